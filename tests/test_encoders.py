"""Encoders: a WAF log -> the bytes of one syslog message (no network, no SDK worker)."""
import datetime
import json
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

import sync_waf_to_syslog as fwd
from tests.kv import parse_kv
from tests.waf_logs import expected_fields, hostile_logs, log_group_list, realistic_logs

RFC5424 = re.compile(rb"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (\S+) (.*)\Z", re.S)
BASE_ENV = dict(SLS_ENDPOINT="sls.example.test", SLS_AK_ID="id", SLS_AK_KEY="secret",
                SLS_PROJECT="p", SLS_LOGSTORE="l", SYSLOG_HOST="syslog.example.test")


def make_settings(**env):
    return fwd.Settings.from_environment({**BASE_ENV, **env})


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

def encode(logs, **env):
    return fwd.MessageEncoder(make_settings(**env), procid=4242).encode(log_group_list(logs))


def test_every_hostile_log_gives_exactly_one_well_formed_rfc5424_message():
    logs = hostile_logs()
    messages, newest, truncated = encode(logs, SYSLOG_HOSTNAME="fwd-host", SYSLOG_TAG="waf",
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
    messages, _, _ = encode(logs, SYSLOG_FORMAT="rfc3164", SYSLOG_HOSTNAME="fwd", SYSLOG_TAG="waf")
    for entry, message in zip(logs, messages):
        match = re.match(rb"<14>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) fwd waf: (.*)\Z", message, re.S)
        assert match, message[:100]
        assert parse_kv(match.group(2).decode(), ",") == expected_fields(entry)


def test_nanoseconds_become_microseconds_in_the_timestamp():
    entry = dict(realistic_logs(1)[0], __time_ns_part__="987654321")
    message = encode([entry])[0][0]
    assert re.search(rb"T\d\d:\d\d:\d\d\.987654[+-]\d\d:\d\d ", message)


def test_separator_setting_changes_the_body():
    entry = realistic_logs(1)[0]
    message = encode([entry], SYSLOG_SEP="||")[0][0]
    body = RFC5424.match(message).group(8).decode()
    assert "||http_user_agent=" in body
    assert parse_kv(body, "||") == expected_fields(entry)


@pytest.mark.parametrize("max_size", [480, 2048, 8192])
def test_oversized_logs_are_cut_to_fit_and_still_parse(max_size):
    logs = [entry for entry in hostile_logs() if entry["request_traceid"] in ("hostile-huge", "hostile-huge_utf8")]
    messages, _, truncated = encode(logs, SYSLOG_MAX_MESSAGE_SIZE=str(max_size))
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


@hypothesis_settings(max_examples=300, deadline=None)
@given(fields=st.lists(st.tuples(st.text(max_size=12), st.text(max_size=30)), max_size=6),
       separator=SEPARATORS)
def test_fast_kv_path_equals_the_reference_encoder(fields, separator):
    """log_kv_body escapes all values of a log in one pass; it must equal encode_kv field by field."""
    from aliyun.log.proto import LogGroupList
    entry = LogGroupList().LogGroups.add().Logs.add()
    for key, value in fields:
        content = entry.Contents.add()
        content.Key, content.Value = key, value
    assert fwd.log_kv_body(entry, separator) == fwd.encode_kv(fields, separator)
