"""systemd Type=notify: this test plays systemd's side on a Unix datagram socket (NOTIFY_SOCKET,
WATCHDOG_USEC) and sees READY=1, STATUS= and WATCHDOG=1 from the real forwarder, and no WATCHDOG=1
while its consumer loop is stuck."""
import os
import socket
import threading
import time

import pytest

import sync_waf_to_syslog as fwd
from tests.forwarder_process import ForwarderProcess, forwarder_env, with_fault
from tests.polling import wait_until
from tests.syslog_receiver import SyslogReceiver
from tests.waf_logs import realistic_logs, write_jsonl


class SystemdSide:
    """A NOTIFY_SOCKET (a path, or with abstract=True an abstract name) recording each datagram
    as (time.monotonic(), its KEY=VALUE lines)."""

    def __init__(self, path, abstract=False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.address = f"@{path}" if abstract else str(path)
        self.sock.bind("\0" + str(path) if abstract else str(path))
        self.sock.settimeout(0.1)
        self.received = []
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.receive, daemon=True)
        self.thread.start()

    def receive(self):
        while not self.closing.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            self.received.append((time.monotonic(), data.decode().split("\n")))

    def lines(self, key):
        return [(when, line) for when, lines in list(self.received) for line in lines if line.startswith(key)]

    def close(self):
        self.closing.set()
        self.thread.join()
        self.sock.close()


def test_notifier_speaks_to_an_abstract_socket(tmp_path):
    systemd = SystemdSide(f"sync-waf-test-{os.getpid()}", abstract=True)
    try:
        notifier = fwd.SystemdNotifier({"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "4000000"})
        assert notifier.watchdog_interval == 2.0
        notifier.send("READY=1", "STATUS=hello")
        notifier.watchdog(True, 100.0)
        notifier.watchdog(True, 101.0)  # not due yet
        notifier.watchdog(False, 103.0)  # due, but no progress: nothing
        wait_until(lambda: systemd.lines("WATCHDOG"), "a datagram", 5)
        assert [line for _, line in systemd.lines("")] == ["READY=1", "STATUS=hello", "WATCHDOG=1"]
    finally:
        systemd.close()
    other = fwd.SystemdNotifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # the watchdog is another process's
    assert fwd.SystemdNotifier({}).sock is None


@pytest.mark.slow
def test_ready_status_and_watchdog_only_while_the_loop_goes_round(make_emulator, tmp_path):
    emulator = make_emulator(load=[write_jsonl(tmp_path / "logs.jsonl", realistic_logs(100, seed=31))])
    systemd = SystemdSide(tmp_path / "notify")
    stick = tmp_path / "stick"
    try:
        with SyslogReceiver("tcp") as receiver:
            # Heartbeats 2 s apart: the forwarder's own stuck check (10 heartbeats) stays out of the way.
            env = forwarder_env(emulator, port=receiver.port, SYNC_STATS_INTERVAL="1", SLS_HEARTBEAT_INTERVAL="2",
                                NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="1000000")
            with ForwarderProcess(env, tmp_path, python_args=with_fault("stuck_worker_loop", str(stick))) as fwd_:
                wait_until(lambda: systemd.lines("READY=1"), "READY=1")
                wait_until(lambda: any("stats: " in line for _, line in systemd.lines("STATUS=")), "STATUS=stats")
                wait_until(lambda: len(systemd.lines("WATCHDOG=1")) >= 3, "WATCHDOG=1 pings")
                ready_at = systemd.lines("READY=1")[0][0]
                assert all(when >= ready_at for when, _ in systemd.lines("WATCHDOG=1"))
                assert "joined group test-group" in fwd_.stderr()

                stick.touch()
                # Once the loop is stuck the pings stop; systemd's WatchdogSec would then restart it.
                def quiet_for_3_s():
                    return time.monotonic() - systemd.lines("WATCHDOG=1")[-1][0] > 3
                wait_until(quiet_for_3_s, "WATCHDOG=1 to stop", 30)
                assert fwd_.process.poll() is None  # alive: only the watchdog would notice
                fwd_.kill()
    finally:
        systemd.close()
