"""A real ``rsyslogd`` on 127.0.0.1 as the receiving end of forwarder tests.

:class:`Rsyslog` writes a config into its own work directory and runs
``rsyslogd -n -f CONF -i PIDFILE`` in the foreground. It never touches the
system daemon or anything under /etc or /var: no ``imuxsock``/``imklog`` (so no
/dev/log), no include of /etc/rsyslog.d, no privilege dropping (it runs as
whoever runs the tests, root included), DNS lookups off.

Inputs (each on a free 127.0.0.1 port, see ``Rsyslog.ports``):

* ``udp`` - imudp.
* ``tcp`` - imtcp; octet counting and LF framing, even mixed on one connection.
* ``tls`` - imtcp + GnuTLS driver, server auth only (the client needs no
  certificate). In anon mode rsyslog's GnuTLS driver disables TLS 1.3, so this
  is TLS 1.2; it does not answer close_notify (``SSLSocket.unwrap()`` raises
  ``SSLEOFError``). GnuTLS generates DH parameters at every start: ~0.5 s.
* ``mtls`` - imtcp + OpenSSL driver, ``x509/certvalid``: the client must show a
  certificate issued by the test CA. TLS 1.3, where the client's handshake and
  ``sendall`` may succeed although the server then rejects it, so assert on
  :meth:`Rsyslog.records` / :meth:`Rsyslog.wait_for_stderr` ("peer did not
  return a certificate", "certificate verify failed").
* ``tls_wrong`` - imtcp + OpenSSL, server auth only, presenting the
  ``wrong.example`` certificate.
* ``relp`` - imrelp, plain (only if the imrelp module is installed).
* ``relp_tls`` - imrelp over TLS, ``certvalid``: librelp has no server-auth-only
  mode for certificate-holding servers (without ``tls.authMode`` it demands a
  client certificate and checks its fingerprint), so clients need the client
  certificate here too.

The TLS inputs exist only when a :class:`~tests.pki.Pki` is given;
``Rsyslog.available_inputs`` lists what this instance has.

``Rsyslog(..., write_before_ack=True)`` gives the capture ruleset a Direct queue: each message is
written to ``out.jsonl`` in the input's own thread before the input takes the next one. imrelp
answers "200 OK" right after handing a message to its ruleset's queue; with the default (the
in-memory main queue) that is before the message is written, so a ``kill -9`` can lose messages
rsyslog already acknowledged (observed here: of 2,000 messages sent one at a time, 111 were
acknowledged before they were in the file; with the Direct queue none of 2,000). Fault tests of
acknowledged delivery need this; every input of the instance gets it.

Every received message becomes one JSON line in ``out.jsonl``; the keys are
``input pri facility severity version timestamp hostname appname procid msgid
sd msg raw`` (pri/facility/severity/version are numbers, the rest strings;
``timestamp`` is rsyslog's ``timereported`` in RFC 3339, ``sd`` the raw
structured-data text with its escapes, ``raw`` the ``rawmsg`` property).

What rsyslog 8.2302 does to ``msg`` (observed here, identical over UDP and
octet-counted TCP, with ``parser.escapeControlCharactersOnReceive="off"``):

* RFC 5424: the single SP after STRUCTURED-DATA is the separator; any further
  leading spaces are kept. A message without MSG gives ``msg == ""``. In the
  RFC 3164 fallback ``msg`` keeps the space after ``tag:`` (``" text"``).
* A trailing LF is dropped (``parser.dropTrailingLFOnReceive``); trailing
  spaces/TABs are kept.
* A leading UTF-8 BOM is kept in ``msg``; valid non-ASCII UTF-8 is kept.
* Invalid UTF-8 bytes are written to the file unchanged; :meth:`records`
  decodes with ``surrogateescape``, so ``msg.encode("utf-8",
  "surrogateescape")`` gives back the exact bytes.
* Embedded LF, CR, TAB, ESC, DEL and other control characters are kept as-is
  (in LF-framed TCP an LF of course ends the message) - *unless* the message
  contains a NUL: then every NUL becomes the four characters ``#000`` and
  the other control characters except TAB, LF and CR are *dropped*.
* ``timestamp`` keeps the sender's precision and offset (``.1-05:30``,
  ``Z``); a NILVALUE timestamp becomes the receive time. A timestamp rsyslog
  cannot parse as RFC 5424 (e.g. offset ``+0800``) makes it fall back to RFC
  3164 parsing: receive time, hostname from the connection, header in msg.

Linux only: readiness is detected by finding rsyslogd's own listening sockets
in /proc, which needs no connection and so adds no noise (TLS handshake
errors) to :meth:`stderr_text`.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from tests.pki import Pki
from tests.polling import poll

LOOPBACK = "127.0.0.1"
# Big enough for a maximal UDP datagram (65,507 bytes) and then some.
MAX_MESSAGE_SIZE = 256 * 1024
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02

# imtcp's octet-counted frame limit defaults to 200,000 bytes; let it match maxMessageSize.
_MODULE_PARAMETERS = {"imtcp": f' maxFrameSize="{MAX_MESSAGE_SIZE}"'}

# A ruleset with this runs its actions in the input's thread (see write_before_ack).
_DIRECT_QUEUE = ' queue.type="Direct"'

# imtcp/imudp: "Could not create tcp listener", imrelp: "could not activate relp listener".
_LISTENER_FAILURE = re.compile(r"could not (create|activate) \w+ listener", re.IGNORECASE)

_TEMPLATE = """\
template(name="jsonl" type="list" option.jsonf="on") {
  property(outname="input"     name="inputname"        format="jsonf")
  property(outname="pri"       name="pri"              format="jsonf" datatype="number")
  property(outname="facility"  name="syslogfacility"   format="jsonf" datatype="number")
  property(outname="severity"  name="syslogseverity"   format="jsonf" datatype="number")
  property(outname="version"   name="protocol-version" format="jsonf" datatype="number")
  property(outname="timestamp" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="hostname"  name="hostname"         format="jsonf")
  property(outname="appname"   name="app-name"         format="jsonf")
  property(outname="procid"    name="procid"           format="jsonf")
  property(outname="msgid"     name="msgid"            format="jsonf")
  property(outname="sd"        name="structured-data"  format="jsonf")
  property(outname="msg"       name="msg"              format="jsonf")
  property(outname="raw"       name="rawmsg"           format="jsonf")
}
"""


def find_rsyslogd() -> str:
    """Path of rsyslogd (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    path = shutil.which("rsyslogd", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if path is None:
        raise RuntimeError("rsyslogd not found (apt-get install rsyslog rsyslog-gnutls rsyslog-openssl)")
    return path


@functools.lru_cache(maxsize=None)
def has_module(name: str) -> bool:
    """Whether rsyslogd can load module ``name`` (a config validation run, ~50 ms)."""
    # The dummy action keeps the validation run from failing for lack of outputs.
    config = f'module(load="{name}")\naction(type="omfile" file="/dev/null")\n'
    result = subprocess.run(
        [find_rsyslogd(), "-N1", "-f", "/dev/stdin"], input=config.encode(), capture_output=True
    )
    return result.returncode == 0


def _quote(value: object) -> str:
    text = str(value)
    if '"' in text or "\\" in text:
        raise ValueError(f"cannot put {text!r} into an rsyslog config string")
    return f'"{text}"'


def _imtcp_tls(driver: str, auth_mode: str, ca: Path, cert: Path, key: Path) -> str:
    return (
        f"streamDriver.name={_quote(driver)} streamDriver.mode=\"1\" "
        f"streamDriver.authMode={_quote(auth_mode)} streamDriver.CAFile={_quote(ca)} "
        f"streamDriver.CertFile={_quote(cert)} streamDriver.KeyFile={_quote(key)}"
    )


def _input_settings(pki: Optional[Pki], with_relp: bool) -> dict[str, tuple[str, str]]:
    """Input name -> (rsyslog module, extra input() parameters)."""
    # A large UDP receive buffer: a forwarder's burst of big datagrams must not overflow it.
    inputs = {"udp": ("imudp", 'rcvbufSize="64m"'), "tcp": ("imtcp", "")}
    if pki is not None:
        inputs["tls"] = ("imtcp", _imtcp_tls("gtls", "anon", pki.ca, pki.server_cert, pki.server_key))
        inputs["mtls"] = ("imtcp", _imtcp_tls("ossl", "x509/certvalid", pki.ca, pki.server_cert, pki.server_key))
        inputs["tls_wrong"] = ("imtcp", _imtcp_tls("ossl", "anon", pki.ca, pki.wrong_cert, pki.wrong_key))
    if with_relp:
        inputs["relp"] = ("imrelp", "")
        if pki is not None:
            inputs["relp_tls"] = (
                "imrelp",
                f'tls="on" tls.authMode="certvalid" tls.caCert={_quote(pki.ca)} '
                f"tls.myCert={_quote(pki.server_cert)} tls.myPrivKey={_quote(pki.server_key)}",
            )
    return inputs


def _pick_free_port(kind: int, held: list[socket.socket]) -> int:
    """A free loopback port; the probe socket stays open in ``held`` so the next pick differs."""
    sock = socket.socket(socket.AF_INET, kind)
    held.append(sock)
    sock.bind((LOOPBACK, 0))
    return sock.getsockname()[1]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:  # the process is gone; the caller notices via poll()
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:  # the fd was closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def _bound_ports(table: str, state: str, inodes: set[str]) -> set[int]:
    """Ports in /proc/net/{table} in ``state`` on 127.0.0.1 whose socket is one of ``inodes``."""
    # /proc prints the address as a native-endian 32-bit hex number.
    loopback_hex = "%08X" % int.from_bytes(socket.inet_aton(LOOPBACK), sys.byteorder)
    ports = set()
    for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
        fields = row.split()
        address, port_hex = fields[1].split(":")
        if address == loopback_hex and fields[3] == state and fields[9] in inodes:
            ports.add(int(port_hex, 16))
    return ports


def _die_with_parent() -> None:
    """In the child: get SIGKILLed if the test runner dies, so no rsyslogd is orphaned."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


_tags = itertools.count()


def unique_tag() -> str:
    """An app-name (SYSLOG_TAG) no other test uses, to tell a test's records apart in the shared rsyslogd."""
    return f"e2e{next(_tags)}t{int(time.time() * 1000) % 100000}"


class Rsyslog:
    """A private rsyslogd; use as a context manager (``with Rsyslog(dir, pki) as peer:``)."""

    def __init__(self, workdir: Path, pki: Optional[Pki] = None, write_before_ack: bool = False) -> None:
        self.workdir = Path(workdir)
        self.write_before_ack = write_before_ack
        self.config_path = self.workdir / "rsyslog.conf"
        self.pid_path = self.workdir / "rsyslogd.pid"
        self.output_path = self.workdir / "out.jsonl"
        self.stderr_path = self.workdir / "rsyslogd.stderr"
        self._process: Optional[subprocess.Popen] = None

        self._inputs = _input_settings(pki, with_relp=has_module("imrelp"))
        self.available_inputs = tuple(self._inputs)
        held: list[socket.socket] = []
        try:
            self.ports = {
                name: _pick_free_port(
                    socket.SOCK_DGRAM if self._protocol(name) == "udp" else socket.SOCK_STREAM, held
                )
                for name in self._inputs
            }
        finally:
            for sock in held:
                sock.close()

        (self.workdir / "spool").mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())

    def _config(self) -> str:
        modules = sorted({module for module, _ in self._inputs.values()})
        inputs = "\n".join(
            f'input(type="{module}" address="{LOOPBACK}" port="{self.ports[name]}" '
            f'ruleset="capture" name="{name}" {extra})'
            for name, (module, extra) in self._inputs.items()
        )
        return (
            # maxMessageSize must come before the inputs; escaping off keeps LF/TAB inside msg.
            f"global(workDirectory={_quote(self.workdir / 'spool')} maxMessageSize=\"{MAX_MESSAGE_SIZE}\"\n"
            f'       net.enableDNS="off" parser.escapeControlCharactersOnReceive="off")\n'
            + "".join(f'module(load="{module}"{_MODULE_PARAMETERS.get(module, "")})\n' for module in modules)
            + _TEMPLATE
            # Flush after every batch, through a buffer that holds a whole big message.
            + f"ruleset(name=\"capture\"{_DIRECT_QUEUE if self.write_before_ack else ''}) {{\n"
            f'  action(type="omfile" file={_quote(self.output_path)} template="jsonl"\n'
            f'         flushOnTXEnd="on" asyncWriting="off" ioBufferSize="{2 * MAX_MESSAGE_SIZE}")\n'
            "}\n" + inputs + "\n"
        )

    # -- process control -------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> "Rsyslog":
        """Start rsyslogd and wait until every input is listening."""
        if self.running:
            raise RuntimeError("rsyslogd is already running")
        self.pid_path.unlink(missing_ok=True)  # stale after kill(); rsyslogd refuses a live one
        stderr_before = len(self.stderr_text())
        # Appending keeps the messages of earlier runs; rsyslogd prints nothing useful on stdout.
        with open(self.stderr_path, "ab") as stderr:
            self._process = subprocess.Popen(
                [find_rsyslogd(), "-n", "-f", str(self.config_path), "-i", str(self.pid_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                preexec_fn=_die_with_parent,
            )
        try:
            self._wait_until_listening(timeout, stderr_before)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_until_listening(self, timeout: float, stderr_before: int) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"rsyslogd exited with {self._process.returncode} during start:\n{self.stderr_text()}"
                )
            # rsyslogd keeps running without an input it cannot bind, so fail fast on its complaint.
            new_stderr = self.stderr_text()[stderr_before:]
            if _LISTENER_FAILURE.search(new_stderr):
                raise RuntimeError(f"rsyslogd could not open all inputs {self.ports}:\n{new_stderr}")
            not_listening = self._inputs_not_listening()
            if not not_listening:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rsyslogd inputs {not_listening} not listening within {timeout} s "
                    f"(ports {self.ports}):\n{self.stderr_text()}"
                )
            time.sleep(POLL_INTERVAL)

    def _inputs_not_listening(self) -> list[str]:
        """Inputs whose port is not (yet) bound by *our* rsyslogd; all of them until the pid file exists."""
        if not self.pid_path.exists():
            return list(self.ports)
        inodes = _socket_inodes(self._process.pid)
        # /proc state codes: 0A = TCP LISTEN, 07 = UDP bound ("close").
        bound = {"udp": _bound_ports("udp", "07", inodes), "tcp": _bound_ports("tcp", "0A", inodes)}
        return [name for name, port in self.ports.items() if port not in bound[self._protocol(name)]]

    def _protocol(self, name: str) -> str:
        return "udp" if self._inputs[name][0] == "imudp" else "tcp"

    def stop(self) -> None:
        """SIGTERM and wait (rsyslogd drains its queue and closes the file); SIGKILL if it hangs."""
        if self.running:
            self._process.terminate()
            try:
                self._process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL without a chance to flush - for fault tests."""
        if self.running:
            self._process.kill()
        self._reap()

    def _reap(self) -> None:
        if self._process is not None:
            self._process.wait()

    def restart(self) -> "Rsyslog":
        """Stop if still running, then start again with the same config and ports."""
        self.stop()
        return self.start()

    def __enter__(self) -> "Rsyslog":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what arrived ----------------------------------------------------

    def records(self) -> list[dict]:
        """Every complete JSON line written so far (a partly written last line is skipped)."""
        try:
            data = self.output_path.read_bytes()
        except FileNotFoundError:  # nothing received yet
            return []
        complete_lines = data.split(b"\n")[:-1]
        # surrogateescape: msg may carry invalid UTF-8 bytes, and tests want them back exactly.
        return [json.loads(line.decode("utf-8", "surrogateescape")) for line in complete_lines]

    def messages(self) -> list[bytes]:
        """``msg`` of every record, as the bytes sent (for loss accounting); unlike :meth:`records`
        it reads a file that a SIGKILL may have cut inside a line: such a line counts as no message."""
        try:
            data = self.output_path.read_bytes()
        except FileNotFoundError:
            return []
        found = []
        for line in data.split(b"\n"):
            try:
                found.append(json.loads(line.decode("utf-8", "surrogateescape"))["msg"])
            except ValueError:
                continue
        return [msg.encode("utf-8", "surrogateescape") for msg in found]

    def wait_for(
        self, count: int, timeout: float = 30.0, where: Optional[Callable[[dict], bool]] = None
    ) -> list[dict]:
        """Poll until at least ``count`` records (those matching ``where``, if given) arrived; return them."""
        def matching() -> list[dict]:
            return [record for record in self.records() if where is None or where(record)]

        found = poll(matching, lambda records: len(records) >= count, timeout, POLL_INTERVAL)
        if len(found) < count:
            received = self.records()
            last_records = "\n".join(json.dumps(record)[:500] for record in received[-3:]) or "(none)"
            raise TimeoutError(
                f"expected >= {count} {'matching ' if where else ''}records within {timeout} s, "
                f"got {len(found)} of {len(received)} received; last received:\n{last_records}\n"
                f"rsyslogd stderr:\n{self.stderr_text()}"
            )
        return found

    def tagged(self, tag: str, count: int, timeout: float = 60.0) -> list[dict]:
        """The records whose app-name is ``tag``, once there are ``count`` of them or ``timeout``
        seconds passed (then possibly fewer: the caller's assertions say what is missing)."""
        return poll(lambda: [record for record in self.records() if record["appname"] == tag],
                    lambda records: len(records) >= count, timeout, 0.2)

    def wait_for_stderr(self, text: str, timeout: float = 30.0, after: int = 0) -> str:
        """Poll until ``text`` appears in stderr past character offset ``after``; return stderr from there.

        Take ``after = len(peer.stderr_text())`` before provoking an error to see only the new messages.
        """
        deadline = time.monotonic() + timeout
        while True:
            new_text = self.stderr_text()[after:]
            if text in new_text:
                return new_text
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in rsyslogd stderr within {timeout} s; new stderr:\n{new_text}")
            time.sleep(POLL_INTERVAL)

    def stderr_text(self) -> str:
        """rsyslogd's own messages (errors such as TLS rejects), across restarts."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
