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
