"""Shards that split and merge while logs keep arriving (issue 13), with and without in-order
consumption, a group of several forwarders across such changes, and heartbeat answers that name
shards which do not exist (issue 18).

Every test runs the real forwarder as a subprocess against the SLS emulator (tests/sls_emulator.py,
whose docstring says how splits, merges and `order` behave) and sends to an in-process TCP
SyslogReceiver; tests/live_logs.py's LogFeeder keeps adding logs meanwhile, each with a unique
request_traceid, so loss and duplicates are counted exactly (run with `pytest -s` for the figures).
"""
import base64
import json
import signal

import pytest

from bench.shards import print_figures, simulate
from tests.checkpoints import assignments, group_state, one_owner_each, owners, shard_contents, shard_states
from tests.delivered import assert_delivered
from tests.forwarder_process import ForwarderProcess, forwarder_env, problem_lines
from tests.live_logs import LOGS_PER_GROUP, LogFeeder
from tests.polling import wait_until
from tests.sls_emulator import log_client
from tests.syslog_receiver import SyslogReceiver, ids, loss_report

pytestmark = pytest.mark.slow

CONSUMER = "test-consumer"   # forwarder_env's SLS_CONSUMER_NAME
FETCH_GROUPS = 2             # SLS_MAX_FETCH_GROUPS here: a batch is at most 20 logs
ONE_BATCH = FETCH_GROUPS * LOGS_PER_GROUP
# Groups of several processes heartbeat every 2 s (group timeout 4 s): with 1 s, one late heartbeat
# on a busy 2-core machine expires a live member, and the group rebalances unasked.
GROUP_HEARTBEAT = 2


def requests(emulator, op):
    return emulator.state()["requests"].get(op, 0)


def holds_exactly(emulator, shards, consumer=CONSUMER):
    """A condition: `consumer` is the group's only member, it holds exactly `shards`, and its last
    heartbeat listed exactly them (so it has let go of every other shard)."""
    def condition():
        group = group_state(emulator)
        return group.get("consumers") == {consumer: shards} \
            and group["heartbeats"][consumer]["listed"] == shards
    return condition


def shared_by(emulator, members):
    """Every shard not finished has one owner among `members`, and each member holds some."""
    held = assignments(emulator)
    return set(held) == members and all(held.values()) and one_owner_each(emulator)


def wait_started(emulator, shards):
    """Wait until the forwarder's shard consumers have fixed their start cursors (one GetCursor
    each) and pull: logs added from then on are after any SLS_CURSOR_START=end."""
    wait_until(lambda: requests(emulator, "cursor") >= shards, "a start cursor for every shard")
    pulls = requests(emulator, "pull")
    wait_until(lambda: requests(emulator, "pull") >= pulls + 2 * shards, "pulls from those cursors")


def arrival_order(messages):
    """{request_traceid: index of its first arrival}."""
    first = {}
    for index, trace_id in enumerate(ids(messages)):
        first.setdefault(trace_id, index)
    return first


@pytest.mark.parametrize("in_order", [False, True], ids=["at-once", "in-order"])
def test_splits_and_merges_while_logs_arrive_lose_nothing_and_release_the_parents(
        make_emulator, tmp_path, monkeypatch, in_order):
    """Shard 1 is split before it ever holds a log, shard 0 mid-stream, then 1's children merged:
    every parent is read to its end, its checkpoint saved there, and released. In order, the
    children start only after their parents, and with SLS_CURSOR_START=end (the shards the group
    starts with are read from their end), which must not skip what the children got meanwhile."""
    emulator = make_emulator(shards=2)  # 0 = [00.., 80..), 1 = [80.., ff..]
    settings = dict(SLS_MAX_FETCH_GROUPS=FETCH_GROUPS, SLS_IN_ORDER=str(in_order).lower(),
                    SLS_CURSOR_START="end" if in_order else "begin")
    with SyslogReceiver("tcp") as receiver, LogFeeder(emulator) as feeder:
        with ForwarderProcess(forwarder_env(emulator, port=receiver.port, **settings), tmp_path) as fwd:
            wait_until(holds_exactly(emulator, [0, 1]), "the forwarder to hold both shards")
            wait_started(emulator, 2)
            emulator.split(1)  # empty and read-only now; 2 = [80.., c0..), 3 = [c0.., ff..]
            feeder.start()     # over the read-write shards 0, 2, 3
            wait_until(holds_exactly(emulator, [0, 2, 3]), "the empty shard 1 to be released")
            wait_until(lambda: receiver.count >= 10 * LOGS_PER_GROUP, "deliveries from 0, 2 and 3")
            emulator.split(0)  # mid-stream; 4 = [00.., 40..), 5 = [40.., 80..)
            wait_until(holds_exactly(emulator, [2, 3, 4, 5]), "shard 0 to be read to its end and released")
            emulator.merge(2)  # 2 + 3 -> 6 = [80.., ff..]
            wait_until(holds_exactly(emulator, [4, 5, 6]), "shards 2 and 3 to be released")
            later = len(feeder.sent) + 10 * LOGS_PER_GROUP
            wait_until(lambda: receiver.count >= later, "deliveries from 4, 5 and 6")
            sent = feeder.stop()
            assert_delivered(lambda: receiver.messages, sent, [fwd])
            assert fwd.stop() == 0
        report = loss_report(sent, receiver.messages)
        messages = receiver.messages
    print(f"\n{'in order' if in_order else 'at once'}: {report}")
    assert report["lost"] == 0 and report["unexpected"] == 0
    assert report["duplicates"] <= ONE_BATCH
    shards = shard_states(emulator)
    assert group_state(emulator)["checkpoints"] == {shard: info["end_cursor"] for shard, info in shards.items()}
    assert [shards[s]["status"] for s in "0123456"] == ["readonly"] * 4 + ["readwrite"] * 3
    if in_order:
        for name, value in emulator.client_env().items():
            monkeypatch.setenv(name, value)
        contents = shard_contents(log_client(emulator), emulator)
        arrived = arrival_order(messages)
        for parents, children in (((0,), (4, 5)), ((2, 3), (6,))):
            last_parent_log = max(arrived[i] for s in parents for group in contents[s] for i in group)
            first_child_log = min(arrived[i] for s in children for group in contents[s] for i in group)
            assert last_parent_log < first_child_log, (parents, children)


def test_a_heartbeat_answer_naming_10000_shards_that_do_not_exist_changes_nothing(
        make_emulator, tmp_path):
    """A corrupt or forged answer: the SDK would start a shard consumer for each id (each failing
    its start-up, each with a warning of its own) and the real shards would starve. Shards
    ListShards does not list are ignored, with one warning. The emulator's "replace" fault sends
    the answer: the two shards the forwarder holds, then 10,000 that do not exist."""
    emulator = make_emulator(shards=2)
    with SyslogReceiver("tcp") as receiver, LogFeeder(emulator) as feeder:
        with ForwarderProcess(forwarder_env(emulator, port=receiver.port), tmp_path) as fwd:
            wait_until(holds_exactly(emulator, [0, 1]), "the forwarder to hold both shards")
            feeder.start()
            wait_until(lambda: receiver.count >= 5 * LOGS_PER_GROUP, "the first deliveries")
            start_ups = requests(emulator, "get_checkpoint")  # one per shard consumer that starts
            answer = json.dumps([0, 1] + list(range(1_000_000, 1_010_000))).encode()
            phantoms = emulator.inject(op="heartbeat", action="replace", body=base64.b64encode(answer).decode())
            beats = requests(emulator, "heartbeat")
            wait_until(lambda: requests(emulator, "heartbeat") >= beats + 5, "five such answers")
            sent = feeder.stop()
            assert_delivered(lambda: receiver.messages, sent, [fwd])
            assert requests(emulator, "get_checkpoint") == start_ups
            assert group_state(emulator)["heartbeats"][CONSUMER]["listed"] == [0, 1]
            assert fwd.stop() == 0
        report = loss_report(sent, receiver.messages)
    applied = [f for f in emulator.state()["faults"] if f["id"] == phantoms["id"]][0]["applied"]
    problems = problem_lines(fwd.stderr())
    print(f"\n{applied} answers with 10,000 phantom shards; {report}; warnings: {problems}")
    assert applied >= 5 and report["lost"] == 0 and report["duplicates"] == 0
    assert len(problems) == 1 and "10000 shards that ListShards does not list" in problems[0]


def test_two_forwarders_in_one_group_keep_one_owner_per_shard_across_a_split(make_emulator, tmp_path):
    emulator = make_emulator(shards=4)
    members = {"fwd-a", "fwd-b"}
    with SyslogReceiver("tcp") as receiver, LogFeeder(emulator) as feeder:
        forwarders = [ForwarderProcess(forwarder_env(
            emulator, port=receiver.port, SLS_CONSUMER_NAME=name, SLS_MAX_FETCH_GROUPS=FETCH_GROUPS,
            SLS_HEARTBEAT_INTERVAL=GROUP_HEARTBEAT), tmp_path) for name in sorted(members)]
        with forwarders[0], forwarders[1]:  # started here
            feeder.start()
            wait_until(lambda: shared_by(emulator, members), "both forwarders to share the shards")
            emulator.split(1)
            emulator.split(3)
            wait_until(lambda: shared_by(emulator, members) and owners(emulator)[1] == {1, 3},
                       "shards 1 and 3 to be finished and released, and their children taken up")
            sent = feeder.stop()
            assert_delivered(lambda: receiver.messages, sent, forwarders)
            for forwarder in forwarders:  # together, so that neither takes over the other's shards
                forwarder.process.send_signal(signal.SIGTERM)
            assert [forwarder.wait(30) for forwarder in forwarders] == [0, 0]
        report = loss_report(sent, receiver.messages)
    print(f"\ntwo forwarders across a split: {report}; held at the end: {assignments(emulator)}")
    assert report["lost"] == 0 and report["duplicates"] == 0 and report["unexpected"] == 0


def test_a_group_of_six_consumers_through_a_kill_a_restart_splits_and_merges(tmp_path):
    """bench/shards.py's scenario, small: 16 shards, 3 hosts x --workers 2."""
    figures = simulate(tmp_path, shards=16, hosts=3, workers=2, splits=2, merges=1, rate=100,
                       heartbeat=GROUP_HEARTBEAT, idle_seconds=2, log=lambda line: None)
    print_figures(figures)
    assert figures["lost"] == 0 and figures["unexpected"] == 0
    assert figures["duplicates_outside_window"] == []
    assert figures["read_only_not_finished"] == []
    assert figures["exit_statuses"] == [0, 0, 0]
    # The idle cost: the SDK pulls an idle shard at most twice a second; ListShards adds one
    # request per heartbeat interval (and one more when a heartbeat names a shard it lacks).
    assert figures["idle_pulls_per_shard_second"] <= 2.5
    assert figures["idle_requests_per_consumer_second"]["list_shards"] <= 2 / GROUP_HEARTBEAT
