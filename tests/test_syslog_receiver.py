"""Proves each behaviour of tests/syslog_receiver.py with plain client sockets."""
import errno
import fcntl
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import termios
import time

import pytest
import trustme

from tests.polling import poll
from tests.syslog_receiver import ADDR_LINE_PREFIX, ReceiverProcess, SyslogReceiver, ids, loss_report

RECEIVER_SCRIPT = os.path.join(os.path.dirname(__file__), "syslog_receiver.py")

# A separate process, so the sender does not share the measured receiver's core or GIL.
SENDER_SCRIPT = """
import socket, sys
port, total, size = (int(arg) for arg in sys.argv[1:4])
message = b"<134>1 2024-01-01T00:00:00Z host app - - - " + b"x" * (size - 43)
block = (b"%d " % len(message) + message) * 1000
with socket.create_connection(("127.0.0.1", port)) as sock:
    for _ in range(total // 1000):
        sock.sendall(block)
"""


def octet(message: bytes) -> bytes:
    return b"%d %s" % (len(message), message)


def lf(message: bytes) -> bytes:
    return message + b"\n"


def numbered(index: int) -> bytes:
    return b"<13>1 - host app - - - request_traceid=id%05d, n" % index


def wait_until(predicate, timeout: float = 5.0) -> bool:
    return bool(poll(predicate, bool, timeout, interval=0.001))


def unacknowledged_bytes(sock: socket.socket) -> int:
    """Bytes the peer's kernel has not acknowledged yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def connect(receiver: SyslogReceiver) -> socket.socket:
    sock = socket.create_connection(receiver.address, timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send_until_refused(sock: socket.socket, frame: bytes) -> OSError:
    """Keep sending to a peer that went away; return the error the kernel reports."""
    for _ in range(500):
        try:
            sock.sendall(frame)
        except OSError as error:
            return error
        time.sleep(0.005)
    pytest.fail("the sender never noticed that the receiver closed the connection")


@pytest.mark.parametrize("recv_chunk", [1 << 20, 1024], ids=["1MiB-reads", "buffer-grows"])
def test_mixed_octet_counted_and_lf_frames_on_one_connection(recv_chunk):
    big = b"<14>1 - h app - - - big " + bytes(range(256)).replace(b"\n", b"") * 240  # ~60 KB
    messages = [b"<13>octet counted", b"<13>lf framed", b"<13>embedded\nnewline", big,
                b"<13>after the big one", b"<13>" + b"y" * 3000]
    stream = (octet(messages[0]) + lf(messages[1]) + octet(messages[2]) + octet(messages[3])
              + lf(messages[4]) + b"\n" + octet(messages[5]))  # a blank line between frames too
    with SyslogReceiver(recv_chunk=recv_chunk) as receiver, connect(receiver) as client:
        client.sendall(stream)
        assert receiver.wait_for(len(messages)) == messages
        stats = receiver.stats()
    assert stats["bytes"] == sum(map(len, messages))
    assert stats["received_bytes"] == len(stream)
    assert stats["framing_errors"] == 0


def test_frames_split_across_receives_at_every_byte_position():
    messages = [b"<13>one two", b"<14>three", b"<15>with\nnewline " + b"z" * 100]
    stream = octet(messages[0]) + lf(messages[1]) + octet(messages[2])
    with SyslogReceiver() as receiver, connect(receiver) as client:
        for round_number, split in enumerate(range(1, len(stream))):
            client.sendall(stream[:split])
            # The receiver has read exactly up to `split`: its next read starts there.
            assert wait_until(lambda: receiver.received_bytes == round_number * len(stream) + split)
            client.sendall(stream[split:])
        expected = messages * (len(stream) - 1)
        assert receiver.wait_for(len(expected)) == expected
        assert receiver.stats()["framing_errors"] == 0


def test_bad_octet_count_is_read_as_an_lf_frame_and_counted_as_framing_error():
    with SyslogReceiver() as receiver, connect(receiver) as client:
        client.sendall(b"12x <13>not a")  # the rest of the line arrives later
        assert wait_until(lambda: receiver.received_bytes == 13)
        client.sendall(b" length\n" + octet(b"<13>fine"))
        assert receiver.wait_for(2) == [b"12x <13>not a length", b"<13>fine"]
        client.close()
        assert wait_until(lambda: receiver.stats()["open_connections"] == 0)
        assert receiver.stats()["framing_errors"] == 1


def test_partial_frame_at_close_is_discarded_not_counted():
    partial_octet = b"40 <13>only half of it"
    partial_lf = b"<13>no newline yet"
    with SyslogReceiver() as receiver:
        with connect(receiver) as first, connect(receiver) as second:
            first.sendall(octet(b"<13>a") + lf(b"<13>b") + partial_octet)
            second.sendall(partial_lf)
            assert receiver.wait_for(2) == [b"<13>a", b"<13>b"]
            assert wait_until(lambda: receiver.received_bytes == 13 + len(partial_octet + partial_lf))
        assert wait_until(lambda: receiver.stats()["open_connections"] == 0)
        assert receiver.count == 2
        assert receiver.discarded_bytes == len(partial_octet) + len(partial_lf)


def test_udp_one_message_per_datagram_and_refusal_while_down():
    datagrams = [b"<13>first", b"<13>second\n", b"<13>" + b"u" * 60000]
    with SyslogReceiver("udp") as receiver, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.connect(receiver.address)
        for datagram in datagrams:
            client.send(datagram)
        assert receiver.wait_for(3) == datagrams

        receiver.stop_listening()
        assert isinstance(send_until_refused(client, b"<13>lost"), ConnectionRefusedError)

        receiver.start_listening()  # same port: the connected client reaches it again
        assert wait_until(lambda: client.send(b"<13>back") and receiver.count > 3)
        assert receiver.messages[3] == b"<13>back"


def test_refuses_connections_until_start_listening_and_stop_closes_open_ones():
    with SyslogReceiver(listening=False) as receiver:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(receiver.address, timeout=5)

        receiver.start_listening()
        with connect(receiver) as client:
            client.sendall(octet(b"<13>up now"))
            assert receiver.wait_for(1) == [b"<13>up now"]

            receiver.stop_listening()  # a stopping server: open connections end with FIN
            assert client.recv(1) == b""
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(receiver.address, timeout=5)

        receiver.start_listening()
        with connect(receiver) as client:
            client.sendall(octet(b"<13>again"))
            assert receiver.wait_for(2)[1] == b"<13>again"
        assert receiver.connections_accepted == 2


def test_close_after_keeps_everything_that_arrived_then_sends_fin():
    frames = [numbered(i) for i in range(15)]
    partial = b"99 <13>the start of a frame"
    # Tiny reads, so when the fault fires most of the data still sits in the kernel buffer
    # and must be drained.
    with SyslogReceiver(stalled=True, recv_chunk=64) as receiver:
        with connect(receiver) as client:
            client.sendall(b"".join(octet(frame) for frame in frames) + partial)
            assert wait_until(lambda: unacknowledged_bytes(client) == 0)  # all in the receiver's kernel
            receiver.close_after(10, times=2)
            receiver.resume()
            assert client.recv(1) == b""  # FIN, not RST
            assert wait_until(lambda: receiver.stats()["open_connections"] == 0)
            assert receiver.messages == frames
            assert receiver.discarded_bytes == len(partial)
            error = send_until_refused(client, octet(numbered(99)))
            assert error.errno in (errno.EPIPE, errno.ECONNRESET)

        with connect(receiver) as client:  # second round
            client.sendall(b"".join(octet(frame) for frame in frames[:12]))
            assert client.recv(1) == b""
            assert receiver.wait_for(27)[15:] == frames[:12]

        with connect(receiver) as client:  # rounds used up: this one stays open
            client.sendall(b"".join(octet(frame) for frame in frames[:12]))
            assert len(receiver.wait_for(39)) == 39
            stats = receiver.stats()
            assert (stats["closes"], stats["open_connections"], stats["connections_accepted"]) == (2, 1, 3)


def test_close_after_while_the_client_streams_loses_nothing_it_read():
    with SyslogReceiver(close_after=50) as receiver, connect(receiver) as client:
        sent = 0
        try:
            while sent < 100_000:
                client.sendall(octet(numbered(sent)))
                sent += 1
        except OSError as error:
            assert error.errno in (errno.EPIPE, errno.ECONNRESET)
        else:
            pytest.fail("the receiver never closed the connection")
        received = ids(receiver.messages)
        assert len(received) >= 50
        assert received == ["id%05d" % i for i in range(len(received))]  # a gap-free prefix


def test_reset_after_sends_rst_with_unread_data():
    with SyslogReceiver(reset_after=5) as receiver, connect(receiver) as client:
        client.sendall(b"".join(octet(numbered(i)) for i in range(200)))
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        assert wait_until(lambda: receiver.stats()["open_connections"] == 0)
        assert ids(receiver.messages) == ["id%05d" % i for i in range(5)]
        assert receiver.stats()["resets"] == 1


def test_stall_blocks_the_sender_until_resume():
    frames = [octet(b"<13>" + b"%07d" % i + b"s" * 1000) for i in range(8000)]
    payload = memoryview(b"".join(frames))  # 8 MB: far more than both socket buffers
    with SyslogReceiver() as receiver, connect(receiver) as client:
        receiver.stall()
        client.settimeout(0.5)
        sent = 0
        with pytest.raises(socket.timeout):
            while sent < len(payload):
                sent += client.send(payload[sent:])
        assert sent < len(payload)

        receiver.resume()
        client.settimeout(20)
        client.sendall(payload[sent:])
        received = receiver.wait_for(len(frames), timeout=20)
        assert [octet(message) for message in received] == frames


def test_tls_frames_close_after_and_handshake_errors():
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with SyslogReceiver("tls", ssl_context=server_context, close_after=3) as receiver:
        with client_context.wrap_socket(connect(receiver), server_hostname="localhost") as client:
            client.sendall(b"".join(octet(numbered(i)) for i in range(3)) + lf(numbered(3)))
            assert client.recv(1) == b""
        assert ids(receiver.wait_for(4)) == ["id%05d" % i for i in range(4)]

        with connect(receiver) as plain_client:
            plain_client.sendall(b"1 x" * 200)
            assert wait_until(lambda: receiver.stats()["tls_errors"] == 1)


def test_counting_mode_counts_without_storing():
    messages = [numbered(i) + b"c" * (i % 300) for i in range(3000)]
    stream = b"".join(octet(m) if i % 3 else lf(m) for i, m in enumerate(messages))
    with SyslogReceiver(store=False, recv_chunk=4096) as receiver, connect(receiver) as client:
        client.sendall(stream)
        assert receiver.wait_for(3000) == []
        stats = receiver.stats()
    assert (stats["count"], stats["bytes"]) == (3000, sum(map(len, messages)))
    assert stats["first_time"] <= stats["last_time"]


def test_receiver_process_prints_its_address_and_reports_stats():
    with ReceiverProcess("tcp") as process:
        with socket.create_connection(process.address) as client:
            client.sendall(b"".join(octet(numbered(i)) for i in range(100)))
            stats = process.wait_for(100)
        assert (stats["count"], stats["connections_accepted"]) == (100, 1)
        final = process.stop()
        assert process.process.returncode == 0
    assert final["count"] == 100
    assert final["bytes"] == 100 * len(numbered(0))


def test_program_writes_stats_periodically_and_exits_0_on_sigterm(tmp_path):
    stats_file = tmp_path / "stats.json"
    program = subprocess.Popen(
        [sys.executable, RECEIVER_SCRIPT, "--protocol", "udp", "--stats-file", str(stats_file),
         "--stats-interval", "0.05"], stdout=subprocess.PIPE, text=True)
    try:
        first_line = program.stdout.readline()
        assert first_line.startswith(ADDR_LINE_PREFIX + "127.0.0.1:")
        port = int(first_line.strip().rsplit(":", 1)[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for i in range(10):
                client.sendto(numbered(i), ("127.0.0.1", port))
        assert wait_until(lambda: stats_file.exists() and json.loads(stats_file.read_text())["count"] == 10)
        program.send_signal(signal.SIGTERM)
        rest_of_output, _ = program.communicate(timeout=5)
    finally:
        if program.poll() is None:
            program.kill()
            program.communicate()
    assert program.returncode == 0
    assert "SYSLOG_RECEIVER_COUNT=10 " in rest_of_output
    stats = json.loads(stats_file.read_text())
    assert stats["first_time"] <= stats["last_time"]


def test_ids_and_loss_report():
    messages = [numbered(1), numbered(2), numbered(2), numbered(7), b"<13>no id here"]
    assert ids(messages) == ["id00001", "id00002", "id00002", "id00007"]
    assert ids([b"x traceid:abc y"], pattern=rb"traceid:(\w+)") == ["abc"]
    report = loss_report(["id%05d" % i for i in range(5)], messages)
    assert report == {"sent": 5, "received": 5, "unique": 2, "lost": 3, "duplicates": 1,
                      "unexpected": 1, "without_id": 1, "lost_ids": ["id00000", "id00003", "id00004"]}


def test_counting_throughput_report(capsys):
    total, size = 300_000, 1024
    with ReceiverProcess("tcp") as process:
        sender = subprocess.run([sys.executable, "-c", SENDER_SCRIPT, str(process.port), str(total), str(size)],
                                timeout=60)
        assert sender.returncode == 0
        stats = process.wait_for(total, timeout=30)
    assert stats["count"] == total
    rate = (total - 1) / (stats["last_time"] - stats["first_time"])
    with capsys.disabled():
        print(f"\ncounting receiver (own process): {rate:,.0f} msgs/s, "
              f"{rate * size / 1e6:,.0f} MB/s for {size} B octet-counted messages")
