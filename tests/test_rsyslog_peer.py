"""The rsyslog test peer really receives and parses syslog, checked with raw sockets and ``ssl``.

No forwarder is involved: these tests pin down what the peer records for a
known byte sequence, so forwarder tests can trust it. One rsyslogd with the
test PKI serves the whole module; tests tell their messages apart by MSGID.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from tests.pki import Pki, make_pki
from tests.rsyslog_peer import LOOPBACK, Rsyslog

pytestmark = [pytest.mark.slow, pytest.mark.rsyslog]

TIMESTAMP = "2026-01-02T03:04:05.123456+08:00"
STRUCTURED_DATA = r'[waf@32473 rule="a\"b\]c\\d"]'
TEXT = "\ufeffblocked /login ü"  # BOM + non-ASCII UTF-8, as RFC 5424 MSG-UTF8


def rfc5424(msgid: str, text: str = TEXT) -> bytes:
    """A local0.info RFC 5424 message (PRI 134) with every header field set."""
    return f"<134>1 {TIMESTAMP} fwd-host waf-sync 4242 {msgid} {STRUCTURED_DATA} {text}".encode()


def octet_counted(message: bytes) -> bytes:
    return b"%d %s" % (len(message), message)


def send_udp(port: int, message: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(message, (LOOPBACK, port))


def send_tcp(port: int, data: bytes) -> None:
    with socket.create_connection((LOOPBACK, port)) as sock:
        sock.sendall(data)


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A hostname-checking client context trusting the test CA, optionally with a client certificate."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def send_tls(port: int, data: bytes, context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
    with socket.create_connection((LOOPBACK, port)) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(data)
            try:
                tls.unwrap()  # close_notify, so rsyslog logs no "non-properly terminated"
            except (ssl.SSLEOFError, ConnectionResetError):
                pass  # GnuTLS does not answer close_notify


def send_rejected_tls(port: int, data: bytes, context: ssl.SSLContext) -> None:
    """Send over a connection the server will reject; with TLS 1.3 the client may not notice."""
    try:
        send_tls(port, data, context)
    except (ssl.SSLError, OSError):
        pass


def with_msgid(msgid: str):
    return lambda record: record["msgid"] == msgid


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory, pki: Pki):
    with Rsyslog(tmp_path_factory.mktemp("rsyslog"), pki) as running_peer:
        yield running_peer


TRANSPORTS = {
    "udp": lambda peer, pki, message: send_udp(peer.ports["udp"], message),
    "tcp-octet-counted": lambda peer, pki, message: send_tcp(peer.ports["tcp"], octet_counted(message)),
    "tcp-lf": lambda peer, pki, message: send_tcp(peer.ports["tcp"], message + b"\n"),
    "tls": lambda peer, pki, message: send_tls(peer.ports["tls"], octet_counted(message), client_context(pki)),
    "mtls": lambda peer, pki, message: send_tls(
        peer.ports["mtls"], octet_counted(message), client_context(pki, pki.client_cert, pki.client_key)
    ),
}
INPUT_OF_TRANSPORT = {"udp": "udp", "tcp-octet-counted": "tcp", "tcp-lf": "tcp", "tls": "tls", "mtls": "mtls"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rfc5424_fields_are_parsed_exactly(peer: Rsyslog, pki: Pki, transport: str) -> None:
    msgid = f"fields-{transport}"
    TRANSPORTS[transport](peer, pki, rfc5424(msgid))

    [record] = peer.wait_for(1, where=with_msgid(msgid))
    assert record == {
        "input": INPUT_OF_TRANSPORT[transport],
        "pri": 134,
        "facility": 16,
        "severity": 6,
        "version": 1,
        "timestamp": TIMESTAMP,
        "hostname": "fwd-host",
        "appname": "waf-sync",
        "procid": "4242",
        "msgid": msgid,
        "sd": STRUCTURED_DATA,
        "msg": TEXT,
        "raw": rfc5424(msgid).decode(),
    }


def test_embedded_lf_cr_and_tab_survive_octet_counting(peer: Rsyslog) -> None:
    text = "line one\nline two\r\n\tindented  "
    send_tcp(peer.ports["tcp"], octet_counted(rfc5424("ctl-octet", text)))

    [record] = peer.wait_for(1, where=with_msgid("ctl-octet"))
    assert record["msg"] == text


def test_invalid_utf8_comes_back_byte_exact(peer: Rsyslog) -> None:
    text = b"bad \xff\xfe utf-8 \xc3"
    send_tcp(peer.ports["tcp"], octet_counted(rfc5424("bad-utf8", "") + text))

    [record] = peer.wait_for(1, where=with_msgid("bad-utf8"))
    assert record["msg"].encode("utf-8", "surrogateescape") == text


@pytest.mark.parametrize("input_name", ["udp", "tcp"])
def test_60000_byte_message_arrives_whole(peer: Rsyslog, input_name: str) -> None:
    msgid = f"big-{input_name}"
    header = rfc5424(msgid, "")
    message = header + b"x" * (60_000 - len(header))
    assert len(message) == 60_000
    if input_name == "udp":
        send_udp(peer.ports["udp"], message)
    else:
        send_tcp(peer.ports["tcp"], octet_counted(message))

    [record] = peer.wait_for(1, where=with_msgid(msgid))
    assert record["raw"].encode() == message
    assert record["msg"] == "x" * (60_000 - len(header))


def test_hostname_checking_client_refuses_wrong_name_certificate(peer: Rsyslog, pki: Pki) -> None:
    context = client_context(pki)
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        send_tls(peer.ports["tls_wrong"], octet_counted(rfc5424("wrong-name")), context)
    # Control: the same CA-signed certificate is accepted under the name it was issued for.
    send_tls(peer.ports["tls_wrong"], octet_counted(rfc5424("right-name")), context, "wrong.example")
    peer.wait_for(1, where=with_msgid("right-name"))
    assert not [record for record in peer.records() if record["msgid"] == "wrong-name"]


@pytest.mark.parametrize(
    "client, server_complaint",
    [("no-cert", "peer did not return a certificate"), ("untrusted-ca", "certificate verify failed")],
)
def test_mtls_records_nothing_from_unauthenticated_client(
    peer: Rsyslog, pki: Pki, client: str, server_complaint: str
) -> None:
    msgid = f"mtls-{client}"
    if client == "no-cert":
        context = client_context(pki)
    else:
        context = client_context(pki, pki.untrusted_client_cert, pki.untrusted_client_key)
    stderr_before = len(peer.stderr_text())

    send_rejected_tls(peer.ports["mtls"], octet_counted(rfc5424(msgid)), context)

    # Once rsyslog has logged the reject, that connection is closed: nothing of it can arrive later.
    peer.wait_for_stderr(server_complaint, after=stderr_before)
    # And a trusted client sent afterwards is recorded, so the input itself still works.
    good_context = client_context(pki, pki.client_cert, pki.client_key)
    send_tls(peer.ports["mtls"], octet_counted(rfc5424(f"{msgid}-ok")), good_context)
    peer.wait_for(1, where=with_msgid(f"{msgid}-ok"))
    assert not [record for record in peer.records() if record["msgid"] == msgid]


def relp_open(sock: socket.socket) -> bytes:
    """Send a RELP 'open' command and return the server's response."""
    offer = b"relp_version=0\nrelp_software=test\ncommands=syslog"
    sock.sendall(b"1 open %d %s\n" % (len(offer), offer))
    return sock.recv(4096)


def test_relp_inputs_answer_open(peer: Rsyslog, pki: Pki) -> None:
    if "relp" not in peer.available_inputs:
        pytest.skip("rsyslog's imrelp module (package rsyslog-relp) is not installed")
    with socket.create_connection((LOOPBACK, peer.ports["relp"])) as sock:
        assert relp_open(sock).startswith(b"1 rsp ")
    context = client_context(pki, pki.client_cert, pki.client_key)
    with socket.create_connection((LOOPBACK, peer.ports["relp_tls"])) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert relp_open(tls).startswith(b"1 rsp ")


def test_kill_and_restart_reuse_the_same_ports(tmp_path: Path) -> None:
    with Rsyslog(tmp_path) as peer:  # no PKI: starts in milliseconds
        ports = dict(peer.ports)
        send_tcp(peer.ports["tcp"], octet_counted(rfc5424("before-kill")))
        peer.wait_for(1, where=with_msgid("before-kill"))

        # A connection still open at the kill leaves the server side in TIME_WAIT.
        with socket.create_connection((LOOPBACK, peer.ports["tcp"])):
            peer.kill()
        assert not peer.running
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOOPBACK, peer.ports["tcp"])).close()

        peer.restart()
        assert peer.ports == ports
        send_udp(peer.ports["udp"], rfc5424("after-restart-udp"))
        send_tcp(peer.ports["tcp"], octet_counted(rfc5424("after-restart-tcp")))
        peer.wait_for(1, where=with_msgid("after-restart-udp"))
        peer.wait_for(1, where=with_msgid("after-restart-tcp"))
    assert not peer.running


@pytest.mark.parametrize("input_name", ["udp", "tcp"])
def test_start_fails_when_a_port_is_taken_by_someone_else(tmp_path: Path, input_name: str) -> None:
    peer = Rsyslog(tmp_path)
    kind = socket.SOCK_DGRAM if input_name == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as squatter:
        squatter.bind((LOOPBACK, peer.ports[input_name]))
        with pytest.raises(RuntimeError, match=f"Could not create {input_name} listener"):
            peer.start()
    assert not peer.running


def test_records_skip_a_partly_written_last_line(tmp_path: Path) -> None:
    peer = Rsyslog(tmp_path)  # never started: only the file parsing is exercised
    peer.output_path.write_bytes(b'{"msgid": "complete"}\n{"msgid": "parti')
    assert peer.records() == [{"msgid": "complete"}]


def test_wait_for_reports_what_did_arrive(peer: Rsyslog) -> None:
    send_udp(peer.ports["udp"], rfc5424("arrived"))
    peer.wait_for(1, where=with_msgid("arrived"))
    with pytest.raises(TimeoutError, match="expected >= 2 matching records.*got 1"):
        peer.wait_for(2, timeout=0.2, where=with_msgid("arrived"))
