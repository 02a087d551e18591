"""What a forged or broken SLS answer can and cannot do to the forwarder (issue 18): memory bombs,
a bad next cursor, a pull that does not parse, forged error text, plain HTTP, and a log of a
million fields. The forged answers come from the emulator's "replace" fault (tests/sls_emulator.py);
the forwarder must count each as a failed pull, pull again, and deliver every log all the same."""
import base64
import io
import logging
import re
import socket
import threading
import zlib

import pytest
import requests
import urllib3

import sync_waf_to_syslog as fwd
from tests.delivered import assert_delivered, trace_ids
from tests.forwarder_process import ForwarderProcess, forwarder_env, run_forwarder
from tests.syslog_receiver import SyslogReceiver, ids, loss_report
from tests.waf_logs import realistic_logs, write_jsonl

BOMB_BYTES = 256 << 20  # what each bomb expands to: eight times answer_limit at the defaults
RSS_BOUND_KB = 300 << 10  # README.md, "Security": the forwarder's peak resident size under bombs
STOP_TIMEOUT = fwd.Settings.from_environment(dict(
    SLS_ENDPOINT="e", SLS_REGION="cn-hangzhou", SLS_AK_ID="i", SLS_AK_KEY="k", SLS_PROJECT="p", SLS_LOGSTORE="l",
    SYSLOG_HOST="h")).sync_stop_timeout  # SYNC_STOP_TIMEOUT's default


# ------------------------------------------------------------------------------------------------
# Forged answers
# ------------------------------------------------------------------------------------------------

def zlib_bomb(size, wbits=zlib.MAX_WBITS):
    """`size` zero bytes compressed by zlib (wbits=31: gzip), made one MB at a time."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    megabyte = bytes(1 << 20)
    return b"".join(compressor.compress(megabyte) for _ in range(size >> 20)) + compressor.flush()


def lz4_bomb(size):
    """A raw LZ4 block (as SLS sends it) of `size` zero bytes, about size / 255 bytes long, built
    by hand rather than by compressing `size` bytes: a zero literal, then one match repeating it
    (offset 1, its length past 15 in 255-steps), then the five literals a block must end with."""
    extra = size - 1 - 5 - 4 - 15
    length = b"\xff" * (extra // 255) + bytes([extra % 255])
    return bytes([0x1F, 0x00, 0x01, 0x00]) + length + bytes([0x50]) + bytes(5)


def nested_pull(depth=200):
    """A LogGroupList whose one Log carries unknown groups nested `depth` deep: protobuf refuses
    more than 100 levels, the SDK's parse as well as the forwarder's."""
    def field(number, payload):
        size, varint = len(payload), b""
        while size > 0x7F:
            varint, size = varint + bytes([size & 0x7F | 0x80]), size >> 7
        return bytes([number << 3 | 2]) + varint + bytes([size]) + payload

    log = b"\x08\x01" + b"\x7b" * depth + b"\x7c" * depth  # Time = 1, then start/end group 15
    return field(1, field(1, log))


def replace(emulator, shard=0, count=1, body=None, **headers):
    """A "replace" fault on the next `count` pulls of a shard: these headers (None removes one),
    this body."""
    spec = {"op": "pull", "shard": shard, "action": "replace", "count": count, "headers": headers}
    if body is not None:
        spec["body"] = base64.b64encode(body).decode()
    return emulator.inject(**spec)


def test_the_hand_made_lz4_bomb_is_what_it_claims():
    import lz4.block
    assert lz4.block.decompress(lz4_bomb(1 << 20), uncompressed_size=1 << 20) == bytes(1 << 20)


def peak_rss_kb(pid):
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1))


def stats_counter(stderr, name):
    """The last value of a counter of the statistics line (e.g. "failed pulls")."""
    return int(re.findall(rf"{name} (\d+)", stderr)[-1])


# ------------------------------------------------------------------------------------------------
# Bounded input
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_memory_bombs_are_failed_pulls_and_memory_stays_bounded(make_emulator, tmp_path):
    logs = realistic_logs(40, seed=18)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "logs.jsonl", logs)], shards=2)
    size = str(BOMB_BYTES)
    bombs = [  # each answers one pull of its shard (the first active fault applies), two a shard
        replace(emulator, 0, body=zlib_bomb(BOMB_BYTES), **{"x-log-compresstype": "deflate",
                                                            "x-log-bodyrawsize": size}),
        replace(emulator, 1, body=lz4_bomb(BOMB_BYTES), **{"x-log-bodyrawsize": size}),
        replace(emulator, 0, body=lz4_bomb(BOMB_BYTES), **{"x-log-bodyrawsize": "1000"}),  # it lies
        replace(emulator, 1, body=zlib_bomb(BOMB_BYTES, wbits=31), **{"Content-Encoding": "gzip",
                                                                      "x-log-compresstype": None}),
    ]
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SYNC_STATS_INTERVAL="1")
        with ForwarderProcess(env, tmp_path) as forwarder:
            assert_delivered(lambda: receiver.messages, trace_ids(logs), [forwarder], timeout=60)
            peak = peak_rss_kb(forwarder.process.pid)
            assert forwarder.stop() == 0
    stderr = forwarder.stderr()
    applied = [fault["applied"] for fault in emulator.state()["faults"]]
    print(f"\nbombs applied {applied}; forwarder peak RSS {peak} kB")
    assert applied == [1] * len(bombs)
    assert peak < RSS_BOUND_KB
    assert stats_counter(stderr, "failed pulls") == 4
    assert "shard 0: pull failed (1 in a row)" in stderr and "deflate" in stderr
    assert "shard 1: pull failed (1 in a row)" in stderr and "x-log-bodyrawsize" in stderr
    assert "Traceback" not in stderr
    assert loss_report(trace_ids(logs), receiver.messages)["duplicates"] == 0


def answer(body=b"", status=200, **headers):
    """A requests Response as the SDK's session gets it, its body not read yet."""
    response = requests.models.Response()
    response.status_code = status
    response.headers = requests.structures.CaseInsensitiveDict(headers)
    response.raw = urllib3.HTTPResponse(body=io.BytesIO(body), headers=headers, status=status,
                                        preload_content=False)
    return response


def test_answers_are_refused_before_their_body_is_read():
    limit = fwd.MIN_ANSWER_LIMIT
    too_large = str(limit + 1)
    for refused, reason in (
            (answer(status=302, Location="http://elsewhere.example/"), "redirected"),
            (answer(**{"Content-Encoding": "gzip"}), "Content-Encoding 'gzip'"),
            (answer(**{"x-log-compresstype": "zstd"}), "compressed as 'zstd'"),
            (answer(**{"Content-Length": too_large}), "Content-Length is"),
            (answer(**{"x-log-bodyrawsize": too_large}), "x-log-bodyrawsize is"),
            (answer(**{"x-log-bodyrawsize": "-1"}), "x-log-bodyrawsize is '-1'")):
        with pytest.raises(fwd.UnsafeAnswer, match=reason):
            fwd.refuse_unsafe_answer(refused, limit)
    accepted = answer(b"x" * 1000, **{"x-log-compresstype": "lz4", "x-log-bodyrawsize": "5000"})
    fwd.refuse_unsafe_answer(accepted, limit)
    assert accepted.content == b"x" * 1000
    endless = fwd.BoundedBody(answer(b"x" * 1000).raw, 999)  # a body longer than any header said
    with pytest.raises(fwd.UnsafeAnswer, match="longer than"):
        b"".join(endless.stream(100))


# ------------------------------------------------------------------------------------------------
# Answers that do not make sense
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_bad_next_cursor_and_a_pull_that_does_not_parse_are_failed_pulls(make_emulator, tmp_path):
    logs = realistic_logs(30, seed=19)
    emulator = make_emulator(load=[write_jsonl(tmp_path / "logs.jsonl", logs)], shards=1)
    nested = nested_pull()
    replace(emulator, **{"x-log-cursor": "not a cursor"})  # the real data, a bogus next cursor
    replace(emulator, body=nested, **{"x-log-compresstype": None, "x-log-bodyrawsize": str(len(nested))})
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port, SYNC_STATS_INTERVAL="1")
        with ForwarderProcess(env, tmp_path) as forwarder:
            # Neither a jump to the end of the shard nor a log lost: every log arrives, once.
            assert_delivered(lambda: receiver.messages, trace_ids(logs), [forwarder], timeout=60)
            assert forwarder.stop() == 0
    stderr = forwarder.stderr()
    assert [fault["applied"] for fault in emulator.state()["faults"]] == [1, 1]
    assert stats_counter(stderr, "failed pulls") == 2
    assert "BadNextCursor" in stderr and "Traceback" not in stderr
    report = loss_report(trace_ids(logs), receiver.messages)
    assert report["lost"] == 0 and report["duplicates"] == 0


@pytest.mark.slow
def test_forged_error_text_cannot_forge_a_check_line(make_emulator, tmp_path):
    emulator = make_emulator(shards=1)
    emulator.inject(op="list_shards", status=403, errorCode="Unauthorized\x1b[2J",
                    errorMessage="denied\nOK   SLS waf-project/waf-logstore: 9 shards\r\x1b[32m")
    with SyslogReceiver("tcp") as receiver:
        status, out, err = run_forwarder(forwarder_env(emulator, port=receiver.port), tmp_path,
                                         ["--check"], timeout=60)
    lines = out.splitlines()
    assert status == 1, out + err
    assert [line[:4] for line in lines] == ["WARN", "OK  ", "FAIL", "OK  "], out  # the OK: credentials
    assert "plain HTTP" in lines[0]
    assert "\\x0a" in lines[2] and "\\x1b[2J" in lines[2] and "\x1b" not in out and "\r" not in out


def test_printed_and_logged_text_has_its_control_characters_escaped():
    assert fwd.printable("a\nb\r\x1b[31m\x00\x7f\x85\u2028\u2029 é\tz") == \
        "a\\x0ab\\x0d\\x1b[31m\\x00\\x7f\\x85\\u2028\\u2029 é\\x09z"
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "server said %s", ("a\nFORGED",), None)
    line = fwd.PrintableFormatter("%(levelname)s %(message)s").format(record)
    assert line == "WARNING server said a\\x0aFORGED"


# ------------------------------------------------------------------------------------------------
# https by default
# ------------------------------------------------------------------------------------------------

class RecordingProxy:
    """An HTTP proxy that records the first line of each request and refuses it (403)."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.requests = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with connection:
                self.requests.append(connection.makefile("rb").readline().decode(errors="replace").strip())
                connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self):
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the serving thread
        self.server.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.mark.slow
@pytest.mark.parametrize("endpoint, first_line", [
    ("sls.example.test", "CONNECT waf-project.sls.example.test:443 "),
    ("http://sls.example.test", "GET http://waf-project.sls.example.test:80/logstores/waf-logstore/shards"),
])
def test_an_endpoint_without_a_scheme_is_reached_over_tls(endpoint, first_line, tmp_path):
    proxy = RecordingProxy()
    try:
        proxy_url = f"http://127.0.0.1:{proxy.port}"
        env = {"PATH": "/usr/bin:/bin", "SLS_ENDPOINT": endpoint, "SLS_REGION": "cn-hangzhou", "SLS_AK_ID": "id",
               "SLS_AK_KEY": "secret",
               "SLS_PROJECT": "waf-project", "SLS_LOGSTORE": "waf-logstore", "SLS_CONSUMER_NAME": "c",
               "SYSLOG_HOST": "127.0.0.1", "SYSLOG_PORT": "1", "HTTP_PROXY": proxy_url,
               "HTTPS_PROXY": proxy_url}
        status, out, _ = run_forwarder(env, tmp_path, ["--check"], timeout=60)
    finally:
        proxy.close()
    assert status == 1 and proxy.requests and proxy.requests[0].startswith(first_line), proxy.requests
    assert ("WARN" in out) == endpoint.startswith("http://"), out


# ------------------------------------------------------------------------------------------------
# Messages of hostile size
# ------------------------------------------------------------------------------------------------

def test_a_message_that_cannot_fit_is_never_built_whole():
    built = []

    def counted(fields):
        built.append(len(fields))
        return fwd.encode_kv(fields, ",")

    # Names alone too long: 200,000 fields with empty values (only their values were counted).
    fields = [(f"field{i}", "") for i in range(200_000)]
    message, cut = fwd.fit_message(b"<14>1 - h a - - - ", fields, counted, 65507)
    assert cut and len(message) <= 65507 and max(built) < len(fields) // 4
    # The fast kv path: a name longer than the message takes the reference path, which cuts it.
    assert fwd.kv_body((b"k" * 100_000, b"b"), b"1\x002", ",", None, 65507) is None
    # cef leaves empty values out: a log that fits is sent whole, and not counted as cut.
    empty = [(f"field{i}", "") for i in range(20_000)] + [("host", "a.example")]
    encode_cef = lambda fields: fwd.encode_cef(fields, ("access", "access", 2))  # noqa: E731
    message, cut = fwd.fit_message(b"<14>1 - h a - - - ", empty, encode_cef, 65507)
    assert not cut and message.endswith(b"dhost=a.example")


@pytest.mark.slow
def test_a_log_of_a_million_fields_is_sent_cut_and_the_shard_goes_on(make_emulator, tmp_path):
    before, after = realistic_logs(5, seed=20), realistic_logs(5, seed=21)
    for entry in after:
        entry["request_traceid"] = "after-" + entry["request_traceid"]
    huge = tmp_path / "huge.jsonl"  # a million fields, its JSON written directly (it is faster)
    huge.write_text(f'{{"__time__": "{before[-1]["__time__"]}", "request_traceid": "a-million", '
                    + ", ".join(f'"f{i}": "v"' for i in range(1_000_000)) + "}\n")
    # One log per LogGroup: the huge one is pulled alone, between the others.
    emulator = make_emulator(load=[write_jsonl(tmp_path / "before.jsonl", before), huge,
                                   write_jsonl(tmp_path / "after.jsonl", after)],
                             shards=1, extra_args=["--group-size", "1"])
    with SyslogReceiver("tcp") as receiver:
        env = forwarder_env(emulator, port=receiver.port)
        with ForwarderProcess(env, tmp_path) as forwarder:
            assert_delivered(lambda: receiver.messages, trace_ids(before + after), [forwarder], timeout=120)
            assert forwarder.stop(timeout=STOP_TIMEOUT + 5) == 0  # the documented stop time
        messages = receiver.messages
    # Cut to fit: its first fields, values cut to "..." where need be (its trace id too).
    [position] = [i for i, message in enumerate(messages) if b",f0=v,f1=v,f2=v," in message]
    assert len(messages[position]) <= 65507 and b"f999999=" not in messages[position]
    assert set(ids(messages[:position])) == set(trace_ids(before))
    assert ids(messages[position + 1:]) == trace_ids(after)  # the shard went on, in order
    assert "1 logs were longer than SYSLOG_MAX_MESSAGE_SIZE" in forwarder.stderr()
