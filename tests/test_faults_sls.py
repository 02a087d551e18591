"""Fault injection on the SLS side and at process level (issue 4, cases 5, 6, 7, 9 and 10), plus
expired checkpoints and SLS_CURSOR_START=end.

Every test runs the real forwarder as a subprocess against the SLS emulator (tests/sls_emulator.py)
and sends to an in-process TCP SyslogReceiver. Every WAF log carries a unique request_traceid, so
each test does loss accounting: it asserts that nothing was lost and prints one row
`FAULT <name>: sent=.. received=.. lost=.. duplicates=..` (run with `pytest -s` to see them).

Data layout the tests rely on (documented by tests/waf_logs.py and tests/sls_emulator.py):
realistic_logs() gives ten logs per second that share one receive-time tag, so the emulator stores
every ten consecutive logs as one LogGroup, and LogGroups go to the shards round-robin. Small
SLS_MAX_FETCH_GROUPS values make batches small, so a fault lands mid-stream.
"""
import collections
import itertools
import signal
import subprocess
import time

import pytest

from tests.checkpoints import assert_checkpoints_at_end, assignments, checkpoint_positions, checkpoints_at_end
from tests.delivered import assert_delivered, trace_ids
from tests.forwarder_process import ForwarderProcess, forwarder_env, problem_lines, run_forwarder, with_fault
from tests.syslog_receiver import SyslogReceiver, ids, loss_report
from tests.waf_logs import realistic_logs, write_jsonl
from tests.polling import wait_until

pytestmark = pytest.mark.slow

LOGS_PER_GROUP = 10      # see the module docstring
WAIT = 60                # seconds any single wait may take before the test fails
SDK_IDLE_FLUSH = 30      # the SDK saves a shard's checkpoint once it has had no new data this long

_seeds = itertools.count(1000)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def fresh_logs(count):
    """`count` realistic WAF logs whose request_traceids no other call of this module produces."""
    logs = realistic_logs(count, seed=next(_seeds))
    assert count % LOGS_PER_GROUP == 0, "whole LogGroups keep the shard layout predictable"
    return logs


def groups_by_shard(logs, shards):
    """{shard: [ids of each LogGroup, in shard order]} for every log SLS stored, in storing order."""
    layout = {shard: [] for shard in range(shards)}
    for number, start in enumerate(range(0, len(logs), LOGS_PER_GROUP)):
        layout[number % shards].append(trace_ids(logs[start:start + LOGS_PER_GROUP]))
    return layout


def unsaved_window(layout, saved, shards, delivered):
    """The delivered ids at or after the stored checkpoint (`saved` LogGroup positions) of
    `shards`: what a consumer resuming those shards sends again."""
    return {trace_id for shard in shards for group in layout[shard][saved.get(shard, 0):]
            for trace_id in group} & delivered


def received_ids(receiver):
    return set(ids(receiver.messages))


def wait_delivered(receiver, expected, forwarders=()):
    """Wait until every id in `expected` reached the receiver (showing the forwarders' logs if not)."""
    assert_delivered(lambda: receiver.messages, expected, forwarders, WAIT)


def account(name, expected, receiver):
    """Loss accounting for one test: print its table row and return the report."""
    report = loss_report(expected, receiver.messages)
    print(f"\nFAULT {name}: sent={report['sent']} received={report['received']} "
          f"lost={report['lost']} duplicates={report['duplicates']}")
    return report


def duplicated_ids(receiver):
    return {trace_id for trace_id, copies in collections.Counter(ids(receiver.messages)).items()
            if copies > 1}


def fault_by_id(emulator, fault_id):
    return next(f for f in emulator.state()["faults"] if f["id"] == fault_id)


def stop_together(forwarders):
    """SIGTERM to every forwarder at once; their exit statuses."""
    for process in forwarders:
        process.process.send_signal(signal.SIGTERM)
    return [process.wait(30) for process in forwarders]


@pytest.fixture
def receiver():
    with SyslogReceiver("tcp") as server:
        yield server


def forwarder(emulator, receiver, workdir, **settings):
    """A ForwarderProcess (not started) sending to the receiver; settings as in forwarder_env."""
    return ForwarderProcess(forwarder_env(emulator, port=receiver.port, **settings), workdir)


# ------------------------------------------------------------------------------------------------
# 5. SLS outage mix
# ------------------------------------------------------------------------------------------------

def test_sls_outage_mix_loses_nothing_and_logs_each_condition_once(make_emulator, receiver, tmp_path):
    logs = fresh_logs(800)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)], shards=2)
    # The SDK retries a 5xx answer itself (1 s apart), so those and the latency only slow the
    # stream down; a 403 quota answer is not retried and reaches the consumer.
    pull_errors = emulator.inject(op="pull", status=500, fraction=0.1)
    pull_quota = emulator.inject(op="pull", status=403, errorCode="ReadQuotaExceed",
                                 errorMessage="pull quota (injected)", count=2)
    slow_requests = emulator.inject(op="any", action="delay", latency=2, fraction=0.1)
    with forwarder(emulator, receiver, tmp_path, SLS_MAX_FETCH_GROUPS=2) as fwd:
        wait_until(lambda: receiver.count >= 100, "the first deliveries")
        # One heartbeat refused (by count, not for a second: the latency fault, which comes first,
        # delays every tenth request, and may be what the one heartbeat of that second meets).
        heartbeat_failures = emulator.inject(op="heartbeat", status=403, errorCode="ExceedQuota",
                                             errorMessage="heartbeat quota (injected)", count=1)
        checkpoint_failures = emulator.inject(op="checkpoint", status=403, errorCode="ExceedQuota",
                                              errorMessage="checkpoint quota (injected)", duration=8)
        wait_delivered(receiver, trace_ids(logs), [fwd])
        assert fwd.process.poll() is None, "the forwarder died during the SLS faults"
        # Once SLS takes checkpoints again, the refused ones are saved with no new data to carry
        # them (the last logs may well have been delivered while the fault lasted).
        wait_until(lambda: checkpoints_at_end(emulator), "the refused checkpoints to be saved")
        assert fwd.stop() == 0
    log_text = fwd.stderr()
    applied = {name: fault_by_id(emulator, fault["id"])["applied"] for name, fault in (
        ("pull 500", pull_errors), ("pull quota", pull_quota), ("2 s latency", slow_requests),
        ("heartbeat", heartbeat_failures), ("checkpoint", checkpoint_failures))}
    print(f"\nfaults applied: {applied}")
    assert all(applied.values()), applied
    problems = problem_lines(log_text)
    per_condition = {marker: sum(marker in line for line in problems) for marker in (
        "pull quota", "heartbeat quota", "cannot save checkpoints")}
    print(f"warning/error lines: {len(problems)} {per_condition}")
    # Each condition is visible, at most once a minute (per shard for the SDK's fetch errors),
    # and nothing else complained.
    assert per_condition["heartbeat quota"] == 1 and per_condition["cannot save checkpoints"] == 1
    assert 1 <= per_condition["pull quota"] <= 2
    assert applied["checkpoint"] > per_condition["cannot save checkpoints"]  # not once per request
    assert len(problems) == sum(per_condition.values()), "\n".join(problems)
    assert_checkpoints_at_end(emulator)
    report = account("sls-outage-mix", trace_ids(logs), receiver)
    assert report["lost"] == 0 and report["unexpected"] == 0


def test_slow_checkpoint_writes_still_save_the_last_delivered_position(make_emulator, receiver, tmp_path):
    logs = fresh_logs(400)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)], shards=2)
    # Every write takes 2 s, so batches are delivered while one is in flight.
    emulator.inject(op="checkpoint", action="delay", latency=2)
    with forwarder(emulator, receiver, tmp_path, SLS_MAX_FETCH_GROUPS=1) as fwd:
        wait_delivered(receiver, trace_ids(logs), [fwd])
        assert fwd.stop() == 0
    report = account("slow-checkpoint-writes", trace_ids(logs), receiver)
    assert report["lost"] == 0 and report["duplicates"] == 0
    assert_checkpoints_at_end(emulator)


# ------------------------------------------------------------------------------------------------
# 6. kill -9 mid-stream
# ------------------------------------------------------------------------------------------------

def test_kill_9_mid_stream_then_restart_repeats_only_the_unsaved_window(make_emulator, receiver, tmp_path):
    logs = fresh_logs(800)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)], shards=2)
    with forwarder(emulator, receiver, tmp_path, SLS_MAX_FETCH_GROUPS=2) as fwd:
        wait_until(lambda: receiver.count >= 300, "deliveries before the kill")
        fwd.kill()
    # The kernel still flushes what the dead process had written; count it before measuring.
    wait_until(lambda: receiver.stats()["open_connections"] == 0, "the killed connection to close")
    delivered_before_restart = received_ids(receiver)
    window = unsaved_window(groups_by_shard(logs, 2), checkpoint_positions(emulator), [0, 1],
                            delivered_before_restart)
    assert len(delivered_before_restart) < len(logs), "the kill did not land mid-stream"
    with forwarder(emulator, receiver, tmp_path, SLS_MAX_FETCH_GROUPS=2) as restarted:
        wait_delivered(receiver, trace_ids(logs), [restarted])
        assert restarted.stop() == 0
    print(f"\ndelivered before the kill: {len(delivered_before_restart)}, "
          f"unsaved window (delivered after the last stored checkpoint): {len(window)}")
    report = account("kill-9-restart", trace_ids(logs), receiver)
    assert report["lost"] == 0 and report["unexpected"] == 0
    assert report["duplicates"] <= len(window)
    assert duplicated_ids(receiver) <= window
    assert_checkpoints_at_end(emulator)


# ------------------------------------------------------------------------------------------------
# 7. Two forwarders in one consumer group
# ------------------------------------------------------------------------------------------------

SHARDS_4 = [0, 1, 2, 3]
# Group members heartbeat every 2 s (group timeout 4 s): with 1 s, one late heartbeat on a busy
# 2-core machine expires a live member and the group rebalances when the test does not expect it.
GROUP_HEARTBEAT = 2


def member(emulator, receiver, workdir, name):
    """A forwarder (not started) that joins the group as consumer `name`, with small batches."""
    return forwarder(emulator, receiver, workdir, SLS_CONSUMER_NAME=name, SLS_MAX_FETCH_GROUPS=1,
                     SLS_HEARTBEAT_INTERVAL=GROUP_HEARTBEAT)


def holders(emulator):
    """{consumer: shards} when every shard is held by exactly one live consumer, else None."""
    held = {name: shards for name, shards in assignments(emulator).items() if shards}
    every = sorted(shard for shards in held.values() for shard in shards)
    return held if every == SHARDS_4 else None


def wait_balanced(emulator, description, names=("fwd-a", "fwd-b")):
    """Wait until exactly `names` share every shard; returns {consumer: shards}."""
    def balanced():
        held = holders(emulator)
        return held if held and sorted(held) == sorted(names) else None
    return wait_until(balanced, description)


def test_group_member_killed_then_restarted_hands_shards_over(make_emulator, receiver, tmp_path):
    emulator = make_emulator(shards=4)
    sent = []  # every log, in the order SLS stored it

    def feed(count):  # logs that arrive in SLS while the group changes
        logs = fresh_logs(count)
        emulator.add_logs(logs)
        sent.extend(logs)
        return trace_ids(logs)

    a, b = (member(emulator, receiver, tmp_path, name) for name in ("fwd-a", "fwd-b"))
    with a, b:
        print(f"\nboth running: {wait_balanced(emulator, 'both to hold shards')}")
        wave = feed(400)  # ten pulls per shard: still streaming when fwd-a dies
        wait_until(lambda: len(received_ids(receiver) & set(wave)) >= 100, "part of the wave")
        a.kill()
        killed = time.monotonic()
        # Until the group timeout expires fwd-a, its shards and their checkpoints stay as it left them.
        killed_shards, saved = assignments(emulator)["fwd-a"], checkpoint_positions(emulator)
        wait_until(lambda: receiver.stats()["open_connections"] <= 1, "fwd-a's connection to close")
        window = unsaved_window(groups_by_shard(sent, 4), saved, killed_shards, received_ids(receiver))
        feed(160)
        wait_until(lambda: holders(emulator) == {"fwd-b": SHARDS_4}, "fwd-b to take every shard")
        print(f"fwd-b holds every shard {time.monotonic() - killed:.1f} s after the kill "
              f"(group timeout {2 * GROUP_HEARTBEAT} s); fwd-a's unsaved window: {len(window)} logs")
        with member(emulator, receiver, tmp_path, "fwd-a") as a_again:
            feed(160)
            print(f"rebalanced: {wait_balanced(emulator, 'fwd-a to get shards back')}")
            feed(160)
            wait_delivered(receiver, trace_ids(sent), [a, b, a_again])
            assert stop_together([a_again, b]) == [0, 0]
    report = account("group-kill-rebalance", trace_ids(sent), receiver)
    assert report["lost"] == 0 and report["unexpected"] == 0
    # Only what fwd-a had delivered past its last stored checkpoint is sent twice; handing shards
    # over in a rebalance saves the delivered checkpoint first, so it adds no duplicates.
    assert duplicated_ids(receiver) <= window
    assert_checkpoints_at_end(emulator)


def test_two_members_share_logs_added_while_they_run(make_emulator, receiver, tmp_path):
    backlog = fresh_logs(400)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", backlog)], shards=4)
    waves = []
    members = [member(emulator, receiver, tmp_path, name) for name in ("fwd-a", "fwd-b")]
    with members[0], members[1]:
        # Both join at once: the backlog is consumed while the group rebalances.
        settled = wait_balanced(emulator, "both to hold shards")
        rebalanced_later = False
        for _ in range(5):
            wave = fresh_logs(80)
            emulator.add_logs(wave)
            waves.extend(trace_ids(wave))
            wait_until(lambda: received_ids(receiver) >= set(waves) or holders(emulator) != settled,
                       "the wave to be delivered")
            rebalanced_later |= holders(emulator) != settled
        wait_delivered(receiver, trace_ids(backlog) + waves, members)
        # Stop both at once, so neither takes over the other's shards while it shuts down.
        assert stop_together(members) == [0, 0]
    print(f"\nsettled assignment {settled}; rebalanced again later: {rebalanced_later}")
    report = account("group-two-members-live-feed", trace_ids(backlog) + waves, receiver)
    assert report["lost"] == 0 and report["unexpected"] == 0
    repeated_from_waves = duplicated_ids(receiver) & set(waves)
    print(f"duplicates among logs added after the group settled: {len(repeated_from_waves)}")
    assert rebalanced_later or not repeated_from_waves, "duplicates without a rebalance"
    assert_checkpoints_at_end(emulator)


def test_member_stopped_gracefully_hands_over_without_duplicates(make_emulator, receiver, tmp_path):
    emulator = make_emulator(shards=4)
    members = {name: member(emulator, receiver, tmp_path, name) for name in ("fwd-a", "fwd-b")}
    sent = []

    def deliver_wave():
        logs = fresh_logs(80)
        emulator.add_logs(logs)
        sent.extend(trace_ids(logs))
        wait_delivered(receiver, sent, members.values())

    with members["fwd-a"], members["fwd-b"]:
        wait_balanced(emulator, "both to hold shards")
        deliver_wave()
        # A slow checkpoint store: fwd-a's last checkpoints are still being written when it stops,
        # for longer than the group timeout. Its shards must not move before they are saved.
        emulator.inject(op="checkpoint", consumer="fwd-a", action="delay", latency=2 * GROUP_HEARTBEAT + 1)
        deliver_wave()
        assert members["fwd-a"].stop() == 0
        wait_until(lambda: holders(emulator) == {"fwd-b": SHARDS_4}, "fwd-b to take every shard")
        deliver_wave()
        assert members["fwd-b"].stop() == 0
    report = account("group-member-sigterm-handover", sent, receiver)
    assert report["lost"] == 0 and report["unexpected"] == 0
    assert report["duplicates"] == 0
    assert_checkpoints_at_end(emulator)


# ------------------------------------------------------------------------------------------------
# 9. Checkpoint writes failing while a shard is idle (the SDK's fatal idle flush, §11.8)
# ------------------------------------------------------------------------------------------------

def test_checkpoint_failures_while_idle_do_not_stop_consumption(make_emulator, receiver, tmp_path):
    first = fresh_logs(40)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", first)], shards=1)
    failing = emulator.inject(op="checkpoint", status=400, errorCode="ConsumerNotMatch",
                              errorMessage="checkpoint refused (injected)")
    with forwarder(emulator, receiver, tmp_path, SLS_MAX_FETCH_GROUPS=1) as fwd:
        wait_delivered(receiver, trace_ids(first), [fwd])
        # Idle past the SDK's flush with every checkpoint write failing: the process must live on.
        with pytest.raises(subprocess.TimeoutExpired):
            fwd.process.wait(SDK_IDLE_FLUSH + 3)
        failed_writes = fault_by_id(emulator, failing["id"])["applied"]
        emulator.clear_faults()
        later = fresh_logs(40)
        emulator.add_logs(later)
        wait_delivered(receiver, trace_ids(first + later), [fwd])
        assert fwd.stop() == 0
    print(f"\nfailed checkpoint writes while idle: {failed_writes}")
    assert failed_writes >= 1
    assert "cannot save checkpoints" in fwd.stderr()
    assert "thread stopped unexpectedly" not in fwd.stderr()
    assert_checkpoints_at_end(emulator)
    report = account("checkpoint-failures-idle", trace_ids(first + later), receiver)
    assert report["lost"] == 0 and report["unexpected"] == 0


# ------------------------------------------------------------------------------------------------
# 10. A second instance with the same consumer name
# ------------------------------------------------------------------------------------------------

def test_second_instance_exits_at_once_while_the_first_keeps_delivering(make_emulator, receiver, tmp_path):
    first_logs = fresh_logs(200)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", first_logs)], shards=2)
    with forwarder(emulator, receiver, tmp_path) as first:
        wait_delivered(receiver, trace_ids(first_logs), [first])
        status, out, err = run_forwarder(first.env, tmp_path, timeout=30)  # same name, same lock
        assert (status, out) == (0, "")
        [line] = err.splitlines()
        assert f"another instance is running (pid {first.process.pid})" in line
        later = fresh_logs(200)
        emulator.add_logs(later)
        wait_delivered(receiver, trace_ids(first_logs + later), [first])
        assert first.process.poll() is None
        assert first.stop() == 0
    report = account("second-instance", trace_ids(first_logs + later), receiver)
    assert report["lost"] == 0 and report["duplicates"] == 0 and report["unexpected"] == 0


# ------------------------------------------------------------------------------------------------
# Expired checkpoint (InvalidCursor) and SLS_CURSOR_START=end
# ------------------------------------------------------------------------------------------------

def test_expired_checkpoint_resumes_from_the_oldest_retained_log(make_emulator, receiver, tmp_path):
    old = fresh_logs(100)  # five LogGroups per shard
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", old)], shards=2)
    with forwarder(emulator, receiver, tmp_path) as fwd:
        wait_delivered(receiver, trace_ids(old), [fwd])
        assert fwd.stop() == 0
    assert_checkpoints_at_end(emulator)  # both shards' checkpoints at LogGroup 5
    new = fresh_logs(100)
    emulator.add_logs(new)
    # The retention drops shard 1's five old LogGroups and its first two new ones, so its
    # checkpoint now points before the oldest retained log.
    emulator.expire(1, 7)
    deleted = {trace_id for group in groups_by_shard(old + new, 2)[1][5:7] for trace_id in group}
    retained = [trace_id for trace_id in trace_ids(new) if trace_id not in deleted]
    with forwarder(emulator, receiver, tmp_path) as restarted:
        wait_delivered(receiver, retained, [restarted])
        assert restarted.stop() == 0
    errors = [line for line in problem_lines(restarted.stderr()) if " ERROR " in line]
    print(f"\n{len(deleted)} logs deleted by retention; error lines: {errors}")
    assert len(errors) == 1 and "shard 1:" in errors[0] and "retention" in errors[0]
    assert not received_ids(receiver) & deleted
    assert_checkpoints_at_end(emulator)
    report = account("expired-checkpoint", trace_ids(old) + retained, receiver)
    assert report["lost"] == 0 and report["duplicates"] == 0


def test_cursor_start_end_sends_only_logs_added_after_the_start(make_emulator, receiver, tmp_path):
    history = fresh_logs(200)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", history)], shards=2)
    with forwarder(emulator, receiver, tmp_path, SLS_CURSOR_START="end") as fwd:
        # Both shard consumers pull repeatedly only once their start cursors are fixed.
        wait_until(lambda: emulator.state()["requests"].get("pull", 0) >= 4 * 2, "the first pulls")
        new = fresh_logs(100)
        emulator.add_logs(new)
        wait_delivered(receiver, trace_ids(new), [fwd])
        assert fwd.stop() == 0
    assert not received_ids(receiver) & set(trace_ids(history))
    report = account("cursor-start-end", trace_ids(new), receiver)
    assert report["lost"] == 0 and report["duplicates"] == 0 and report["unexpected"] == 0


# ------------------------------------------------------------------------------------------------
# Supervision: the SDK's worker thread alive but stuck
# ------------------------------------------------------------------------------------------------

def test_a_stuck_consumer_thread_is_detected_and_the_process_exits_1(make_emulator, receiver, tmp_path):
    logs = fresh_logs(40)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)], shards=2)
    # Once the logs went out, the worker loop blocks for good in its next round, as a deadlock would.
    stick = tmp_path / "stick"
    stuck_worker = with_fault("stuck_worker_loop", str(stick))
    env = forwarder_env(emulator, port=receiver.port, protocol=receiver.protocol)  # heartbeat 1 s
    with ForwarderProcess(env, tmp_path, python_args=stuck_worker) as fwd:
        wait_delivered(receiver, trace_ids(logs), [fwd])
        stick.touch()
        status = fwd.process.wait(60)  # 10 heartbeat intervals after the loop stopped, and no hang
    assert status == 1, fwd.stderr()[-2000:]
    assert "the SDK consumer thread is stuck" in fwd.stderr()
    assert account("stuck-worker", trace_ids(logs), receiver)["lost"] == 0
