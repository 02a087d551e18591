"""--workers: several consumer processes on one host, supervised; and the statistics line."""
import os
import re
import signal
import time

import pytest

from tests.checkpoints import assignments
from tests.delivered import trace_ids, wait_delivered
from tests.forwarder_process import ForwarderProcess, forwarder_env
from tests.syslog_receiver import SyslogReceiver, loss_report
from tests.waf_logs import realistic_logs, write_jsonl
from tests.polling import wait_until

pytestmark = pytest.mark.slow


def child_pids(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(p) for p in children.read().split()]


def test_two_workers_share_the_shards_without_duplicates_and_survive_a_crash(make_emulator, tmp_path):
    logs = realistic_logs(4000, seed=11)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "logs.jsonl", logs)], shards=4)
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SLS_MAX_FETCH_GROUPS="5")
        with ForwarderProcess(env, tmp_path, ["--workers", "2"]) as supervisor:
            held = wait_until(lambda: (lambda c: c if len(c) == 2 and all(c.values()) else None)(assignments(emulator)),
                              "both workers to hold shards", 30)
            assert sorted(held) == ["test-consumer-0", "test-consumer-1"]
            assert sorted(s for shards in held.values() for s in shards) == [0, 1, 2, 3]
            report = wait_delivered(lambda: receiver.messages, trace_ids(logs))
            assert report["lost"] == 0 and report["duplicates"] == 0, report

            # A worker that dies is restarted by the supervisor, and delivery goes on.
            victim = child_pids(supervisor.process.pid)[0]
            os.kill(victim, signal.SIGKILL)
            supervisor.wait_for_log("restarting it")
            more = realistic_logs(500, seed=12, start_time=int(time.time()))
            for entry in more:
                entry["request_traceid"] = "more-" + entry["request_traceid"]
            emulator.add_logs(more)
            wait_until(lambda: len(child_pids(supervisor.process.pid)) == 2, "the worker's restart", 30)
            wait_delivered(lambda: receiver.messages, trace_ids(logs + more))
            assert supervisor.stop() == 0
            assert not [p for p in child_pids_safe(supervisor.process.pid)]
        report = loss_report([e["request_traceid"] for e in logs + more], receiver.messages)
        print("workers: kill -9 of one worker:", report)
        assert report["lost"] == 0, report
    shards = emulator.state()["logstores"][emulator.logstore]["shards"]
    checkpoints = emulator.state()["logstores"][emulator.logstore]["consumer_groups"]["test-group"]["checkpoints"]
    assert checkpoints == {sid: s["end_cursor"] for sid, s in shards.items()}


def child_pids_safe(pid):
    try:
        return child_pids(pid)
    except FileNotFoundError:
        return []


def test_stats_line_reports_rates_lag_and_counters(make_emulator, tmp_path):
    logs = realistic_logs(300, seed=5)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "logs.jsonl", logs)])
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SYNC_STATS_INTERVAL="1")
        with ForwarderProcess(env, tmp_path) as forwarder:
            receiver.wait_for(len(logs), timeout=30)
            forwarder.wait_for_log(f"total {len(logs)} logs")
            assert forwarder.stop() == 0
    line = [line for line in forwarder.stderr().splitlines() if f"total {len(logs)} logs" in line][0]
    match = re.search(r"stats: (\d+) logs/s, (\d+) bytes/s, total (\d+) logs, lag (\S+), "
                      r"send errors (\d+), resent (\d+), truncated (\d+)", line)
    assert match, line
    assert int(match.group(3)) == len(logs)
    assert re.fullmatch(r"(\d+:\d+s,?)+", match.group(4))
    assert (match.group(5), match.group(6), match.group(7)) == ("0", "0", "0")


def test_log_file_is_reopened_after_logrotate_moved_it(make_emulator, tmp_path):
    emulator = make_emulator()
    log_file = tmp_path / "forwarder.log"
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SYNC_STATS_INTERVAL="1", SYNC_LOG_FILE=log_file)
        with ForwarderProcess(env, tmp_path) as forwarder:
            wait_until(lambda: log_file.exists() and "stats: " in log_file.read_text(), "a stats line in the log file")
            rotated = log_file.rename(tmp_path / "forwarder.log.1")  # what logrotate does (then "create")
            wait_until(lambda: log_file.exists() and "stats: " in log_file.read_text(), "a new log file")
            size = rotated.stat().st_size
            wait_until(lambda: log_file.read_text().count("stats: ") >= 2, "a second line in the new file")
            assert rotated.stat().st_size == size  # nothing more went to the moved file
            assert forwarder.stop() == 0
    assert "stopped" in log_file.read_text()
