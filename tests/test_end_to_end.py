"""End to end: SLS emulator -> the real forwarder (subprocess, real SDK) -> a real rsyslogd.

For every protocol, every realistic and hostile WAF log must arrive exactly as one message whose
parsed fields (hostname, app-name, timestamp, msg) are the expected ones, and after SIGTERM the
group's checkpoints must equal each shard's end cursor."""
import datetime
import time

import pytest

from tests.checkpoints import assert_checkpoints_at_end, checkpoints_not_moved, group_state
from tests.delivered import assert_delivered_exactly
from tests.forwarder_process import ForwarderProcess, SCRIPT, forwarder_env, run_forwarder, with_fault
from tests.kv import parse_kv
from tests.rsyslog_peer import unique_tag
from tests.waf_logs import expected_fields, realistic_logs, write_jsonl

pytestmark = pytest.mark.slow

# Protocol variants: (rsyslog input, SYSLOG_PROTOCOL, extra settings).
VARIANTS = {
    "udp": ("udp", "udp", {}),
    "tcp-octet-counting": ("tcp", "tcp", {}),
    "tcp-lf": ("tcp", "tcp", {"SYSLOG_FRAMING": "lf"}),
    "tls": ("tls", "tls", {"SYSLOG_HOST": "localhost"}),
    "mutual-tls": ("mtls", "tls", {"SYSLOG_HOST": "localhost"}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_log_arrives_parsed_over_each_protocol(variant, rsyslog, pki, waf_data, make_emulator, tmp_path):
    logs, path = waf_data
    emulator = make_emulator(load=[path])
    inputs, protocol, extra = VARIANTS[variant]
    tag = unique_tag()
    settings = dict(SYSLOG_TAG=tag, SYSLOG_HOSTNAME="fwd-e2e", **extra)
    if protocol == "tls":
        settings["SYSLOG_CERT_PATH"] = pki.ca
    if inputs == "mtls":
        settings.update(SYSLOG_CLIENT_CERT=pki.client_cert, SYSLOG_CLIENT_KEY=pki.client_key)
    env = forwarder_env(emulator, port=rsyslog.ports[inputs], protocol=protocol, **settings)
    # TLS must work where ssl.wrap_socket no longer exists (Python 3.12+): remove it here.
    without_wrap_socket = with_fault("without_wrap_socket")
    with ForwarderProcess(env, tmp_path, python_args=without_wrap_socket) as forwarder:
        rsyslog.tagged(tag, len(logs))
        assert forwarder.stop() == 0, forwarder.stderr()[-2000:]
    assert "*** start to consume data..." in forwarder.stderr()
    assert "Complete send data to remote" in forwarder.stderr()
    assert_delivered_exactly(rsyslog.tagged(tag, len(logs), timeout=1), logs, "fwd-e2e")
    assert_checkpoints_at_end(emulator)


def test_rfc3164_and_a_custom_separator(rsyslog, waf_data, make_emulator, tmp_path):
    logs, path = waf_data
    emulator = make_emulator(load=[path])
    tag = unique_tag()
    env = forwarder_env(emulator, port=rsyslog.ports["tcp"], SYSLOG_FORMAT="rfc3164", SYSLOG_TAG=tag,
                        SYSLOG_HOSTNAME="fwd3164", SYSLOG_SEP="||", SYSLOG_FACILITY="local3",
                        SYSLOG_SEVERITY="warning")
    with ForwarderProcess(env, tmp_path) as forwarder:
        records = rsyslog.tagged(tag, len(logs))
        assert forwarder.stop() == 0
    assert len(records) == len(logs)
    assert {(r["facility"], r["severity"], r["hostname"]) for r in records} == {(19, 4, "fwd3164")}
    by_id = {dict(parse_kv(r["msg"].lstrip(" "), "||"))["request_traceid"]: r for r in records}
    for entry in logs:
        assert parse_kv(by_id[entry["request_traceid"]]["msg"].lstrip(" "), "||") == expected_fields(entry)


def test_a_certificate_for_another_host_is_refused(rsyslog, pki, waf_data, make_emulator, tmp_path):
    logs, path = waf_data
    emulator = make_emulator(load=[path])
    tag = unique_tag()
    env = forwarder_env(emulator, host="localhost", port=rsyslog.ports["tls_wrong"], protocol="tls",
                        SYSLOG_CERT_PATH=pki.ca, SYSLOG_TAG=tag)
    status, out, _ = run_forwarder(env, tmp_path, ["--check"])
    assert status == 1
    assert "FAIL syslog tls://localhost" in out and "certificate" in out.lower()
    with ForwarderProcess(env, tmp_path) as forwarder:
        forwarder.wait_for_log("CERTIFICATE_VERIFY_FAILED")
        assert forwarder.stop() == 0
    assert rsyslog.tagged(tag, 1, timeout=0.5) == []
    assert checkpoints_not_moved(emulator)  # nothing was delivered: no checkpoint past a shard's start


def test_check_reports_each_part(rsyslog, pki, make_emulator, tmp_path):
    emulator = make_emulator()
    env = forwarder_env(emulator, host="localhost", port=rsyslog.ports["tls"], protocol="tls",
                        SYSLOG_CERT_PATH=pki.ca)
    status, out, _ = run_forwarder(env, tmp_path, ["--check"])
    assert status == 0, out
    assert out.count("OK  ") == 3 and "2 shards" in out and "TLS handshake" in out


def test_wrong_access_key_is_refused_without_printing_it(make_emulator, rsyslog, tmp_path):
    emulator = make_emulator()
    secret = "Wrong-Secret-0123456789"
    log_file = tmp_path / "forwarder.log"
    env = forwarder_env(emulator, port=rsyslog.ports["tcp"], SLS_AK_KEY=secret, SYNC_LOG_FILE=log_file)
    status, out, err = run_forwarder(env, tmp_path, timeout=120)
    assert status == 1, err
    assert "SignatureNotMatch" in err or "Unauthorized" in err
    status, check_out, check_err = run_forwarder(env, tmp_path, ["--check"], timeout=120)
    assert status == 1 and "FAIL SLS" in check_out
    for text in (out, err, check_out, check_err, log_file.read_text()):
        assert secret not in text


def test_dry_run_prints_messages_and_saves_nothing(make_emulator, waf_data, tmp_path):
    logs, path = waf_data
    emulator = make_emulator(load=[path])
    env = forwarder_env(emulator, port=9, SYSLOG_TAG="dry")
    status, out, err = run_forwarder(env, tmp_path, ["--dry-run"])
    assert status == 0, err
    lines = out.splitlines()
    assert len(lines) == len(logs) and all(line.startswith("<14>1 ") for line in lines)
    assert group_state(emulator) == {}  # no consumer group joined, no checkpoint written


def test_a_second_instance_exits_at_once(make_emulator, rsyslog, tmp_path):
    emulator = make_emulator()
    env = forwarder_env(emulator, port=rsyslog.ports["tcp"])
    with ForwarderProcess(env, tmp_path) as first:
        first.wait_for_log("*** start to consume data...")
        status, _, err = run_forwarder(env, tmp_path, timeout=30)
        assert status == 0
        assert f"another instance is running (pid {first.process.pid})" in err
        assert first.process.poll() is None
        assert first.stop() == 0


def test_replay_stops_at_cursor_end(make_emulator, rsyslog, tmp_path):
    start = int(time.time()) - 3600
    logs = realistic_logs(400, seed=3, start_time=start)  # 10 logs per second, 40 seconds
    emulator = make_emulator(load=[write_jsonl(tmp_path / "old.jsonl", logs)])
    tag = unique_tag()
    end = start + 20
    env = forwarder_env(emulator, port=rsyslog.ports["tcp"], SYSLOG_TAG=tag,
                        SLS_CURSOR_END=datetime.datetime.fromtimestamp(end, datetime.timezone.utc).isoformat())
    status, _, err = run_forwarder(env, tmp_path, timeout=90)
    assert status == 0, err[-2000:]
    assert "replay finished" in err
    records = rsyslog.tagged(tag, 1, timeout=5)
    times = sorted(int(dict(parse_kv(r["msg"], ","))["start_time"]) for r in records)
    # Cursor times are the receive times of whole log groups: everything before `end` was sent,
    # nothing received a group or more after it.
    assert times[0] == start and set(range(start, end)) <= set(times)
    assert max(times) < end + 10


def test_the_local_demo_runs():
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "tests/demo.py", "--logs", "100"], capture_output=True,
                            text=True, timeout=120, cwd=SCRIPT.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost 0" in result.stdout and "checkpoints at the end of every shard: True" in result.stdout
