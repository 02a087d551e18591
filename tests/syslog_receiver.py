"""A small, fast syslog receiver for tests and benchmarks that can misbehave on purpose.

`SyslogReceiver` listens on 127.0.0.1 (TCP, TLS or UDP) on background threads of the calling
process. TCP/TLS streams are split with RFC 6587 framing, decided per frame: a leading digit 1-9
means octet counting (`LEN SP MSG`), anything else (normally `<`) means an LF-terminated frame.
UDP carries one message per datagram. Only complete frames count as messages; a partial frame
left when a connection ends is counted in `discarded_bytes`.

Faults, switchable at run time from any thread (and settable in the constructor):

* `stop_listening()` / `start_listening()`: the port refuses connections (ECONNREFUSED; ICMP
  port unreachable for UDP) and, by default, open connections are closed like a stopping server
  would; the port number stays the same so a forwarder can reconnect.
* `close_after(n, times)`: the most graceful restart a receiver can do. After n more messages it
  keeps everything that has already arrived on that connection (drains the socket until EAGAIN),
  then shuts it down (the peer sees FIN) and closes it; `times` rounds; new connections are
  accepted throughout.
* `reset_after(n)`: a crash. After n more messages it stops reading, lets data pile up, then
  closes with SO_LINGER {1, 0} so the kernel sends RST; what it had not processed is lost.
* `stall()` / `resume()`: stop reading so the buffers fill and the sender blocks.

`store=False` only counts messages and bytes (for benchmarks). Run as a program, it is that
counting receiver in a process of its own so it does not share a GIL with the process measured:

    python tests/syslog_receiver.py --protocol tcp|udp [--port 0] [--stats-file FILE]

prints `SYSLOG_RECEIVER_ADDR=127.0.0.1:PORT` as its first line and writes JSON stats to FILE on
SIGUSR1, every `--stats-interval` seconds if given, and on SIGTERM/SIGINT (then exits 0).
`ReceiverProcess` runs it. `ids()` and `loss_report()` do the loss accounting.

Linux only: refusing connections while keeping the port relies on Linux's shutdown() of a
listening socket.
"""
from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import re
import select
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time

HOST = "127.0.0.1"
ADDR_LINE_PREFIX = "SYSLOG_RECEIVER_ADDR="
DEFAULT_RECV_CHUNK = 1 << 20  # large reads keep the per-message cost low when counting
MAX_UDP_DATAGRAM = 65535
MAX_LENGTH_DIGITS = 10  # an octet count longer than this is a framing error, not a length
MAX_MESSAGE_BYTES = 16 << 20  # a larger octet count is a framing error (not a 10 GB buffer)
POLL_SECONDS = 0.1  # how quickly idle threads notice faults, stops and closes
UDP_BURST = 1024  # datagrams read per lock round-trip
CLOSE, RESET = "close", "reset"


class _FrameParser:
    """Incremental RFC 6587 parser over one connection's byte stream.

    Bytes are received straight into one growable buffer and messages are located by index,
    so counting mode never copies a message.
    """

    def __init__(self, store: bool, chunk_size: int):
        self._store = store
        self._buffer = bytearray(chunk_size)
        self._view = memoryview(self._buffer)
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received bytes
        self.framing_errors = 0

    @property
    def unparsed_bytes(self) -> int:
        return self._end - self._start

    def recv_into(self, sock: socket.socket) -> int:
        """Receive once into the free space (raises what the socket raises); 0 means EOF."""
        if self._start:  # move the partial frame to the front
            remainder = self._end - self._start
            self._buffer[:remainder] = self._buffer[self._start:self._end]
            self._start, self._end = 0, remainder
        if self._end == len(self._buffer):  # one frame is larger than the buffer
            self._view.release()
            self._buffer.extend(bytes(len(self._buffer)))
            self._view = memoryview(self._buffer)
        received = sock.recv_into(self._view[self._end:])
        self._end += received
        return received

    def parse(self, limit: int | None = None) -> tuple[int, int, list[bytes]]:
        """Consume up to `limit` complete frames: (message count, message bytes, messages)."""
        buffer, view = self._buffer, self._view
        position, end = self._start, self._end
        count = size = 0
        messages: list[bytes] = []
        store = self._store
        while position < end and count != limit:
            message_start = -1  # stays -1 unless the frame is octet counted
            bad_length = False
            if 49 <= buffer[position] <= 57:  # octet counting: MSG-LEN starts with 1-9
                space = buffer.find(b" ", position, min(end, position + MAX_LENGTH_DIGITS + 1))
                if space < 0 and end - position <= MAX_LENGTH_DIGITS:
                    break  # the length field is still arriving
                digits = buffer[position:space] if space >= 0 else b""
                length = int(digits) if digits.isdigit() else -1
                if 0 < length <= MAX_MESSAGE_BYTES:
                    message_start = space + 1
                    message_end = message_start + length
                    if message_end > end:
                        break
                    next_position = message_end
                else:  # not a length after all: read it as an LF-terminated frame
                    bad_length = True
            if message_start < 0:  # non-transparent framing: MSG LF
                newline = buffer.find(b"\n", position, end)
                if newline < 0:
                    break
                message_start, message_end, next_position = position, newline, newline + 1
                if message_end == message_start:  # a blank line between frames
                    position = next_position
                    continue
                self.framing_errors += bad_length
            count += 1
            size += message_end - message_start
            if store:
                messages.append(view[message_start:message_end].tobytes())
            position = next_position
        self._start = position
        return count, size, messages

    def discard(self) -> int:
        """Drop the unparsed bytes (a partial frame at a close); return how many."""
        dropped = self.unparsed_bytes
        self._start = self._end = 0
        return dropped


class _Connection:
    """One accepted TCP/TLS connection, served by its own thread."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.close_requested = False  # set by stop_listening(): close gracefully
        self.thread: threading.Thread | None = None


class _Fault:
    """A close/reset armed to fire after `remaining` more messages, `rounds` times."""

    def __init__(self, kind: str, after: int, rounds: int, delay: float = 0.0):
        if after < 1 or rounds < 1:
            raise ValueError("a fault needs at least one message and one round")
        self.kind, self.after, self.rounds, self.delay = kind, after, rounds, delay
        self.remaining = after


class SyslogReceiver:
    """A syslog server on 127.0.0.1 running on background threads; see the module docstring.

    It starts listening in the constructor (so `.port` is known at once) and stops in `close()`
    or at the end of a `with` block. All attributes and methods are thread-safe.
    """

    def __init__(
        self,
        protocol: str = "tcp",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        store: bool = True,
        *,
        listening: bool = True,
        stalled: bool = False,
        close_after: int | None = None,
        close_times: int = 1,
        reset_after: int | None = None,
        recv_chunk: int = DEFAULT_RECV_CHUNK,
    ):
        if protocol not in ("tcp", "udp", "tls"):
            raise ValueError(f"unknown protocol {protocol!r}")
        if (protocol == "tls") != (ssl_context is not None):
            raise ValueError("protocol 'tls' needs an ssl_context, and only it")
        self.protocol = protocol
        self.store = store
        self._ssl_context = ssl_context
        self._recv_chunk = recv_chunk
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._messages: list[bytes] = []
        self._count = self._bytes = self._received_bytes = 0
        self._discarded_bytes = self._framing_errors = self._tls_errors = 0
        self._connections_accepted = self._closes = self._resets = 0
        self._first_monotonic = self._last_monotonic = None
        self._first_time = self._last_time = None
        self._open: set[_Connection] = set()
        self._stalled = stalled
        self._fault: _Fault | None = None
        self._listening = False
        self._socket: socket.socket | None = None
        self._socket_lock = threading.Lock()  # UDP: reader and stop_listening share the socket
        self.port = port or _free_port(socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM)
        if close_after is not None:
            self.close_after(close_after, close_times)
        if reset_after is not None:
            self.reset_after(reset_after)
        if protocol == "udp":
            target = self._udp_loop
        else:
            # Bound once with an explicit port: the port stays ours while not listening.
            self._socket = _bound_socket(socket.SOCK_STREAM, self.port)
            self._socket.settimeout(POLL_SECONDS)
            target = self._accept_loop
        if listening:
            self.start_listening()
        self._thread = threading.Thread(target=target, name=f"syslog-{protocol}-{self.port}", daemon=True)
        self._thread.start()

    # ---- context manager and shutdown -------------------------------------------------------

    def __enter__(self) -> SyslogReceiver:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop all threads and close all sockets."""
        self._stopping.set()
        self._thread.join(5)
        for connection in self._open_connections():
            connection.thread.join(5)
        if self._socket is not None:
            self._socket.close()

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    # ---- observations -----------------------------------------------------------------------

    @property
    def messages(self) -> list[bytes]:
        """A snapshot of the messages received so far (empty when store=False)."""
        with self._lock:
            return list(self._messages)

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    @property
    def bytes(self) -> int:
        """Total size of the messages (without framing)."""
        with self._lock:
            return self._bytes

    @property
    def received_bytes(self) -> int:
        """Bytes read from sockets, framing and partial frames included."""
        with self._lock:
            return self._received_bytes

    @property
    def discarded_bytes(self) -> int:
        """Bytes read but not counted: partial frames at a close, the unprocessed rest at a reset."""
        with self._lock:
            return self._discarded_bytes

    @property
    def connections_accepted(self) -> int:
        with self._lock:
            return self._connections_accepted

    def stats(self) -> dict:
        """All counters at one instant."""
        with self._lock:
            return {
                "count": self._count,
                "bytes": self._bytes,
                "received_bytes": self._received_bytes,
                "discarded_bytes": self._discarded_bytes,
                "framing_errors": self._framing_errors,
                "tls_errors": self._tls_errors,
                "connections_accepted": self._connections_accepted,
                "open_connections": len(self._open),
                "closes": self._closes,
                "resets": self._resets,
                "first_monotonic": self._first_monotonic,
                "last_monotonic": self._last_monotonic,
                "first_time": self._first_time,
                "last_time": self._last_time,
            }

    def wait_for(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Wait until at least `count` messages arrived or `timeout` passed; return the messages.

        It does not raise on timeout: the caller's loss accounting says what is missing.
        """
        with self._lock:
            self._lock.wait_for(lambda: self._count >= count, timeout)
            return list(self._messages)

    # ---- faults -----------------------------------------------------------------------------

    def stop_listening(self, close_connections: bool = True) -> None:
        """Refuse new connections from now on; by default also close open ones gracefully."""
        with self._lock:
            self._listening = False
            to_close = list(self._open) if close_connections else []
            for connection in to_close:
                connection.close_requested = True
        if self.protocol == "udp":
            with self._socket_lock:
                if self._socket is not None:
                    self._socket.close()
                    self._socket = None
        else:
            try:  # Linux: un-listens (queued connections get RST) but keeps the port bound
                self._socket.shutdown(socket.SHUT_RD)
            except OSError as error:
                if error.errno != errno.ENOTCONN:  # not listening already
                    raise
        for connection in to_close:
            connection.thread.join(5)

    def start_listening(self) -> None:
        """Accept connections (datagrams) again, on the same port."""
        if self.protocol == "udp":
            with self._socket_lock:
                if self._socket is None:
                    self._socket = _bound_socket(socket.SOCK_DGRAM, self.port)
                    self._socket.setblocking(False)
        else:
            self._socket.listen(128)
        with self._lock:
            self._listening = True

    def close_after(self, n_messages: int, times: int = 1) -> None:
        """After `n_messages` more messages, drain the connection and close it with FIN; `times` rounds."""
        self._arm(_Fault(CLOSE, n_messages, times))

    def reset_after(self, n_messages: int, delay: float = 0.2) -> None:
        """After `n_messages` more messages, stop reading for `delay` s, then close with RST."""
        self._arm(_Fault(RESET, n_messages, 1, delay))

    def clear_faults(self) -> None:
        """Disarm a pending close_after/reset_after."""
        with self._lock:
            self._fault = None

    def stall(self) -> None:
        """Stop reading from every connection (the sender blocks once the buffers are full)."""
        with self._lock:
            self._stalled = True

    def resume(self) -> None:
        with self._lock:
            self._stalled = False
            self._lock.notify_all()

    def _arm(self, fault: _Fault) -> None:
        if self.protocol == "udp":
            raise ValueError("close/reset faults need a connection: TCP or TLS")
        with self._lock:
            self._fault = fault

    # ---- bookkeeping shared by all threads ----------------------------------------------------

    def _messages_until_fault(self) -> int | None:
        with self._lock:
            return self._fault.remaining if self._fault else None

    def _record(self, count: int, size: int, messages: list[bytes], received: int = 0,
                count_towards_fault: bool = True) -> _Fault | None:
        """Account for parsed messages; return the armed fault if it fires now."""
        with self._lock:
            self._received_bytes += received
            fired = None
            if count:
                now_monotonic, now = time.monotonic(), time.time()
                if self._first_monotonic is None:
                    self._first_monotonic, self._first_time = now_monotonic, now
                self._last_monotonic, self._last_time = now_monotonic, now
                self._count += count
                self._bytes += size
                self._messages.extend(messages)
                self._lock.notify_all()
                fault = self._fault
                if fault and count_towards_fault:
                    fault.remaining -= count
                    if fault.remaining <= 0:
                        fired = fault
                        fault.rounds -= 1
                        fault.remaining = fault.after
                        if fault.rounds == 0:
                            self._fault = None
            return fired

    def _open_connections(self) -> list[_Connection]:
        with self._lock:
            return list(self._open)

    def _wait_while_stalled(self) -> bool:
        """Block while stalled (bounded by POLL_SECONDS); return True if still stalled."""
        with self._lock:
            if self._stalled:
                self._lock.wait(POLL_SECONDS)
            return self._stalled

    # ---- TCP / TLS -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._socket
        while not self._stopping.is_set():
            try:
                sock, peer = listener.accept()
            except socket.timeout:
                continue
            except OSError:  # EINVAL while not listening
                self._stopping.wait(POLL_SECONDS / 2)
                continue
            connection = _Connection(sock)
            connection.thread = threading.Thread(
                target=self._serve, args=(connection,), name=f"syslog-conn-{peer[1]}", daemon=True)
            with self._lock:
                if not self._listening:  # lost a race with stop_listening()
                    sock.close()
                    continue
                self._connections_accepted += 1
                self._open.add(connection)
                connection.thread.start()  # under the lock: whoever sees it can join it

    def _serve(self, connection: _Connection) -> None:
        sock = connection.sock
        parser = _FrameParser(self.store, self._recv_chunk)
        try:
            if self._ssl_context is not None:
                sock = self._tls_handshake(sock)
                if sock is None:
                    return
                connection.sock = sock
            sock.settimeout(POLL_SECONDS)
            while not self._stopping.is_set():
                if connection.close_requested:
                    self._close_gracefully(sock, parser)
                    return
                if self._wait_while_stalled():
                    continue
                try:
                    received = parser.recv_into(sock)
                except socket.timeout:
                    continue
                except OSError:  # reset by the peer
                    return
                if not received:
                    return
                fired = self._consume(parser, received)
                if fired is not None and fired.kind == CLOSE:
                    self._close_gracefully(sock, parser)
                    return
                if fired is not None and fired.kind == RESET:
                    self._reset(sock, parser, fired.delay)
                    return
        finally:
            with self._lock:
                self._discarded_bytes += parser.discard()
                self._framing_errors += parser.framing_errors
                self._open.discard(connection)
            connection.sock.close()

    def _tls_handshake(self, sock: socket.socket) -> ssl.SSLSocket | None:
        sock.settimeout(10)
        try:
            return self._ssl_context.wrap_socket(sock, server_side=True)
        except OSError:  # ssl.SSLError included
            with self._lock:
                self._tls_errors += 1
            return None

    def _consume(self, parser: _FrameParser, received: int) -> _Fault | None:
        """Parse what was received, stopping exactly where an armed fault fires."""
        count, size, messages = parser.parse(self._messages_until_fault())
        return self._record(count, size, messages, received)

    def _close_gracefully(self, sock: socket.socket, parser: _FrameParser) -> None:
        """Keep every complete message that has arrived, then send FIN and close."""
        self._record(*parser.parse(), count_towards_fault=False)
        sock.settimeout(0.0)
        while True:
            try:
                received = parser.recv_into(sock)
            except (BlockingIOError, ssl.SSLWantReadError):
                break  # EAGAIN: nothing more has arrived
            except OSError:
                break  # reset by the peer
            self._record(*parser.parse(), received=received, count_towards_fault=False)
            if not received:
                break
        with self._lock:
            self._closes += 1
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is already gone

    def _reset(self, sock: socket.socket, parser: _FrameParser, delay: float) -> None:
        """Crash: drop what was read but not processed, let more pile up, then RST."""
        with self._lock:
            self._discarded_bytes += parser.discard()
            self._resets += 1
        self._stopping.wait(delay)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    # ---- UDP ---------------------------------------------------------------------------------

    def _udp_loop(self) -> None:
        view = memoryview(bytearray(MAX_UDP_DATAGRAM))
        while not self._stopping.is_set():
            if self._wait_while_stalled():
                continue
            count = size = received = 0
            messages: list[bytes] = []
            with self._socket_lock:
                sock = self._socket
                if sock is not None and select.select([sock], [], [], POLL_SECONDS)[0]:
                    for _ in range(UDP_BURST):
                        try:
                            length = sock.recv_into(view)
                        except BlockingIOError:
                            break
                        count += 1
                        size += length
                        received += length
                        if self.store:
                            messages.append(view[:length].tobytes())
            if sock is None:
                self._stopping.wait(POLL_SECONDS)
            elif count:
                self._record(count, size, messages, received)


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _bound_socket(kind: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        raise
    return sock


# ---- loss accounting ---------------------------------------------------------------------------

DEFAULT_ID_PATTERN = rb"request_traceid=([^,\s]+)"


def ids(messages: list[bytes], pattern: bytes = DEFAULT_ID_PATTERN) -> list[str]:
    """The id (first group of `pattern`) of each message that has one, in order."""
    regex = re.compile(pattern)
    found = []
    for message in messages:
        match = regex.search(message)
        if match:
            found.append(match.group(1).decode("utf-8", "replace"))
    return found


def loss_report(expected_ids, messages: list[bytes], pattern: bytes = DEFAULT_ID_PATTERN,
                sample: int = 10) -> dict:
    """Compare the ids sent with the messages received.

    Returns sent, received (messages), unique (expected ids seen), lost, duplicates (extra
    copies), unexpected (ids never sent), without_id (messages with no id) and lost_ids (a sample).
    """
    expected = set(expected_ids)
    received_ids = ids(messages, pattern)
    copies = collections.Counter(received_ids)
    lost = expected.difference(copies)
    return {
        "sent": len(expected),
        "received": len(messages),
        "unique": len(expected) - len(lost),
        "lost": len(lost),
        "duplicates": sum(n - 1 for n in copies.values()),
        "unexpected": sum(1 for key in copies if key not in expected),
        "without_id": len(messages) - len(received_ids),
        "lost_ids": sorted(lost)[:sample],
    }


# ---- the receiver as a program, and its wrapper ---------------------------------------------

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_DUMP_SIGNAL = signal.SIGUSR1


def _write_stats(path: str, receiver: SyslogReceiver, sequence: int) -> None:
    stats = receiver.stats()
    document = {key: stats[key] for key in ("count", "bytes", "first_time", "last_time",
                                            "connections_accepted", "discarded_bytes",
                                            "framing_errors")}
    document.update(sequence=sequence, pid=os.getpid())
    temporary = f"{path}.tmp"
    with open(temporary, "w") as stream:
        json.dump(document, stream)
    os.replace(temporary, path)  # readers never see half a file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Counting syslog receiver for benchmarks.")
    parser.add_argument("--protocol", choices=("tcp", "udp"), default="tcp")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stats-file")
    parser.add_argument("--stats-interval", type=float, default=0.0,
                        help="also write the stats file every N seconds (0: only on SIGUSR1 and exit)")
    args = parser.parse_args(argv)

    # Signals go to sigtimedwait() here, not to handlers racing the receiver threads, so block
    # them before those threads start (they inherit the mask).
    handled = {*_STOP_SIGNALS, _DUMP_SIGNAL}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    sequence = 0
    with SyslogReceiver(args.protocol, args.port, store=False) as receiver:
        print(f"{ADDR_LINE_PREFIX}{HOST}:{receiver.port}", flush=True)
        while True:
            info = signal.sigtimedwait(handled, args.stats_interval or 3600)
            if info is not None and info.si_signo in _STOP_SIGNALS:
                break
            if args.stats_file and (info is not None or args.stats_interval):
                sequence += 1
                _write_stats(args.stats_file, receiver, sequence)
    if args.stats_file:
        _write_stats(args.stats_file, receiver, sequence + 1)
    print(f"SYSLOG_RECEIVER_COUNT={receiver.count} SYSLOG_RECEIVER_BYTES={receiver.bytes}", flush=True)
    return 0


class ReceiverProcess:
    """Runs this module as a counting receiver in a child process (context manager).

    `.port` is known once the constructor returns; `.stats()` asks the child for fresh counters
    (SIGUSR1) and returns its JSON; `.stop()` ends it with SIGTERM and returns the final stats.
    """

    def __init__(self, protocol: str = "tcp", port: int = 0, stats_file: str | None = None,
                 start_timeout: float = 10.0):
        self._temporary_directory = None
        if stats_file is None:
            self._temporary_directory = tempfile.TemporaryDirectory(prefix="syslog-receiver-")
            stats_file = os.path.join(self._temporary_directory.name, "stats.json")
        self.stats_file = stats_file
        self._final_stats: dict | None = None
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--protocol", protocol,
             "--port", str(port), "--stats-file", stats_file],
            stdout=subprocess.PIPE, text=True)
        try:
            line = self._read_line(start_timeout)
            if not line.startswith(ADDR_LINE_PREFIX):
                raise RuntimeError(f"syslog receiver did not start: {line!r}")
            self.port = int(line.strip().rsplit(":", 1)[1])
        except BaseException:
            self._kill()
            raise

    def __enter__(self) -> ReceiverProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    def stats(self, timeout: float = 5.0) -> dict:
        """Counters as of this call: count, bytes, first_time, last_time (time.time()), ..."""
        if self._final_stats is not None:
            return self._final_stats
        before = self._read_stats().get("sequence", 0)
        self.process.send_signal(_DUMP_SIGNAL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self._read_stats()
            if stats.get("sequence", 0) > before:
                return stats
            if self.process.poll() is not None:
                break
            time.sleep(0.005)
        raise RuntimeError("syslog receiver process did not write its stats")

    def wait_for(self, count: int, timeout: float = 10.0) -> dict:
        """Poll until at least `count` messages arrived or `timeout` passed; return the stats."""
        deadline = time.monotonic() + timeout
        stats = self.stats()
        while stats["count"] < count and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = self.stats()
        return stats

    def stop(self, timeout: float = 5.0) -> dict:
        """SIGTERM the child, wait for it, and return its final stats."""
        if self._final_stats is None:
            if self.process.poll() is None:
                self.process.terminate()
            try:
                self.process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                raise
            self._final_stats = self._read_stats()
            if self._temporary_directory is not None:
                self._temporary_directory.cleanup()
        return self._final_stats

    def _read_stats(self) -> dict:
        try:
            with open(self.stats_file) as stream:
                return json.load(stream)
        except FileNotFoundError:
            return {}

    def _read_line(self, timeout: float) -> str:
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise TimeoutError("syslog receiver printed no address")
        return self.process.stdout.readline()

    def _kill(self) -> None:
        self.process.kill()
        self.process.communicate()
        if self._temporary_directory is not None:
            self._temporary_directory.cleanup()


if __name__ == "__main__":
    sys.exit(main())
