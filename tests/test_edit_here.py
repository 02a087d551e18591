"""The "EDIT HERE" section, tried as an operator would: copy sync_waf_to_syslog.py, edit STATIC_FIELDS
and customize(), and every encoding and every path (the fast kv path, truncated messages, --dry-run,
a real run) follows the edit; SYSLOG_STATIC_FIELDS likewise without editing anything."""
import importlib.util
import json
import re

import pytest

import sync_waf_to_syslog as fwd
from tests.cef import parse_cef
from tests.checkpoints import checkpoints_at_end
from tests.delivered import trace_ids, wait_delivered
from tests.encoding import BASE_ENV
from tests.forwarder_process import SCRIPT, ForwarderProcess, forwarder_env, run_forwarder
from tests.kv import parse_kv
from tests.leef import parse_leef
from tests.polling import wait_until
from tests.syslog_receiver import SyslogReceiver
from tests.waf_logs import hostile_logs, pull_body, realistic_logs, write_jsonl

# An operator's edits, as text replaced in a copy of the file: a static field, a renamed field and
# a dropped class of logs (requests WAF answered with a captcha).
STATIC_EDIT = ('STATIC_FIELDS = []\n', 'STATIC_FIELDS = [("env", "prod")]\n')
CUSTOMIZE_EDIT = ('    return fields\n\n\n# SIEM mappings', '''    if dict(fields).get("final_action") == "captcha":
        return None
    return [("client_ip" if name == "real_client_ip" else name, value) for name, value in fields]


# SIEM mappings''')
LOGS = realistic_logs(200, seed=21) + hostile_logs()
CAPTCHAS = {entry["request_traceid"] for entry in LOGS if entry.get("final_action") == "captcha"}
# Logs long enough to be cut at 8192 bytes, with room left for every key.
LONG_LOGS = [dict(entry, request_body="x" * 20_000) for entry in realistic_logs(30, seed=22)]


def edited_copy(tmp_path, *edits):
    """The forwarder file with the edits made, as a file and as a module."""
    text = SCRIPT.read_text()
    for old, new in edits:
        assert text.count(old) == 1, f"the edit section changed: {old!r} is not there once"
        text = text.replace(old, new)
    path = tmp_path / "sync_waf_to_syslog.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"edited_{abs(hash(edits))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def fields_of(message, encoding):
    """The (key, value) pairs of a message's MSG, by the encoding's own parser; CEF and LEEF keys
    are the ones a SIEM sees (the mapping tables and custom keys)."""
    body = re.match(rb"<\d+>1 \S+ \S+ \S+ \S+ - - (.*)\Z", message, re.S).group(1).decode()
    if encoding == "kv":
        return parse_kv(body, ",")
    if encoding == "json":
        return list(json.loads(body).items())
    if encoding == "cef":
        return parse_cef(body)[1]
    return parse_leef(body)[1]


# Where each field lands, by encoding: (env=prod, the renamed client_ip, the original real_client_ip).
KEYS = {"kv": ("env", "client_ip", "real_client_ip"), "json": ("env", "client_ip", "real_client_ip"),
        "cef": ("AliyunWafEnv", "AliyunWafClientIp", "src"), "leef": ("env", "client_ip", "src")}


def encoded(module, logs, **env):
    settings = module.Settings.from_environment({**BASE_ENV, **env})
    return module.MessageEncoder(settings, procid=1).encode(module.read_log_groups(pull_body(logs)))


@pytest.mark.parametrize("encoding", ["kv", "json", "cef", "leef"])
def test_an_edited_copy_changes_every_encoding_and_the_cut_messages(encoding, tmp_path):
    _, module = edited_copy(tmp_path, STATIC_EDIT, CUSTOMIZE_EDIT)
    env_key, renamed, original = KEYS[encoding]
    batch = encoded(module, LOGS, SYSLOG_ENCODING=encoding)
    assert CAPTCHAS and batch.filtered == len(CAPTCHAS)
    assert len(batch.messages) == len(LOGS) - len(CAPTCHAS)
    for message in batch.messages:
        fields = dict(fields_of(message, encoding))
        assert fields[env_key] == "prod"
        assert original not in fields
        assert fields.get("request_traceid", fields.get("externalId")) not in CAPTCHAS
    with_client_ip = [m for m in batch.messages if renamed in dict(fields_of(m, encoding))]
    assert len(with_client_ip) >= len(LOGS) - len(CAPTCHAS) - len(hostile_logs())
    cut = encoded(module, LONG_LOGS, SYSLOG_ENCODING=encoding, SYSLOG_MAX_MESSAGE_SIZE="8192")
    assert cut.truncated == len(cut.messages) > 0
    for message in cut.messages:
        fields = dict(fields_of(message, encoding))
        assert len(message) <= 8192 and fields[env_key] == "prod" and renamed in fields
        assert original not in fields


def test_the_fast_path_steps_aside_for_an_edited_customize_only(tmp_path):
    assert fwd.customize_is_unchanged() and fwd.MessageEncoder(fwd.Settings.from_environment(BASE_ENV)).fast
    _, static_only = edited_copy(tmp_path, STATIC_EDIT)
    settings = static_only.Settings.from_environment(BASE_ENV)
    assert static_only.MessageEncoder(settings).fast  # a static field costs nothing
    _, customized = edited_copy(tmp_path, STATIC_EDIT, CUSTOMIZE_EDIT)
    assert not customized.customize_is_unchanged()
    assert not customized.MessageEncoder(customized.Settings.from_environment(BASE_ENV)).fast


def test_a_static_field_from_the_edit_section_is_first_on_the_fast_path(tmp_path):
    _, module = edited_copy(tmp_path, STATIC_EDIT)
    for message in encoded(module, LOGS).messages:
        assert fields_of(message, "kv")[0] == ("env", "prod")


@pytest.mark.parametrize("encoding", ["kv", "json", "cef", "leef"])
def test_the_static_fields_setting_in_every_encoding_and_cut_message(encoding):
    env_key = KEYS[encoding][0]
    dc_key = "AliyunWafDc" if encoding == "cef" else "dc"
    settings = dict(SYSLOG_ENCODING=encoding, SYSLOG_STATIC_FIELDS="env=prod,dc=hz",
                    SYSLOG_FIELDS_EXCLUDE="real_client_ip")  # selection never drops a static field
    for logs, extra in ((LOGS, {}), (LONG_LOGS, {"SYSLOG_MAX_MESSAGE_SIZE": "8192"})):
        batch = encoded(fwd, logs, **settings, **extra)
        assert len(batch.messages) == len(logs) and batch.truncated == (len(logs) if extra else 0)
        for message in batch.messages:
            fields = dict(fields_of(message, encoding))
            assert (fields[env_key], fields[dc_key]) == ("prod", "hz")
            assert KEYS[encoding][2] not in fields


@pytest.mark.slow
def test_an_edited_copy_runs_as_the_real_cli(make_emulator, tmp_path):
    """The edited copy, run as an operator runs it, with --dry-run and for real."""
    logs = realistic_logs(300, seed=23)
    captchas = {entry["request_traceid"] for entry in logs if entry.get("final_action") == "captcha"}
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)])
    script, _ = edited_copy(tmp_path, STATIC_EDIT, CUSTOMIZE_EDIT)
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SYNC_STATS_INTERVAL="3600")
        status, out, err = run_forwarder(env, tmp_path, ["--dry-run"], python_args=[str(script)])
        assert status == 0, err
        assert len(out.splitlines()) == len(logs) - len(captchas)
        assert all("env=prod" in line and "client_ip=" in line and "real_client_ip" not in line
                   for line in out.splitlines())
        sent = [trace_id for trace_id in trace_ids(logs) if trace_id not in captchas]
        with ForwarderProcess(env, tmp_path, python_args=[str(script)]) as forwarder:
            assert wait_delivered(lambda: receiver.messages, sent)["lost"] == 0
            wait_until(lambda: checkpoints_at_end(emulator), "the checkpoints past the dropped logs too")
            assert forwarder.stop() == 0
    messages = [fields_of(message, "kv") for message in receiver.messages]
    assert all(fields[0] == ("env", "prod") and "client_ip" in dict(fields) for fields in messages)
    assert not {dict(fields)["request_traceid"] for fields in messages} & captchas
    assert f"filtered {len(captchas)}" in forwarder.stderr()
