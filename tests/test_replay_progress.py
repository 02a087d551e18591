"""Replay (SLS_CURSOR_END): progress lines at the statistics interval, the live bar of --progress
on a terminal, a final line saying what was replayed, and exit 0."""
import os
import pty
import subprocess
import sys
import time

import pytest

import sync_waf_to_syslog as fwd
from tests.delivered import trace_ids
from tests.forwarder_process import SCRIPT, forwarder_env
from tests.syslog_receiver import loss_report, SyslogReceiver
from tests.waf_logs import realistic_logs, write_jsonl


def test_progress_arithmetic():
    shards = {"0": [100, 150, 200], "1": [10, 10, 10], "2": [0, 250, 100]}  # 50 of 100, empty, overshoot
    percent, done, total, rate, eta = fwd.replay_progress(shards, 10)
    assert (percent, done, total, rate, eta) == (75.0, 150, 200, 15.0, 50 / 15)
    line = fwd.replay_line(shards, 10)
    assert line.startswith("replay: 75.0% (150 of 200 log groups done, 50 to go), 15 log groups/s, ETA 0:00:03")
    assert line.endswith("shards 0: 50%, 1: 100%, 2: 100%")
    assert fwd.replay_bar(shards, 10, width=4) == "[###.]  75.0% 150/200 log groups, ETA 0:00:03"
    assert fwd.replay_line({}, 1) == "replay: no shard held yet"


def run_on_a_terminal(args, env, cwd, timeout=90):
    """Run the forwarder with stderr (and stdout) on a pseudo-terminal: (exit status, what it wrote)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                               stdout=follower, stderr=follower)
    os.close(follower)
    output, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    try:
        return process.wait(10), output.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_a_replay_reports_its_progress_to_100_percent_and_exits_0(make_emulator, tmp_path):
    logs = realistic_logs(300, seed=41, start_time=time.time() - 120)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "logs.jsonl", logs)])
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SLS_CURSOR_END=str(int(time.time()) - 10),
                            SYNC_STATS_INTERVAL="1", SYNC_LOCK_FILE=str(tmp_path / "lock"))
        status, output = run_on_a_terminal(["--progress"], env, tmp_path)
    assert status == 0, output[-3000:]
    assert loss_report(trace_ids(logs), receiver.messages)["lost"] == 0
    assert "replay: " in output and "log groups done" in output  # the progress line
    assert "\r\x1b[K[" in output and "100.0%" in output  # the live bar, redrawn in place
    final = [line for line in output.splitlines() if "replay finished: 100.0%" in line]
    assert final and "of shards 0, 1" in final[0] and f"{len(logs)} logs sent" in final[0], output[-3000:]
