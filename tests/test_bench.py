"""The throughput benchmark (bench/throughput.py) runs end to end in its quick mode.

Nothing here asserts a speed (the machine is shared): the tests check that every variant consumed
every log exactly once through its own consumer group and that each part of the report is there.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.throughput import summarise_py_spy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "throughput.py"
LOGS = 2000


def run_bench(tmp_path, *args):
    """Run the benchmark; (its JSON report, its stdout)."""
    report_path = tmp_path / "throughput.json"
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--shards", "2", "--cache-dir",
                             str(tmp_path), "--json", str(report_path), *args],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(report_path.read_text()), result.stdout


def test_quick_run_measures_every_variant_on_every_log(tmp_path):
    report, table = run_bench(tmp_path, "--logs", str(LOGS), "--no-latency")
    print(table)
    variants = report["variants"]
    assert set(variants) == {"baseline", "forwarder_1", "forwarder_n"}
    for key, result in variants.items():
        # received counts messages after a settling pause: a duplicate would show as more than sent
        assert (result["sent"], result["received"]) == (LOGS, LOGS), key
        assert result["complete"] and result["exit_codes"] == [0] * len(result["exit_codes"]), key
        assert result["logs_per_s"] > 0 and result["cpu_s"] > 0 and result["peak_rss_mb_max"] > 0, key
    assert variants["forwarder_n"]["consumers"] == 2
    assert variants["forwarder_n"]["processes"] >= 2
    assert set(report["ratios"]) == {"forwarder_1", "forwarder_n"}
    assert set(report["encoder"]["logs_per_s"]) == {
        "sdk_protobuf_parse", "baseline_parse_flatten_format", "forwarder_read_and_encode",
        "forwarder_read_and_encode_varying_keys"}
    assert all(rate > 0 for rate in report["encoder"]["logs_per_s"].values())
    assert set(report["encoder"]["logs_per_s_by_encoding"]) == {"kv", "json", "cef", "leef", "kv_with_edited_customize"}
    assert all(rate > 0 for rate in report["encoder"]["logs_per_s_by_encoding"].values())
    assert report["encoder_profile"]["forwarder"]["top_own_time"]
    assert "latency" not in report
    assert "forwarder, 2 processes" in table


def test_group_size_sweep_measures_each_variant_and_the_idle_cpu(tmp_path):
    report, table = run_bench(tmp_path, "--group-sizes", "200", "--logs", "1200", "--rate-logs", "600",
                              "--encodings-shape", "200", "--idle-seconds", "2", "--no-latency")
    print(table)
    shape = report["group_sizes"]["200"]
    variants = {"baseline", "forwarder_1", "forwarder_n", "forwarder_1_json", "forwarder_1_cef", "forwarder_1_leef"}
    assert set(shape["variants"]) == variants and shape["logs"] == 1200
    for key, result in shape["variants"].items():
        # the baseline is measured over the first 600 logs, every forwarder variant drains the backlog
        assert result["complete"] and result["sent"] == (600 if key == "baseline" else 1200), key
    assert set(shape["ratios"]) == variants - {"baseline"}
    assert report["idle"]["cpu_s"] > 0 and report["idle"]["shards"] == 2


def test_latency_run_receives_every_stamped_log(tmp_path):
    report, table = run_bench(tmp_path, "--latency", "--latency-rate", "500", "--latency-seconds", "2")
    print(table)
    latency = report["latency"]
    assert latency["sent"] == latency["received"] == 1000
    assert 0 < latency["p50_s"] <= latency["p90_s"] <= latency["p99_s"] <= latency["max_s"]
    assert "variants" not in report


def test_py_spy_summary_counts_self_and_inclusive_samples(tmp_path):
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "_bootstrap (threading.py:1002);process (sync_waf_to_syslog.py:10);encode (sync_waf_to_syslog.py:20) 3\n"
        "_bootstrap (threading.py:1002);process (sync_waf_to_syslog.py:11);send (sync_waf_to_syslog.py:30) 1\n")
    summary = summarise_py_spy(raw)
    assert summary["samples"] == 4
    assert summary["self"] == [{"function": "encode (sync_waf_to_syslog.py)", "share": 0.75},
                               {"function": "send (sync_waf_to_syslog.py)", "share": 0.25}]
    inclusive = {row["function"]: row["share"] for row in summary["inclusive"]}
    assert inclusive["process (sync_waf_to_syslog.py)"] == 1.0  # two lines of one function
    assert not any("threading.py" in name for name in inclusive)
