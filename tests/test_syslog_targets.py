"""Several syslog collectors (SYSLOG_HOST as a list, SYSLOG_BALANCE, SYSLOG_FAILBACK_AFTER): the list
parser, and Delivery with its TargetPool against in-process receivers (tests/syslog_receiver.py):
which target takes a batch, failover and fail-back, round-robin, every target down, a stall, what a
reset connection may not have read going to the next target, a name resolved again at every
connect. The same end to end with real rsyslogd peers: tests/test_failover.py."""
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import threading

import pytest

import sync_waf_to_syslog as fwd
from tests.encoding import BASE_ENV, make_settings
from tests.forwarder_process import SCRIPT
from tests.polling import wait_until
from tests.syslog_receiver import SyslogReceiver, loss_report

# ---- the list in SYSLOG_HOST ---------------------------------------------------------------------

GOOD_LISTS = {
    "siem": [("siem", 514)],
    "siem:1514": [("siem", 1514)],
    " siem-a , siem-b:2 ,10.0.0.7:6514": [("siem-a", 514), ("siem-b", 2), ("10.0.0.7", 6514)],
    "[::1]:6514,[2001:db8::7]": [("::1", 6514), ("2001:db8::7", 514)],
    "::1": [("::1", 514)],  # a bare IPv6 address, as a single SYSLOG_HOST always took it
}


@pytest.mark.parametrize("text", GOOD_LISTS)
def test_the_list_is_parsed_in_its_order(text):
    settings = make_settings(SYSLOG_HOST=text)
    assert fwd.syslog_targets(settings) == tuple(fwd.SyslogTarget(*target) for target in GOOD_LISTS[text])
    assert settings.syslog_host == text.strip()  # the text as given


def test_a_target_is_written_as_it_is_given():
    assert [str(target) for target in fwd.parse_targets("siem,[::1]:6514", 514)] == ["siem:514", "[::1]:6514"]


BAD_LISTS = {  # SYSLOG_HOST: what its problem line says
    "a:notaport": "'notaport' is not a port number",
    "a,,b": "empty item",
    "a,b,": "empty item",
    "[::1": "is not closed by ]",
    "[::1]6514": "only :port may follow",
    "[siem]:514": "'siem' is not an IPv6 address",
    "a:0": "'0' is not a port number (1..65535)",
    "a:65536": "'65536' is not a port number",
    "a:": "'' is not a port number",
    ":514": "'' is not a host name",
    "a b": "'a b' is not a host name",
    "a,a:514": "a:514 is listed twice",
    "1:2:3": "neither host:port nor an IPv6 address",
}


@pytest.mark.parametrize("text", BAD_LISTS)
def test_a_bad_list_is_one_problem_naming_syslog_host(text):
    with pytest.raises(fwd.SettingsError) as error:
        make_settings(SYSLOG_HOST=text)
    [problem] = error.value.problems
    assert problem.startswith("SYSLOG_HOST: ") and BAD_LISTS[text] in problem, problem


def test_udp_takes_one_target_only():
    assert make_settings(SYSLOG_HOST="siem", SYSLOG_PROTOCOL="udp").syslog_protocol == "udp"
    with pytest.raises(fwd.SettingsError) as error:
        make_settings(SYSLOG_HOST="siem-a,siem-b", SYSLOG_PROTOCOL="udp")
    [problem] = error.value.problems
    assert problem.startswith("SYSLOG_HOST: a list of collectors needs") and "udp" in problem


def test_balance_and_failback_settings():
    settings = make_settings()
    assert (settings.syslog_balance, settings.syslog_failback_after) == ("failover", 60.0)
    settings = make_settings(SYSLOG_BALANCE="Round-Robin", SYSLOG_FAILBACK_AFTER="0")
    assert (settings.syslog_balance, settings.syslog_failback_after) == ("round-robin", 0.0)
    for variable, bad in (("SYSLOG_BALANCE", "random"), ("SYSLOG_FAILBACK_AFTER", "-1"),
                          ("SYSLOG_FAILBACK_AFTER", "soon")):
        with pytest.raises(fwd.SettingsError) as error:
            make_settings(**{variable: bad})
        [problem] = error.value.problems
        assert problem.startswith(f"{variable}: "), problem


def test_the_program_exits_2_with_one_line_naming_syslog_host():
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLS_", "SYSLOG_", "SYNC_"))}
    result = subprocess.run([sys.executable, str(SCRIPT)], env={**clean, **BASE_ENV, "SYSLOG_HOST": "[::1"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["setting error: SYSLOG_HOST: '[::1': the [ of an IPv6 address "
                                          "is not closed by ]"]


# ---- Delivery over several targets -------------------------------------------------------------
# Marked slow where a test waits for probes, pauses or a timeout.

FAST = dict(SYSLOG_RETRY_MAX_DELAY="0.2", SYSLOG_FAILBACK_AFTER="0.5")
_ids = itertools.count()


def batch(count=5):
    return [b"<14>1 2026-01-02T03:04:05Z host app - - - request_traceid=t%d" % next(_ids) for _ in range(count)]


def ids_of(*batches):
    return [message.rsplit(b"=", 1)[1].decode() for messages in batches for message in messages]


def target(receiver):
    return f"127.0.0.1:{receiver.port}"


@contextlib.contextmanager
def delivering(*receivers, **env):
    """A Delivery to the receivers, in this order; its connections and prober end with the block."""
    settings = make_settings(SYSLOG_HOST=",".join(map(target, receivers)), **{**FAST, **env})
    stop = threading.Event()
    delivery = fwd.Delivery(settings, stop, fwd.Stats())
    try:
        yield delivery
    finally:
        stop.set()
        delivery.close()
        if delivery.pool.prober is not None:
            delivery.pool.prober.join(10)


def in_background(deliver, messages):
    """deliver(messages) on a thread of its own; the list gets its result."""
    result = []
    thread = threading.Thread(target=lambda: result.append(deliver(messages)), daemon=True)
    thread.start()
    return thread, result


@pytest.mark.slow
def test_failover_sends_everything_to_the_first_target_then_the_next_then_fails_back(caplog):
    caplog.set_level("INFO", logger="sync_waf_to_syslog")
    with SyslogReceiver() as a, SyslogReceiver() as b, delivering(a, b) as delivery:
        sent = [batch() for _ in range(3)]
        assert all(delivery.deliver(messages) for messages in sent)
        wait_until(lambda: a.count == 15, "A received the first three batches")
        assert b.count == 0 and delivery.pool.active() == target(a)

        a.stop_listening()  # closes its connection and refuses new ones
        sent.append(batch())
        assert delivery.deliver(sent[-1])
        wait_until(lambda: b.count == 5, "B received the batch A could not take")
        assert delivery.pool.active() == target(b)
        assert f"syslog target {target(a)} is out of service; sending to {target(b)}" in caplog.text

        a.start_listening()
        wait_until(lambda: delivery.pool.active() == target(a), "fail-back to A once it was reachable")
        assert f"syslog target {target(a)} is back in service (reachable for" in caplog.text
        sent.append(batch())
        assert delivery.deliver(sent[-1])
        wait_until(lambda: a.count == 20, "A received the batch after the fail-back")
        assert b.count == 5
        assert [member.connected for member in delivery.pool.members] == [True, False]  # one connection
    assert loss_report(ids_of(*sent), a.messages + b.messages)["lost"] == 0


@pytest.mark.slow
def test_round_robin_takes_turns_and_a_failed_target_drops_out_and_rejoins():
    with SyslogReceiver() as a, SyslogReceiver() as b, \
            delivering(a, b, SYSLOG_BALANCE="round-robin") as delivery:
        sent = [batch() for _ in range(4)]
        assert all(delivery.deliver(messages) for messages in sent)
        wait_until(lambda: a.count == b.count == 10, "two batches each")
        assert delivery.pool.active() == f"{target(a)},{target(b)}"
        assert all(member.connected for member in delivery.pool.members)  # one connection each

        b.stop_listening()
        sent += [batch() for _ in range(4)]
        assert all(delivery.deliver(messages) for messages in sent[4:])
        wait_until(lambda: a.count == 30, "A took every batch while B was out")
        assert delivery.pool.active() == target(a)

        b.start_listening()
        wait_until(lambda: delivery.pool.active() == f"{target(a)},{target(b)}", "B back in the rotation")
        sent += [batch() for _ in range(2)]
        assert all(delivery.deliver(messages) for messages in sent[8:])
        wait_until(lambda: a.count == 35 and b.count == 15, "one more batch each")
    assert loss_report(ids_of(*sent), a.messages + b.messages)["lost"] == 0


@pytest.mark.slow
def test_with_every_target_down_the_batch_waits_for_the_first_that_returns(caplog):
    with SyslogReceiver(listening=False) as a, SyslogReceiver(listening=False) as b, \
            delivering(a, b) as delivery:
        messages = batch()
        thread, result = in_background(delivery.deliver, messages)
        wait_until(lambda: delivery.stats.totals["send_errors"] >= 6, "both targets tried three times")
        assert thread.is_alive() and delivery.pool.active() == "none"
        assert "no target is in service: trying each in turn" in caplog.text
        b.start_listening()
        thread.join(30)
        assert result == [True]
        wait_until(lambda: b.count == 5, "B received the batch")
        assert a.count == 0 and delivery.pool.active() == target(b)
        assert delivery.stats.totals["resent"] == 5  # the batch, once, on the attempt that worked


@pytest.mark.slow
def test_one_target_is_retried_as_it_always_was(caplog):
    with SyslogReceiver(listening=False) as a, delivering(a) as delivery:
        thread, result = in_background(delivery.deliver, batch())
        wait_until(lambda: delivery.stats.totals["send_errors"] >= 2, "two failed attempts")
        a.start_listening()
        thread.join(30)
        assert result == [True] and delivery.pool.active() is None
    assert f"cannot send 5 messages to {target(a)} over tcp (1 failed attempts so far)" in caplog.text
    assert "out of service" not in caplog.text and "back in service" not in caplog.text
    assert "active" not in delivery.stats.line(delivery.pool.active())


@pytest.mark.slow
def test_what_a_reset_connection_may_not_have_read_is_sent_to_the_next_target():
    """A reads 7 messages, stops reading and resets its connection: the 3 it never read were
    acknowledged by its kernel. The next batch fails on A and goes to B, with what A confirmed in
    its last second (TcpTransport's resend, taken over by B's transport)."""
    with SyslogReceiver(reset_after=7) as a, SyslogReceiver() as b, delivering(a, b) as delivery:
        sent = [batch(), batch()]
        assert all(delivery.deliver(messages) for messages in sent)
        wait_until(lambda: a.stats()["resets"] == 1 and a.stats()["open_connections"] == 0,
                   "A reset its connection")
        assert a.count == 7
        sent.append(batch())
        assert delivery.deliver(sent[-1])
        wait_until(lambda: b.count == 15, "B received A's last second and the new batch")
        assert delivery.stats.totals["resent"] == 15
    report = loss_report(ids_of(*sent), a.messages + b.messages)
    assert report["lost"] == 0 and report["duplicates"] == 7, report


@pytest.mark.slow
def test_a_stall_past_syslog_timeout_moves_the_batch_to_the_next_target(caplog):
    big = [b"<14>1 - h app - - - request_traceid=big%d " % i + b"x" * 65000 for i in range(256)]
    with SyslogReceiver(stalled=True) as a, SyslogReceiver() as b, \
            delivering(a, b, SYSLOG_TIMEOUT="1") as delivery:
        assert delivery.deliver(big)  # 16 MB: more than A's buffers hold
        wait_until(lambda: b.count == len(big), "B received the batch A stalled on")
        assert delivery.pool.active() == target(b)
    assert "the syslog server accepted nothing for 1 s" in caplog.text


def test_a_name_is_resolved_again_at_every_connect_and_each_address_is_tried(monkeypatch):
    """Every connect asks the resolver; of the addresses it answers, the first that accepts wins."""
    resolve = socket.getaddrinfo
    with SyslogReceiver() as first, SyslogReceiver() as second:
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            dead = unused.getsockname()  # bound, never listening: refuses
        answers = [dead, first.address]

        def fake_resolver(host, *args, **kwargs):
            if host != "collector.test":
                return resolve(host, *args, **kwargs)
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address) for address in answers]

        monkeypatch.setattr(socket, "getaddrinfo", fake_resolver)
        transport = fwd.TcpTransport(make_settings(SYSLOG_HOST="collector.test"))
        for receiver in (first, second):
            transport.connect(threading.Event())
            transport.send(batch(1), threading.Event())
            transport.close()
            wait_until(lambda: receiver.count == 1, f"the message reached {receiver.address}")
            answers[:] = [second.address]  # the name moves
