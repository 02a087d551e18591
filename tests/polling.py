"""Waiting for something to happen in a test, without asserting how fast it happens."""
import time


def wait_until(condition, what, timeout=60):
    """Poll `condition` until it returns something truthy, and return that; fail after `timeout`
    seconds (the timeout only bounds a hang, it is not a speed check)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def poll(read, done, timeout=60, interval=0.1):
    """Call read() until done(value) holds or `timeout` seconds passed; return the last value, for
    the caller to judge (a loss report, records that arrived)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(interval)
