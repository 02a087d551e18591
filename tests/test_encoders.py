"""Encoders: a WAF log -> the bytes of one syslog message (no network, no SDK worker)."""
import datetime
import json
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

import sync_waf_to_syslog as fwd
from tests.encoding import RAW_TEXT, RFC5424, encode, make_settings, pull_of, serialized, text
from tests.kv import parse_kv
from tests.waf_logs import expected_fields, hostile_logs, log_group_list, pull_body, realistic_logs

# --- key=value escaping -------------------------------------------------------------------------

@pytest.mark.parametrize("fields, separator, expected", [
    ([("a", "1"), ("b", "2")], ",", "a=1,b=2"),
    ([("k", "x,y")], ",", "k=x\\,y"),
    ([("k=1", "v=1")], ",", "k\\=1=v=1"),
    ([("k", "line1\nline2\r\n")], ",", "k=line1\\nline2\\r\\n"),
    ([("k", "C:\\dir\\")], ",", "k=C:\\\\dir\\\\"),
    ([("k", "nul\x00esc\x1bdel\x7f")], ",", "k=nul\\x00esc\\x1bdel\x7f"),
    ([("k", "tab\tkept")], ",", "k=tab\tkept"),
    ([("k", "a||b")], "||", "k=a\\||b"),
    ([("k", "ends|"), ("n", "2")], "||", "k=ends\\x7c||n=2"),
    ([("k", "")], ",", "k="),
    ([("k", "ü 日本 😀")], ",", "k=ü 日本 😀"),
])
def test_kv_escaping_follows_the_documented_rules(fields, separator, expected):
    assert fwd.encode_kv(fields, separator) == expected
    assert parse_kv(expected, separator) == fields


SEPARATORS = st.text(alphabet=sorted(fwd.SEPARATOR_CHARS), min_size=1, max_size=4)


@hypothesis_settings(max_examples=400, deadline=None)
@given(fields=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), min_size=1, max_size=6),
       separator=SEPARATORS)
def test_kv_escaping_is_reversible_for_any_fields_and_separator(fields, separator):
    body = fwd.encode_kv(fields, separator)
    assert parse_kv(body, separator) == fields
    assert not re.search(r"[\x00-\x08\x0a-\x1f]", body.replace(separator, ""))


@hypothesis_settings(max_examples=200, deadline=None)
@given(value=st.binary(max_size=60))
def test_any_bytes_become_one_valid_utf8_field(value):
    text = fwd.text_of(value)
    body = fwd.encode_kv([("k", text)], ",")
    assert parse_kv(body, ",") == [("k", value.decode("utf-8", "replace"))]
    body.encode("utf-8")  # never raises: invalid input became U+FFFD


# --- timestamps ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tz, offsets", [
    ("UTC", {"+00:00"}),
    ("Asia/Shanghai", {"+08:00"}),
    ("America/New_York", {"-05:00", "-04:00"}),
    ("Asia/Kolkata", {"+05:30"}),
    ("America/St_Johns", {"-03:30", "-02:30"}),
    ("Australia/Eucla", {"+08:45"}),
])
def test_rfc3339_timestamps_are_right_in_every_time_zone(tz, offsets):
    moments = [0, 1_700_000_000, 1_719_835_199, 1_735_689_600, 1_795_773_144]
    script = ("import json, sys; import sync_waf_to_syslog as f; "
              "print(json.dumps([[f.rfc3339(s, 123456789), f.rfc3339(s), f.rfc3164_timestamp(s)] "
              f"for s in {moments}]))")
    out = subprocess.run([sys.executable, "-c", script], env={"TZ": tz, "PYTHONPATH": "."},
                         capture_output=True, text=True, check=True).stdout
    for seconds, (with_fraction, whole, classic) in zip(moments, json.loads(out)):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.123456[+-]\d\d:\d\d", with_fraction)
        assert with_fraction[-6:] in offsets
        parsed = datetime.datetime.fromisoformat(with_fraction)
        assert parsed.timestamp() == pytest.approx(seconds + 0.123456, abs=1e-6)
        assert datetime.datetime.fromisoformat(whole).timestamp() == seconds
        local = parsed.replace(tzinfo=None)
        assert classic == f"{fwd.MONTHS[local.month - 1]} {local.day:2d} {local:%H:%M:%S}"


def test_rfc3164_day_is_space_padded():
    script = "import sync_waf_to_syslog as f; print(f.rfc3164_timestamp(1704412800), f.rfc3339(1704412800))"
    out = subprocess.run([sys.executable, "-c", script], env={"TZ": "UTC", "PYTHONPATH": "."},
                         capture_output=True, text=True, check=True).stdout
    assert out == "Jan  5 00:00:00 2024-01-05T00:00:00+00:00\n"


# --- whole messages -----------------------------------------------------------------------------

def test_every_hostile_log_gives_exactly_one_well_formed_rfc5424_message():
    logs = hostile_logs()
    messages, newest, truncated, _ = encode(logs, SYSLOG_HOSTNAME="fwd-host", SYSLOG_TAG="waf",
                                         SYSLOG_FACILITY="local4", SYSLOG_SEVERITY="notice")
    assert len(messages) == len(logs) and truncated == 0
    assert newest == max(int(entry["__time__"]) for entry in logs)
    for entry, message in zip(logs, messages):
        match = RFC5424.match(message)
        assert match, message[:200]
        pri, timestamp, host, app, procid, msgid, sd, body = match.groups()
        assert (int(pri), host, app, procid, msgid, sd) == (20 * 8 + 5, b"fwd-host", b"waf", b"4242", b"-", b"-")
        assert datetime.datetime.fromisoformat(timestamp.decode()).timestamp() == int(entry["__time__"])
        assert b"\n" not in message and b"\r" not in message
        assert parse_kv(body.decode("utf-8"), ",") == expected_fields(entry)


def test_rfc3164_messages_keep_utf8_and_have_the_classic_header():
    logs = hostile_logs()
    messages = encode(logs, SYSLOG_FORMAT="rfc3164", SYSLOG_HOSTNAME="fwd", SYSLOG_TAG="waf").messages
    for entry, message in zip(logs, messages):
        match = re.match(rb"<14>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) fwd waf: (.*)\Z", message, re.S)
        assert match, message[:100]
        assert parse_kv(match.group(2).decode(), ",") == expected_fields(entry)


def test_nanoseconds_become_microseconds_in_the_timestamp():
    entry = dict(realistic_logs(1)[0], __time_ns_part__="987654321")
    message = encode([entry])[0][0]
    assert re.search(rb"T\d\d:\d\d:\d\d\.987654[+-]\d\d:\d\d ", message)


def test_a_nanosecond_part_out_of_range_is_left_out():
    entry = dict(realistic_logs(1)[0], __time_ns_part__=str(2**32 - 1))
    message = encode([entry])[0][0]
    assert RFC5424.match(message) and re.search(rb"T\d\d:\d\d:\d\d[+-]\d\d:\d\d ", message)


def test_separator_setting_changes_the_body():
    entry = realistic_logs(1)[0]
    message = encode([entry], SYSLOG_SEP="||")[0][0]
    body = RFC5424.match(message).group(8).decode()
    assert "||http_user_agent=" in body
    assert parse_kv(body, "||") == expected_fields(entry)


@pytest.mark.parametrize("max_size", [480, 2048, 8192])
def test_oversized_logs_are_cut_to_fit_and_still_parse(max_size):
    logs = [entry for entry in hostile_logs() if entry["request_traceid"] in ("hostile-huge", "hostile-huge_utf8")]
    messages, _, truncated, _ = encode(logs, SYSLOG_MAX_MESSAGE_SIZE=str(max_size))
    assert truncated == len(logs)
    for entry, message in zip(logs, messages):
        assert len(message) <= max_size
        text = message.decode("utf-8")  # cut at a character boundary
        if max_size >= 8192:  # room for every key: all fields present, long values cut with "..."
            fields = parse_kv(RFC5424.match(message).group(8).decode(), ",")
            assert [k for k, _ in fields] == [k for k, _ in expected_fields(entry)]
            assert any(v.endswith("...") for _, v in fields)
        else:
            assert text.startswith("<14>1 ")


# --- reading pulls: the fast path -------------------------------------------------------------

@hypothesis_settings(max_examples=400, deadline=None)
@given(logs=st.lists(st.lists(st.tuples(RAW_TEXT, RAW_TEXT), max_size=6), min_size=1, max_size=3),
       tags=st.lists(st.tuples(RAW_TEXT, RAW_TEXT), max_size=2), topic=RAW_TEXT,
       separator=SEPARATORS, nanoseconds=st.integers(0, 999_999_999))
def test_messages_from_pulled_bytes_equal_the_reference_encoder(logs, tags, topic, separator, nanoseconds):
    """The fast path (raw values joined, escaped as bytes, put in a template) gives byte for byte what
    encode_kv gives field by field, for any keys and values: invalid UTF-8, NUL, %, separators."""
    encoder = fwd.MessageEncoder(make_settings(SYSLOG_SEP=separator), procid=1)
    messages = encoder.encode(fwd.read_log_groups(pull_of(logs, topic, tags, nanoseconds)))[0]
    assert len(messages) == len(logs)
    shared = [("__topic__", text(topic)), ("__source__", "src"), *((f"__tag__:{text(k)}", text(v)) for k, v in tags)]
    for i, (pairs, message) in enumerate(zip(logs, messages)):
        fields = shared + [(text(k), text(v)) for k, v in pairs]
        header = encoder.header(1_795_000_000 + i, nanoseconds)
        assert message == (header + fwd.encode_kv(fields, separator)).encode()
        assert parse_kv(RFC5424.match(message).group(8).decode("utf-8"), separator) == fields


SELECTIONS = [dict(SYSLOG_FIELDS_EXCLUDE="b*"), dict(SYSLOG_FIELDS_INCLUDE="a*,__topic__"),
              dict(SYSLOG_FIELDS_RENAME="a:z%,__source__:src"), dict(SYSLOG_FIELDS_INCLUDE="nothing"),
              dict(SYSLOG_FIELDS_EXCLUDE="__*")]
NAMES = st.sampled_from([b"a", b"b", b"ab", b"ba", b"%s", b"a=b", b"b\n", b"\xff"])


STATIC = ["", "env=prod", "a=x|y,b=%s\\", "e==,n="]


@hypothesis_settings(max_examples=200, deadline=None)
@given(logs=st.lists(st.lists(st.tuples(NAMES, RAW_TEXT), max_size=6), min_size=1, max_size=3),
       selection=st.sampled_from(SELECTIONS), static=st.sampled_from(STATIC), separator=SEPARATORS)
def test_fast_kv_path_equals_the_reference_with_selection_and_static_fields(logs, selection, static, separator):
    """Field selection and static fields on the fast path: the same as the static fields, then the
    selected fields, through encode_kv; and the same as the encoder's own reference path."""
    settings = make_settings(SYSLOG_SEP=separator, SYSLOG_STATIC_FIELDS=static, **selection)
    encoder = fwd.MessageEncoder(settings, procid=1)
    assert encoder.fast
    raw = pull_of(logs)
    messages = encoder.encode(fwd.read_log_groups(raw)).messages
    select = fwd.field_selector(settings.syslog_fields_include, settings.syslog_fields_exclude,
                                settings.syslog_fields_rename)
    for i, (pairs, message) in enumerate(zip(logs, messages)):
        fields = [("__topic__", "t"), ("__source__", "src")] + [(text(k), text(v)) for k, v in pairs]
        body = fwd.encode_kv(list(settings.syslog_static_fields) + fwd.select_fields(fields, select), separator)
        assert message == (encoder.header(1_795_000_000 + i, 0) + body).encode()
    encoder.fast = False
    assert encoder.encode(fwd.read_log_groups(raw)).messages == messages


def test_truncation_encodes_a_log_a_logarithmic_number_of_times():
    """fit_message on a log of 100,000 fields and on one with a 1 MB value: each try encodes the whole
    body, and the tries grow with the logarithm of the fields and of the longest value."""
    calls = []

    def counted(fields):
        calls.append(len(fields))
        return fwd.encode_kv(fields, ",")

    head = b"<14>1 - h a - - - "
    many = [(f"field{i}", "value") for i in range(100_000)]
    message, cut = fwd.fit_message(head, many, counted, 65507)
    assert cut and len(message) <= 65507 and len(calls) <= 60
    fields = parse_kv(message[len(head):].decode(), ",")
    # Not even the keys fit: values cut to "...", then as many fields as fit, from the first.
    assert fields == [(key, "...") for key, _ in many[:len(fields)]] and len(fields) > 4000
    calls.clear()
    huge = [("a", "1"), ("request_body", "\u00fc" * 500_000), ("z", "2")]
    message, cut = fwd.fit_message(head, huge, counted, 65507)
    assert cut and 65000 < len(message) <= 65507 and len(calls) <= 60
    fields = parse_kv(message[len(head):].decode(), ",")
    assert [k for k, _ in fields] == ["a", "request_body", "z"] and fields[1][1].endswith("...")


def test_reading_a_pull_gives_what_the_sdk_parses():
    logs = realistic_logs(200, start_time=1_795_000_000) + hostile_logs(start_time=1_795_000_000)
    logs[5]["__time_ns_part__"] = "123456789"
    sdk = log_group_list(logs)
    read = fwd.read_log_groups(sdk.SerializeToString())

    def as_bytes(items):
        return [tuple(v if isinstance(v, bytes) else v.encode() for v in (item.Key, item.Value)) for item in items]

    assert len(read) == len(sdk.LogGroups) > 1
    for ours, theirs in zip(read, sdk.LogGroups):
        assert (ours.Topic.decode(), ours.Source.decode()) == (theirs.Topic, theirs.Source)
        assert list(zip(ours.LogTags.Key, ours.LogTags.Value)) == as_bytes(theirs.LogTags)
        assert len(ours.Logs) == len(theirs.Logs)
        for mine, sdk_log in zip(ours.Logs, theirs.Logs):
            assert (mine.Time, mine.Time_ns) == (sdk_log.Time, sdk_log.Time_ns)
            assert list(zip(mine.Contents.Key, mine.Contents.Value)) == as_bytes(sdk_log.Contents)


def test_contents_without_key_or_value_are_read_one_by_one():
    both = serialized((2, serialized((1, b"a"), (2, b"1"))))
    keyless = serialized((2, serialized((2, b"v"))))
    valueless = serialized((2, serialized((1, b"k"))))
    raw = serialized((1, b"".join(serialized((1, serialized((1, 7)) + contents))
                                  for contents in (both + keyless, valueless + both))))
    groups = fwd.read_log_groups(raw)
    assert [list(zip(entry.Contents.Key, entry.Contents.Value)) for entry in groups[0].Logs] == [
        [(b"a", b"1"), (b"", b"v")], [(b"k", b""), (b"a", b"1")]]
    messages = fwd.MessageEncoder(make_settings(), procid=1).encode(groups)[0]
    assert [message.split(b" - - ")[1] for message in messages] == [
        b"__topic__=,__source__=,a=1,=v", b"__topic__=,__source__=,k=,a=1"]


def test_taking_a_logs_values_finds_its_keys_and_putting_them_back_restores_it():
    """take_values reads a log's keys from the serialized Contents left without values: the same
    tuple for the same keys, another for any other keys (one more, one fewer, an unknown field
    beside them); put_back_values restores the log; a value holding NUL leaves the log as it is."""
    logs = [[(b"a", b"1"), (b"b", b"2")], [(b"a", b"3"), (b"b", b"")], [(b"a", b"5")],
            [(b"a", b"6"), (b"b", b"7"), (b"c", b"8")], [(b"a", b"x\x00y"), (b"b", b"9")], []]
    raw = pull_of(logs)
    contents = [entry.Contents for entry in fwd.read_log_groups(raw)[0].Logs]
    taken = [fwd.take_values(c, 65507) for c in contents]
    assert taken[:4] == [((b"a", b"b"), b"1\x002"), ((b"a", b"b"), b"3\x00"), ((b"a",), b"5"),
                         ((b"a", b"b", b"c"), b"6\x007\x008")]
    assert taken[0][0] is taken[1][0]
    assert taken[4] is None and list(contents[4].Value) == [b"x\x00y", b"9"]
    assert taken[5] == ((), b"")
    assert [list(c.Value) for c in contents[:4]] == [[]] * 4
    for c, values in zip(contents, taken):
        if values is not None:
            fwd.put_back_values(c, values)
    assert [list(zip(c.Key, c.Value)) for c in contents] == logs
    # An unknown field in a Content (a server's addition) is part of what the keys are found by.
    content = serialized((1, b"a"), (2, b"1"), (9, b"?"))
    odd = serialized((1, serialized((1, serialized((1, 1), (2, content))))))
    assert fwd.take_values(fwd.read_log_groups(odd)[0].Logs[0].Contents, 65507) == ((b"a",), b"1")
    assert fwd.take_values(fwd.read_log_groups(raw)[0].Logs[2].Contents, 3) == ((b"a",), b"5")
    assert fwd.take_values(fwd.read_log_groups(raw)[0].Logs[3].Contents, 3) is None  # longer than limit


@hypothesis_settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(0, 120), min_size=1, max_size=8),
       encoding=st.sampled_from(["kv", "json", "cef", "leef"]), max_size=st.integers(480, 700))
def test_a_log_too_long_for_the_fast_path_is_cut_from_all_its_values(sizes, encoding, max_size):
    """Values that fit the message size while the whole message does not: the fast path gives the
    log back to the reference path (its values put back), which cuts it as it cuts any log."""
    logs = [[(f"field{i}".encode(), b"v" * size + b"=|,\\") for i, size in enumerate(sizes)] * 3]
    settings = make_settings(SYSLOG_ENCODING=encoding, SYSLOG_MAX_MESSAGE_SIZE=str(max_size))
    encoder = fwd.MessageEncoder(settings, procid=1)
    fast = encoder.encode(fwd.read_log_groups(pull_of(logs)))
    encoder.fast = False
    assert fast == encoder.encode(fwd.read_log_groups(pull_of(logs)))


def test_bytes_that_do_not_parse_raise_so_the_pull_is_fetched_again():
    from google.protobuf.message import DecodeError
    with pytest.raises(DecodeError):
        fwd.read_log_groups(b"\x0a\x05ab")


def pull_response(raw):
    from aliyun.log.pulllog_response import PullLogResponse
    return PullLogResponse(raw, {"x-log-count": "1", "x-log-bodyrawsize": str(len(raw or b"")),
                                 "x-log-cursor": "MTA="})


def test_a_pull_body_is_read_without_the_sdks_parse():
    raw = pull_body(realistic_logs(3))
    forwarder = fwd.Forwarder(make_settings(), stop=None)
    processor = fwd.WafLogProcessor(forwarder)
    processor.shard_id = 0  # what the SDK's initialize() sets
    response = pull_response(raw)
    response.log_groups = fwd.read_pull(response)  # as ResilientConsumerClient.pull_logs reads every pull
    pull = processor._preprocessor(response)
    assert response._raw_uncompressed_body is raw  # the SDK did not parse it (it drops the body when it does)
    assert pull.filtered_by_sls == 0
    expected = forwarder.encoder.encode(pull.groups)[0]
    assert len(expected) == 3
    parsed_first = pull_response(raw)
    parsed_first.get_loggroup_list()  # e.g. another SDK version: the body is then re-serialized
    assert forwarder.encoder.encode(fwd.read_pull(parsed_first))[0] == expected
    assert forwarder.encoder.encode(fwd.read_pull(pull_response(None)))[0] == []
