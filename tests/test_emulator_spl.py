"""Rule-based consumption (SPL) in the SLS emulator, through the unmodified SDK: `pull_logs(...,
query=...)` / `processor=...` and a real ConsumerWorker with `LogHubConfig(query=...)`."""
import base64
import json
import urllib.error
import urllib.request

import pytest
from aliyun.log import LogException
from aliyun.log.auth import AUTH_VERSION_4

from tests.polling import wait_until
from tests.sdk_consumer import AKID, LOGSTORE, PROJECT, SECRET, emulator_for_sdk, start_worker, stop_worker
from tests.sls_emulator import EmulatorProcess, log_client
from tests.waf_logs import realistic_logs

pytestmark = pytest.mark.slow
GROUP_SIZE, SHARDS = 10, 2

# What a SIEM wants: logs some WAF module acted on, except CC, with five fields.
SIEM_SPL = ("* | where final_action <> '' and final_plugin <> 'cc'"
            " | project request_traceid, final_action, final_plugin, client=real_client_ip,"
            " \"__tag__:__receive_time__\"")
SIEM_FIELDS = ["request_traceid", "final_action", "final_plugin", "client"]


def siem_view(log):
    """SIEM_SPL's result for one log (a flat dict), computed directly: None if it is filtered out.
    An absent field is null in SPL, and a comparison with null is never true."""
    action, plugin = log.get("final_action"), log.get("final_plugin")
    if action is None or plugin is None or action == "" or plugin == "cc":
        return None
    return {"__time__": int(log["__time__"]), "__topic__": "", "__source__": "",  # not projected
            "__tag__:__receive_time__": log["__tag__:__receive_time__"],
            "request_traceid": log["request_traceid"], "final_action": action,
            "final_plugin": plugin, "client": log["real_client_ip"]}


def waf_logs():
    """Realistic WAF logs in LogGroups of ten: a group of passes only, twenty groups of attacks
    and passes (half of the passes without final_* fields, as real WAF writes them), then ten
    groups of passes only. The SIEM filter empties the all-pass groups."""
    mixed = realistic_logs(20 * GROUP_SIZE, seed=11)
    for index, log in enumerate(mixed):
        if not log["final_action"] and index % 2:
            for key in [key for key in log if key.startswith("final_")]:
                del log[key]
    passes = [log for log in realistic_logs(40 * GROUP_SIZE, seed=12) if not log["final_action"]]
    logs = passes[:GROUP_SIZE] + mixed + passes[GROUP_SIZE:11 * GROUP_SIZE]
    for index, log in enumerate(logs):  # one tag value per LogGroup: groups are exactly ten logs
        log["__tag__:__receive_time__"] = str(1_700_000_000 + index // GROUP_SIZE)
    return logs


@pytest.fixture
def logs():
    return waf_logs()


@pytest.fixture
def emulator(monkeypatch, logs):
    """An in-process emulator holding `logs`, and the SDK's proxy settings pointing at it."""
    with emulator_for_sdk(monkeypatch, SHARDS, group_size=GROUP_SIZE) as emu:
        emu.add_logs(logs)
        yield emu


def end_cursors(emulator):
    shards = emulator.state()["logstores"][LOGSTORE]["shards"]
    return {int(shard): state["end_cursor"] for shard, state in shards.items()}


def checkpoints(emulator):
    """{consumer group: {shard: stored checkpoint}}"""
    groups = emulator.state()["logstores"][LOGSTORE]["consumer_groups"]
    return {name: {int(shard): cursor for shard, cursor in group["checkpoints"].items()}
            for name, group in groups.items()}


def position(cursor):
    """Cursors of a shard are base64 of increasing integers."""
    return int(base64.b64decode(cursor))


def pull_all(client, shard, **options):
    """Every PullLogs answer from the shard's begin cursor to its end, as (cursor, response)."""
    cursor = client.get_begin_cursor(PROJECT, LOGSTORE, shard).get_cursor()
    end = client.get_end_cursor(PROJECT, LOGSTORE, shard).get_cursor()
    answers = []
    while cursor != end:
        response = client.pull_logs(PROJECT, LOGSTORE, shard, cursor, **options)
        answers.append((cursor, response))
        cursor = response.get_next_cursor()
    return answers


def flat_logs(answers):
    return [log for _, response in answers for log in response.get_flatten_logs_json()]


def content_keys(answers):
    return [[c.Key for c in log.Contents] for _, response in answers
            for group in response.get_loggroup_list().LogGroups for log in group.Logs]


def test_pull_with_query_returns_exactly_the_matching_logs_and_moves_over_every_group(emulator, logs):
    client = log_client(emulator)
    expected_traceids = {log["request_traceid"] for log in logs if siem_view(log)}
    assert 0 < len(expected_traceids) < len(logs) // 4  # the filter has something to do

    pulled = []
    for shard in range(SHARDS):
        raw = pull_all(client, shard, count=1)  # one LogGroup per pull: the headers are per group
        processed = pull_all(client, shard, count=1, query=SIEM_SPL)
        assert [cursor for cursor, _ in processed] == [cursor for cursor, _ in raw]
        for (_, raw_answer), (_, answer) in zip(raw, processed):
            headers = answer.get_all_headers()
            assert answer.get_next_cursor() == raw_answer.get_next_cursor()
            assert headers["x-log-rawdatacount"] == "1"
            assert headers["x-log-rawdatasize"] == raw_answer.get_all_headers()["x-log-bodyrawsize"]
            assert headers["x-log-rawdatalines"] == str(raw_answer.get_log_count())
            assert headers["x-log-resultlines"] == str(answer.get_log_count())
            assert headers["x-log-failedlines"] == "0"
            groups = answer.get_loggroup_list().LogGroups
            assert headers["x-log-count"] == str(len(groups)) == str(min(1, answer.get_log_count()))
            assert int(headers["x-log-bodyrawsize"]) < int(headers["x-log-rawdatasize"])
        # The first and last LogGroups hold passes only: the answer is empty, the cursor moves.
        for _, answer in (processed[0], processed[-1]):
            assert (answer.get_loggroup_count(), answer.get_raw_size()) == (0, 0)
        expected = [view for view in map(siem_view, flat_logs(raw)) if view]
        assert flat_logs(processed) == expected
        assert content_keys(processed) == [SIEM_FIELDS] * len(expected)
        # A big pull covers the whole shard at once and gives the same logs.
        [(_, whole)] = pull_all(client, shard, query=SIEM_SPL)
        assert whole.get_all_headers()["x-log-rawdatacount"] == str(len(raw))
        assert whole.get_flatten_logs_json() == expected
        pulled += expected

    assert sorted(log["request_traceid"] for log in pulled) == sorted(expected_traceids)
    counts = emulator.state()["spl"]
    assert counts["raw_logs"] == 2 * len(logs) and counts["failed_logs"] == 0


def test_consume_processor_by_name_and_statement_errors(emulator):
    client = log_client(emulator, auth_version=AUTH_VERSION_4, region="cn-hangzhou")
    begin = client.get_begin_cursor(PROJECT, LOGSTORE, 1).get_cursor()

    with pytest.raises(LogException) as raised:
        client.pull_logs(PROJECT, LOGSTORE, 1, begin, processor="siem")
    assert (raised.value.resp_status, raised.value.get_error_code()) == (404, "ConsumeProcessorNotExist")

    # The admin route defines processors; an invalid statement defines nothing.
    def define(name, statement):
        request = urllib.request.Request(f"http://{emulator.addr}/_emulator/processors", method="POST",
                                         data=json.dumps({"name": name, "spl": statement}).encode())
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request) as answer:
            return json.loads(answer.read())

    assert define("siem", SIEM_SPL) == {"name": "siem", "spl": SIEM_SPL}
    with pytest.raises(urllib.error.HTTPError) as rejected:
        define("broken", "* | where status > 400")
    assert (rejected.value.code, json.loads(rejected.value.read())["errorCode"]) == (400, "ParameterInvalid")
    assert emulator.state()["processors"] == {"siem": SIEM_SPL}

    by_processor = client.pull_logs(PROJECT, LOGSTORE, 1, begin, processor="siem")
    by_query = client.pull_logs(PROJECT, LOGSTORE, 1, begin, query=SIEM_SPL)
    assert by_processor.get_flatten_logs_json() == by_query.get_flatten_logs_json()
    assert by_processor.get_log_count() > 0

    for options, message in (({"query": "* | where status > 400"}, "invalid query: line 1:18: Cannot apply"),
                             ({"query": "* | parse-json request_body"}, "invalid query: line 1:5:"),
                             ({"query": SIEM_SPL, "processor": "siem"}, "not both")):
        with pytest.raises(LogException) as raised:
            client.pull_logs(PROJECT, LOGSTORE, 1, begin, **options)
        assert (raised.value.resp_status, raised.value.get_error_code()) == (400, "ParameterInvalid")
        assert message in raised.value.get_error_message()


def test_the_emulator_process_defines_processors_too(monkeypatch, logs):
    with EmulatorProcess(PROJECT, LOGSTORE, shards=1, access_key_id=AKID, access_key_secret=SECRET) as emu:
        for name, value in emu.client_env().items():
            monkeypatch.setenv(name, value)
        emu.add_logs(logs)
        assert emu.add_processor("siem", SIEM_SPL) == {"name": "siem", "spl": SIEM_SPL}
        with pytest.raises(urllib.error.HTTPError) as rejected:
            emu.add_processor("broken", "* | where")
        assert rejected.value.code == 400
        client = log_client(emu)
        begin = client.get_begin_cursor(PROJECT, LOGSTORE, 0).get_cursor()
        answer = client.pull_logs(PROJECT, LOGSTORE, 0, begin, processor="siem")
        assert answer.get_flatten_logs_json() == [view for view in map(siem_view, logs) if view]
        assert emu.state()["processors"] == {"siem": SIEM_SPL}


def test_a_log_the_statement_fails_on_is_counted_and_dropped(emulator):

    client = log_client(emulator)
    emulator.add_logs([dict(log, status=status, request_traceid=f"status-{status}")
                       for log, status in zip(realistic_logs(3, seed=5), ("-", "503", "200"))])
    statement = "* | where cast(status as bigint) >= 500 | project request_traceid"
    answers = [answer for shard in range(SHARDS)
               for _, answer in pull_all(client, shard, query=statement, count=1)]
    assert sum(int(answer.get_all_headers()["x-log-failedlines"]) for answer in answers) == 1
    [answer] = [answer for answer in answers  # the new LogGroup: the others hold ten logs
                if answer.get_all_headers()["x-log-rawdatalines"] == "3"]
    headers = answer.get_all_headers()
    assert (headers["x-log-resultlines"], headers["x-log-failedlines"]) == ("1", "1")
    assert [log["request_traceid"] for log in answer.get_flatten_logs_json()] == ["status-503"]
    assert emulator.state()["spl"]["failed_logs"] == 1


def fields(log, *_):
    return {c.Key: c.Value for c in log.Contents}


def test_consumer_workers_with_a_query_and_with_a_processor_get_only_matching_logs(emulator, logs):
    emulator.add_processor("siem", SIEM_SPL)
    expected = sorted((view["request_traceid"], view["client"])
                      for view in map(siem_view, logs) if view)
    seen = {"query": [], "processor": []}
    workers = [start_worker(emulator, "c1", seen[group], group=group, record=fields, **spl_option)
               for group, spl_option in (("query", {"query": SIEM_SPL}), ("processor", {"processor": "siem"}))]
    try:
        total = len(logs)
        # Both groups read every LogGroup, up to the ten trailing all-pass ones.
        wait_until(lambda: emulator.state()["spl"]["raw_logs"] >= 2 * total,
                   what="both consumers to read the shards")
        wait_until(lambda: all(len(s) >= len(expected) for s in seen.values()), what="every matching log")
        # The last batches held no matching log, so the SDK never called process() for them: the
        # stored checkpoints stay behind the end cursors (until the next batch with data, or the
        # default shutdown, which saves the last batch the worker took in).
        before = checkpoints(emulator)
        ends = end_cursors(emulator)
        for group in seen:
            assert all(position(before[group][shard]) < position(end) for shard, end in ends.items())
    finally:
        for worker in workers:
            stop_worker(worker)

    for received in seen.values():
        assert sorted((log["request_traceid"], log["client"]) for log in received) == expected
        assert all(list(log) == SIEM_FIELDS for log in received)
    after = checkpoints(emulator)
    for group in seen:
        assert all(position(before[group][shard]) <= position(after[group][shard]) <= position(end)
                   for shard, end in ends.items())

