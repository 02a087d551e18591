"""--check: each failure names the variable behind it; UDP is probed, never called connected; an
endpoint that does not resolve is reported within DNS_TIMEOUT, not after the SDK's retries."""
import socket
import threading
import time

import pytest

import sync_waf_to_syslog as fwd
from tests.forwarder_process import forwarder_env, free_port, run_forwarder
from tests.sdk_consumer import AKID, LOGSTORE, PROJECT, SECRET, emulator_for_sdk
from tests.syslog_receiver import SyslogReceiver


def check(capsys, **variables):
    """fwd.check() in this process with these settings: (exit status, its verdict lines)."""
    env = dict(SLS_ENDPOINT="http://sls.emulator.test", SLS_REGION="cn-hangzhou", SLS_AK_ID=AKID, SLS_AK_KEY=SECRET,
               SLS_PROJECT=PROJECT, SLS_LOGSTORE=LOGSTORE, SYSLOG_HOST="127.0.0.1",
               SYSLOG_PORT=str(free_port()))
    env.update(variables)
    status = fwd.check(fwd.Settings.from_environment(env))
    return status, capsys.readouterr().out.splitlines()


def verdict(lines, about):
    """The verdict line of --check about "SLS ..." or "syslog ..."."""
    return next(line for line in lines if line[5:].startswith(about))


@pytest.fixture
def emulator(monkeypatch):
    with emulator_for_sdk(monkeypatch, 2) as emu:
        yield emu


@pytest.mark.parametrize("variable, change", [
    ("SLS_AK_KEY", dict(SLS_AK_KEY="not-the-secret")),
    ("SLS_AK_ID", dict(SLS_AK_ID="LTAI-unknown")),
    ("SLS_PROJECT", dict(SLS_PROJECT="no-such-project")),
    ("SLS_LOGSTORE", dict(SLS_LOGSTORE="no-such-logstore")),
])
def test_each_sls_failure_names_its_variable(variable, change, emulator, capsys):
    status, lines = check(capsys, **change)
    assert status == 1
    sls_line = verdict(lines, "SLS ")
    assert sls_line.startswith("FAIL") and f": {variable}: " in sls_line, lines
    assert "string to sign" not in sls_line  # SLS's raw SignatureNotMatch text stays out


def test_an_endpoint_that_does_not_resolve_names_sls_endpoint_at_once(emulator, monkeypatch, capsys):
    for name in fwd.PROXY_VARIABLES:  # no proxy: this process resolves the host itself
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    status, lines = check(capsys, SLS_ENDPOINT="sls.does-not-exist.invalid")
    took = time.monotonic() - started
    assert status == 1 and verdict(lines, "SLS ").startswith("FAIL") and ": SLS_ENDPOINT: " in verdict(lines, "SLS "), lines
    # The SDK alone would retry for about 10 s; the check gives DNS at most DNS_TIMEOUT.
    assert took < fwd.DNS_TIMEOUT + 3, took


def test_a_dns_server_that_does_not_answer_is_given_up_on(monkeypatch):
    answered = threading.Event()
    monkeypatch.setattr(fwd.socket, "getaddrinfo", lambda *args: answered.wait(5))
    assert fwd.resolve_within("sls.example.test", 0.2) == "no answer from DNS within 0.2 s"
    answered.set()


def test_udp_is_refused_or_unconfirmed_never_connected(emulator, capsys):
    status, lines = check(capsys, SYSLOG_PROTOCOL="udp", SYSLOG_PORT=str(free_port(socket.SOCK_DGRAM)))
    syslog = verdict(lines, "syslog ")
    assert status == 1 and syslog.startswith("FAIL syslog udp://") and "refused" in syslog, lines
    with SyslogReceiver("udp") as receiver:
        status, lines = check(capsys, SYSLOG_PROTOCOL="udp", SYSLOG_PORT=str(receiver.port))
    assert status == 0, lines
    assert verdict(lines, "SLS ").startswith("OK   SLS") and "2 shards" in verdict(lines, "SLS ")
    syslog = verdict(lines, "syslog ")
    assert syslog.startswith("WARN syslog udp://") and "cannot be confirmed" in syslog, lines
    assert "connected" not in syslog


def test_a_closed_tcp_port_names_host_and_port(emulator, capsys):
    status, lines = check(capsys)
    syslog = verdict(lines, "syslog ")
    assert status == 1 and syslog.startswith("FAIL syslog tcp://"), lines
    assert "refused" in syslog and "SYSLOG_HOST" in syslog and "SYSLOG_PORT" in syslog


@pytest.mark.slow
def test_the_run_names_the_variable_too(make_emulator, tmp_path):
    emulator = make_emulator()
    env = forwarder_env(emulator, port=free_port(), SLS_AK_KEY="not-the-secret")
    status, _, err = run_forwarder(env, tmp_path)
    assert status == 1 and "SLS_AK_KEY" in err and "SignatureNotMatch" in err, err[-2000:]
