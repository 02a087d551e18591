"""Encoding in tests: settings from a few variables, pulls written by hand (so the reader is checked
against another writer), and the messages the forwarder's encoder makes."""
import re

from hypothesis import strategies as st

import sync_waf_to_syslog as fwd
from tests.waf_logs import pull_body

RFC5424 = re.compile(rb"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (\S+) (.*)\Z", re.S)
BASE_ENV = dict(SLS_ENDPOINT="sls.example.test", SLS_REGION="cn-hangzhou", SLS_AK_ID="id", SLS_AK_KEY="secret",
                SLS_PROJECT="p", SLS_LOGSTORE="l", SYSLOG_HOST="syslog.example.test")


def make_settings(**env):
    """Settings from BASE_ENV and the given variables (keyword names are the variable names)."""
    return fwd.Settings.from_environment({**BASE_ENV, **env})


def encode(logs, **env):
    """fwd.Encoded for logs (dicts, tests/waf_logs.py) as one pull, with settings from env."""
    return fwd.MessageEncoder(make_settings(**env), procid=4242).encode(fwd.read_log_groups(pull_body(logs)))


def msg_of(message):
    """The MSG part of an RFC 5424 message (bytes), as text."""
    return RFC5424.match(message).group(8).decode("utf-8")


def bodies(logs, **env):
    """The MSG of each log's message, as text."""
    return [msg_of(message) for message in encode(logs, **env).messages]


def serialized(*fields):
    """Protobuf wire bytes of (field number, value) pairs: int -> varint, bytes -> length-delimited,
    ("fixed32", int) -> fixed32; written by hand, so the reader is checked against another writer."""
    def varint(number):
        out = bytearray()
        while True:
            out.append(number & 0x7F | (0x80 if number > 0x7F else 0))
            number >>= 7
            if not number:
                return bytes(out)
    out = b""
    for number, value in fields:
        if isinstance(value, int):
            out += varint(number << 3) + varint(value)
        elif isinstance(value, tuple):
            out += varint(number << 3 | 5) + value[1].to_bytes(4, "little")
        else:
            out += varint(number << 3 | 2) + varint(len(value)) + value
    return out


def pull_of(logs, topic=b"t", tags=(), nanoseconds=0):
    """A serialized LogGroupList of one LogGroup: logs are lists of raw (key, value) pairs."""
    group = serialized(
        *((1, serialized((1, 1_795_000_000 + i), *((2, serialized((1, k), (2, v))) for k, v in pairs),
                         (4, ("fixed32", nanoseconds))))
          for i, pairs in enumerate(logs)),
        (3, topic), (4, b"src"), *((6, serialized((1, k), (2, v))) for k, v in tags))
    return serialized((1, group))


def text(raw):
    return raw.decode("utf-8", "replace")


RAW_TEXT = st.one_of(st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
                     st.binary(max_size=20),  # valid UTF-8, or not
                     st.sampled_from([b"\\", b"a|", b"x\x00y", b"\x00", b"%s", b"%", b"\xe4\xb8", b"\xe4\xb8,"]))
