"""Several collectors end to end (SYSLOG_HOST as a list): the real forwarder (real SDK, SLS emulator)
sends to two real rsyslogd peers while a feeder keeps putting logs into SLS, and the collectors are
stopped, killed and started again. Each peer writes a message before it acknowledges it
(Rsyslog's write_before_ack), so what it acknowledged survives its kill -9. Every log carries a
unique request_traceid; each test prints its accounting (see it with `pytest -s`):

    FAULT <name>: sent=N received=N lost=N duplicates=N send_errors=N resent=N

The selection logic itself, fast and in-process, is in tests/test_syslog_targets.py."""
import socket
import threading
import time

import pytest

from tests.checkpoints import checkpoints_at_end, checkpoints_not_moved, group_state
from tests.delivered import account, trace_ids, wait_delivered
from tests.forwarder_process import ForwarderProcess, forwarder_env, run_forwarder, with_fault
from tests.polling import wait_until
from tests.rsyslog_peer import Rsyslog
from tests.syslog_receiver import ids
from tests.waf_logs import realistic_logs, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.rsyslog]

STEP, STEP_INTERVAL = 10, 0.1  # the feeder puts 10 logs into SLS every 0.1 s
STREAM = 6000                  # logs the feeder has: a minute of stream, more than any test needs
SYSLOG_TIMEOUT = 3
SWITCH_WITHIN = SYSLOG_TIMEOUT + 10  # the other collector carries the stream within this (issue 15)
DELIVERY_TIMEOUT = 40
FAST = dict(SYSLOG_TIMEOUT=SYSLOG_TIMEOUT, SYSLOG_RETRY_MAX_DELAY=0.5, SYSLOG_FAILBACK_AFTER=1,
            SLS_MAX_FETCH_GROUPS=2, SYNC_STATS_INTERVAL=3600)  # the statistics line only at exit
# A kill -9 over TCP or TLS can lose what rsyslogd had read but not yet written when it died: its
# kernel then closes with FIN, as after a clean close, so the forwarder resends nothing (RELP
# loses nothing). Such losses can only be among the logs fed this shortly before the kill.
KILL_WINDOW = 200


class LogFeeder:
    """Puts STEP logs into the emulator every STEP_INTERVAL s on a thread of its own: the stream
    the forwarder reads while a test breaks its collectors."""

    def __init__(self, emulator, logs):
        self.emulator, self.logs, self.fed = emulator, logs, 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.feed, name="feeder", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def feed(self):
        while self.fed < len(self.logs) and not self.stopping.wait(STEP_INTERVAL):
            self.emulator.add_logs(self.logs[self.fed:self.fed + STEP])
            self.fed += STEP

    def stop(self):
        self.stopping.set()
        self.thread.join(10)

    def fed_ids(self):
        return trace_ids(self.logs[:self.fed])


def collectors(tmp_path, pki):
    """Two rsyslogd peers of their own (they are stopped and killed), not started yet."""
    return (Rsyslog(tmp_path / "collector-a", pki, write_before_ack=True),
            Rsyslog(tmp_path / "collector-b", pki, write_before_ack=True))


def target(peer, inputs, host="127.0.0.1"):
    return f"{host}:{peer.ports[inputs]}"


def list_env(emulator, targets, **settings):
    """forwarder_env with SYSLOG_HOST listing the targets (each with its own port)."""
    return forwarder_env(emulator, host=",".join(targets), port=514, **settings)


def grows(peer, what, timeout=DELIVERY_TIMEOUT):
    """Wait until the peer writes messages beyond those it has now."""
    before = len(peer.messages())
    wait_until(lambda: len(peer.messages()) > before, what, timeout)


def received(*peers):
    return [message for peer in peers for message in peer.messages()]


def finish(feeder, forwarder, emulator, peers):
    """Stop the stream, wait until every log fed is at one of the peers and every checkpoint at the
    end, stop the forwarder (exit 0)."""
    feeder.stop()
    wait_delivered(lambda: received(*peers), feeder.fed_ids(), DELIVERY_TIMEOUT)
    wait_until(lambda: checkpoints_at_end(emulator), "every checkpoint at the end", DELIVERY_TIMEOUT)
    assert forwarder.stop() == 0, forwarder.stderr()[-3000:]


# ---- failover: stop, then kill, the active collector; fail-back each time ----------------------

FAILOVER_VARIANTS = {  # id: (rsyslog input, SYSLOG_PROTOCOL, host names of the two targets)
    "tcp": ("tcp", "tcp", ("127.0.0.1", "127.0.0.1")),
    # Each target's certificate is checked against its own name: one by DNS name, one by IP.
    "tls": ("tls", "tls", ("localhost", "127.0.0.1")),
    "relp": ("relp", "relp", ("127.0.0.1", "127.0.0.1")),
}


@pytest.mark.parametrize("variant", FAILOVER_VARIANTS)
def test_failover_and_fail_back_when_the_active_collector_is_stopped_then_killed(variant, pki, make_emulator,
                                                                                tmp_path):
    inputs, protocol, (host_a, host_b) = FAILOVER_VARIANTS[variant]
    emulator = make_emulator()
    logs = realistic_logs(STREAM, seed=15)
    a, b = collectors(tmp_path, pki)
    with a, b:
        first, second = target(a, inputs, host_a), target(b, inputs, host_b)
        tls = {"SYSLOG_CERT_PATH": pki.ca} if protocol == "tls" else {}
        env = list_env(emulator, [first, second], protocol=protocol, **FAST, **tls)
        with LogFeeder(emulator, logs) as feeder, ForwarderProcess(env, tmp_path) as forwarder:
            grows(a, "the first collector carries the stream")
            assert b.messages() == []
            for how in ("stop", "kill"):  # SIGTERM, then SIGKILL
                before = len(b.messages())
                getattr(a, how)()
                fed_at_fault = feeder.fed  # after the loop: when the kill came
                wait_until(lambda: len(b.messages()) > before, f"the second collector carries the stream "
                           f"after the first's {how}", SWITCH_WITHIN)
                a.start()
                grows(a, f"the stream fails back to the first collector after its {how}")
            finish(feeder, forwarder, emulator, (a, b))
        report = account(f"failover, active collector stopped then killed ({variant})", feeder.fed_ids(),
                         received(a, b), forwarder)
    log = forwarder.stderr()
    assert log.count(f"syslog target {first} is out of service; sending to {second}") == 2, log[-3000:]
    assert log.count(f"syslog target {first} is back in service (reachable for") == 2, log[-3000:]
    assert f"active {first}\n" in log  # the statistics line at exit
    assert report["duplicates"] <= report["resent"]  # every copy is one the forwarder sent again
    if protocol == "relp":
        assert report["lost"] == 0, report
    else:
        lost = set(feeder.fed_ids()) - set(ids(received(a, b)))
        assert lost <= set(trace_ids(logs[fed_at_fault - KILL_WINDOW:fed_at_fault])), report


# ---- round-robin ---------------------------------------------------------------------------------

def test_round_robin_shares_the_stream_and_a_killed_collector_leaves_it_to_the_other(pki, make_emulator, tmp_path):
    emulator = make_emulator()
    a, b = collectors(tmp_path, pki)
    with a, b:
        first, second = target(a, "relp"), target(b, "relp")
        env = list_env(emulator, [first, second], protocol="relp", SYSLOG_BALANCE="round-robin", **FAST)
        with LogFeeder(emulator, realistic_logs(STREAM, seed=16)) as feeder, \
                ForwarderProcess(env, tmp_path) as forwarder:
            grows(a, "the first collector has a share")
            grows(b, "the second collector has a share")
            a.kill()
            wait_until(lambda: f"syslog target {first} is out of service; sending to {second}\n"
                       in forwarder.stderr(), "the first collector left the rotation")
            for _ in range(3):
                grows(b, "the second collector takes the whole stream")
            finish(feeder, forwarder, emulator, (a, b))
        report = account("round-robin, one of two collectors killed (relp)", feeder.fed_ids(),
                         received(a, b), forwarder)
    assert report["lost"] == 0 and report["duplicates"] <= report["resent"], report
    assert f"active {second}\n" in forwarder.stderr()


# ---- every collector down -------------------------------------------------------------------------

OUTAGE_SECONDS = 5  # the 20 s, shortened: what is checked during it does not change with time


def test_every_collector_down_nothing_moves_then_the_first_back_takes_everything(pki, make_emulator, tmp_path):
    logs = realistic_logs(400, seed=17)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)])
    a, b = collectors(tmp_path, pki)
    try:
        first, second = target(a, "tcp"), target(b, "tcp")
        env = list_env(emulator, [first, second], **FAST)
        with ForwarderProcess(env, tmp_path) as forwarder:
            forwarder.wait_for_log("cannot send")
            outage_end = time.monotonic() + OUTAGE_SECONDS
            while time.monotonic() < outage_end:
                assert checkpoints_not_moved(emulator), group_state(emulator)
                assert forwarder.process.poll() is None
                time.sleep(0.5)
            b.start()
            wait_delivered(lambda: received(b), trace_ids(logs), DELIVERY_TIMEOUT)
            wait_until(lambda: checkpoints_at_end(emulator), "every checkpoint at the end", DELIVERY_TIMEOUT)
            assert forwarder.stop() == 0, forwarder.stderr()[-3000:]
    finally:
        a.stop()
        b.stop()
    report = account("every collector down 5 s, then the second back (tcp)", trace_ids(logs), received(b),
                     forwarder)
    assert report["lost"] == 0 and report["send_errors"] >= 4, report  # both tried, round after round
    log = forwarder.stderr()
    assert f"syslog target {second} is back in service (it took a batch); sending to {second}" in log


# ---- a name with two addresses, one of them dead ----------------------------------------------------

def test_a_name_with_a_dead_and_a_live_address_delivers_through_the_live_one(rsyslog, make_emulator, tmp_path):
    logs = realistic_logs(300, seed=18)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)])
    # 127.0.0.2 is loopback too, but rsyslogd listens on 127.0.0.1 only: the first address refuses.
    resolver = with_fault("resolver", "collectors.test", ["127.0.0.2", "127.0.0.1"])
    env = forwarder_env(emulator, host="collectors.test", port=rsyslog.ports["tcp"], **FAST)
    with ForwarderProcess(env, tmp_path, python_args=resolver) as forwarder:
        wait_until(lambda: checkpoints_at_end(emulator), "every checkpoint at the end", DELIVERY_TIMEOUT)
        assert forwarder.stop() == 0, forwarder.stderr()[-3000:]
    report = account("a name with a dead and a live address (tcp)", trace_ids(logs), rsyslog.messages(),
                     forwarder)
    assert report["lost"] == 0 and report["send_errors"] == 0, report


# ---- --check ----------------------------------------------------------------------------------------

def test_check_says_which_collectors_are_healthy(rsyslog, pki, make_emulator, tmp_path):
    """--check tries each target over its protocol, its certificate checked against its own name."""
    emulator = make_emulator()
    client_cert = dict(SYSLOG_CLIENT_CERT=pki.client_cert, SYSLOG_CLIENT_KEY=pki.client_key)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{unused.getsockname()[1]}"  # bound, never listening: refuses
    lists = [  # (SYSLOG_PROTOCOL, targets, settings, the verdict per target)
        ("tls", [target(rsyslog, "tls", "localhost"), target(rsyslog, "tls_wrong"), dead], {},
         ["OK", "FAIL", "FAIL"]),
        ("tls", [target(rsyslog, "mtls", "localhost"), target(rsyslog, "mtls")], client_cert, ["OK", "OK"]),
        ("relp+tls", [target(rsyslog, "relp_tls"), target(rsyslog, "relp_tls", "localhost")], client_cert,
         ["OK", "OK"]),
    ]
    for protocol, targets, settings, verdicts in lists:
        env = list_env(emulator, targets, protocol=protocol, SYSLOG_CERT_PATH=pki.ca, **settings)
        status, out, _ = run_forwarder(env, tmp_path, ["--check"])
        lines = [line for line in out.splitlines() if " syslog " in line]
        assert [line.split()[0] for line in lines] == verdicts, out
        assert [line.split()[2] for line in lines] == [f"{protocol}://{t}:" for t in targets], out
        assert status == (0 if set(verdicts) == {"OK"} else 1), out
        if "FAIL" in verdicts:  # the wrong.example certificate does not name 127.0.0.1
            assert "certificate verify failed" in lines[1] and "ConnectionRefusedError" in lines[2], out
