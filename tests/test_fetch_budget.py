"""Fetching by volume (FetchBudget): a pull carries about SLS_FETCH_BYTES whatever a LogGroup holds,
and all held shards together stay within SLS_BUFFER_BYTES."""
import re

import pytest

import sync_waf_to_syslog as fwd
from tests.checkpoints import checkpoints_at_end
from tests.delivered import trace_ids, wait_delivered
from tests.encoding import make_settings
from tests.forwarder_process import ForwarderProcess, forwarder_env
from tests.polling import wait_until
from tests.syslog_receiver import SyslogReceiver, loss_report
from tests.waf_logs import realistic_logs, write_jsonl

MB = 1 << 20


def budget(**env):
    return fwd.FetchBudget(make_settings(**env))


def test_a_pull_asks_for_what_carries_the_target_volume():
    rule = budget(SLS_FETCH_BYTES="2M", SLS_BUFFER_BYTES="64M")
    assert rule.groups(0) == 2  # nothing learnt yet: LogGroups are assumed big (1 MB)
    rule.observe(0, 2, 2, 2 * 1500)  # one 1.5 KB log per LogGroup
    assert rule.groups(0) == 1000  # 2 MB would be 1398 groups: SLS's limit of 1000 applies
    rule.observe(0, 1000, 1000, 200 * 1500 * 1000)  # groups of 200 logs: learnt, not jumped to
    assert rule.groups(0) == int(2 * MB / ((1500 + 300_000) / 2))
    for _ in range(20):
        rule.observe(0, 10, 10, 10 * 300_000)
    assert rule.groups(0) == 6  # 2 MB / 300 KB
    assert rule.groups(1) == 2  # each shard learns on its own
    assert rule.asked(0, 99) == 6 and rule.asked(7, 99) == 99  # what the last pull asked for


def test_all_held_shards_together_stay_within_the_buffer():
    rule = budget(SLS_FETCH_BYTES="8M", SLS_BUFFER_BYTES="48M", SLS_MAX_FETCH_GROUPS="1000")
    for shard in range(64):
        rule.observe(shard, 100, 100, 100 * 10_000)  # 10 KB LogGroups
    rule.hold(2)
    assert rule.groups(0) == int(8 * MB / 10_000)        # few shards: the pull target
    rule.hold(64)
    assert rule.groups(0) == int(48 * MB / 3 / 64 / 10_000)  # many: the buffer, 3 pulls a shard
    rule.hold(10_000)
    assert rule.groups(0) == 1  # never less than one LogGroup
    assert budget(SLS_MAX_FETCH_GROUPS="50").groups(0) <= 50


def test_under_an_eps_ceiling_a_pull_holds_a_second_of_it():
    rule = budget(SYSLOG_MAX_EPS="500")
    rule.observe(0, 2, 2, 2 * 15_000, logs=20)  # 10 logs a LogGroup
    assert rule.groups(0) == 50  # 500 logs


def test_a_backlog_is_a_full_pull():
    rule = budget()
    rule.observe(3, 40, 39, 100)
    assert not rule.backlog()
    rule.observe(3, 40, 40, 100)
    assert rule.backlog()
    rule.observe(3, 40, 0, 0)  # the shard is at its end
    assert not rule.backlog()


@pytest.mark.slow
def test_one_log_groups_drain_in_big_pulls_without_loss_or_repeat(make_emulator, tmp_path):
    """6,000 logs, each in a LogGroup of its own: every one arrives once, and pulls grew past the 100
    groups the forwarder used to ask for."""
    logs = realistic_logs(6000, seed=31)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)], shards=2,
                             extra_args=["--group-size", "1"])
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port)
        with ForwarderProcess(env, tmp_path) as forwarder:
            report = wait_delivered(lambda: receiver.messages, trace_ids(logs))
            wait_until(lambda: checkpoints_at_end(emulator), "the checkpoints at the end")
            assert forwarder.stop() == 0
        report = loss_report(trace_ids(logs), receiver.messages)
    assert report["lost"] == 0 and report["duplicates"] == 0, report
    batches = [int(count) for count in re.findall(r"Get data from shard \d+, log count: (\d+)", forwarder.stderr())]
    assert sum(batches) == len(logs)
    assert max(batches) > 100 and len(batches) < len(logs) / 100, batches
