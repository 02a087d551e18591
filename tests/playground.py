"""A local playground for the real CLI, no cloud account needed: the SLS emulator (its CLI, in a
process of its own) loaded with realistic WAF logs, a few new ones arriving every second, and a
syslog receiver that says what arrives. It writes `.env.playground` (mode 0600) beside
sync_waf_to_syslog.py, with every variable the forwarder needs (the emulator is reached through
HTTP_PROXY, which the forwarder exports from the file), prints them, and stays up until Ctrl-C;
then it removes the file.

    python tests/playground.py [--logs N] [--per-second N] [--shards N] [--syslog-port PORT]

Then, in another terminal, from the same folder (README.md, "Trying it locally"):

    python sync_waf_to_syslog.py --env-file .env.playground --check
    python sync_waf_to_syslog.py --env-file .env.playground --dry-run | head -3
    python sync_waf_to_syslog.py --env-file .env.playground
"""
import argparse
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.sls_emulator import EmulatorProcess  # noqa: E402
from tests.syslog_receiver import SyslogReceiver  # noqa: E402
from tests.waf_logs import realistic_logs, write_jsonl  # noqa: E402

ENV_FILE = ROOT / ".env.playground"
READY_LINE = "playground ready"


def settings(emulator, receiver):
    """The forwarder's variables for this emulator and receiver."""
    return {
        "SLS_ENDPOINT": emulator.endpoint, "SLS_REGION": "cn-hangzhou", "SLS_AK_ID": emulator.access_key_id,
        "SLS_AK_KEY": emulator.access_key_secret, "SLS_PROJECT": emulator.project,
        "SLS_LOGSTORE": emulator.logstore, "SLS_CG": "playground", "SLS_HEARTBEAT_INTERVAL": "5",
        "SYSLOG_HOST": "127.0.0.1", "SYSLOG_PORT": str(receiver.port), "SYSLOG_PROTOCOL": "tcp",
        "SYNC_STATS_INTERVAL": "10",
        **emulator.client_env(),  # HTTP_PROXY to the emulator; NO_PROXY keeps 127.0.0.1 direct
    }


def write_env_file(variables):
    """.env.playground, readable by its owner only (it holds an AccessKey, if a fake one)."""
    fd = os.open(ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as file:
        file.write("# Written by tests/playground.py for as long as it runs: the SLS emulator and a "
                   "syslog receiver on this host.\n")
        file.writelines(f"{name}={value}\n" for name, value in variables.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", type=int, default=1000, help="realistic WAF logs loaded at start (1000)")
    parser.add_argument("--per-second", type=int, default=5, help="new logs arriving every second (5)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--syslog-port", type=int, default=5514, help="receiver port, 0 = any free (5514)")
    args = parser.parse_args(argv)

    stop = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.append(True))
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    history = write_jsonl(workdir / f"playground-{os.getpid()}.jsonl", realistic_logs(args.logs, seed=1))
    try:
        with EmulatorProcess(shards=args.shards, load=[str(history)]) as emulator, \
                SyslogReceiver("tcp", args.syslog_port) as receiver:
            variables = settings(emulator, receiver)
            write_env_file(variables)
            print(f"SLS emulator on {emulator.addr}: {args.logs} WAF logs in {args.shards} shards, "
                  f"{args.per_second} more every second")
            print(f"syslog receiver on tcp://127.0.0.1:{receiver.port}")
            print(f"\nwrote {ENV_FILE.name} (mode 0600); the same as variables to export:")
            print("".join(f"  export {name}={value}\n" for name, value in variables.items()))
            print("try, in another terminal here:\n"
                  f"  python sync_waf_to_syslog.py --env-file {ENV_FILE.name} --check\n"
                  f"  python sync_waf_to_syslog.py --env-file {ENV_FILE.name} --dry-run | head -3\n"
                  f"  python sync_waf_to_syslog.py --env-file {ENV_FILE.name}\n")
            print(f"{READY_LINE}; Ctrl-C stops it", flush=True)
            serve(emulator, receiver, args.per_second, stop)
    finally:
        ENV_FILE.unlink(missing_ok=True)
        history.unlink(missing_ok=True)
    print("playground stopped", flush=True)
    return 0


def serve(emulator, receiver, per_second, stop):
    """Add logs every second and say how many messages arrived, until stopped."""
    reported, batch = 0, 0
    while not stop:
        time.sleep(1)
        if per_second:
            batch += 1
            emulator.add_logs(realistic_logs(per_second, seed=1000 + batch, start_time=time.time()))
        count = len(receiver.messages)
        if count != reported:
            if not reported:
                print("first message received:\n  " + receiver.messages[0][:300].decode(errors="replace"))
            print(f"syslog receiver: {count} messages received", flush=True)
            reported = count


if __name__ == "__main__":
    sys.exit(main())
