"""Logs that keep arriving in the SLS emulator while a test (or a benchmark) changes things."""
import itertools
import threading
import time

from tests.waf_logs import realistic_logs

LOGS_PER_GROUP = 10  # realistic_logs gives ten logs per second, stored as one LogGroup


class LogFeeder:
    """Adds one LogGroup of fresh realistic WAF logs (received now) to the emulator every
    `interval` seconds, on a thread, from start() to stop() or the end of its `with` block.
    `sent` lists their request_traceids in the order they were added; each starts with `prefix`,
    so that several feeders never repeat an id."""

    def __init__(self, emulator, interval=0.1, prefix="live"):
        self.emulator, self.interval, self.prefix = emulator, interval, prefix
        self.sent = []
        self._seeds = itertools.count()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._feed, name=f"feeder-{prefix}", daemon=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        """Stop adding logs; returns every id sent."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(30)
        return list(self.sent)

    def _feed(self):
        next_at = time.monotonic()
        while not self._stopping.is_set():
            seed = next(self._seeds)
            logs = realistic_logs(LOGS_PER_GROUP, seed=seed, start_time=time.time())
            for log in logs:
                log["request_traceid"] = f"{self.prefix}-{seed}-{log['request_traceid']}"
            self.emulator.add_logs(logs)
            self.sent.extend(log["request_traceid"] for log in logs)
            next_at += self.interval
            self._stopping.wait(max(0.0, next_at - time.monotonic()))
