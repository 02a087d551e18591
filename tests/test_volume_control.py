"""Volume control, end to end through the real forwarder: SLS_QUERY / SLS_CONSUME_PROCESSOR (SPL that
SLS, here the emulator, applies before the pull) and the SYSLOG_MAX_EPS ceiling."""
import re
import time

import pytest

from tests.checkpoints import checkpoints_at_end
from tests.delivered import trace_ids, wait_delivered
from tests.forwarder_process import SCRIPT, ForwarderProcess, forwarder_env, run_forwarder
from tests.kv import parse_kv
from tests.polling import wait_until
from tests.syslog_receiver import SyslogReceiver, ids, loss_report
from tests.waf_logs import realistic_logs, write_jsonl

pytestmark = pytest.mark.slow

# What each README example must let through, computed here without SPL: (the logs kept, the fields
# sent for a kept log). `project` drops __topic__, __source__ and the tags; what it names and a log
# lacks is left out.
SHARED = ("__topic__", "__source__", "__tag__:__receive_time__")


def content(entry):
    return [(k, v) for k, v in entry.items() if k != "__time__"]


def projected(*names):
    return lambda entry: [("__topic__", ""), ("__source__", "")] + [(n, entry[n]) for n in names if n in entry]


def without(*names):
    return lambda entry: [(k, v) for k, v in content(entry) if k not in names]


EXAMPLES = {
    "* | where final_action is not null": (lambda e: "final_action" in e, content),
    "* | where final_action in ('block', 'captcha', 'captcha_strict')":
        (lambda e: e.get("final_action") in ("block", "captcha", "captcha_strict"), content),
    "* | project-away wxbb_info_tbl, http_cookie, response_set_cookie, ssl_cipher, upstream_addr":
        (lambda e: True, without("wxbb_info_tbl", "http_cookie", "response_set_cookie", "ssl_cipher",
                                 "upstream_addr")),
    "* | project time, host, real_client_ip, request_method, request_uri, status, final_action, final_rule_id, request_traceid":
        (lambda e: True, projected("time", "host", "real_client_ip", "request_method", "request_uri",
                                   "status", "final_action", "final_rule_id", "request_traceid")),
    "* | where final_action = 'block' | project time, host, real_client_ip, request_uri, final_rule_id, final_rule_type, request_traceid":
        (lambda e: e.get("final_action") == "block",
         projected("time", "host", "real_client_ip", "request_uri", "final_rule_id", "final_rule_type",
                   "request_traceid")),
}


def readme_examples():
    section = (SCRIPT.parent / "README.md").read_text().split("<!-- spl-examples -->", 1)[1].split("```", 2)[1]
    return re.findall(r'^SLS_QUERY="(.*)"$', section, re.M)


def waf_logs(seed):
    """Realistic logs as WAF writes them (a module that did not act leaves its fields out, so a
    request no module acted on has no final_action), ending in a stretch no filter keeps."""
    logs = [{k: v for k, v in entry.items() if v != ""} for entry in realistic_logs(600, seed=seed)]
    passes = [entry for entry in logs if "final_action" not in entry]
    return logs + [dict(entry, request_traceid=entry["request_traceid"] + "-late") for entry in passes[:100]]


def test_the_readme_examples_are_the_ones_tested():
    assert readme_examples() == list(EXAMPLES)


@pytest.mark.parametrize("statement", list(EXAMPLES))
def test_each_readme_example_sends_exactly_what_it_keeps(statement, make_emulator, tmp_path):
    logs = waf_logs(seed=41)
    keep, fields_of = EXAMPLES[statement]
    kept = [entry for entry in logs if keep(entry)]
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)])
    with SyslogReceiver("tcp") as receiver:
        # Small pulls: the trailing stretch of filtered LogGroups comes in pulls of its own.
        env = forwarder_env(emulator, port=receiver.port, SLS_QUERY=statement, SLS_MAX_FETCH_GROUPS="3",
                            SYNC_STATS_INTERVAL="3600")
        with ForwarderProcess(env, tmp_path) as forwarder:
            wait_delivered(lambda: receiver.messages, trace_ids(kept))
            # The last LogGroups hold nothing the statement keeps: the checkpoints still reach the end.
            wait_until(lambda: checkpoints_at_end(emulator), "the checkpoints past the filtered logs")
            assert forwarder.stop() == 0
        received = {}
        for message in receiver.messages:
            fields = parse_kv(message.split(b" - - ", 1)[1].decode(), ",")
            received[dict(fields).get("request_traceid")] = fields
    assert loss_report(trace_ids(kept), receiver.messages)["duplicates"] == 0
    assert set(received) == set(trace_ids(kept)), statement
    by_id = {entry["request_traceid"]: entry for entry in kept}
    for trace_id, fields in received.items():
        assert fields == fields_of(by_id[trace_id]), (statement, trace_id)
    assert f"filtered by SLS {len(logs) - len(kept)}" in forwarder.stderr()


def test_a_consume_processor_by_name(make_emulator, tmp_path):
    logs = waf_logs(seed=42)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)])
    emulator.add_processor("waf-blocked", "* | where final_action = 'block'")
    blocked = [entry for entry in logs if entry.get("final_action") == "block"]
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SLS_CONSUME_PROCESSOR="waf-blocked")
        status, out, _ = run_forwarder(env, tmp_path, ["--dry-run"])
        assert status == 0 and len(out.splitlines()) == len(blocked)
        with ForwarderProcess(env, tmp_path) as forwarder:
            assert wait_delivered(lambda: receiver.messages, trace_ids(blocked))["lost"] == 0
            wait_until(lambda: checkpoints_at_end(emulator), "the checkpoints at the end")
            assert forwarder.stop() == 0
    assert sorted(ids(receiver.messages)) == sorted(trace_ids(blocked))


@pytest.mark.parametrize("setting, value", [("SLS_QUERY", "* | sort host"),
                                            ("SLS_QUERY", "* | where final_action <> "),
                                            ("SLS_CONSUME_PROCESSOR", "no-such-processor")])
def test_a_statement_sls_refuses_is_a_setting_error(setting, value, make_emulator, tmp_path):
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", realistic_logs(20, seed=43))])
    env = forwarder_env(emulator, port=9, **{setting: value})
    for args in ((), ["--check"]):
        status, out, err = run_forwarder(env, tmp_path, args)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1, (args, err)
        assert lines[0].startswith(f"setting error: {setting}: SLS refused it") and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# SYSLOG_MAX_EPS
# ------------------------------------------------------------------------------------------------

EPS = 500
WINDOW = 5  # seconds: the rate over any such window stays within 10 % of the ceiling


def arrivals(receiver, until, forwarders):
    """[(monotonic time, messages received so far)] every 0.1 s until until() holds."""
    samples = []
    deadline = time.monotonic() + 120
    while not until() and time.monotonic() < deadline:
        samples.append((time.monotonic(), receiver.count))
        assert all(f.process.poll() is None for f in forwarders), forwarders[0].stderr()[-2000:]
        time.sleep(0.1)
    samples.append((time.monotonic(), receiver.count))
    return samples


def window_rates(samples, settled):
    """Messages per second over every WINDOW-second span of the samples (0.5 s steps) up to the last
    second (the backlog runs out), each with whether it starts `settled` s after the first arrival
    (before, the consumers are still taking their shards)."""
    first = next(when for when, count in samples if count)
    rates, at = [], first
    while at + WINDOW <= samples[-1][0] - 1:
        begin = next(count for when, count in samples if when >= at)
        end = next(count for when, count in samples if when >= at + WINDOW)
        rates.append(((end - begin) / WINDOW, at >= first + settled))
        at += 0.5
    return rates


@pytest.mark.parametrize("workers", [1, 2])
def test_the_eps_ceiling_holds_the_rate_and_loses_nothing(workers, make_emulator, tmp_path):
    """A backlog of 6,000 logs at SYSLOG_MAX_EPS=500: every log arrives, no 5-s window is more than
    10 % off the ceiling, for one process and for --workers 2 together."""
    logs = realistic_logs(6000, seed=44 + workers)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)], shards=4)
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SYSLOG_MAX_EPS=str(EPS))
        args = ["--workers", str(workers)] if workers > 1 else []
        with ForwarderProcess(env, tmp_path, args) as forwarder:
            samples = arrivals(receiver, lambda: receiver.count >= len(logs), [forwarder])
            assert forwarder.stop() == 0
    report = loss_report(trace_ids(logs), receiver.messages)
    assert report["lost"] == 0 and report["duplicates"] == 0, report
    rates = window_rates(samples, settled=3)
    assert all(rate <= 1.1 * EPS for rate, _ in rates), rates  # never over the ceiling
    settled = [rate for rate, after in rates if after]
    assert len(settled) >= 6 and all(rate >= 0.9 * EPS for rate in settled), rates  # and held at it
    assert "SYSLOG_MAX_EPS=500 holds the syslog rate back" in forwarder.stderr()


def test_a_stop_under_the_ceiling_saves_only_what_was_delivered(make_emulator, tmp_path):
    """SIGTERM while the ceiling holds logs back, then a new run: every log arrives (a checkpoint
    past an undelivered log would lose it), and only what the last second repeats twice."""
    logs = realistic_logs(3000, seed=46)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "waf.jsonl", logs)])
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SYSLOG_MAX_EPS=str(EPS))
        with ForwarderProcess(env, tmp_path) as first:
            wait_until(lambda: receiver.count >= 1000, "a third of the logs")
            assert first.stop() == 0
        stopped_at = receiver.count
        assert stopped_at < len(logs)
        with ForwarderProcess(env, tmp_path) as second:
            report = wait_delivered(lambda: receiver.messages, trace_ids(logs))
            assert second.stop() == 0
    assert report["lost"] == 0, report
    # At most what the batch in hand had sent (a pull is at most one second of the ceiling) and the
    # unsaved second (checkpoints are saved every second).
    assert report["duplicates"] <= 2 * EPS + 100, report
