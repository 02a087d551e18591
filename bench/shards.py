#!/usr/bin/env python3
"""A consumer group at scale while it changes: hosts killed with SIGKILL and restarted, shards split
and merged, logs arriving all along (issue 13).

    python bench/shards.py            the full run: 64 shards, 3 hosts x --workers 4 = 12 consumers;
                                      kill -9 one host (4 consumers), start it again, split 4
                                      shards, merge 2 pairs (a few minutes)
    python bench/shards.py --shards 16 --workers 2 --splits 2 --merges 1     the suite's size
                                      (tests/test_shards.py runs simulate() at that size)

What runs: the SLS emulator (tests/sls_emulator.py, its own process) with --shards empty shards; a
TCP syslog receiver in this process; tests/live_logs.py's LogFeeder adding --rate logs/s (one
LogGroup of ten at a time) from start to end; and --hosts "hosts", each `python
sync_waf_to_syslog.py --workers W` with its own SLS_CONSUMER_NAME (host-0, host-1, ...), so the
group has hosts x W consumers (host-0-0, host-0-1, ...), heartbeat --heartbeat seconds.

The changes, one after the other, each once the group has settled from the one before:
  kill      SIGKILL to every worker of host-0 and then to its supervisor (a host that dies)
  restart   host-0 started again (same consumer names)
  split     --splits read-write shards split at once
  merge     --merges pairs of read-write shards merged at once
then the feeder stops, every log is awaited, and the group idles for --idle-seconds.

Figures (printed, and written as JSON with --json):
  * after each change, the seconds (and heartbeat intervals) until every shard the group still
    hands out is held, and listed in its last heartbeat, by exactly one live consumer, and no
    finished read-only shard by any ("one owner"); and until, in addition, every live consumer
    holds its share, ±1 ("balanced");
  * logs lost (must be 0), duplicates, and the unsaved window of the kill: the logs between the
    stored checkpoint and the end of each shard the killed consumers held, at the kill (every
    duplicate must be one of them);
  * the emulator's requests per consumer and second while the group idles (all logs delivered):
    heartbeats, pulls (every one of them a pull of an idle shard), ListShards, checkpoint writes;
    and the pulls per shard and second.
Timings depend on what else runs on the machine (the JSON records the load average).
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.checkpoints import (assignments, checkpoint_positions, group_state, one_owner_each,  # noqa: E402
                               owners, shard_contents, shard_states)
from tests.forwarder_process import ForwarderProcess, forwarder_env  # noqa: E402
from tests.live_logs import LOGS_PER_GROUP, LogFeeder  # noqa: E402
from tests.polling import wait_until  # noqa: E402
from tests.sls_emulator import EmulatorProcess, log_client  # noqa: E402
from tests.syslog_receiver import SyslogReceiver, ids, loss_report  # noqa: E402

SETTLE_TIMEOUT = 180  # seconds a change may take to settle before the run fails


def worker_pids(supervisor_pid):
    with open(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children") as children:
        return [int(pid) for pid in children.read().split()]


def balanced(emulator, live):
    """One owner each, every consumer in `live` (and no other) in the group, each holding its
    share of the shards give or take one."""
    held = {name: len(shards) for name, shards in assignments(emulator).items() if name in live}
    return set(held) == set(live) and max(held.values()) - min(held.values()) <= 1 \
        and one_owner_each(emulator, dead=set(assignments(emulator)) - set(live))


def settle(condition, started, heartbeat):
    """Wait for condition(); its time since `started`, in seconds and heartbeat intervals."""
    wait_until(condition, condition.__doc__ or "the group to settle", SETTLE_TIMEOUT)
    seconds = time.monotonic() - started
    return {"seconds": round(seconds, 1), "heartbeats": round(seconds / heartbeat, 1)}


def request_counts(emulator):
    return dict(emulator.state()["requests"])


def all_saved(emulator):
    """Is every shard that holds logs checkpointed at its end?"""
    checkpoints = group_state(emulator)["checkpoints"]
    return all(checkpoints.get(shard) == info["end_cursor"]
               for shard, info in shard_states(emulator).items() if info["groups"])


def unsaved_window(emulator, dead):
    """(shard -> (checkpoint position, end position)) of every shard the `dead` consumers held or
    listed: the LogGroups a new owner sends again, at most."""
    found, _ = owners(emulator)
    shards = {shard for shard, names in found.items() if names & set(dead)}
    saved, ends = checkpoint_positions(emulator), shard_states(emulator)
    return {shard: (saved.get(shard, 0), ends[str(shard)]["groups"]) for shard in shards}


def simulate(workdir, shards=64, hosts=3, workers=4, splits=4, merges=2, rate=200, heartbeat=2,
             idle_seconds=20, log=print):
    """Run the scenario of the module docstring; returns its figures (a dict)."""
    assert merges <= splits and shards >= 4 * splits, "merged pairs sit between the split shards"
    figures = {"shards": shards, "hosts": hosts, "workers": workers, "consumers": hosts * workers,
               "splits": splits, "merges": merges, "rate": rate, "heartbeat": heartbeat,
               "load_average": os.getloadavg(), "changes": {}}
    names = {host: [f"host-{host}-{w}" for w in range(workers)] for host in range(hosts)}
    everyone = [name for host_names in names.values() for name in host_names]
    with EmulatorProcess(shards=shards) as emulator, SyslogReceiver("tcp") as receiver, \
            LogFeeder(emulator, interval=LOGS_PER_GROUP / rate) as feeder, \
            mock.patch.dict(os.environ, emulator.client_env()):
        def host(number):
            env = forwarder_env(emulator, port=receiver.port, SLS_CONSUMER_NAME=f"host-{number}",
                                SLS_HEARTBEAT_INTERVAL=heartbeat, SLS_MAX_FETCH_GROUPS=10)
            return ForwarderProcess(env, workdir, ["--workers", str(workers)]).start()

        def change(name, make_change, condition):
            started = time.monotonic()
            make_change()
            figures["changes"][name] = {
                "one_owner": settle(lambda: one_owner_each(emulator, dead), started, heartbeat),
                "balanced": settle(condition, started, heartbeat)}
            log(f"{name}: {figures['changes'][name]}")

        dead = set()
        started = time.monotonic()
        forwarders = [host(number) for number in range(hosts)]
        try:
            feeder.start()
            figures["changes"]["start"] = {"balanced": settle(lambda: balanced(emulator, everyone),
                                                              started, heartbeat)}
            log(f"start: {figures['changes']['start']}")

            def kill_host_0():
                supervisor = forwarders[0].process
                for pid in worker_pids(supervisor.pid):
                    os.kill(pid, signal.SIGKILL)
                supervisor.send_signal(signal.SIGKILL)
                supervisor.wait()
                dead.update(names[0])
                figures["unsaved_window"] = unsaved_window(emulator, dead)

            survivors = [name for name in everyone if name not in names[0]]
            change("kill", kill_host_0, lambda: balanced(emulator, survivors))

            def restart_host_0():
                dead.clear()
                forwarders[0] = host(0)

            change("restart", restart_host_0, lambda: balanced(emulator, everyone))
            split_shards = [n * shards // splits for n in range(splits)]
            change("split", lambda: [emulator.split(shard) for shard in split_shards],
                   lambda: balanced(emulator, everyone))
            # Between two split shards: shard + 1 follows it, and neither was split.
            merged = [shard + shards // splits // 2 for shard in split_shards[:merges]]
            change("merge", lambda: [emulator.merge(shard) for shard in merged],
                   lambda: balanced(emulator, everyone))

            sent = feeder.stop()
            wait_until(lambda: loss_report(sent, receiver.messages)["lost"] == 0, "every log", SETTLE_TIMEOUT)
            wait_until(lambda: all_saved(emulator), "the last checkpoints", SETTLE_TIMEOUT)
            before, idle_started = request_counts(emulator), time.monotonic()
            time.sleep(idle_seconds)
            after, idle = request_counts(emulator), time.monotonic() - idle_started
            handed_out = sum(1 for names_of_shard in owners(emulator)[0].values() if names_of_shard)
            per_consumer = {op: round((after.get(op, 0) - before.get(op, 0)) / idle / len(everyone), 3)
                            for op in ("heartbeat", "pull", "list_shards", "checkpoint")}
            figures["idle_requests_per_consumer_second"] = per_consumer
            figures["idle_pulls_per_shard_second"] = round(
                (after.get("pull", 0) - before.get("pull", 0)) / idle / handed_out, 3)
            for forwarder in forwarders:  # all at once: each takes seconds to hand its shards back
                forwarder.process.send_signal(signal.SIGTERM)
            figures["exit_statuses"] = [forwarder.wait(60) for forwarder in forwarders]
        finally:
            for forwarder in forwarders:
                forwarder.__exit__()
        report = loss_report(sent, receiver.messages)
        contents = shard_contents(log_client(emulator), emulator)
        shard_info = shard_states(emulator)
        checkpoints = group_state(emulator)["checkpoints"]
    window = {trace_id for shard, (saved, end) in figures["unsaved_window"].items()
              for group in contents[shard][saved:end] for trace_id in group}
    copies = {}
    for trace_id in ids(receiver.messages):
        copies[trace_id] = copies.get(trace_id, 0) + 1
    figures.update(
        sent=report["sent"], lost=report["lost"], duplicates=report["duplicates"],
        unexpected=report["unexpected"], unsaved_window_logs=len(window),
        duplicates_outside_window=sorted(t for t, n in copies.items() if n > 1 and t not in window)[:10],
        read_only_not_finished=sorted(int(s) for s, info in shard_info.items() if info["status"] == "readonly"
                                      and checkpoints.get(s) != info["end_cursor"]))
    figures["unsaved_window"] = {str(k): v for k, v in figures["unsaved_window"].items()}
    return figures


def print_figures(figures):
    hb = figures["heartbeat"]
    print(f"\n{figures['shards']} shards, {figures['hosts']} hosts x --workers {figures['workers']} = "
          f"{figures['consumers']} consumers, {figures['rate']} logs/s, heartbeat {hb} s "
          f"(load average at start {', '.join(f'{x:.1f}' for x in figures['load_average'])})")
    print(f"{'change':<8} {'one owner per shard':>24} {'balanced':>24}")
    for name, result in figures["changes"].items():
        cells = [f"{r['seconds']:6.1f} s = {r['heartbeats']:5.1f} heartbeats" if r else "-"
                 for r in (result.get("one_owner"), result.get("balanced"))]
        print(f"{name:<8} {cells[0]:>24} {cells[1]:>24}")
    print(f"logs sent {figures['sent']}, lost {figures['lost']}, duplicates {figures['duplicates']} "
          f"(unsaved window of the kill: {figures['unsaved_window_logs']} logs; duplicates outside it: "
          f"{len(figures['duplicates_outside_window'])})")
    print(f"read-only shards not finished: {figures['read_only_not_finished'] or 'none'}")
    rates = figures["idle_requests_per_consumer_second"]
    print("idle group, requests per consumer per second: " + ", ".join(f"{op} {n}" for op, n in rates.items())
          + f"; pulls per shard per second: {figures['idle_pulls_per_shard_second']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="--workers of each host")
    parser.add_argument("--splits", type=int, default=4)
    parser.add_argument("--merges", type=int, default=2)
    parser.add_argument("--rate", type=int, default=200, help="logs per second added")
    parser.add_argument("--heartbeat", type=int, default=2, help="SLS_HEARTBEAT_INTERVAL, seconds")
    parser.add_argument("--idle-seconds", type=float, default=20)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--workdir", default="/tmp", help="where the forwarders' logs and locks go")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir) / f"bench-shards-{os.getpid()}"
    workdir.mkdir(parents=True)
    figures = simulate(workdir, args.shards, args.hosts, args.workers, args.splits, args.merges,
                       args.rate, args.heartbeat, args.idle_seconds)
    print_figures(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ok = figures["lost"] == 0 and not figures["duplicates_outside_window"] \
        and not figures["read_only_not_finished"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
