"""SIEM encodings (SYSLOG_ENCODING=json / cef / leef), field selection and the topic filter.

Every realistic and hostile WAF log becomes exactly one message, and an independent parser (the
`pycef` package, and strict parsers written from the CEF and LEEF specifications in tests/cef.py and
tests/leef.py) reads it back to the values sent. End to end, through the real forwarder and a real
rsyslogd, each MSG arrives exactly as MessageEncoder encodes it."""
import collections
import datetime
import json
import re

import pycef
import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

import sync_waf_to_syslog as fwd
from tests.cef import parse_cef, unescape_value
from tests.forwarder_process import ForwarderProcess, forwarder_env
from tests.kv import parse_kv
from tests.leef import parse_leef
from tests.rsyslog_peer import unique_tag
from tests.checkpoints import assert_checkpoints_at_end
from tests.encoding import RAW_TEXT, RFC5424, bodies, make_settings, pull_of
from tests.waf_logs import expected_fields, hostile_logs, pull_body, realistic_logs, write_jsonl

LOGS = realistic_logs(200, seed=11) + hostile_logs()
SEVERITY = {"block": "8", "captcha": "5", "js": "5", "": "2"}  # the actions in tests/waf_logs.py
_C0_BUT_TAB_LF_CR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


# --- what each encoding should carry, computed from the log independently of the encoders --------

def as_text(value):
    """The documented rule for control characters CEF and LEEF cannot carry: \\xHH text."""
    return _C0_BUT_TAB_LF_CR.sub(lambda match: f"\\x{ord(match.group()):02x}", value)


def log_seconds(iso_time):
    return int(datetime.datetime.fromisoformat(iso_time).timestamp())


def expected_header(entry):
    """(event id, name, severity) for the realistic logs, whose decisions are final_* fields."""
    action = entry["final_action"]
    if not action:
        return "access", "access", SEVERITY[""]
    return (f"{entry['final_plugin']}:{entry['final_rule_id']}",
            f"{entry['final_plugin']} {entry['final_rule_type']} {action}", SEVERITY[action])


def expected_cef(fields):
    """The CEF extension for these fields: key names by fwd.cef_key (their rule has its own test)."""
    pairs = []
    for key, value in fields:
        if value:
            cef_key, label = fwd.cef_key(key)
            pairs.append((cef_key, str(log_seconds(value) * 1000) if cef_key == "rt" else as_text(value)))
            if label:
                pairs.append((label, as_text(key)))
    return pairs


def expected_leef(fields, delimiter, severity):
    """The LEEF attributes for these fields: key names by fwd.leef_key (their rule has its own test)."""
    delimiter_text = "\\t" if delimiter == "\t" else f"\\x{ord(delimiter):02x}"
    attributes = [("sev", str(severity))]
    for key, value in fields:
        if not value:
            continue
        if fwd.leef_key(key) == "devTime":
            utc = datetime.datetime.fromtimestamp(log_seconds(value), datetime.timezone.utc)
            attributes += [("devTime", utc.strftime("%b %d %Y %H:%M:%S GMT")),
                           ("devTimeFormat", "MMM dd yyyy HH:mm:ss z")]
        else:
            text = as_text(value).replace("\n", "\\n").replace("\r", "\\r").replace(delimiter, delimiter_text)
            attributes.append((fwd.leef_key(key), text))
    return attributes


# --- JSON ---------------------------------------------------------------------------------------

def test_every_log_is_one_json_object_with_its_fields_in_order():
    found = bodies(LOGS, SYSLOG_ENCODING="json")
    assert len(found) == len(LOGS)
    for entry, body in zip(LOGS, found):
        assert json.loads(body, object_pairs_hook=list) == expected_fields(entry)
        assert not re.search("[\x00-\x1f]", body)  # control characters are JSON escapes
    utf8 = found[[entry["request_traceid"] for entry in LOGS].index("hostile-utf8")]
    assert "ümlaut 日本語" in utf8  # UTF-8 as it is, not \\u escapes


def test_a_name_given_twice_keeps_its_first_place_and_last_value():
    assert fwd.encode_json([("a", "1"), ("b", "2"), ("a", "3")]) == '{"a":"3","b":"2"}'


# --- CEF ----------------------------------------------------------------------------------------

def test_every_log_is_one_cef_event_that_a_strict_parser_reads_back():
    found = bodies(LOGS, SYSLOG_ENCODING="cef")
    assert len(found) == len(LOGS)
    for entry, body in zip(LOGS, found):
        header, extension = parse_cef(body)
        event_id, name, severity = expected_header(entry)
        assert header == dict(version="0", vendor="Alibaba Cloud", product="WAF", device_version="3.0",
                              event_class_id=event_id, name=name, severity=severity)
        assert extension == expected_cef(expected_fields(entry))


def test_pycef_reads_the_mapped_values():
    found = bodies(LOGS, SYSLOG_ENCODING="cef")
    for entry, body in zip(LOGS, found):
        parsed = pycef.parse(body)
        event_id, name, severity = expected_header(entry)
        assert (parsed["DeviceVendor"], parsed["DeviceProduct"], parsed["DeviceEventClassID"],
                parsed["Name"], parsed["Severity"]) == ("Alibaba Cloud", "WAF", event_id, name, severity)
        expected = dict(expected_cef(expected_fields(entry)))
        for key in [key for key in expected if key.endswith("Label")]:  # pycef names csN by its label
            expected[expected.pop(key)] = expected.pop(key[:-len("Label")])
        extension = {key: unescape_value(value) for key, value in parsed.items()
                     if key not in ("CEFVersion", "DeviceVendor", "DeviceProduct", "DeviceVersion",
                                    "DeviceEventClassID", "Name", "DeviceName", "Severity", "DeviceSeverity")}
        assert extension == expected
        assert (extension["src"], extension["request"]) == (entry["real_client_ip"], entry["request_uri"])


@pytest.mark.parametrize("fields, expected", [
    ([("request_uri", "/a?b=c")], "request=/a?b\\=c"),
    ([("http_user_agent", "C:\\dir\\")], "requestClientApplication=C:\\\\dir\\\\"),
    ([("request_body", "line1\nline2\r\n")], "cs6=line1\\nline2\\r\\n cs6Label=request_body"),
    ([("request_body", "nul\x00 esc\x1b tab\t pipe| space ")], "cs6=nul\\\\x00 esc\\\\x1b tab\t pipe| space  "
                                                               "cs6Label=request_body"),
    ([("ssl_cipher", "TLS"), ("__tag__:__receive_time__", "1")],
     "AliyunWafSslCipher=TLS AliyunWafTagReceiveTime=1"),
    ([("time", "2026-11-27T18:11:05+08:00")], "rt=1795774265000"),
    ([("time", "yesterday")], "AliyunWafTime=yesterday"),
    ([("status", ""), ("act", "-")], "AliyunWafAct=-"),
])
def test_cef_extension_escaping_and_keys(fields, expected):
    body = fwd.encode_cef(fields, ("access", "access", 2))
    assert body == "CEF:0|Alibaba Cloud|WAF|3.0|access|access|2|" + expected
    parse_cef(body)


def test_cef_header_fields_are_escaped():
    body = fwd.encode_cef([], ("a|b\\c", "x\ny", 8))
    assert body == "CEF:0|Alibaba Cloud|WAF|3.0|a\\|b\\\\c|x\\\\ny|8|"
    assert parse_cef(body)[0]["event_class_id"] == "a|b\\c"


FIELD_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
NOT_TIME = FIELD_TEXT.filter(lambda name: name != "time")  # time fields are converted, tested above


@hypothesis_settings(max_examples=300, deadline=None)
@given(fields=st.lists(st.tuples(NOT_TIME, FIELD_TEXT), max_size=6), event_id=FIELD_TEXT)
def test_any_fields_give_a_cef_event_that_parses_back(fields, event_id):
    header, extension = parse_cef(fwd.encode_cef(fields, (event_id, "name", 5)))
    control_text = as_text(event_id).replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    assert header["event_class_id"] == control_text
    assert extension == expected_cef(fields)


# --- LEEF ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("delimiter", ["\t", "^"])
def test_every_log_is_one_leef_event_split_into_exactly_the_attributes_written(delimiter):
    found = bodies(LOGS, SYSLOG_ENCODING="leef", SYSLOG_LEEF_DELIMITER=delimiter)
    assert len(found) == len(LOGS)
    for entry, body in zip(LOGS, found):
        header, attributes = parse_leef(body)
        assert header == dict(version="2.0", vendor="Alibaba Cloud", product="WAF", device_version="3.0",
                              event_id=expected_header(entry)[0], delimiter=delimiter)
        assert body.split("|", 6)[5] == ("x09" if delimiter == "\t" else delimiter)
        assert attributes == expected_leef(expected_fields(entry), delimiter, expected_header(entry)[2])


@pytest.mark.parametrize("fields, delimiter, expected", [
    ([("querystring", "a=b&c==d")], "\t", "querystring=a=b&c==d"),
    ([("http_user_agent", "x\ty\nz\r")], "\t", "http_user_agent=x\\ty\\nz\\r"),
    ([("http_user_agent", "x\ty^z|")], "^", "http_user_agent=x\ty\\x5ez|"),
    ([("request_body", "nul\x00")], "\t", "request_body=nul\\x00"),
    ([("__tag__:__receive_time__", "1"), ("weird key=1", "v")], "\t",
     "__tag__:__receive_time__=1\tweird_key_1=v"),
    ([("time", "2026-11-27T18:11:05+08:00")], "\t",
     "devTime=Nov 27 2026 10:11:05 GMT\tdevTimeFormat=MMM dd yyyy HH:mm:ss z"),
    ([("time", "yesterday"), ("status", "")], "\t", "time=yesterday"),
])
def test_leef_replacements_and_keys(fields, delimiter, expected):
    body = fwd.encode_leef(fields, ("waf:1|2", "name", 8), delimiter)
    declared = "x09" if delimiter == "\t" else delimiter
    assert body == f"LEEF:2.0|Alibaba Cloud|WAF|3.0|waf:1\\x7c2|{declared}|sev=8{delimiter}{expected}"
    parse_leef(body)


@hypothesis_settings(max_examples=300, deadline=None)
@given(fields=st.lists(st.tuples(NOT_TIME, FIELD_TEXT), max_size=6),
       delimiter=st.sampled_from(sorted(fwd.LEEF_DELIMITERS)))
def test_any_fields_give_a_leef_event_with_exactly_those_attributes(fields, delimiter):
    header, attributes = parse_leef(fwd.encode_leef(fields, ("id", "name", 5), delimiter))
    assert header["delimiter"] == delimiter
    assert attributes == expected_leef(fields, delimiter, 5)


# --- the WAF's decision in the CEF and LEEF headers ---------------------------------------------

BLOCKED = dict(final_action="block", final_plugin="waf", final_rule_id="113001", final_rule_type="sqli")


@pytest.mark.parametrize("fields, event", [
    (BLOCKED, ("waf:113001", "waf sqli block", 8)),
    (dict(final_action="captcha", final_plugin="cc", final_rule_id="8790391", final_rule_type="custom"),
     ("cc:8790391", "cc custom captcha", 5)),
    (dict(final_action="captcha_strict", final_plugin="acl", final_rule_id="7"),
     ("acl:7", "acl captcha_strict", 6)),
    (dict(final_action="mask", final_plugin="dlp"), ("dlp", "dlp mask", fwd.OTHER_ACTION_SEVERITY)),
    (dict(final_action="", waf_action="block", waf_rule_id="113001", waf_rule_type="sqli", waf_test="true"),
     ("waf:113001", "waf sqli monitor", 5)),
    (dict(final_action="", waf_action="block", waf_test="false", acl_test="true", acl_action=""),
     ("access", "access", 2)),
    (dict(host="www.example.com"), ("access", "access", 2)),
])
def test_waf_event_names_what_waf_did(fields, event):
    assert fwd.waf_event(list(fields.items())) == event


def test_field_selection_does_not_change_the_cef_or_leef_header():
    entry = next(entry for entry in LOGS if entry["final_action"] == "block")
    exclude = "final_*,*_test,waf_*"
    cef = bodies([entry], SYSLOG_ENCODING="cef", SYSLOG_FIELDS_EXCLUDE=exclude)[0]
    header, extension = parse_cef(cef)
    assert (header["event_class_id"], header["name"], header["severity"]) == expected_header(entry)
    assert "act" not in dict(extension) and "cs1" not in dict(extension)
    leef = bodies([entry], SYSLOG_ENCODING="leef", SYSLOG_FIELDS_EXCLUDE=exclude)[0]
    header, attributes = parse_leef(leef)
    assert header["event_id"] == expected_header(entry)[0] and attributes[0] == ("sev", "8")
    assert "cat" not in dict(attributes)


def test_the_mapping_tables_are_usable():
    for table, key_pattern in ((fwd.CEF_KEYS, "[A-Za-z0-9]+"), (fwd.LEEF_KEYS, "[A-Za-z0-9_]+")):
        assert len(set(table.values())) == len(table)  # one field per key
        assert all(re.fullmatch(key_pattern, key) for key in table.values())
    assert not any(key.startswith(fwd.CEF_CUSTOM_KEY_PREFIX) for key in fwd.CEF_KEYS.values())
    assert set(fwd.EVENT_SEVERITY) >= {"block", "monitor", "access"}
    assert all(1 <= severity <= 10 for severity in [*fwd.EVENT_SEVERITY.values(), fwd.OTHER_ACTION_SEVERITY])


# --- truncation keeps every encoding well-formed ------------------------------------------------

PARSERS = {  # encoding -> (MSG -> [(key, value)], log -> the [(key, value)] it should give)
    "kv": (lambda body: parse_kv(body, ","), expected_fields),
    "json": (lambda body: json.loads(body, object_pairs_hook=list), expected_fields),
    "cef": (lambda body: parse_cef(body)[1], lambda entry: expected_cef(expected_fields(entry))),
    "leef": (lambda body: parse_leef(body)[1],
             lambda entry: expected_leef(expected_fields(entry), "\t", expected_header(entry)[2])),
}


@pytest.mark.parametrize("encoding", PARSERS)
@pytest.mark.parametrize("max_size", [480, 2048, 8192])
def test_cut_messages_stay_well_formed(encoding, max_size):
    logs = [entry for entry in LOGS if entry["request_traceid"] in ("hostile-huge", "hostile-huge_utf8")]
    messages, _, truncated, _ = fwd.MessageEncoder(
        make_settings(SYSLOG_ENCODING=encoding, SYSLOG_MAX_MESSAGE_SIZE=str(max_size)), procid=1) \
        .encode(fwd.read_log_groups(pull_body(logs)))
    assert truncated == len(logs)
    parse, expect = PARSERS[encoding]
    for entry, message in zip(logs, messages):
        assert len(message) <= max_size
        found = parse(RFC5424.match(message).group(8).decode("utf-8"))
        if max_size < 8192:
            continue  # well-formed is all: fields were cut to "..." and the last ones left out
        expected = expect(entry)
        assert [key for key, _ in found] == [key for key, _ in expected]
        for (_, value), (_, original) in zip(found, expected):
            assert value == original or (value.endswith("...") and original.startswith(value[:-3]))
        assert any(value != original for (_, value), (_, original) in zip(found, expected))


# --- field selection and the topic filter -------------------------------------------------------

def test_include_exclude_and_rename():
    entry = LOGS[0]
    body = bodies([entry], SYSLOG_ENCODING="json", SYSLOG_FIELDS_INCLUDE="__*,http_*,real_client_ip",
                  SYSLOG_FIELDS_EXCLUDE="__source__,http_cookie",
                  SYSLOG_FIELDS_RENAME="real_client_ip:client,__tag__:__receive_time__:received")[0]
    found = json.loads(body, object_pairs_hook=list)
    assert found == [("__topic__", "waf_access_log"), ("received", entry["__tag__:__receive_time__"]),
                     ("client", entry["real_client_ip"]), ("http_referer", entry["http_referer"]),
                     ("http_user_agent", entry["http_user_agent"]),
                     ("http_x_forwarded_for", entry["http_x_forwarded_for"])]
    kv = parse_kv(bodies([entry], SYSLOG_FIELDS_EXCLUDE="__*")[0], ",")
    assert kv == [(key, value) for key, value in expected_fields(entry) if not key.startswith("__")]
    body = bodies([entry], SYSLOG_ENCODING="cef", SYSLOG_FIELDS_RENAME="request_path:request_uri",
                  SYSLOG_FIELDS_EXCLUDE="request_uri")[0]
    cef = dict(parse_cef(body)[1])
    assert cef["request"] == entry["request_path"]  # the mapping follows the name sent


def test_only_the_configured_topics_are_sent_yet_every_log_counts():
    other = [dict(entry, __topic__="waf_other_log", request_traceid=f"other-{i}")
             for i, entry in enumerate(realistic_logs(5, seed=3, start_time=2_000_000_000))]
    logs = LOGS[:10] + other + LOGS[10:20]
    encoder = fwd.MessageEncoder(make_settings(SLS_TOPICS="waf_access_log, waf_more_log"), procid=1)
    messages, newest, _, _ = encoder.encode(fwd.read_log_groups(pull_body(logs)))
    sent = [dict(parse_kv(RFC5424.match(m).group(8).decode(), ","))["request_traceid"] for m in messages]
    assert sent == [entry["request_traceid"] for entry in LOGS[:20]]
    assert newest == 2_000_000_000  # the skipped logs are the newest: they count as done


# --- end to end: the forwarder -> a real rsyslogd ------------------------------------------------

E2E = {
    "kv": {},
    "json": dict(SYSLOG_ENCODING="json"),
    "cef": dict(SYSLOG_ENCODING="cef"),
    "leef": dict(SYSLOG_ENCODING="leef"),
    "leef-caret-selected": dict(SYSLOG_ENCODING="leef", SYSLOG_LEEF_DELIMITER="0x5e",
                                SLS_TOPICS="waf_access_log", SYSLOG_FIELDS_EXCLUDE="wxbb_*,upstream_*",
                                SYSLOG_FIELDS_RENAME="host:domain"),
}


@pytest.mark.parametrize("variant", E2E)
def test_rsyslog_receives_exactly_what_the_encoder_makes(variant, rsyslog, waf_data, make_emulator, tmp_path):
    logs, _ = waf_data
    other_topic = [dict(entry, __topic__="waf_other_log", request_traceid=f"other-{i}")
                   for i, entry in enumerate(realistic_logs(20, seed=5))]
    if E2E[variant].get("SLS_TOPICS"):
        logs = logs + other_topic
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)])
    tag = unique_tag()
    env = forwarder_env(emulator, port=rsyslog.ports["tcp"], SYSLOG_TAG=tag, **E2E[variant])
    expected = collections.Counter(
        RFC5424.match(message).group(8).decode("utf-8")
        for message in fwd.MessageEncoder(fwd.Settings.from_environment(env)).encode(fwd.read_log_groups(pull_body(logs)))[0])
    with ForwarderProcess(env, tmp_path) as forwarder:
        records = rsyslog.tagged(tag, sum(expected.values()))
        assert forwarder.stop() == 0, forwarder.stderr()[-2000:]
    records = rsyslog.tagged(tag, len(records) + 1, timeout=1)  # nothing more arrives
    assert collections.Counter(record["msg"] for record in records) == expected
    assert sum(expected.values()) == len(waf_data[0])
    assert_checkpoints_at_end(emulator)


# --- the fast path: per-key-set plans give what the reference encoders give ----------------------

SIEM_KEYS = st.sampled_from([b"time", b"start_time", b"final_action", b"final_plugin", b"final_rule_id",
                             b"final_rule_type", b"waf_test", b"waf_action", b"waf_rule_id", b"cc_test",
                             b"cc_action", b"real_client_ip", b"request_uri", b"host", b"a%s", b"a=b",
                             b"x y", b"\xff", b"__tag__:x"])
SIEM_VALUES = st.one_of(RAW_TEXT, st.sampled_from([
    b"", b"", b"true", b"block", b"captcha", b"2026-11-27T18:11:05+08:00", b"1795774266", b"not a time",
    b"a=b|c\\d", b"\t^,|", b"%s", b"%", b"line\nbreak", b"\x01\x7f", b"\xe4\xb8", b"\\u0000", b"x\\",
    b"bl=ock", b"block\t", b"2026-11-27T18:11:05+08:00\x01"]))
SIEM_SETTINGS = [{}, dict(SYSLOG_FIELDS_EXCLUDE="final_*"), dict(SYSLOG_FIELDS_RENAME="host:time,a%s:b"),
                 dict(SYSLOG_STATIC_FIELDS="env=prod,%s=a|b=c"), dict(SYSLOG_STATIC_FIELDS="time=x,e="),
                 dict(SYSLOG_FIELDS_INCLUDE="__*,time,waf_*")]


@hypothesis_settings(max_examples=300, deadline=None)
@given(logs=st.lists(st.lists(st.tuples(SIEM_KEYS, SIEM_VALUES), max_size=8), min_size=1, max_size=3),
       tags=st.lists(st.tuples(RAW_TEXT, SIEM_VALUES), max_size=2), topic=SIEM_VALUES,
       encoding=st.sampled_from(["json", "cef", "leef"]), delimiter=st.sampled_from(["\t", "^", "%", ","]),
       extra=st.sampled_from(SIEM_SETTINGS))
def test_fast_siem_path_equals_the_reference(logs, tags, topic, encoding, delimiter, extra):
    """json, cef and leef from per-key-set plans: byte for byte what the reference encoders give, for
    any keys and values (empty, times and not, control characters, NUL, %, delimiters), field
    selection and static fields."""
    settings = make_settings(SYSLOG_ENCODING=encoding, SYSLOG_LEEF_DELIMITER=delimiter, **extra)
    encoder = fwd.MessageEncoder(settings, procid=1)
    raw = pull_of(logs, topic, tags)
    fast = encoder.encode(fwd.read_log_groups(raw)).messages
    encoder.fast = False
    assert fast == encoder.encode(fwd.read_log_groups(raw)).messages


def test_the_fast_siem_path_is_taken_for_realistic_logs():
    """Realistic WAF logs go through the plans, not the reference path."""
    logs = realistic_logs(50, seed=3)
    for encoding in ("json", "cef", "leef"):
        encoder = fwd.MessageEncoder(make_settings(SYSLOG_ENCODING=encoding), procid=1)
        group = fwd.read_log_groups(pull_body(logs))[0]
        body = encoder.group_bodies(group)
        assert all(body(fwd.take_values(log.Contents, 65507)) is not None for log in group.Logs), encoding
