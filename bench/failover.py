#!/usr/bin/env python3
"""What a failover costs in duplicates (and, where the protocol cannot prevent it, losses) (issue 15).

    python bench/failover.py                              tcp, tls and relp; stop and kill; 10 rounds
    python bench/failover.py --protocols relp --faults kill --rounds 30

What runs, in this process: the forwarder's Delivery with SYSLOG_HOST listing two real rsyslogd
peers (tests/rsyslog_peer.py; each writes a message before it acknowledges it) and
SYSLOG_BALANCE=failover. A sender thread hands it batches of --batch messages (each with a unique
request_traceid and --size bytes), one every --interval seconds, as the shards of a busy forwarder
would. Each round: the active collector is stopped (SIGTERM) or killed (SIGKILL) at a random
moment, the other one takes the stream, the first one is started again and the stream fails back
to it. At the end every message sent is looked for in both outputs: lost = sent and in neither,
duplicates = extra copies. `resent` is the forwarder's own count of messages sent again (the
statistics line's). The SLS side plays no part here: a failover happens between the forwarder and
its collectors, and the end-to-end version of this runs in tests/test_failover.py.
"""
import argparse
import itertools
import logging
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sync_waf_to_syslog as fwd  # noqa: E402
from tests.encoding import make_settings  # noqa: E402
from tests.pki import make_pki  # noqa: E402
from tests.polling import wait_until  # noqa: E402
from tests.rsyslog_peer import Rsyslog  # noqa: E402
from tests.syslog_receiver import loss_report  # noqa: E402

PROTOCOLS = {  # SYSLOG_PROTOCOL: (rsyslog input, host name of the targets)
    "tcp": ("tcp", "127.0.0.1"),
    "tls": ("tls", "localhost"),
    "relp": ("relp", "127.0.0.1"),
}


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocols", default="tcp,tls,relp", help="comma list of tcp, tls, relp")
    parser.add_argument("--faults", default="stop,kill", help="comma list of stop (SIGTERM), kill (SIGKILL)")
    parser.add_argument("--rounds", type=int, default=10, help="failovers per protocol and fault")
    parser.add_argument("--batch", type=int, default=20, help="messages per batch")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between batches")
    parser.add_argument("--size", type=int, default=1000, help="bytes of padding per message")
    return parser.parse_args()


class Sender:
    """Hands Delivery a batch every `interval` seconds on a thread of its own and keeps every id."""

    def __init__(self, delivery, args):
        self.delivery, self.args = delivery, args
        self.ids, self.numbers = [], itertools.count()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.send, daemon=True)

    def send(self):
        padding = b"p" * self.args.size
        while not self.stopping.wait(self.args.interval):
            ids = [f"f{next(self.numbers)}" for _ in range(self.args.batch)]
            batch = [b"<14>1 - bench app - - - request_traceid=%s pad=%s" % (i.encode(), padding) for i in ids]
            if self.delivery.deliver(batch):
                self.ids += ids


def settled(*peers):
    """Every message the peers wrote, once a second has passed without a new one."""
    messages = None
    while True:
        time.sleep(1)
        now = [message for peer in peers for message in peer.messages()]
        if messages is not None and len(now) == len(messages):
            return now
        messages = now


def measure(protocol, fault, args, pki, workdir):
    inputs, host = PROTOCOLS[protocol]
    with Rsyslog(workdir / "a", pki, write_before_ack=True) as a, Rsyslog(workdir / "b", pki, write_before_ack=True) as b:
        settings = make_settings(SYSLOG_HOST=f"{host}:{a.ports[inputs]},{host}:{b.ports[inputs]}",
                                 SYSLOG_PROTOCOL=protocol, SYSLOG_CERT_PATH=str(pki.ca),
                                 SYSLOG_TIMEOUT="5", SYSLOG_RETRY_MAX_DELAY="0.3", SYSLOG_FAILBACK_AFTER="0.5")
        stop = threading.Event()
        delivery = fwd.Delivery(settings, stop, fwd.Stats())
        first = str(delivery.pool.members[0].target)
        sender = Sender(delivery, args)
        sender.thread.start()
        started = time.monotonic()
        for _ in range(args.rounds):
            time.sleep(random.uniform(0.3, 0.8))
            getattr(a, fault)()
            time.sleep(random.uniform(0.2, 0.5))
            a.start()
            wait_until(lambda: delivery.pool.active() == first, "the fail-back", 60)
        sender.stopping.set()
        sender.thread.join(60)
        seconds = time.monotonic() - started
        stop.set()
        delivery.close()
        report = loss_report(sender.ids, settled(a, b))
    resent = delivery.stats.totals["resent"]
    print(f"{protocol:5} {fault:5} {args.rounds} failovers in {seconds:.0f} s, "
          f"{report['sent'] / seconds:.0f} msgs/s: sent {report['sent']}, lost {report['lost']}, "
          f"duplicates {report['duplicates']} ({report['duplicates'] / args.rounds:.0f} per failover), "
          f"resent {resent}", flush=True)


def main():
    args = parse_arguments()
    logging.getLogger("sync_waf_to_syslog").setLevel(logging.ERROR)  # the table, not every failover
    with tempfile.TemporaryDirectory(prefix="failover-bench-") as directory:
        workdir = Path(directory)
        pki = make_pki(workdir / "pki")
        for number, (protocol, fault) in enumerate(itertools.product(args.protocols.split(","),
                                                                     args.faults.split(","))):
            measure(protocol, fault, args, pki, workdir / str(number))


if __name__ == "__main__":
    main()
