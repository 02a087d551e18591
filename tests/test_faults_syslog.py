"""Fault injection on the syslog side of the forwarder (issue 4: cases 1-4 and 8, stalls, UDP errors).

Each test runs the real forwarder as a subprocess (real SDK, SLS emulator) against a syslog peer
that misbehaves on purpose: tests/syslog_receiver.py refuses, closes, resets or stalls connections,
and a real rsyslogd is stopped or killed and started again. Every log carries a unique
request_traceid, so each test prints one accounting line (see it with `pytest -s`):

    FAULT <name>: sent=N received=N lost=N duplicates=N send_errors=N resent=N

and asserts what the protocol can guarantee: 0 lost wherever TCP acknowledgements prove delivery;
where they cannot (a reset with unread data, kill -9 of rsyslogd, UDP) it asserts that the
forwarder survives, reconnects and finishes, and only reports the loss.
"""
import re
import time

import pytest

from tests.checkpoints import assignments, checkpoints_at_end, checkpoints_not_moved, group_state
from tests.delivered import wait_delivered
from tests.forwarder_process import ForwarderProcess, forwarder_env, with_fault
from tests.rsyslog_peer import Rsyslog
from tests.syslog_receiver import SyslogReceiver, loss_report
from tests.waf_logs import realistic_logs, write_jsonl
from tests.polling import wait_until

pytestmark = pytest.mark.slow

LOG_COUNT = 2000
# Pulls of 2 LogGroups (20 logs): many small batches, so every fault lands in mid-stream.
SMALL_BATCHES = {"SLS_MAX_FETCH_GROUPS": "2"}
# Messages before a receiver's close or reset fires: not a multiple of the 20-log batches, so the
# fault cuts a batch in two.
FAULT_AFTER = 397
# Only the final statistics line (at exit): it carries the forwarder's send-error and resend counts.
FINAL_STATS = {"SYNC_STATS_INTERVAL": "3600"}
DELIVERY_TIMEOUT = 40  # seconds a test waits for all logs before its loss accounting fails it
OUTAGE_SECONDS = 10  # how long the syslog server stays down at start (issue 4, case 1)


# ---- building blocks -----------------------------------------------------------------------------

def loaded_emulator(make_emulator, tmp_path, count=LOG_COUNT, seed=1):
    """An SLS emulator holding `count` realistic logs; returns (emulator, their request_traceids)."""
    logs = realistic_logs(count, seed=seed)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)])
    return emulator, [entry["request_traceid"] for entry in logs]


def receiver_env(emulator, receiver, **settings):
    return forwarder_env(emulator, port=receiver.port, protocol=receiver.protocol,
                         **SMALL_BATCHES, **FINAL_STATS, **settings)


def rsyslog_messages(peer):
    """What rsyslogd wrote, as messages for loss_report."""
    return [record["msg"].encode("utf-8", "surrogateescape") for record in peer.records()]


def final_stats(forwarder):
    """(send errors, messages resent) from the forwarder's last statistics line, at exit."""
    counts = re.findall(r"send errors (\d+), resent (\d+)", forwarder.stderr())
    assert counts, f"no statistics line in the forwarder's log:\n{forwarder.stderr()[-2000:]}"
    return int(counts[-1][0]), int(counts[-1][1])


def account(fault, sent_ids, messages, forwarder):
    """Loss accounting for one fault: print the table row and return the loss_report."""
    report = loss_report(sent_ids, messages)
    send_errors, resent = final_stats(forwarder)
    report.update(send_errors=send_errors, resent=resent)
    print(f"\nFAULT {fault}: sent={report['sent']} received={report['received']} "
          f"lost={report['lost']} duplicates={report['duplicates']} "
          f"send_errors={send_errors} resent={resent} lost_ids={report['lost_ids']}")
    return report


def stop_cleanly(forwarder, timeout=30):
    status = forwarder.stop(timeout)
    assert status == 0, forwarder.stderr()[-3000:]


# ---- TCP: the syslog server is unreachable, refuses, closes, stalls ------------------------------

def test_server_down_at_start_no_checkpoint_moves_then_all_arrive(make_emulator, tmp_path):
    """Case 1: nothing listens for ~10 s; meanwhile no checkpoint moves; then everything arrives."""
    emulator, sent_ids = loaded_emulator(make_emulator, tmp_path)
    with SyslogReceiver("tcp", listening=False) as receiver, \
            ForwarderProcess(receiver_env(emulator, receiver), tmp_path) as forwarder:
        forwarder.wait_for_log("cannot send")  # it holds a batch and cannot deliver it
        outage_end = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < outage_end:
            assert checkpoints_not_moved(emulator), group_state(emulator)
            time.sleep(0.5)
        assert assignments(emulator)["test-consumer"], "the forwarder never took its shards"
        assert forwarder.process.poll() is None and receiver.count == 0
        receiver.start_listening()
        wait_delivered(lambda: receiver.messages, sent_ids, DELIVERY_TIMEOUT)
        stop_cleanly(forwarder)
    report = account("server down at start (TCP)", sent_ids, receiver.messages, forwarder)
    assert report["send_errors"] >= 1 and report["resent"] > 0  # the held batch went out late
    assert report["lost"] == 0
    assert checkpoints_at_end(emulator), group_state(emulator)


def test_receiver_closes_three_times_mid_stream_nothing_lost(make_emulator, tmp_path):
    """Case 2: three graceful closes (drain, then FIN) in mid-stream; the forwarder must resend
    whatever the closed connection did not take."""
    emulator, sent_ids = loaded_emulator(make_emulator, tmp_path)
    with SyslogReceiver("tcp", close_after=FAULT_AFTER, close_times=3) as receiver, \
            ForwarderProcess(receiver_env(emulator, receiver), tmp_path) as forwarder:
        wait_delivered(lambda: receiver.messages, sent_ids, DELIVERY_TIMEOUT)
        stop_cleanly(forwarder)
    report = account("receiver closes x3 mid-stream (TCP)", sent_ids, receiver.messages, forwarder)
    stats = receiver.stats()
    assert stats["closes"] == 3 and stats["connections_accepted"] >= 4, stats
    assert report["lost"] == 0
    assert checkpoints_at_end(emulator), group_state(emulator)


@pytest.mark.parametrize("syslog_timeout", [None, 1], ids=["forwarder-waits", "send-times-out"])
def test_receiver_stalls_then_resumes_nothing_lost(syslog_timeout, make_emulator, tmp_path):
    """The receiver stops reading for a few seconds (buffers fill, the forwarder blocks or, with a
    short SYSLOG_TIMEOUT, gives up and reconnects), then reads again: nothing is lost."""
    emulator, sent_ids = loaded_emulator(make_emulator, tmp_path)
    settings = {"SYSLOG_TIMEOUT": syslog_timeout} if syslog_timeout else {}
    with SyslogReceiver("tcp") as receiver, \
            ForwarderProcess(receiver_env(emulator, receiver, **settings), tmp_path) as forwarder:
        wait_until(lambda: receiver.count >= LOG_COUNT // 4, "a quarter arrived", DELIVERY_TIMEOUT)
        receiver.stall()
        time.sleep(4)
        assert forwarder.process.poll() is None, forwarder.stderr()[-2000:]
        assert loss_report(sent_ids, receiver.messages)["lost"] > 0, "the stall came too late"
        receiver.resume()
        wait_delivered(lambda: receiver.messages, sent_ids, DELIVERY_TIMEOUT)
        stop_cleanly(forwarder)
    report = account(f"receiver stalls 4 s ({'SYSLOG_TIMEOUT=1' if syslog_timeout else 'no timeout'})",
                     sent_ids, receiver.messages, forwarder)
    assert report["lost"] == 0
    if syslog_timeout:
        assert "accepted nothing for 1 s" in forwarder.stderr()
    assert checkpoints_at_end(emulator), group_state(emulator)


def test_reset_with_unread_data_is_survived_and_its_loss_measured(make_emulator, tmp_path):
    """Case 4: the receiver stops reading, lets data pile up and resets (RST). What its kernel had
    acknowledged is gone and plain TCP cannot tell which (RFC 5425 section 6.3), so after a reset the
    forwarder sends again what was confirmed in the second before it: nothing lost, duplicates."""
    emulator, sent_ids = loaded_emulator(make_emulator, tmp_path)
    with SyslogReceiver("tcp", reset_after=FAULT_AFTER) as receiver, \
            ForwarderProcess(receiver_env(emulator, receiver), tmp_path) as forwarder:
        wait_until(lambda: checkpoints_at_end(emulator), "every checkpoint is at the end", DELIVERY_TIMEOUT)
        stop_cleanly(forwarder)
    report = account("receiver resets with unread data (TCP)", sent_ids, receiver.messages, forwarder)
    stats = receiver.stats()
    assert stats["resets"] == 1 and stats["connections_accepted"] >= 2, stats
    assert report["send_errors"] >= 1 and report["resent"] > 0  # noticed, reconnected, resent
    assert report["unique"] > FAULT_AFTER  # the stream went on after the reset
    assert report["lost"] == 0 and report["duplicates"] > 0, report
    assert report["resent"] >= report["duplicates"]  # the statistics line counts every message sent again


def test_sigterm_while_server_down_then_next_run_delivers(make_emulator, tmp_path):
    """Case 8: SIGTERM while every send fails: exit 0 promptly, no checkpoint past undelivered logs;
    the next run, with the server back, delivers everything."""
    emulator, sent_ids = loaded_emulator(make_emulator, tmp_path)
    with SyslogReceiver("tcp", listening=False) as receiver:
        env = receiver_env(emulator, receiver)
        with ForwarderProcess(env, tmp_path) as first_run:
            first_run.wait_for_log("cannot send")
            stop_cleanly(first_run, timeout=10)
        assert checkpoints_not_moved(emulator), group_state(emulator)
        assert receiver.count == 0
        receiver.start_listening()
        with ForwarderProcess(env, tmp_path) as second_run:
            wait_delivered(lambda: receiver.messages, sent_ids, DELIVERY_TIMEOUT)
            stop_cleanly(second_run)
    report = account("SIGTERM while server down, then next run (TCP)", sent_ids, receiver.messages,
                     second_run)
    assert report["lost"] == 0
    assert checkpoints_at_end(emulator), group_state(emulator)


# ---- rsyslogd stopped or killed and started again ------------------------------------------------

RSYSLOG_RESTARTS = {  # id: (rsyslog input and protocol, how it goes down)
    "tcp-sigterm": ("tcp", "stop"),
    "tls-sigterm": ("tls", "stop"),
    "tcp-sigkill": ("tcp", "kill"),
}


@pytest.mark.rsyslog
@pytest.mark.parametrize("variant", RSYSLOG_RESTARTS)
def test_rsyslogd_restarted_mid_stream(variant, pki, make_emulator, tmp_path):
    """Case 3: a real rsyslogd (of its own, as it is restarted) goes down mid-stream and comes back.
    After a graceful stop (SIGTERM) nothing may be lost; after kill -9 rsyslogd loses what it had
    accepted but not yet written, which TCP cannot reveal: then only recovery is asserted."""
    protocol, stop_how = RSYSLOG_RESTARTS[variant]
    emulator, sent_ids = loaded_emulator(make_emulator, tmp_path)
    settings = {"SYSLOG_HOST": "localhost", "SYSLOG_CERT_PATH": pki.ca} if protocol == "tls" else {}
    with Rsyslog(tmp_path / "rsyslog", pki) as peer:
        env = forwarder_env(emulator, port=peer.ports[protocol], protocol=protocol,
                            **SMALL_BATCHES, **FINAL_STATS, **settings)
        with ForwarderProcess(env, tmp_path) as forwarder:
            wait_until(lambda: len(rsyslog_messages(peer)) >= LOG_COUNT // 4, "a quarter arrived",
                       DELIVERY_TIMEOUT)
            getattr(peer, stop_how)()
            before_restart = len(rsyslog_messages(peer))
            forwarder.wait_for_log("cannot send")
            peer.start()
            wait_delivered(lambda: rsyslog_messages(peer), sent_ids, DELIVERY_TIMEOUT)
            wait_until(lambda: checkpoints_at_end(emulator), "every checkpoint is at the end", DELIVERY_TIMEOUT)
            stop_cleanly(forwarder)
        messages = rsyslog_messages(peer)
    report = account(f"rsyslogd {'SIGTERM' if stop_how == 'stop' else 'SIGKILL'} + start ({protocol})",
                     sent_ids, messages, forwarder)
    assert before_restart < LOG_COUNT, "rsyslogd went down after the stream had ended"
    assert report["resent"] > 0  # a batch that failed during the outage went out afterwards
    assert len(messages) > before_restart  # logs flow again after the restart
    if stop_how == "stop":
        assert report["lost"] == 0


# ---- UDP ---------------------------------------------------------------------------------------------

def test_udp_send_errors_are_counted_and_logged(make_emulator, tmp_path):
    """UDP cannot confirm delivery; while nothing listens, ICMP port unreachable makes sends fail
    with ECONNREFUSED: the forwarder logs and counts that, retries, and logs flow again once the
    receiver is back."""
    emulator, sent_ids = loaded_emulator(make_emulator, tmp_path, count=600)
    with SyslogReceiver("udp", listening=False) as receiver, \
            ForwarderProcess(receiver_env(emulator, receiver), tmp_path) as forwarder:
        forwarder.wait_for_log("ConnectionRefusedError")
        assert checkpoints_not_moved(emulator), group_state(emulator)
        receiver.start_listening()
        wait_delivered(lambda: receiver.messages, sent_ids, DELIVERY_TIMEOUT)
        wait_until(lambda: checkpoints_at_end(emulator), "every checkpoint is at the end", DELIVERY_TIMEOUT)
        stop_cleanly(forwarder)
    report = account("UDP receiver down, then up", sent_ids, receiver.messages, forwarder)
    assert report["send_errors"] >= 1
    assert report["unique"] > 0  # logs flow again


# ---- the forwarder itself fails with a batch ---------------------------------------------------

def test_unexpected_error_in_a_batch_rolls_it_back_nothing_lost(make_emulator, tmp_path):
    """The SDK drops a batch whose process() raises; the forwarder must fetch it again instead. Here
    the encoder fails on its first 5 batches (as a bug with some rare log would)."""
    emulator, sent_ids = loaded_emulator(make_emulator, tmp_path, count=400)
    failing_encoder = with_fault("failing_encoder", 5)
    with SyslogReceiver("tcp") as receiver:
        env = receiver_env(emulator, receiver)
        with ForwarderProcess(env, tmp_path, python_args=failing_encoder) as forwarder:
            wait_delivered(lambda: receiver.messages, sent_ids, DELIVERY_TIMEOUT)
            wait_until(lambda: checkpoints_at_end(emulator), "checkpoints at the end")
            stop_cleanly(forwarder)
    report = loss_report(sent_ids, receiver.messages)
    assert report["lost"] == 0 and report["duplicates"] == 0, report
    assert "injected encoder failure" in forwarder.stderr() and "nothing is skipped" in forwarder.stderr()
