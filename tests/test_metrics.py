"""SYNC_METRICS_ADDR: /metrics counts what the syslog server received, /healthz follows a syslog
outage past SYNC_HEALTH_FAILING_AFTER, one endpoint covers --workers; and the pieces they are made
of (every Stats counter exported, the health rules, the text format)."""
import time

import pytest

import sync_waf_to_syslog as fwd
from tests import scrape
from tests.delivered import assert_delivered, trace_ids
from tests.forwarder_process import ForwarderProcess, forwarder_env, free_port
from tests.polling import wait_until
from tests.syslog_receiver import SyslogReceiver
from tests.waf_logs import realistic_logs, write_jsonl

SETTINGS = fwd.Settings.from_environment(dict(
    SLS_ENDPOINT="sls.example.test", SLS_REGION="cn-hangzhou", SLS_AK_ID="id", SLS_AK_KEY="key",
    SLS_PROJECT="p", SLS_LOGSTORE="l",
    SYSLOG_HOST="127.0.0.1", SLS_HEARTBEAT_INTERVAL="1", SYNC_HEALTH_FAILING_AFTER="30"))


def snapshot(**changes):
    return {**fwd.empty_snapshot("", time.time()), "ready": True, "held": [0], **changes}


def test_every_stats_counter_and_gauge_is_exported():
    stats = fwd.Stats()
    stats.totals["added_by_another_change"] = 0  # a counter this file does not know yet
    stats.add(added_by_another_change=3, send_errors=2)
    stats.sent(1, [b"abc", b"de"], int(time.time()))
    stats.set_info("syslog_target", target='a"b:514')
    stats.set_info("syslog_target", target="b:514")  # replaces the first
    stats.set_gauge("queue_depth", 7, shard="1")
    counters, lag, gauges = stats.snapshot()
    text = fwd.render_metrics([snapshot(counters=counters, lag={"1": 0.5}, gauges=gauges)], True)
    lines = text.splitlines()
    assert "sync_waf_to_syslog_added_by_another_change_total 3" in lines
    assert "# TYPE sync_waf_to_syslog_logs_total counter" in lines
    assert "sync_waf_to_syslog_logs_total 2" in lines and "sync_waf_to_syslog_bytes_total 5" in lines
    assert "sync_waf_to_syslog_send_errors_total 2" in lines
    assert 'sync_waf_to_syslog_syslog_target{target="b:514"} 1' in lines and 'a\\"b' not in text
    assert 'sync_waf_to_syslog_queue_depth{shard="1"} 7' in lines
    assert 'sync_waf_to_syslog_lag_seconds{shard="1"} 0.5' in lines
    assert "sync_waf_to_syslog_healthy 1" in lines
    samples = [(name, labels) for name, labels, _ in
               (scrape._SAMPLE.match(line).groups() for line in lines if not line.startswith("#"))]
    assert len(samples) == len(set(samples))  # no series twice
    with_worker = fwd.render_metrics([snapshot(worker="w-0", counters={"logs": 1})], True)
    assert 'sync_waf_to_syslog_logs_total{worker="w-0"} 1' in with_worker.splitlines()


def test_label_values_are_escaped():
    text = fwd.render_metrics([snapshot(gauges=[("syslog_target", {"target": 'a\\b"c\nd'}, 1)])], True)
    assert 'sync_waf_to_syslog_syslog_target{target="a\\\\b\\"c\\nd"} 1' in text.splitlines()


def test_health_rules():
    now = time.time()
    assert fwd.health_problems([snapshot(written=now)], SETTINGS, now) == []
    assert fwd.health_problems([], SETTINGS, now) == ["no consumer process is running"]
    assert "not joined" in fwd.health_problems([snapshot(ready=False)], SETTINGS, now)[0]
    assert "stuck" in fwd.health_problems([snapshot(loop_age=11.0)], SETTINGS, now)[0]
    assert fwd.health_problems([snapshot(failing_for=29.0)], SETTINGS, now) == []
    assert "syslog failing for 31 s" in fwd.health_problems([snapshot(failing_for=31.0)], SETTINGS, now)[0]
    assert fwd.health_problems([snapshot(held=[])], SETTINGS, now) == ["no shard held"]
    # Under --workers: a worker without shards is fine while another holds them; a silent one is not.
    assert fwd.health_problems([snapshot(worker="a", held=[]), snapshot(worker="b")], SETTINGS, now) == []
    assert "no report for" in fwd.health_problems([snapshot(worker="a", written=now - 11)], SETTINGS, now)[0]


def test_stats_line_says_how_long_syslog_has_been_failing():
    stats = fwd.Stats()
    assert "failing" not in stats.line() and stats.failing_for() == 0
    stats.add(send_errors=1)
    stats.failing_since -= 42
    assert stats.line().endswith(", failed pulls 0, syslog failing for 42 s")
    stats.sent(0, [], 0)  # a batch with nothing to send proves nothing about syslog
    assert stats.failing_for() >= 42
    stats.sent(0, [b"x"], 0)
    assert stats.failing_for() == 0 and "failing" not in stats.line()


@pytest.mark.slow
def test_metrics_match_the_receiver_and_healthz_follows_an_outage(make_emulator, tmp_path):
    logs = realistic_logs(300, seed=21)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "logs.jsonl", logs)])
    port = free_port()
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SYNC_METRICS_ADDR=f"127.0.0.1:{port}",
                            SYNC_HEALTH_FAILING_AFTER="2", SYNC_STATS_INTERVAL="1")
        with ForwarderProcess(env, tmp_path) as forwarder:
            assert_delivered(lambda: receiver.messages, trace_ids(logs), [forwarder])
            # Checkpoints are saved about once a second: a fast run can finish before the first.
            samples = wait_until(lambda: (lambda s: s if scrape.total(s, "sync_waf_to_syslog_logs_total")
                                          == len(logs) and scrape.total(s, "sync_waf_to_syslog_checkpoint_writes_total")
                                          >= 2 else None)(scrape.metrics(port)), "the metrics")
            assert scrape.total(samples, "sync_waf_to_syslog_bytes_total") == sum(map(len, receiver.messages))
            assert scrape.total(samples, "sync_waf_to_syslog_send_errors_total") == 0
            assert scrape.total(samples, "sync_waf_to_syslog_checkpoint_writes_total") >= 2
            assert scrape.total(samples, "sync_waf_to_syslog_shards_held") == 2
            assert {labels["shard"] for name, labels, _ in samples if name == "sync_waf_to_syslog_lag_seconds"} \
                == {"0", "1"}
            assert ("sync_waf_to_syslog_syslog_target", {"target": f"127.0.0.1:{receiver.port}", "protocol": "tcp"},
                    1.0) in samples
            assert scrape.get(port, "/healthz") == (200, "ok\n")
            assert "consumer test-consumer joined group test-group and holds shards 0, 1" in forwarder.stderr()

            receiver.stop_listening()
            more = realistic_logs(20, seed=22, start_time=time.time())
            emulator.add_logs(more)
            status, text = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(scrape.get(port, "/healthz")),
                                      "/healthz to turn 503")
            assert "syslog failing for" in text
            forwarder.wait_for_log("syslog failing for")  # the stats line says so too
            receiver.start_listening()
            wait_until(lambda: scrape.get(port, "/healthz")[0] == 200, "/healthz to turn 200 again")
            assert_delivered(lambda: receiver.messages, trace_ids(logs + more), [forwarder])
            assert forwarder.stop() == 0


@pytest.mark.slow
def test_one_endpoint_covers_every_worker(make_emulator, tmp_path):
    logs = realistic_logs(400, seed=23)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "logs.jsonl", logs)], shards=4)
    port = free_port()
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SYNC_METRICS_ADDR=f"127.0.0.1:{port}")
        with ForwarderProcess(env, tmp_path, ["--workers", "2"]) as supervisor:
            assert_delivered(lambda: receiver.messages, trace_ids(logs), [supervisor])
            # The group hands the second worker its shards a heartbeat or two after the first had all.
            samples = wait_until(lambda: (lambda s: s if scrape.total(s, "sync_waf_to_syslog_logs_total")
                                          == len(receiver.messages) and scrape.total(s, "sync_waf_to_syslog_shards_held")
                                          == 4 else None)(scrape.metrics(port)),
                                 "the workers' metrics to add up to what arrived, and all shards held")
            workers = {labels["worker"] for name, labels, _ in samples if name == "sync_waf_to_syslog_logs_total"}
            assert workers == {"test-consumer-0", "test-consumer-1"}
            assert scrape.total(samples, "sync_waf_to_syslog_shards_held") == 4
            wait_until(lambda: scrape.get(port, "/healthz")[0] == 200, "/healthz 200")
            assert supervisor.stop() == 0
        assert not list(tmp_path.glob("lock-*.status*"))  # the workers' snapshot files are gone
