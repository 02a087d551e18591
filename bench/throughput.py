#!/usr/bin/env python3
"""Throughput, CPU, memory and latency of the forwarder against the SDK's own path.

    python bench/throughput.py                 the full run: a few minutes on 2 cores
    python bench/throughput.py --group-sizes 1,10,200,1000 --logs 600000
                                               the LogGroup-size sweep, then the idle CPU and the
                                               latency: 7-8 minutes on 2 cores once its backlogs
                                               are in --cache-dir (the first run writes them: 11)
    python bench/throughput.py --quick --logs 2000 --shards 2      a smoke run (tests use it)
    python bench/throughput.py --latency       only the end-to-end latency measurement
    python bench/throughput.py --sweep         also try several SLS_FETCH_BYTES values

What runs: the SLS emulator (tests/sls_emulator.py, its own process) preloaded with --logs
realistic 55-field WAF logs (tests/waf_logs.py; the JSONL, and the LogGroups the emulator encodes
from it, are written once and cached in --cache-dir: a later run loads a backlog in seconds, not half
a minute) over --shards shards, and for every variant a fresh counting syslog receiver
(tests/syslog_receiver.py, its own process; TCP octet-counted or newline-framed, or UDP) and a
fresh consumer group, so every variant consumes every log:

  baseline      Alibaba's sample: ConsumerWorker + loggroups_to_flattern_list + SyslogClientRFC5424
                opened once per batch (bench/baseline_processor.py)
  forwarder_1   python sync_waf_to_syslog.py, one process
  forwarder_N   the same with --workers N processes (or, if the forwarder has no --workers yet,
                N forwarders with different SLS_CONSUMER_NAME in one group, which is what
                --workers does)

All use the same SDK settings (--fetch-interval, --max-fetch-groups, --pool-size; defaults are
the forwarder's) and a short heartbeat (2 s, or two fetch intervals). How a variant is measured:

* Start-up and the consumer group's rebalancing are kept out of the measurement: the emulator
  answers every PullLogs with an error until the group has given every shard to the variant's
  consumers and they confirmed them in a heartbeat; then pulls flow.
* logs/s: messages counted by the receiver / (last receipt - first receipt), receiver clock.
* CPU s per 1,000 logs: user+system time of the variant's process tree (/proc/PID/stat of every
  process and its descendants) from the moment pulls flow until the receiver has every log.
* peak RSS: VmHWM of each process (/proc/PID/status) when the receiver has every log; the table
  shows the largest process, the JSON also the sum over processes.
* the same window's CPU of the emulator and the receiver, and how busy the whole machine was
  (/proc/stat; "machine busy" in cores): the cores are shared with them and with anything else.
* ratios: throughput / baseline throughput, and baseline CPU per log / this CPU per log.

Then, in this process: the encoder alone (read_log_groups + MessageEncoder.encode from the bytes of
one pull of the same logs, next to the SDK's protobuf parse and the sample's parse + flatten +
formatting), a cProfile of the encoder, and, when py-spy is installed, a py-spy profile of every 1-process run
while it runs (self and inclusive sample shares per function). Last, end-to-end latency on a fresh empty
emulator: a writer adds --latency-rate logs/s (batches every 0.1 s, each log carrying its send
time in `bench_sent_at`) for --latency-seconds to one forwarder process; an in-process receiver
records arrival times; p50/p90/p99/max of (arrival - send).

It prints a table and writes everything as JSON (--json, default bench/results/throughput.json).
Timing numbers depend on what else runs on the machine: the JSON records the load average.
"""
import argparse
import collections
import contextlib
import cProfile
import dataclasses
import functools
import importlib.util
import json
import math
import os
import platform
import pstats
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import baseline_processor  # noqa: E402
from tests.forwarder_process import SCRIPT, ForwarderProcess, forwarder_env  # noqa: E402
from tests.sls_emulator import EmulatorProcess  # noqa: E402
from tests.syslog_receiver import ReceiverProcess, SyslogReceiver  # noqa: E402
from tests.waf_logs import pull_body, realistic_logs, write_jsonl  # noqa: E402

BASELINE_SCRIPT = ROOT / "bench" / "baseline_processor.py"
DEFAULT_JSON = ROOT / "bench" / "results" / "throughput.json"
LOG_START_TIME = 1_767_225_600  # fixed, so the cached JSONL is the same file every run
# A 4xx the SDK neither retries inside the request nor sleeps on (it does both for 5xx and 403):
# the pull fails at once, the thread is free for the shard releases of a rebalance.
PULL_GATE = dict(op="pull", action="error", status=400, errorCode="BenchmarkGateClosed",
                 errorMessage="benchmark: waiting for the consumer group to settle")
# SLS_FETCH_BYTES values --sweep tries on forwarder_1 (the default was chosen from such runs):
# a bigger pull means fewer requests and rounds per log, and more memory.
SWEEP = ("256K", "512K", "1M", "2M", "4M", "8M")
# --group-sizes: logs a LogGroup holds in each shape of the backlog, and the encodings measured
# end to end (on the shape given by --encodings-shape) besides kv.
ENCODINGS = ("json", "cef", "leef")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class PreloadedEmulator(EmulatorProcess):
    STARTUP_TIMEOUT = 900  # it parses and encodes every preloaded log before it answers


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ================================================================================================
# Test data
# ================================================================================================

def cached_logs_file(count, seed, cache_dir, group_size=None):
    """JSONL of `count` realistic WAF logs; written once per (count, seed, group size) and reused.
    With group_size, logs come as SLS stores them: each run of group_size logs shares its topic,
    source and tags (a __receive_time__ of its own), so the emulator (--group-size) keeps it as one
    LogGroup; without, ten logs a second share one receive time (tests/waf_logs.py)."""
    shape = f"-groups{group_size}" if group_size else ""
    path = Path(cache_dir) / f"waf-bench-{count}-seed{seed}{shape}.jsonl"
    if not path.exists():
        log(f"writing {count} realistic WAF logs to {path} (once; later runs reuse it)")
        logs = realistic_logs(count, seed=seed, start_time=LOG_START_TIME)
        if group_size:
            for index, entry in enumerate(logs):
                entry["__tag__:__receive_time__"] = str(LOG_START_TIME + index // group_size)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        write_jsonl(temporary, logs)
        os.replace(temporary, path)
    return path


# ================================================================================================
# Process accounting from /proc
# ================================================================================================

def process_tree(roots):
    """The pids of `roots` and of all their living descendants."""
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read_stat(int(entry))
            if stat:
                children[int(stat[1])].append(int(entry))  # stat[1] is the parent pid
    found, pending = [], list(roots)
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, ()))
    return found


def _read_stat(pid):
    """/proc/PID/stat after the command name (field 3 on), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pids):
    """Per pid: (user, system) CPU seconds so far."""
    times = {}
    for pid in pids:
        stat = _read_stat(pid)
        if stat:
            times[pid] = (int(stat[11]) / CLOCK_TICKS, int(stat[12]) / CLOCK_TICKS)  # utime, stime
    return times


def cpu_used(before, after, pids):
    """(user, system) CPU seconds that `pids` used between two cpu_seconds() samples."""
    deltas = [(after[pid][0] - before.get(pid, (0.0, 0.0))[0], after[pid][1] - before.get(pid, (0.0, 0.0))[1])
              for pid in pids if pid in after]
    return sum(user for user, _ in deltas), sum(system for _, system in deltas)


def machine_busy_seconds():
    """CPU seconds all cores of the machine have been busy (not idle, not waiting for I/O)."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    idle, iowait = ticks[3], ticks[4]
    return (sum(ticks[:8]) - idle - iowait) / CLOCK_TICKS  # user..steal; guest time is in user


def peak_rss_mb(pid):
    """VmHWM (the largest resident set so far) of a process, in MB; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# ================================================================================================
# One variant: consumers of a fresh group, until the receiver has every log
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class SdkSettings:
    fetch_interval: float
    max_fetch_groups: int
    pool_size: int

    @property
    def heartbeat_interval(self):
        """Short, so the group rebalances in seconds, but at least two fetch rounds: the SDK's
        worker only forgets a shard it has started a consumer for, so a shard given and taken back
        between two rounds stays in its heartbeat for ever and the group never settles."""
        return max(2, math.ceil(2 * self.fetch_interval))

    def __str__(self):
        groups = self.max_fetch_groups or "default"
        return f"fetch interval {self.fetch_interval:g} s, {groups} groups per fetch, pool {self.pool_size}"

    def environment(self):
        """The variables; without max_fetch_groups each program keeps its own (the forwarder fetches
        by volume, up to 1000 LogGroups; the baseline asks for the SDK's 1000)."""
        groups = {"SLS_MAX_FETCH_GROUPS": self.max_fetch_groups} if self.max_fetch_groups else {}
        return {"SLS_FETCH_INTERVAL": self.fetch_interval, "SLS_WORKER_POOL_SIZE": self.pool_size,
                "SLS_HEARTBEAT_INTERVAL": self.heartbeat_interval, **groups}


@dataclasses.dataclass(frozen=True)
class Variant:
    key: str
    label: str
    script: Path
    processes: int = 1            # consumers in the group
    native_workers: bool = False  # the script runs them itself (--workers N)
    env: tuple = ()               # (variable, value) pairs of its own, e.g. SYSLOG_ENCODING


def forwarder_variants(key, name, script, workers):
    """One process, and `workers` processes: with --workers if the script has it, else as
    separate processes with their own SLS_CONSUMER_NAME (what --workers does)."""
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                               timeout=60).stdout
    return [Variant(f"{key}_1", f"{name}, 1 process", Path(script)),
            Variant(f"{key}_n", f"{name}, {workers} processes", Path(script), workers, "--workers" in help_text)]


def variant_processes(variant, env, workdir):
    """The variant's ForwarderProcess objects, not started yet."""
    script = [str(variant.script)]
    if variant.processes == 1:
        return [ForwarderProcess(env, workdir, python_args=script)]
    if variant.native_workers:
        return [ForwarderProcess(env, workdir, python_args=script, args=["--workers", str(variant.processes)])]
    return [ForwarderProcess({**env, "SLS_CONSUMER_NAME": f"{env['SLS_CG']}-{i}"}, workdir, python_args=script)
            for i in range(variant.processes)]


def group_settled(emulator, group, consumers):
    """True when `consumers` consumers hold every shard of the group and confirmed them."""
    store = emulator.state()["logstores"][emulator.logstore]
    state = store["consumer_groups"].get(group)
    if not state or len(state["consumers"]) != consumers:
        return False
    held = sorted(shard for shards in state["consumers"].values() for shard in shards)
    if held != sorted(int(shard) for shard in store["shards"]):
        return False
    return all(sorted(beat["listed"]) == state["consumers"][name] and not beat["releasing"]
               for name, beat in state["heartbeats"].items())


def wait_until(condition, timeout, what, processes=()):
    deadline = time.monotonic() + timeout
    while not condition():
        for process in processes:
            if process.process.poll() is not None:
                raise RuntimeError(f"{what}: a process exited with {process.process.returncode}:\n"
                                   f"{process.stderr()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


def wait_for_delivery(receiver, expected, idle_timeout):
    """Receiver stats once it counted `expected` messages, or once it got nothing new for
    idle_timeout seconds (then the caller reports the shortfall)."""
    last_count, last_change = -1, time.monotonic()
    while True:
        stats = receiver.stats()
        if stats["count"] >= expected:
            return stats
        if stats["count"] != last_count:
            last_count, last_change = stats["count"], time.monotonic()
        elif time.monotonic() - last_change > idle_timeout:
            return stats
        time.sleep(0.2)


def run_variant(variant, emulator, total, args, sdk, profiler=None):
    """Measure one variant; returns its result dict. `profiler(pid)` -> context manager that
    samples the first process while logs flow (py-spy)."""
    group = f"bench-{variant.key}-{os.getpid()}-{time.monotonic_ns()}"
    log(f"{variant.label}: consumer group {group}")
    with contextlib.ExitStack() as cleanup:
        workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-"))
        receiver = cleanup.enter_context(ReceiverProcess(args.protocol))
        env = forwarder_env(emulator, port=receiver.port, protocol=args.protocol, SLS_CG=group,
                            SLS_CONSUMER_NAME=f"{group}-0",
                            SYSLOG_SEP=args.separator, SYNC_STATS_INTERVAL=0,
                            **{**sdk.environment(), **dict(variant.env)})  # the variant's own win
        emulator.inject(**PULL_GATE)
        cleanup.callback(emulator.clear_faults)
        processes = variant_processes(variant, env, workdir)
        for process in processes:
            cleanup.enter_context(process)  # starts it; kills it at the end if still running
        wait_until(lambda: group_settled(emulator, group, variant.processes), 120,
                   f"{variant.label}: consumer group settling", processes)
        roots = [p.process.pid for p in processes]
        helpers = {"emulator": emulator.process.pid, "receiver": receiver.process.pid}
        cpu_before = cpu_seconds(process_tree(roots) + list(helpers.values()))
        machine_before, released = machine_busy_seconds(), time.time()
        emulator.clear_faults()
        with profiler(roots[0]) if profiler else contextlib.nullcontext():
            stats = wait_for_delivery(receiver, total, args.idle_timeout)
        pids = process_tree(roots)
        cpu_after = cpu_seconds(pids + list(helpers.values()))
        machine_busy = machine_busy_seconds() - machine_before
        rss = [peak_rss_mb(pid) for pid in pids]
        time.sleep(0.5)  # let any duplicate arrive before the final count
        received = receiver.stats()["count"]
        exit_codes = [p.stop(timeout=60) for p in processes]
    count = stats["count"]
    user, system = cpu_used(cpu_before, cpu_after, pids)
    cpu = user + system
    span = (stats["last_time"] - stats["first_time"]) if count else 0.0
    result = {
        "label": variant.label, "processes": len(pids), "consumers": variant.processes, "sent": total,
        "received": received, "complete": count >= total,
        "logs_per_s": round(count / span) if span > 0 else None,
        "first_to_last_receipt_s": round(span, 3),
        "release_to_last_receipt_s": round(stats["last_time"] - released, 3) if count else None,
        "cpu_s": round(cpu, 3), "cpu_user_s": round(user, 3), "cpu_system_s": round(system, 3),
        # the same machine's cores also run these while logs flow; machine_busy_cpu_s counts every
        # process on the machine (the others too) in the same time
        **{f"{name}_cpu_s": round(sum(cpu_used(cpu_before, cpu_after, [pid])), 3) for name, pid in helpers.items()},
        "machine_busy_cpu_s": round(machine_busy, 3),
        "cpu_s_per_1000_logs": round(cpu / count * 1000, 4) if count else None,
        "peak_rss_mb_max": round(max(rss), 1), "peak_rss_mb_sum": round(sum(rss), 1),
        "exit_codes": exit_codes,
    }
    log(f"{variant.label}: {received}/{total} logs, {result['logs_per_s']} logs/s, "
        f"{result['cpu_s_per_1000_logs']} CPU s/1000 logs, peak RSS {result['peak_rss_mb_max']} MB")
    return result


def measure_variant(variant, emulator, total, args, sdk, profiler=None):
    """run_variant, or a result that records why it failed (the other variants still run)."""
    try:
        return run_variant(variant, emulator, total, args, sdk, profiler)
    except (RuntimeError, AssertionError, OSError) as exc:
        log(f"{variant.label}: FAILED: {exc}")
        return {"label": variant.label, "processes": variant.processes, "sent": total, "received": None,
                "complete": False, "error": str(exc), "logs_per_s": None, "cpu_s_per_1000_logs": None,
                "peak_rss_mb_max": None, "peak_rss_mb_sum": None}


def ratios(results, baseline_key="baseline"):
    """Throughput and CPU-per-log of each variant relative to the baseline."""
    base = results.get(baseline_key)
    if not base or not base["logs_per_s"] or not base["cpu_s_per_1000_logs"]:
        return {}
    out = {}
    for key, result in results.items():
        if key == baseline_key or not result["logs_per_s"] or not result["cpu_s_per_1000_logs"]:
            continue
        out[key] = {
            "throughput_x": round(result["logs_per_s"] / base["logs_per_s"], 2),
            "cpu_per_log_x_less": round(base["cpu_s_per_1000_logs"] / result["cpu_s_per_1000_logs"], 2),
        }
    return out


# ================================================================================================
# py-spy of the 1-process runs, cProfile and speed of the encoder alone
# ================================================================================================

PLUMBING = re.compile(r"\((threading\.py|concurrent/futures/thread\.py)\)$")


@contextlib.contextmanager
def py_spy(pid, raw_output, rate=100):
    """Sample `pid` with py-spy (non-blocking: the process is never paused) inside the block."""
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw", "--nonblocking",
                            "--rate", str(rate), "--output", str(raw_output)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.communicate()


def summarise_py_spy(raw_output, top=15):
    """Shares of samples per function from py-spy's collapsed stacks ("f1 (file:line);f2 ... N").

    self: the function was executing; inclusive: it was anywhere on the stack (thread and
    executor plumbing left out, it is on every stack)."""
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    with open(raw_output) as stacks:
        for line in stacks:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]  # drop line numbers
            total += int(count)
            own[frames[-1]] += int(count)
            for frame in set(frames):
                if not PLUMBING.search(frame):
                    inclusive[frame] += int(count)

    def shares(counter):
        return [{"function": name, "share": round(n / total, 3)} for name, n in counter.most_common(top)]

    return {"samples": total, "self": shares(own), "inclusive": shares(inclusive)}


def load_forwarder(name, script):
    """A forwarder script (--forwarder, --candidate) as a module, for its encoder."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def encoder_settings(forwarder, separator, encoding="kv"):
    return forwarder.Settings.from_environment({
        "SLS_ENDPOINT": "bench.invalid", "SLS_REGION": "cn-hangzhou", "SLS_AK_ID": "id", "SLS_AK_KEY": "key",
        "SLS_PROJECT": "p", "SLS_LOGSTORE": "l", "SYSLOG_HOST": "127.0.0.1", "SYSLOG_SEP": separator,
        "SYSLOG_ENCODING": encoding})


def best_rate(function, count, repeats):
    """Items per CPU second of the fastest of `repeats` calls (CPU time of this process, so other
    processes on the machine disturb it less than wall-clock time)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        function()
        best = min(best, time.process_time() - started)
    return round(count / best)


def sample_pull(count, seed, optional_fields=0):
    """The uncompressed body of a pull (a serialized LogGroupList) of `count` realistic logs; each
    of their last `optional_fields` fields is left out of a log with probability 1/2, as WAF leaves
    out the fields of modules that did not act (so logs differ in their sets of keys)."""
    logs = realistic_logs(count, seed=seed, start_time=LOG_START_TIME)
    if optional_fields:
        rng = random.Random(seed)
        optional = set(list(logs[0])[-optional_fields:])
        logs = [{k: v for k, v in entry.items() if k not in optional or rng.random() < 0.5} for entry in logs]
    return pull_body(logs)


def read_and_encode(forwarder, encoder, raw):
    """A forwarder's messages from the bytes of a pull, as its processor makes them."""
    return encoder.encode(forwarder.read_log_groups(raw))


def measure_encoder(forwarders, count, separator, repeats):
    """logs/s of each in-process step from the bytes of one pull of `count` 55-field logs to the
    messages: the SDK's parse, the baseline's parse + flatten + format, each forwarder's
    read_log_groups + encode."""
    from aliyun.log.proto import LogGroupList

    raw, varying = sample_pull(count, seed=11), sample_pull(count, seed=11, optional_fields=20)
    rates = {
        "sdk_protobuf_parse": best_rate(lambda: LogGroupList.FromString(raw), count, repeats),
        "baseline_parse_flatten_format": best_rate(
            lambda: baseline_processor.format_batch(LogGroupList.FromString(raw), separator), count, repeats),
    }
    message_bytes = {}
    for name, forwarder in forwarders.items():
        encoder = forwarder.MessageEncoder(encoder_settings(forwarder, separator))
        message_bytes[name] = round(sum(map(len, read_and_encode(forwarder, encoder, raw)[0])) / count)
        rates[f"{name}_read_and_encode"] = best_rate(
            lambda: read_and_encode(forwarder, encoder, raw), count, repeats)
        rates[f"{name}_read_and_encode_varying_keys"] = best_rate(
            lambda: read_and_encode(forwarder, encoder, varying), count, repeats)
    # Each SYSLOG_ENCODING of the forwarder under test (SIEM formats cost more per field than kv).
    forwarder = forwarders["forwarder"]
    encodings = {}
    for encoding in ("kv", "json", "cef", "leef"):
        encoder = forwarder.MessageEncoder(encoder_settings(forwarder, separator, encoding))
        encodings[encoding] = best_rate(lambda: read_and_encode(forwarder, encoder, raw), count, repeats)
    # kv when an operator has edited customize() (here: a copy of the fields, changing nothing), so
    # every log takes the reference path: what the README says an edit costs.
    encoder = forwarder.MessageEncoder(encoder_settings(forwarder, separator))
    encoder.customize, encoder.fast = list, False
    encodings["kv_with_edited_customize"] = best_rate(lambda: read_and_encode(forwarder, encoder, raw),
                                                      count, repeats)
    return {"logs": count, "protobuf_bytes_per_log": round(len(raw) / count),
            "message_bytes_per_log": message_bytes, "logs_per_s": rates,
            "logs_per_s_by_encoding": encodings}


def profile_encoder(forwarder, count, separator, top=12):
    """cProfile of read_log_groups + MessageEncoder.encode over one pull: the functions with the most
    own time."""
    raw = sample_pull(count, seed=12)
    encoder = forwarder.MessageEncoder(encoder_settings(forwarder, separator))
    profiler = cProfile.Profile()
    profiler.runcall(read_and_encode, forwarder, encoder, raw)
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return {"logs": count, "seconds_under_profiler": round(total, 3), "top_own_time": [
        {"function": f"{Path(file).name}:{line}({name})", "calls": calls, "own_s": round(own, 3),
         "cumulative_s": round(cumulative, 3), "share": round(own / total, 3)}
        for (file, line, name), (_, calls, own, cumulative, _) in rows]}


# ================================================================================================
# End-to-end latency at a steady rate
# ================================================================================================

SENT_AT = re.compile(rb"bench_sent_at=([0-9.]+)")


def percentile(sorted_values, fraction):
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def measure_latency(args, sdk):
    """Write --latency-rate logs/s into an empty emulator, each stamped with its send time;
    one forwarder process; latency = arrival at the receiver - send time."""
    rate, seconds, interval = args.latency_rate, args.latency_seconds, 0.1
    per_batch = max(1, round(rate * interval))
    batches = max(1, round(seconds / interval))
    total = per_batch * batches
    logs = realistic_logs(total, seed=13)
    latencies = []
    with contextlib.ExitStack() as cleanup:
        workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-latency-"))
        emulator = cleanup.enter_context(EmulatorProcess(shards=args.shards))
        receiver = cleanup.enter_context(SyslogReceiver(args.protocol, store=True))
        group = "bench-latency"
        env = forwarder_env(emulator, port=receiver.port, protocol=args.protocol, SLS_CG=group,
                            SLS_CONSUMER_NAME=f"{group}-0",
                            SYSLOG_SEP=args.separator, SYNC_STATS_INTERVAL=0, **sdk.environment())
        forwarder = cleanup.enter_context(ForwarderProcess(env, workdir, python_args=[str(args.forwarder)]))
        wait_until(lambda: group_settled(emulator, group, 1), 60, "latency: consumer group", [forwarder])
        time.sleep(2)  # shard consumers have initialised their cursors
        log(f"latency: writing {rate} logs/s for {seconds} s ({per_batch} logs every {interval} s)")

        def collect():
            seen = 0
            while seen < total and not collector_stop.is_set():
                messages = receiver.wait_for(seen + 1, timeout=0.2)
                now = time.time()
                for message in messages[seen:]:
                    match = SENT_AT.search(message)
                    if match:
                        latencies.append(now - float(match.group(1)))
                seen = len(messages)

        collector_stop = threading.Event()
        collector = threading.Thread(target=collect, daemon=True)
        collector.start()
        started = time.monotonic()
        for batch in range(batches):
            time.sleep(max(0.0, started + batch * interval - time.monotonic()))
            sent_at = time.time()
            emulator.add_logs([dict(entry, __time__=str(int(sent_at)), bench_sent_at=f"{sent_at:.6f}")
                               for entry in logs[batch * per_batch:(batch + 1) * per_batch]])
        writing = time.monotonic() - started
        collector.join(timeout=args.idle_timeout)
        collector_stop.set()
        collector.join()
        exit_code = forwarder.stop(timeout=60)
    latencies.sort()
    result = {"rate_requested": rate, "rate_written": round(total / writing), "seconds": seconds,
              "sent": total, "received": len(latencies), "forwarder_exit_code": exit_code}
    if latencies:
        result.update({f"{name}_s": round(percentile(latencies, fraction), 3) for name, fraction in
                       (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}, max_s=round(latencies[-1], 3))
    log(f"latency: {result}")
    return result


# ================================================================================================
# Report
# ================================================================================================

def machine():
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    from google.protobuf.internal import api_implementation
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "protobuf": api_implementation.Type()}


def print_variants(variants, variant_ratios):
    print(f"\n{'variant':44} {'procs':>5} {'logs/s':>8} {'CPU s/1k logs':>13} "
          f"{'RSS MB max/sum':>15} {'received/sent':>15} {'machine busy':>12}")
    for result in variants.values():
        if "error" in result:
            print(f"{result['label']:44} FAILED: {result['error'][:200]}")
            continue
        rss = f"{result['peak_rss_mb_max']:.0f}/{result['peak_rss_mb_sum']:.0f}"
        busy = result["machine_busy_cpu_s"] / max(result["release_to_last_receipt_s"] or 0, 1e-3)
        print(f"{result['label']:44} {result['processes']:>5} {result['logs_per_s'] or '-':>8} "
              f"{result['cpu_s_per_1000_logs'] or '-':>13} {rss:>15} "
              f"{result['received']:>7}/{result['sent']:<7} {busy:>6.2f} cores")
    for key, ratio in variant_ratios.items():
        print(f"{variants[key]['label']}: {ratio['throughput_x']}x the baseline's logs/s, "
              f"{ratio['cpu_per_log_x_less']}x less CPU per log")


def print_table(report):
    if report.get("variants"):
        print_variants(report["variants"], report.get("ratios", {}))
    for shape in report.get("group_sizes", {}).values():
        print_variants(shape["variants"], shape["ratios"])
    if "idle" in report:
        idle = report["idle"]
        print(f"\nidle: {idle['core_percent']}% of one core with {idle['shards']} idle shards "
              f"({idle['cpu_s']} CPU s in {idle['seconds']} s)")
    if "encoder" in report:
        rates = ", ".join(f"{name} {value}" for name, value in report["encoder"]["logs_per_s"].items())
        print(f"\nin-process logs/s over {report['encoder']['logs']} logs: {rates}")
        print(f"forwarder encoder by SYSLOG_ENCODING, logs/s: {report['encoder']['logs_per_s_by_encoding']}")
    for name, profile in report.get("encoder_profile", {}).items():
        print(f"{name} encoder, cProfile own time: " + ", ".join(
            f"{row['function']} {row['share']:.0%}" for row in profile["top_own_time"][:6]))
    for key, profile in report.get("py_spy", {}).items():
        print(f"{key} py-spy, self: " + ", ".join(
            f"{row['function']} {row['share']:.0%}" for row in profile["self"][:6]))
    for row in report.get("sweep", []):
        print(f"sweep SLS_FETCH_BYTES={row['fetch_bytes']}: {row['logs_per_s']} logs/s, "
              f"{row['cpu_s_per_1000_logs']} CPU s/1k logs, RSS {row['peak_rss_mb_max']} MB")
    if "latency" in report:
        latency = report["latency"]
        print(f"latency at {latency['rate_written']} logs/s: p50 {latency.get('p50_s')} s, "
              f"p99 {latency.get('p99_s')} s, max {latency.get('max_s')} s "
              f"({latency['received']}/{latency['sent']} received)")


# ================================================================================================
# Program
# ================================================================================================

def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--logs", type=int, default=200_000, help="logs preloaded (default 200000)")
    parser.add_argument("--shards", type=int, default=4, help="shards of the logstore (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="processes of forwarder_N (default 2)")
    parser.add_argument("--protocol", choices=("tcp", "udp"), default="tcp")
    parser.add_argument("--separator", default=",", help="SYSLOG_SEP of every variant (default ,)")
    parser.add_argument("--fetch-interval", type=float, default=0.02, help="SLS_FETCH_INTERVAL (default 0.02, the forwarder's)")
    parser.add_argument("--max-fetch-groups", type=int,
                        help="SLS_MAX_FETCH_GROUPS of every variant (default: each its own: the forwarder "
                             "fetches by volume up to 1000 LogGroups, the baseline asks for the SDK's 1000)")
    parser.add_argument("--pool-size", type=int, default=2, help="SLS_WORKER_POOL_SIZE (default 2)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="result file (default %(default)s)")
    parser.add_argument("--forwarder", default=str(SCRIPT),
                        help="the forwarder script to measure (default %(default)s)")
    parser.add_argument("--candidate", metavar="SCRIPT",
                        help="also measure this forwarder script (e.g. a patched copy) in the same run")
    parser.add_argument("--cache-dir", default=tempfile.gettempdir(),
                        help="where the JSONL and the emulator's LogGroups encoded from it are cached")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--idle-timeout", type=float, default=60,
                        help="give up on a variant after this many seconds without a new log")
    parser.add_argument("--latency", action="store_true", help="run only the latency measurement")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument("--latency-rate", type=int, default=2000, help="logs/s written (default 2000)")
    parser.add_argument("--latency-seconds", type=float, default=20, help="seconds written (default 20)")
    parser.add_argument("--sweep", action="store_true",
                        help="also measure forwarder_1 (candidate_1 if given) with several SDK settings")
    parser.add_argument("--group-sizes", type=lambda text: [int(size) for size in text.split(",")],
                        help="instead of the default run: the LogGroup-size sweep, e.g. 1,10,200,1000 "
                             "(with --logs 600000: the backlog forwarder_1 drains)")
    parser.add_argument("--rate-logs", type=int, default=150_000,
                        help="--group-sizes: logs the baseline is measured over (default 150000)")
    parser.add_argument("--encodings-shape", type=int, default=10,
                        help="--group-sizes: the LogGroup size json, cef and leef are measured on (default 10)")
    parser.add_argument("--idle-seconds", type=float, default=30, help="seconds the idle CPU is measured (default 30)")
    parser.add_argument("--no-py-spy", action="store_true", help="do not profile the 1-process runs with py-spy")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: small encoder sample, 3 s of latency, no py-spy")
    args = parser.parse_args(argv)
    if args.quick:
        args.latency_seconds = min(args.latency_seconds, 3)
        args.no_py_spy = True
    return args


def forwarder_scripts(args):
    """{"forwarder": path, "candidate": path (if --candidate)}."""
    return {name: script for name, script in (("forwarder", args.forwarder), ("candidate", args.candidate))
            if script}


def run_throughput(args, sdk, report, workdir):
    variants = [Variant("baseline", "baseline (SDK sample path)", BASELINE_SCRIPT)]
    for name, script in forwarder_scripts(args).items():
        variants += forwarder_variants(name, name, script, args.workers)
    report["settings"]["n_processes_mode"] = {
        v.key: "--workers" if v.native_workers else "separate processes" for v in variants if v.processes > 1}
    use_py_spy = not args.no_py_spy and shutil.which("py-spy")
    data = cached_logs_file(args.logs, args.seed, args.cache_dir)
    log(f"starting the emulator with {args.logs} logs on {args.shards} shards")
    with PreloadedEmulator(shards=args.shards, load=[str(data)], extra_args=["--load-cache", args.cache_dir]) as emulator:
        total = sum(shard["logs"] for shard in emulator.state()["logstores"][emulator.logstore]["shards"].values())
        results, spy_outputs = {}, {}
        for variant in variants:
            profiler = None
            if use_py_spy and variant.processes == 1:
                spy_outputs[variant.key] = Path(workdir) / f"{variant.key}.pyspy"
                profiler = functools.partial(py_spy, raw_output=spy_outputs[variant.key])
            results[variant.key] = measure_variant(variant, emulator, total, args, sdk, profiler)
        report["variants"], report["ratios"] = results, ratios(results)
        report["py_spy"] = {key: summarise_py_spy(path) for key, path in spy_outputs.items() if path.exists()}
        if args.sweep:
            swept = variants[-2]  # the 1-process run of the candidate, else of the forwarder
            report["sweep"] = []
            for fetch_bytes in SWEEP:
                variant = dataclasses.replace(swept, label=f"{swept.label}, SLS_FETCH_BYTES={fetch_bytes}",
                                              env=(("SLS_FETCH_BYTES", fetch_bytes),))
                report["sweep"].append({"fetch_bytes": fetch_bytes, **measure_variant(variant, emulator, total, args, sdk)})


def run_group_size_sweep(args, sdk, report):
    """--group-sizes: for each LogGroup size, a backlog of --logs logs of that shape on --shards
    shards; the baseline measured over the first --rate-logs logs (it takes long enough for its
    start to weigh little), every forwarder variant over the whole backlog (a second's start in a
    4 s run cut --workers 2's rate by a third; forwarder_1's peak RSS is while it drains it); on the
    --encodings-shape backlog also json, cef and leef end to end against the same baseline."""
    script = Path(args.forwarder)
    report["group_sizes"] = {}
    for size in args.group_sizes:
        data = cached_logs_file(args.logs, args.seed, args.cache_dir, group_size=size)
        log(f"LogGroups of {size} logs: starting the emulator with {args.logs} logs on {args.shards} shards")
        with PreloadedEmulator(shards=args.shards, load=[str(data)],
                               extra_args=["--group-size", str(size), "--load-cache", args.cache_dir]) as emulator:
            total = sum(shard["logs"] for shard in emulator.state()["logstores"][emulator.logstore]["shards"].values())
            first = min(total, args.rate_logs)
            runs = [(Variant("baseline", f"baseline, groups of {size}", BASELINE_SCRIPT), first),
                    (Variant("forwarder_1", f"forwarder, 1 process, groups of {size}", script), total),
                    (Variant("forwarder_n", f"forwarder, {args.workers} processes, groups of {size}", script,
                             args.workers, native_workers=True), total)]
            if size == args.encodings_shape:
                runs += [(Variant(f"forwarder_1_{encoding}", f"forwarder, 1 process, {encoding}, groups of {size}",
                                  script, env=(("SYSLOG_ENCODING", encoding),)), total) for encoding in ENCODINGS]
            results = {variant.key: measure_variant(variant, emulator, count, args, sdk) for variant, count in runs}
        report["group_sizes"][size] = {"logs": total, "variants": results, "ratios": ratios(results)}


def measure_idle(args, sdk):
    """CPU of one forwarder process holding --shards shards that receive no logs."""
    with contextlib.ExitStack() as cleanup:
        workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-idle-"))
        emulator = cleanup.enter_context(EmulatorProcess(shards=args.shards))
        receiver = cleanup.enter_context(SyslogReceiver(args.protocol))
        env = forwarder_env(emulator, port=receiver.port, protocol=args.protocol, SLS_CG="bench-idle",
                            SLS_CONSUMER_NAME="bench-idle-0", SYNC_STATS_INTERVAL=0, **sdk.environment())
        forwarder = cleanup.enter_context(ForwarderProcess(env, workdir, python_args=[str(args.forwarder)]))
        wait_until(lambda: group_settled(emulator, "bench-idle", 1), 60, "idle: consumer group", [forwarder])
        time.sleep(5)  # past the shard consumers' start
        pids = process_tree([forwarder.process.pid])
        before, started = cpu_seconds(pids), time.monotonic()
        time.sleep(args.idle_seconds)
        cpu = sum(cpu_used(before, cpu_seconds(pids), pids))
        seconds = time.monotonic() - started
        forwarder.stop(timeout=60)
    result = {"shards": args.shards, "seconds": round(seconds, 1), "cpu_s": round(cpu, 3),
              "core_percent": round(100 * cpu / seconds, 2)}
    log(f"idle: {result}")
    return result


def main(argv=None):
    args = parse_arguments(argv)
    sdk = SdkSettings(args.fetch_interval, args.max_fetch_groups, args.pool_size)
    report = {"machine": machine(), "load_average_before": os.getloadavg(),
              "settings": {**forwarder_scripts(args), "logs": args.logs, "shards": args.shards,
                           "workers": args.workers, "protocol": args.protocol, "separator": args.separator,
                           "heartbeat_interval": sdk.heartbeat_interval, **dataclasses.asdict(sdk)}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        if args.group_sizes:
            run_group_size_sweep(args, sdk, report)
            report["idle"] = measure_idle(args, sdk)
        elif not args.latency:
            run_throughput(args, sdk, report, workdir)
        if not args.latency:
            sample = min(args.logs, 2_000 if args.quick else 20_000)
            log(f"encoder alone and its profile over {sample} logs")
            forwarders = {name: load_forwarder(name, script) for name, script in forwarder_scripts(args).items()}
            report["encoder"] = measure_encoder(forwarders, sample, args.separator, repeats=1 if args.quick else 3)
            report["encoder_profile"] = {name: profile_encoder(forwarder, sample, args.separator)
                                         for name, forwarder in forwarders.items()}
        if args.latency or not args.no_latency:
            report["latency"] = measure_latency(args, sdk)
    report["load_average_after"] = os.getloadavg()
    report["seconds"] = round(time.monotonic() - started, 1)
    print_table(report)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.json} ({report['seconds']} s)")
    results = [*report.get("variants", {}).values(),
               *(result for shape in report.get("group_sizes", {}).values() for result in shape["variants"].values())]
    return 0 if all(result["complete"] for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
