"""A local demo, no cloud account needed: the SLS emulator loaded with realistic WAF logs, a local
syslog receiver, and the real forwarder between them. It prints what arrived.

    python tests/demo.py [--logs N] [--protocol tcp|udp] [--show N]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.forwarder_process import ForwarderProcess, forwarder_env  # noqa: E402
from tests.kv import parse_kv  # noqa: E402
from tests.sls_emulator import EmulatorProcess  # noqa: E402
from tests.syslog_receiver import SyslogReceiver, loss_report  # noqa: E402
from tests.waf_logs import hostile_logs, realistic_logs, write_jsonl  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=int, default=2000, help="realistic WAF logs to load (default 2000)")
    parser.add_argument("--protocol", choices=("tcp", "udp"), default="tcp")
    parser.add_argument("--show", type=int, default=3, help="messages to print (default 3)")
    args = parser.parse_args(argv)

    logs = realistic_logs(args.logs) + hostile_logs()
    with tempfile.TemporaryDirectory(prefix="waf-demo-") as workdir:
        data = write_jsonl(Path(workdir) / "waf.jsonl", logs)
        print(f"SLS emulator: {len(logs)} WAF logs ({len(hostile_logs())} of them hostile) in 2 shards")
        with EmulatorProcess(shards=2, load=[str(data)]) as emulator, \
                SyslogReceiver(args.protocol) as receiver:
            print(f"syslog receiver: {args.protocol}://127.0.0.1:{receiver.port}")
            env = forwarder_env(emulator, port=receiver.port, protocol=args.protocol,
                                SYSLOG_TAG="AliyunWAF", SYNC_STATS_INTERVAL="2")
            started = time.monotonic()
            with ForwarderProcess(env, workdir) as forwarder:
                print(f"forwarder: python sync_waf_to_syslog.py (pid {forwarder.process.pid}) ...")
                expected = [entry["request_traceid"] for entry in logs]
                deadline = time.monotonic() + 120
                while loss_report(expected, receiver.messages)["lost"] and time.monotonic() < deadline:
                    time.sleep(0.2)
                elapsed = time.monotonic() - started
                status = forwarder.stop()
            report = loss_report(expected, receiver.messages)
            state = emulator.state()["logstores"][emulator.logstore]
            checkpoints = state["consumer_groups"]["test-group"]["checkpoints"]
            at_end = checkpoints == {sid: s["end_cursor"] for sid, s in state["shards"].items()}

        print(f"\nfirst {args.show} messages received:")
        for message in receiver.messages[:args.show]:
            print("  " + message[:400].decode("utf-8", "replace") + (" ..." if len(message) > 400 else ""))
        hostile = next(m for m in receiver.messages if b"request_traceid=hostile-lf" in m).decode()
        agent = dict(parse_kv(hostile.split(" - - ", 1)[1], ","))["http_user_agent"]
        print(f"\na hostile user agent {agent!r} arrived escaped inside one message:")
        print("  ..." + hostile[hostile.find("http_user_agent="):][:60] + "...")
        print("\nforwarder log (last lines):\n  " + "\n  ".join(forwarder.stderr().splitlines()[-4:]))
        print(f"\nsent {report['sent']}, received {report['received']}, lost {report['lost']}, "
              f"duplicates {report['duplicates']} in {elapsed:.1f} s; forwarder exit status {status}; "
              f"checkpoints at the end of every shard: {at_end}")
    return 0 if report["lost"] == 0 and status == 0 and at_end else 1


if __name__ == "__main__":
    sys.exit(main())
