"""Transports on their own: what a stuck peer does to connect and send."""
import socket
import threading
import time

import pytest

import sync_waf_to_syslog as fwd
from tests.encoding import make_settings


@pytest.fixture
def full_backlog_port():
    """A listening port whose accept queue is full, so a new connect gets no answer (SYN dropped)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):  # Linux accepts backlog + 1; later SYNs are dropped, not refused
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    yield port
    for sock in fillers + [server]:
        sock.close()


def test_an_unanswered_connect_gives_up_after_the_connect_timeout(full_backlog_port, monkeypatch):
    """SYSLOG_TIMEOUT may be long, but a connect cannot watch the stop flag: it must give up on its
    own (the kernel alone would retry the SYN for about two minutes)."""
    monkeypatch.setattr(fwd.TcpTransport, "CONNECT_TIMEOUT", 0.5)
    transport = fwd.TcpTransport(make_settings(SYSLOG_HOST="127.0.0.1", SYSLOG_PORT=str(full_backlog_port),
                                                 SYSLOG_TIMEOUT="3600"))
    outcome = []

    def connect():
        try:
            transport.connect(threading.Event())
            outcome.append("connected")
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(30)  # bounds a hang; not a speed check
    assert outcome and isinstance(outcome[0], OSError), outcome or "connect still blocked after 30 s"
