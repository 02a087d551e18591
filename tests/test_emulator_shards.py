"""Shard split and merge in the SLS emulator, and consumer groups across them (with and without
`order`), driven by the unmodified aliyun-log-python-sdk as in tests/test_emulator.py."""
import json
import urllib.error
import urllib.request
from collections import Counter

import pytest
from aliyun.log import LogException

from tests.polling import wait_until
from tests.sdk_consumer import (LOGSTORE, PROJECT, content, emulator_for_sdk, pulled_logs, put,
                                start_worker, stop_worker)
from tests.sls_emulator import EmulatorProcess, SlsError, log_client
from tests.waf_logs import realistic_logs

pytestmark = pytest.mark.slow

LAST_KEY = "f" * 32  # ListShards shows the end of the key space as ff...f


def key(hex_prefix):
    """A 32-hex-digit hash key: the prefix, then zeros."""
    return hex_prefix.ljust(32, "0")


@pytest.fixture
def emulator(monkeypatch):
    """Two shards, [00.., 80..) and [80.., ff..]; ten logs per LogGroup."""
    with emulator_for_sdk(monkeypatch, 2, group_size=10) as emu:
        yield emu


@pytest.fixture
def client(emulator):
    return log_client(emulator)


def span(listing):
    return (listing["shardID"], listing["status"], listing["inclusiveBeginKey"],
            listing["exclusiveEndKey"])


def traceids(logs):
    return [log["request_traceid"] for log in logs]


def traceids_in(client, shard):
    """The request_traceid of every log in the shard, pulled from its begin cursor."""
    begin = client.get_begin_cursor(PROJECT, LOGSTORE, shard).get_cursor()
    return [content(log, "request_traceid")
            for log in pulled_logs(client.pull_logs(PROJECT, LOGSTORE, shard, begin))]


def group_state(emulator, group="forwarder"):
    return emulator.state()["logstores"][LOGSTORE]["consumer_groups"][group]


def end_cursors(emulator):
    shards = emulator.state()["logstores"][LOGSTORE]["shards"]
    return {shard: s["end_cursor"] for shard, s in shards.items()}


def wait_assigned(emulator, shards, what):
    """Wait until consumer "w" alone holds exactly `shards` in group "forwarder"."""
    wait_until(lambda: group_state(emulator)["consumers"] == {"w": shards}, what)


def assert_each_seen_once(seen, sent):
    assert Counter(traceid for traceid, _, _ in seen) == Counter(traceids(sent))


# ---------------------------------------------------------------------------------------------
# Splitting and merging: listings, writes, reads, errors.

def test_split_and_merge_reshape_the_key_space_and_writes_follow_the_read_write_shards(emulator, client):
    before = realistic_logs(10, seed=1)
    put(client, before, hashKey=key("0"))
    end_of_0 = client.get_end_cursor(PROJECT, LOGSTORE, 0).get_cursor()

    assert [span(s) for s in emulator.split(0)] == [
        (0, "readonly", key("0"), key("8")),
        (2, "readwrite", key("0"), key("4")), (3, "readwrite", key("4"), key("8"))]
    listed = client.list_shards(PROJECT, LOGSTORE).get_shards_info()
    assert [span(s) for s in listed] == [
        (0, "readonly", key("0"), key("8")), (1, "readwrite", key("8"), LAST_KEY),
        (2, "readwrite", key("0"), key("4")), (3, "readwrite", key("4"), key("8"))]
    assert all(type(s["createTime"]) is int for s in listed)

    routed = {prefix: realistic_logs(10, seed=ord(prefix)) for prefix in "159"}
    for prefix, logs in routed.items():
        put(client, logs, hashKey=key(prefix))
    balanced = [realistic_logs(10, seed=100 + n) for n in range(3)]
    for logs in balanced:  # no hash key: round-robin over the read-write shards 1, 2, 3
        put(client, logs)
    assert traceids_in(client, 0) == traceids(before)
    assert traceids_in(client, 1) == traceids(routed["9"] + balanced[0])
    assert traceids_in(client, 2) == traceids(routed["1"] + balanced[1])
    assert traceids_in(client, 3) == traceids(routed["5"] + balanced[2])

    # The read-only shard's end is fixed, and every shard keeps its own cursors.
    assert client.get_end_cursor(PROJECT, LOGSTORE, 0).get_cursor() == end_of_0
    at_end = client.pull_logs(PROJECT, LOGSTORE, 0, end_of_0)
    assert (at_end.get_loggroup_count(), at_end.get_next_cursor()) == (0, end_of_0)
    begin_of_2 = client.get_begin_cursor(PROJECT, LOGSTORE, 2).get_cursor()
    with pytest.raises(LogException) as raised:
        client.pull_logs(PROJECT, LOGSTORE, 3, begin_of_2)
    assert raised.value.get_error_code() == "InvalidCursor"

    assert [span(s) for s in emulator.merge(2)] == [
        (4, "readwrite", key("0"), key("8")),
        (2, "readonly", key("0"), key("4")), (3, "readonly", key("4"), key("8"))]
    late = realistic_logs(10, seed=200)
    put(client, late, hashKey=key("5"))
    assert traceids_in(client, 4) == traceids(late)
    assert traceids_in(client, 3) == traceids(routed["5"] + balanced[2])
    assert [span(s) for s in emulator.merge(4)] == [
        (5, "readwrite", key("0"), LAST_KEY),
        (4, "readonly", key("0"), key("8")), (1, "readonly", key("8"), LAST_KEY)]

    for bad_request, message in ((lambda: emulator.split(0), "invalid shard id"),  # read-only
                                 (lambda: emulator.split(6), "invalid shard id"),  # no such shard
                                 (lambda: emulator.split(5, key("0")), "invalid mid hash"),
                                 (lambda: emulator.split(5, "not hex"), "invalid mid hash"),
                                 (lambda: emulator.merge(5), "can not merge the last shard")):
        with pytest.raises(SlsError) as raised:
            bad_request()
        assert (raised.value.status, raised.value.code) == (400, "ParameterInvalid")
        assert raised.value.message.startswith(message)

    shards = emulator.state()["logstores"][LOGSTORE]["shards"]
    assert {shard: (s["status"], s["parents"], s["children"]) for shard, s in shards.items()} == {
        "0": ("readonly", [], [2, 3]), "1": ("readonly", [], [5]), "2": ("readonly", [0], [4]),
        "3": ("readonly", [0], [4]), "4": ("readonly", [2, 3], [5]), "5": ("readwrite", [4, 1], [])}


def test_admin_routes_split_merge_and_answer_sls_errors():
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post_error(emu, route, body):
        """(HTTP status, errorCode, errorMessage) of an admin request that must fail."""
        request = urllib.request.Request(f"http://{emu.addr}/_emulator/{route}", body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as raised:
            opener.open(request, timeout=30)
        answer = json.loads(raised.value.read())
        return raised.value.code, answer["errorCode"], answer["errorMessage"]

    with EmulatorProcess(shards=1) as emu:
        assert [span(s) for s in emu.split(0)] == [
            (0, "readonly", key("0"), LAST_KEY),
            (1, "readwrite", key("0"), key("8")), (2, "readwrite", key("8"), LAST_KEY)]
        assert [span(s) for s in emu.split(1, key("4"))] == [
            (1, "readonly", key("0"), key("8")),
            (3, "readwrite", key("0"), key("4")), (4, "readwrite", key("4"), key("8"))]
        assert [span(s) for s in emu.merge(4)] == [
            (5, "readwrite", key("4"), LAST_KEY),
            (4, "readonly", key("4"), key("8")), (2, "readonly", key("8"), LAST_KEY)]
        for route, body, message in (
                ("split", {"shard": 0}, "invalid shard id"),
                ("split", {"shard": "3"}, "invalid shard id"),
                ("split", {"shard": 3, "splitKey": key("4")}, "invalid mid hash"),  # 3 ends there
                ("merge", {"shard": 5}, "can not merge the last shard"),
                ("merge", {}, "bad admin request")):
            status, code, text = post_error(emu, route, json.dumps(body).encode())
            assert (status, code) == (400, "ParameterInvalid") and text.startswith(message)
        shards = emu.state()["logstores"][LOGSTORE]["shards"]
        assert [(s["status"], s["parents"]) for s in shards.values()] == [
            ("readonly", []), ("readonly", [0]), ("readonly", [0]), ("readwrite", [1]),
            ("readonly", [1]), ("readwrite", [4, 2])]
        assert emu.stop() == 0


# ---------------------------------------------------------------------------------------------
# Which shards a consumer group assigns (raw heartbeats through the SDK).

def test_groups_assign_read_only_shards_until_consumed_and_order_waits_for_ancestors(emulator, client):
    put(client, realistic_logs(10), hashKey=key("0"))  # shard 0 has data, shard 1 never has
    emulator.split(0)  # -> 2, 3
    emulator.split(1)  # -> 4, 5
    emulator.merge(2)  # 2 + 3 -> 6
    begin = {s: client.get_begin_cursor(PROJECT, LOGSTORE, s).get_cursor() for s in range(7)}
    end = {s: client.get_end_cursor(PROJECT, LOGSTORE, s).get_cursor() for s in range(7)}
    groups = ("at-once", "in-order")
    client.create_consumer_group(PROJECT, LOGSTORE, "at-once", timeout=30, in_order=False)
    client.create_consumer_group(PROJECT, LOGSTORE, "in-order", timeout=30, in_order=True)

    def beat(group, consumer, shards):
        return client.heart_beat(PROJECT, LOGSTORE, group, consumer, shards).get_shards()

    def checkpoint(shard, cursor, group_names=groups):
        for group in group_names:
            client.update_check_point(PROJECT, LOGSTORE, group, shard, cursor, "c1")

    # Read-only shards are assigned until consumed, shard 1 too although it never held data.
    assert beat("at-once", "c1", []) == [0, 1, 2, 3, 4, 5, 6]
    assert beat("in-order", "c1", []) == [0, 1]  # the children wait for their ancestors
    checkpoint(0, begin[0])
    assert beat("at-once", "c1", []) == [0, 1, 2, 3, 4, 5, 6]
    checkpoint(0, end[0])  # now shard 0 is consumed
    assert beat("at-once", "c1", []) == [1, 2, 3, 4, 5, 6]
    assert beat("in-order", "c1", []) == [1, 2, 3]  # 6 waits for 3 as well
    checkpoint(1, end[1])
    checkpoint(2, end[2])
    assert beat("in-order", "c1", []) == [3, 4, 5]
    checkpoint(3, end[3])
    assert beat("in-order", "c1", []) == [4, 5, 6]
    assert beat("at-once", "c1", []) == [4, 5, 6]
    # A checkpoint moved back makes a consumed shard assignable again.
    checkpoint(0, begin[0], ["at-once"])
    assert beat("at-once", "c1", [4, 5, 6]) == [0, 4, 5, 6]

    # Quotas count assignable shards only (4 here, not 7), and a shard taken from a live
    # consumer goes to another only once the first stops listing it.
    assert beat("at-once", "c2", []) == []
    assert beat("at-once", "c1", [0, 4, 5, 6]) == [0, 4]
    assert beat("at-once", "c1", [0, 4]) == [0, 4]
    assert beat("at-once", "c2", []) == [5, 6]
    # Only such a shard in transfer is withheld, not one a consumer lists without holding it.
    emulator.split(5)  # -> 7, 8; 5 is read-only but not consumed: 6 shards, 3 each
    assert beat("at-once", "c1", [0, 4, 8]) == [0, 4, 7]
    assert beat("at-once", "c2", [5, 6]) == [5, 6, 8]


# ---------------------------------------------------------------------------------------------
# A real ConsumerWorker across splits and merges.

def feeder(emulator, sent):
    """feed(count, seed): add `count` new logs, received now, remembered in `sent`."""
    def feed(count, seed):
        logs = realistic_logs(count, seed=seed)
        emulator.add_logs(logs)
        sent.extend(logs)
    return feed


def test_a_consumer_worker_follows_a_split_and_a_merge(emulator):
    seen, sent = [], []
    feed = feeder(emulator, sent)
    feed(40, seed=1)  # two LogGroups in each shard
    worker = start_worker(emulator, "w", seen)
    try:
        wait_until(lambda: len(seen) >= 40, "the logs before the split")
        emulator.split(0)
        feed(60, seed=2)  # over the read-write shards 1, 2, 3
        wait_until(lambda: len(seen) >= 100, "the logs after the split")
        # Shard 0's checkpoint is at its end: SLS assigns it no more.
        wait_assigned(emulator, [1, 2, 3], "shard 0 to be released")
        emulator.merge(2)
        feed(40, seed=3)  # over 1, 4
        wait_until(lambda: len(seen) >= 140, "the logs after the merge")
        wait_assigned(emulator, [1, 4], "shards 2 and 3 to be released")
    finally:
        stop_worker(worker)
    assert_each_seen_once(seen, sent)
    assert {shard for _, _, shard in seen} == {0, 1, 2, 3, 4}
    assert group_state(emulator)["checkpoints"] == end_cursors(emulator)


def test_in_order_consumption_finishes_parents_before_their_children(emulator):
    seen, sent = [], []
    feed = feeder(emulator, sent)
    feed(40, seed=1)  # 0, 1, 0, 1
    emulator.split(0)  # -> 2, 3
    feed(60, seed=2)  # 2, 3, 1, 2, 3, 1
    emulator.merge(2)  # -> 4
    feed(40, seed=3)  # 4, 1, 4, 1
    # The first pulls of 0 and 2 are slow: a shard assigned too early would run ahead of them
    # on the third worker thread.
    for parent in (0, 2):
        emulator.inject(op="pull", shard=parent, action="delay", latency=1.5, count=1)
    worker = start_worker(emulator, "w", seen, in_order=True, worker_pool_size=3)
    try:
        wait_until(lambda: len(seen) >= 140, "every log")
        wait_assigned(emulator, [1, 4], "the parents to be released")
    finally:
        stop_worker(worker)
    assert_each_seen_once(seen, sent)
    order_of = {shard: [n for n, (_, _, s) in enumerate(seen) if s == shard] for shard in (0, 2, 3, 4)}
    assert max(order_of[0]) < min(order_of[2] + order_of[3])  # split: the parent first
    assert max(order_of[2] + order_of[3]) < min(order_of[4])  # merge: both parents first


def test_the_sdk_finishes_an_empty_read_only_shard_only_when_its_consumer_shuts_down(emulator, client):
    """SDK 0.9.52 writes a shard's checkpoint after process() (never called without data), 30 s
    after its last data (only if it had some) and at shutdown. So a read-only shard that never
    held data stays assigned, and with `order` its children wait, until the worker stops."""
    first, children = realistic_logs(10, seed=1), realistic_logs(20, seed=2)
    put(client, first, hashKey=key("0"))  # shard 0 only
    emulator.split(1)  # empty -> 2 [80.., c0..), 3 [c0.., ff..]
    put(client, children[:10], hashKey=key("9"))
    put(client, children[10:], hashKey=key("d"))
    seen = []
    worker = start_worker(emulator, "w", seen, in_order=True)
    try:
        wait_until(lambda: len(seen) >= 10, "shard 0's logs")
        heartbeats = emulator.state()["requests"]["heartbeat"]
        wait_until(lambda: emulator.state()["requests"]["heartbeat"] >= heartbeats + 2,
                   "two more heartbeats")
        group = group_state(emulator)
        assert group["consumers"] == {"w": [0, 1]} and "1" not in group["checkpoints"]
        assert len(seen) == 10  # the children's logs wait
    finally:
        stop_worker(worker)
    # processor.shutdown -> save_checkpoint(force=True) saved the cursor of the last (empty) pull.
    assert group_state(emulator)["checkpoints"]["1"] == end_cursors(emulator)["1"]
    worker = start_worker(emulator, "w", seen, in_order=True)
    try:
        wait_until(lambda: len(seen) >= 30, "the children's logs")
        assert group_state(emulator)["consumers"] == {"w": [0, 2, 3]}
    finally:
        stop_worker(worker)
    assert_each_seen_once(seen, first + children)
