"""A stop is honoured whatever a batch does (issue 18): SIGTERM ends the forwarder within
SYNC_STOP_TIMEOUT even while a batch never finishes, and says so; --workers kills a worker that
does not stop; a worker whose supervisor died stops although its pulls hang. A batch that takes
long is reported while it lasts."""
import contextlib
import os
import signal
import subprocess
import sys

import pytest

from tests.checkpoints import assignments
from tests.forwarder_process import SCRIPT, ForwarderProcess, forwarder_env, with_fault
from tests.polling import wait_until
from tests.syslog_receiver import SyslogReceiver
from tests.waf_logs import realistic_logs, write_jsonl

pytestmark = pytest.mark.slow


def child_pids(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def running(pid):
    """Whether pid is a live process (a zombie is not: its parent, gone, cannot reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def two_workers(make_emulator, tmp_path):
    """(emulator, supervisor, worker pids) of a running --workers 2 whose workers both hold
    shards, with SYNC_STOP_TIMEOUT=1; a worker still running at the end is killed."""
    emulator = make_emulator(shards=2)
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SYNC_STOP_TIMEOUT="1")
        with ForwarderProcess(env, tmp_path, ["--workers", "2"]) as supervisor:
            wait_until(lambda: len(assignments(emulator)) == 2 and all(assignments(emulator).values()),
                       "both workers to hold shards", 30)
            workers = child_pids(supervisor.process.pid)
            try:
                yield emulator, supervisor, workers
            finally:
                for pid in workers:
                    if running(pid):
                        os.kill(pid, signal.SIGKILL)


def test_sigterm_ends_a_batch_that_never_finishes_within_the_stop_timeout(make_emulator, tmp_path):
    emulator = make_emulator(load=[write_jsonl(tmp_path / "logs.jsonl", realistic_logs(20, seed=30))])
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SYNC_STOP_TIMEOUT="2")  # heartbeat 1 s
        with ForwarderProcess(env, tmp_path, python_args=with_fault("endless_encoding")) as forwarder:
            forwarder.wait_for_log("encoding a batch of", timeout=30)  # after 3 heartbeat intervals
            assert forwarder.stop(timeout=20) == 0
    stderr = forwarder.stderr()
    assert "the shard waits for it" in stderr
    assert "still stopping after SYNC_STOP_TIMEOUT=2 s; exiting anyway" in stderr
    assert receiver.count == 0


def test_the_supervisor_kills_a_worker_that_does_not_stop(make_emulator, tmp_path):
    with two_workers(make_emulator, tmp_path) as (_, supervisor, workers):
        os.kill(workers[0], signal.SIGSTOP)  # it cannot act on the SIGTERM to come
        assert supervisor.stop(timeout=30) == 1
        assert not [pid for pid in workers if running(pid)]
    assert f"(pid {workers[0]}) had not stopped 3 s after SIGTERM; killed it" in supervisor.stderr()


def test_workers_stop_when_the_supervisor_dies_even_while_their_pulls_hang(make_emulator, tmp_path):
    with two_workers(make_emulator, tmp_path) as (emulator, supervisor, workers):
        hang = emulator.inject(op="pull", action="delay", latency=300, duration=60)
        # Both workers' pulls hang, which holds a stop up (the SDK waits for them).
        wait_until(lambda: next(f for f in emulator.state()["faults"] if f["id"] == hang["id"])["applied"] >= 2,
                   "both workers' pulls to hang", 30)
        supervisor.kill()  # kill -9: the workers get SIGTERM from the kernel (PDEATHSIG)
        wait_until(lambda: not [pid for pid in workers if running(pid)], "the orphaned workers to stop", 30)


def test_a_signal_while_the_stop_event_is_locked_still_stops():
    """stop_on_signals: a SIGTERM handled while the main thread holds the stop Event's lock (as
    inside another signal's Event.set(): Ctrl-C, then the supervisor's SIGTERM) still stops the
    process. A handler that called stop.set() itself would wait for that lock for ever."""
    code = (f"import os, signal, sys, time\nsys.path.insert(0, {str(SCRIPT.parent)!r})\n"
            "import sync_waf_to_syslog as fwd\n"
            "stop = fwd.stop_on_signals()\n"
            "with stop._cond:\n"  # what Event.set() holds while it runs
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.5)\n"  # a Python handler would run here, in this thread
            "print(stop.wait(10))\n")
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the signal handler deadlocked on the stop Event's lock")
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
