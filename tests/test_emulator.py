"""The SLS emulator, driven over HTTP by the unmodified aliyun-log-python-sdk.

Everything goes through the SDK's real request path (signing, proxy, retries, protobuf parsing),
so a test passing here means the SDK accepted the emulator as Log Service.
"""
import base64
import json
import re
import signal
import time

import pytest
from aliyun.log import LogClient, LogException
from aliyun.log.auth import AUTH_VERSION_4

from tests.polling import wait_until
from tests.sdk_consumer import (AKID, LOGSTORE, PROJECT, SECRET, content, emulator_for_sdk, pulled_logs, put,
                                start_worker, stop_worker)
from tests.sls_emulator import (EmulatorProcess, cached_log_groups, encode_log_groups, iter_jsonl_file,
                                log_client)
from tests.waf_logs import hostile_logs, realistic_logs, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture
def emulator(monkeypatch):
    with emulator_for_sdk(monkeypatch, 4, group_size=10) as emu:
        yield emu


@pytest.fixture
def client(emulator):
    return log_client(emulator)


def shard_states(emulator):
    return emulator.state()["logstores"][LOGSTORE]["shards"]


def test_two_consumer_workers_share_shards_and_consume_every_log_exactly_once(emulator, client):
    logs = realistic_logs(20_000, seed=1)
    variants = [{}, {"compress": False}, {"hashKey": "0" * 32}, {"hashKey": "c" + "0" * 31, "compress": False}]
    for batch_number, start in enumerate(range(0, len(logs), 100)):
        put(client, logs[start:start + 100], **variants[batch_number % len(variants)])
    assert sum(s["logs"] for s in shard_states(emulator).values()) == 20_000

    seen = []  # list.append is atomic: shared by the workers' threads
    workers = {"consumer-a": start_worker(emulator, "consumer-a", seen)}
    try:
        wait_until(lambda: len(seen) >= 2_000, what="consumer-a to start consuming")
        workers["consumer-b"] = start_worker(emulator, "consumer-b", seen)
        wait_until(lambda: len(seen) >= 20_000, timeout=60, what="every log to be consumed")

        group = emulator.state()["logstores"][LOGSTORE]["consumer_groups"]["forwarder"]
        assert group["timeout"] == 2  # the SDK asks for 2 x heartbeat_interval
        assert sorted(group["consumers"]["consumer-a"] + group["consumers"]["consumer-b"]) == [0, 1, 2, 3]
        assert len(group["consumers"]["consumer-a"]) == len(group["consumers"]["consumer-b"]) == 2

        # A stopped consumer stops heart-beating; after the group timeout its shards move.
        stop_worker(workers.pop("consumer-a"))
        wait_until(lambda: emulator.state()["logstores"][LOGSTORE]["consumer_groups"]["forwarder"]
                   ["consumers"] == {"consumer-b": [0, 1, 2, 3]}, what="consumer-b to get every shard")
        late_logs = realistic_logs(400, seed=2)
        for start in range(0, 400, 100):
            put(client, late_logs[start:start + 100])
        wait_until(lambda: len(seen) >= 20_400, what="the late logs to be consumed")
    finally:
        for worker in workers.values():
            stop_worker(worker)

    traceids = [traceid for traceid, _, _ in seen]
    assert sorted(traceids) == sorted(log["request_traceid"] for log in logs + late_logs)
    shards_of = {name: {shard for _, consumer, shard in seen if consumer == name}
                 for name in ("consumer-a", "consumer-b")}
    assert shards_of["consumer-a"] == {0, 1, 2, 3}  # it had them all before consumer-b joined
    assert shards_of["consumer-b"] == {0, 1, 2, 3}
    late = {log["request_traceid"] for log in late_logs}
    assert {consumer for traceid, consumer, _ in seen if traceid in late} == {"consumer-b"}

    state = emulator.state()["logstores"][LOGSTORE]
    checkpoints = state["consumer_groups"]["forwarder"]["checkpoints"]
    assert checkpoints == {shard: s["end_cursor"] for shard, s in state["shards"].items()}


def test_heartbeat_never_hands_a_listed_shard_to_a_second_consumer(emulator, client):
    client.create_consumer_group(PROJECT, LOGSTORE, "cg", timeout=1)

    def beat(consumer, shards):
        return client.heart_beat(PROJECT, LOGSTORE, "cg", consumer, shards).get_shards()

    assert beat("c1", []) == [0, 1, 2, 3]
    # c1's body lags its assignment (the SDK's first heartbeat sends []), yet it may be consuming.
    assert beat("c2", []) == []
    assert beat("c1", [0, 1, 2, 3]) == [0, 1]    # c1 is told to release two shards...
    assert beat("c2", []) == []                  # ...but still lists them while it drains
    assert beat("c1", [0, 1, 3]) == [0, 1]       # shard 2 drained (checkpoint saved)
    assert beat("c2", []) == [2]
    assert beat("c1", [0, 1]) == [0, 1]
    assert beat("c2", [2]) == [2, 3]

    time.sleep(1.2)  # c1 sends nothing for longer than the group timeout (1 s)
    assert beat("c2", [2, 3]) == [0, 1, 2, 3]
    consumers = emulator.state()["logstores"][LOGSTORE]["consumer_groups"]["cg"]["consumers"]
    assert consumers == {"c2": [0, 1, 2, 3]}


def test_checkpoints_belong_to_the_group_and_survive_consumer_changes(emulator, client):
    client.create_consumer_group(PROJECT, LOGSTORE, "cg", timeout=30)
    never = client.get_check_point(PROJECT, LOGSTORE, "cg", 3).get_consumer_group_check_points()
    assert [(c["shard"], c["checkpoint"]) for c in never] == [(3, "")]

    cursor = client.get_end_cursor(PROJECT, LOGSTORE, 3).get_cursor()
    client.update_check_point(PROJECT, LOGSTORE, "cg", 3, cursor, "c1")
    client.heart_beat(PROJECT, LOGSTORE, "cg", "c2", [])
    stored = client.get_check_point(PROJECT, LOGSTORE, "cg", 3).get_consumer_group_check_points()
    assert [(c["shard"], c["checkpoint"], c["consumer"]) for c in stored] == [(3, cursor, "c1")]
    every = client.get_check_point(PROJECT, LOGSTORE, "cg").get_consumer_group_check_points()
    assert [c["checkpoint"] for c in every] == ["", "", "", cursor]

    with pytest.raises(LogException) as raised:
        client.update_check_point(PROJECT, LOGSTORE, "cg", 3, "not a cursor!", "c1")
    assert raised.value.get_error_code() == "InvalidShardCheckPoint"


def test_consumer_group_administration(emulator, client):
    client.create_consumer_group(PROJECT, LOGSTORE, "cg", timeout=20, in_order=False)
    with pytest.raises(LogException) as raised:
        client.create_consumer_group(PROJECT, LOGSTORE, "cg", timeout=20)
    assert (raised.value.get_error_code(), raised.value.resp_status) == ("ConsumerGroupAlreadyExist", 400)

    client.update_consumer_group(PROJECT, LOGSTORE, "cg", timeout=40, in_order=True)
    [group] = client.list_consumer_group(PROJECT, LOGSTORE).get_consumer_groups()
    assert (group.get_consumer_group_name(), group.get_timeout(), group.is_in_order()) == ("cg", 40, True)

    client.delete_consumer_group(PROJECT, LOGSTORE, "cg")
    assert client.list_consumer_group(PROJECT, LOGSTORE).get_consumer_groups() == []
    with pytest.raises(LogException) as raised:
        client.heart_beat(PROJECT, LOGSTORE, "cg", "c1", [])
    assert (raised.value.get_error_code(), raised.value.resp_status) == ("ConsumerGroupNotExist", 404)


# ---------------------------------------------------------------------------------------------
# Cursors and PullLogs.

def test_cursors_follow_receive_time_and_pull_respects_count_and_end_cursor(emulator, client):
    start = 1_700_000_000
    emulator.load_logs(realistic_logs(400, start_time=start))  # 10 logs per second -> LogGroup
    # Round-robin puts LogGroups 0, 4, 8, ... (received at start, start+4, ...) on shard 0.
    cursor_at = lambda when: client.get_cursor(PROJECT, LOGSTORE, 0, when).get_cursor()
    begin = client.get_begin_cursor(PROJECT, LOGSTORE, 0).get_cursor()
    end = client.get_end_cursor(PROJECT, LOGSTORE, 0).get_cursor()
    assert cursor_at(start - 100) == begin == cursor_at("begin")
    assert cursor_at(int(time.time()) + 100) == end == cursor_at("end")
    third = cursor_at(start + 5)  # first LogGroup received at or after start+5: start+8
    assert client.get_cursor_time(PROJECT, LOGSTORE, 0, third).get_cursor_time() == start + 8
    assert client.get_previous_cursor_time(PROJECT, LOGSTORE, 0, third).get_cursor_time() == start + 4

    first_two = client.pull_logs(PROJECT, LOGSTORE, 0, begin, count=5, end_cursor=third)
    assert first_two.get_loggroup_count() == 2  # end_cursor is exclusive
    assert first_two.get_next_cursor() == third
    assert [int(log.Time) for log in pulled_logs(first_two)] == [start] * 10 + [start + 4] * 10

    rest = client.pull_logs(PROJECT, LOGSTORE, 0, third, count=1000)
    assert rest.get_loggroup_count() == 8 and rest.get_log_count() == 80
    assert rest.get_next_cursor() == end
    at_end = client.pull_logs(PROJECT, LOGSTORE, 0, end)
    assert (at_end.get_loggroup_count(), at_end.get_next_cursor()) == (0, end)
    assert at_end.get_all_headers()["x-log-bodyrawsize"] == "0"


def test_pull_compresses_with_lz4_only_when_asked(emulator, client):
    emulator.add_logs(realistic_logs(40))
    begin = client.get_begin_cursor(PROJECT, LOGSTORE, 1).get_cursor()
    compressed = client.pull_logs(PROJECT, LOGSTORE, 1, begin)
    plain = client.pull_logs(PROJECT, LOGSTORE, 1, begin, compress=False)
    headers = compressed.get_all_headers()
    assert (headers["x-log-compresstype"], headers["x-log-count"]) == ("lz4", "1")
    assert headers["x-log-bodyrawsize"] == plain.get_all_headers()["x-log-bodyrawsize"]
    assert "x-log-compresstype" not in plain.get_all_headers()
    assert all(name == name.lower() for name in headers if name.lower().startswith("x-log-"))
    assert [content(log, "request_traceid") for log in pulled_logs(compressed)] == \
        [content(log, "request_traceid") for log in pulled_logs(plain)]


def test_bad_cursors_are_invalid_cursor(emulator, client):
    emulator.add_logs(realistic_logs(80))  # two LogGroups per shard
    cursor_of_shard_1 = client.get_begin_cursor(PROJECT, LOGSTORE, 1).get_cursor()
    end = client.get_end_cursor(PROJECT, LOGSTORE, 0).get_cursor()
    beyond_end = base64.b64encode(str(int(base64.b64decode(end)) + 1).encode()).decode()
    for cursor in ("garbage!", base64.b64encode(b"123").decode(), cursor_of_shard_1, beyond_end):
        with pytest.raises(LogException) as raised:
            client.pull_logs(PROJECT, LOGSTORE, 0, cursor)
        assert (raised.value.get_error_code(), raised.value.resp_status) == ("InvalidCursor", 400)

    old_begin = client.get_begin_cursor(PROJECT, LOGSTORE, 0).get_cursor()
    emulator.expire(0, 1)  # the TTL drops the oldest LogGroup
    with pytest.raises(LogException) as raised:
        client.pull_logs(PROJECT, LOGSTORE, 0, old_begin)
    assert raised.value.get_error_code() == "InvalidCursor"
    new_begin = client.get_begin_cursor(PROJECT, LOGSTORE, 0).get_cursor()
    assert client.pull_logs(PROJECT, LOGSTORE, 0, new_begin).get_log_count() == 10
    assert shard_states(emulator)["0"]["logs"] == 10


def test_put_routes_by_hash_key_and_round_robins_without_one(emulator, client):
    logs = realistic_logs(10)
    for key in ("0" * 32, "7" + "f" * 31, "8" + "0" * 31, "f" * 32):
        put(client, logs, hashKey=key)
    assert [s["logs"] for s in shard_states(emulator).values()] == [10, 10, 10, 10]
    for _ in range(4):
        put(client, logs)
    assert [s["logs"] for s in shard_states(emulator).values()] == [20, 20, 20, 20]
    assert [s["shardID"] for s in client.list_shards(PROJECT, LOGSTORE).get_shards_info()] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Authentication and errors.

def test_wrong_credentials_are_refused_with_sls_errors(emulator):
    with pytest.raises(LogException) as raised:
        log_client(emulator, access_key_secret="wrong-secret").list_shards(PROJECT, LOGSTORE)
    assert (raised.value.get_error_code(), raised.value.resp_status) == ("SignatureNotMatch", 403)
    assert raised.value.get_request_id()

    with pytest.raises(LogException) as raised:
        log_client(emulator, access_key_id="other-akid").list_shards(PROJECT, LOGSTORE)
    assert (raised.value.get_error_code(), raised.value.resp_status) == ("Unauthorized", 401)

    with pytest.raises(LogException) as raised:
        log_client(emulator, access_key_secret="wrong", auth_version=AUTH_VERSION_4,
                   region="cn-hangzhou").list_shards(PROJECT, LOGSTORE)
    assert raised.value.get_error_code() == "SignatureNotMatch"

    with pytest.raises(LogException) as raised:
        LogClient(emulator.endpoint, AKID, SECRET).list_shards("other-project", LOGSTORE)
    assert raised.value.get_error_code() == "ProjectNotExist"

    assert emulator.state()["errors"]["SignatureNotMatch"] == 2


def test_sts_token_and_v4_signatures_are_accepted(emulator):
    for client in (log_client(emulator, securityToken="sts-token-value"),
                   log_client(emulator, auth_version=AUTH_VERSION_4, region="cn-hangzhou"),
                   log_client(emulator, securityToken="sts", auth_version=AUTH_VERSION_4, region="cn")):
        put(client, realistic_logs(5), compress=False)
        client.create_consumer_group(PROJECT, LOGSTORE, "cg", timeout=20)
        client.update_check_point(PROJECT, LOGSTORE, "cg", 0, client.get_end_cursor(
            PROJECT, LOGSTORE, 0).get_cursor(), "c1")
        client.delete_consumer_group(PROJECT, LOGSTORE, "cg")
    assert sum(s["logs"] for s in shard_states(emulator).values()) == 15


def test_injected_server_errors_are_survived_by_sdk_retries(emulator, client):
    emulator.add_logs(realistic_logs(10))
    client.create_consumer_group(PROJECT, LOGSTORE, "cg", timeout=20)
    emulator.inject(op="pull", count=1, status=500, errorCode="InternalServerError")
    emulator.inject(op="heartbeat", count=1, status=503, errorCode="ServerBusy")
    begin = client.get_begin_cursor(PROJECT, LOGSTORE, 0).get_cursor()
    assert client.pull_logs(PROJECT, LOGSTORE, 0, begin).get_log_count() == 10
    assert client.heart_beat(PROJECT, LOGSTORE, "cg", "c1", []).get_shards() == [0, 1, 2, 3]
    state = emulator.state()
    assert [f["applied"] for f in state["faults"]] == [1, 1]
    assert (state["requests"]["pull"], state["requests"]["heartbeat"]) == (2, 2)


def test_fault_filters_actions_and_clearing(emulator, client):
    emulator.add_logs(realistic_logs(80))
    client.create_consumer_group(PROJECT, LOGSTORE, "cg", timeout=20)
    begin = [client.get_begin_cursor(PROJECT, LOGSTORE, s).get_cursor() for s in range(4)]

    emulator.inject(op="pull", shard=1, action="invalid_cursor")
    assert client.pull_logs(PROJECT, LOGSTORE, 0, begin[0]).get_log_count() == 20
    with pytest.raises(LogException) as raised:
        client.pull_logs(PROJECT, LOGSTORE, 1, begin[1])
    assert raised.value.get_error_code() == "InvalidCursor"

    emulator.inject(op="checkpoint", consumer="c1", status=400, errorCode="ConsumerNotMatch")
    client.update_check_point(PROJECT, LOGSTORE, "cg", 0, begin[0], "c2")
    with pytest.raises(LogException) as raised:
        client.update_check_point(PROJECT, LOGSTORE, "cg", 0, begin[0], "c1")
    assert raised.value.get_error_code() == "ConsumerNotMatch"

    emulator.inject(op="list_shards", fraction=0.5, status=429, errorCode="WriteQuotaExceed")
    outcomes = []
    for _ in range(4):
        try:
            client.list_shards(PROJECT, LOGSTORE)
            outcomes.append("ok")
        except LogException as error:
            outcomes.append(error.get_error_code())
    assert outcomes == ["ok", "WriteQuotaExceed", "ok", "WriteQuotaExceed"]

    # Through the proxy, the SDK sees a dropped connection as a retryable HTTPConnectionPool error.
    emulator.inject(op="list_cg", count=1, action="drop")
    assert len(client.list_consumer_group(PROJECT, LOGSTORE).get_consumer_groups()) == 1
    state = emulator.state()
    assert (state["faults"][-1]["applied"], state["requests"]["list_cg"]) == (1, 2)

    emulator.inject(op="any", action="delay", latency=0.01)
    emulator.clear_faults()
    assert client.pull_logs(PROJECT, LOGSTORE, 1, begin[1]).get_log_count() == 20
    assert emulator.state()["faults"] == []


def test_a_replace_fault_changes_the_answer_as_asked(emulator, client):
    emulator.add_logs(realistic_logs(40))
    begin = client.get_begin_cursor(PROJECT, LOGSTORE, 0).get_cursor()
    real = client.pull_logs(PROJECT, LOGSTORE, 0, begin)
    raw = real.get_loggroup_list().SerializeToString()
    emulator.inject(op="pull", shard=0, action="replace", count=1,
                    headers={"X-Log-Cursor": "Zm9yZ2Vk", "x-log-compresstype": None, "x-log-bodyrawsize": str(len(raw))},
                    body=base64.b64encode(raw).decode())
    forged = client.pull_logs(PROJECT, LOGSTORE, 0, begin)  # the same logs, uncompressed, another cursor
    assert forged.get_next_cursor() == "Zm9yZ2Vk" != real.get_next_cursor()
    assert "x-log-compresstype" not in {name.lower() for name in forged.get_all_headers()}
    assert forged.get_log_count() == real.get_log_count() == 10
    assert client.pull_logs(PROJECT, LOGSTORE, 0, begin).get_next_cursor() == real.get_next_cursor()
    for bad in ({"headers": {"a": 1}}, {"headers": ["a"]}, {"body": "not base64!"}):
        with pytest.raises(ValueError):
            emulator.inject(op="pull", action="replace", **bad)


# ---------------------------------------------------------------------------------------------
# The command line program.

def test_cli_loads_jsonl_serves_admin_routes_and_exits_cleanly_on_sigterm(tmp_path, monkeypatch):
    # Without per-log tags, consecutive history logs share LogGroups of --group-size logs.
    history = [{k: v for k, v in log.items() if not k.startswith("__tag__:")}
               for log in realistic_logs(1_000, seed=3)]
    hostile = hostile_logs()  # every hostile log has its own tag value: one LogGroup each
    with EmulatorProcess(load=[write_jsonl(tmp_path / "history.jsonl", history),
                               write_jsonl(tmp_path / "hostile.jsonl", hostile)],
                         extra_args=["--group-size", "50"]) as emu:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", emu.addr)
        shards = emu.state()["logstores"]["waf-logstore"]["shards"]
        assert sum(s["logs"] for s in shards.values()) == len(history) + len(hostile)
        assert sum(s["groups"] for s in shards.values()) == 1_000 // 50 + len(hostile)

        for name, value in emu.client_env().items():
            monkeypatch.setenv(name, value)
        client = log_client(emu)
        pulled = []
        for shard in range(4):
            cursor = client.get_begin_cursor("waf-project", "waf-logstore", shard).get_cursor()
            pulled += pulled_logs(client.pull_logs("waf-project", "waf-logstore", shard, cursor))
        by_traceid = {content(log, "request_traceid"): log for log in pulled}
        assert len(by_traceid) == len(history) + len(hostile)
        assert content(by_traceid["hostile-invalid_utf8"], "http_cookie") == b"bad \xff\xfe bytes \xc3( end"
        emoji = next(log for log in hostile if log["request_traceid"] == "hostile-emoji")
        assert content(by_traceid["hostile-emoji"], "http_cookie") == emoji["http_cookie"]

        assert emu.add_logs(realistic_logs(30, seed=4)) == {"logs": 30, "groups": 3}
        groups_before = emu.state()["logstores"]["waf-logstore"]["shards"]["0"]["groups"]
        assert emu.expire(0, 2)["groups"] == groups_before - 2
        emu.inject(op="cursor", count=1, status=400, errorCode="Injected")
        with pytest.raises(LogException) as raised:
            client.get_end_cursor("waf-project", "waf-logstore", 0)
        assert raised.value.get_error_code() == "Injected"
        assert emu.state()["faults"][0]["applied"] == 1
        emu.clear_faults()
        assert emu.stop() == 0


def test_cli_exits_cleanly_on_sigint_and_refuses_a_bad_load_file(tmp_path):
    emu = EmulatorProcess()
    emu.process.send_signal(signal.SIGINT)
    assert emu.stop() == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"__time__": 1700000000, "a": "b"}) + "\n")  # not a string
    with pytest.raises(RuntimeError, match="did not start"):
        EmulatorProcess(load=[bad])


def test_load_cache_gives_the_same_log_groups_until_the_file_changes(tmp_path):
    """--load-cache: the LogGroups encoded from a JSONL file are written once and read back the same,
    hostile bytes included; a changed file is encoded again."""
    logs = realistic_logs(300, seed=8) + hostile_logs()
    path = write_jsonl(tmp_path / "logs.jsonl", logs)
    cache = tmp_path / "cache"
    cache.mkdir()
    direct = list(encode_log_groups(iter_jsonl_file(str(path)), 7))
    assert list(cached_log_groups(str(path), 7, str(cache))) == direct  # written, then read
    [written] = cache.iterdir()
    assert list(cached_log_groups(str(path), 7, str(cache))) == direct  # read from the cache
    assert list(cache.iterdir()) == [written]
    write_jsonl(path, logs[:10])
    assert list(cached_log_groups(str(path), 7, str(cache))) == list(encode_log_groups(logs[:10], 7))
    assert len(list(cache.iterdir())) == 2


def test_log_format_fields_reach_the_sdk(emulator, client):
    emulator.load_logs([
        {"__time__": "1700000000", "__time_ns_part__": "123456789", "__topic__": "t", "__source__": "s",
         "__tag__:__hostname__": "waf-1", "b": "2", "a": "1"},
    ])
    [group] = client.pull_logs(PROJECT, LOGSTORE, 0, client.get_begin_cursor(
        PROJECT, LOGSTORE, 0).get_cursor()).get_loggroup_list().LogGroups
    [log] = group.Logs
    assert (group.Topic, group.Source, [(t.Key, t.Value) for t in group.LogTags]) == \
        ("t", "s", [("__hostname__", "waf-1")])
    assert (log.Time, log.Time_ns, [(c.Key, c.Value) for c in log.Contents]) == \
        (1700000000, 123456789, [("b", "2"), ("a", "1")])
