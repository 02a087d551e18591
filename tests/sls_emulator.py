"""A local Alibaba Cloud Log Service (SLS) emulator that the unmodified SDK cannot tell from SLS.

It speaks the SLS REST wire protocol (as aliyun-log-python-sdk speaks it) for one project with one
logstore: PutLogs, ListShards, GetCursor, GetCursorTime, PullLogs, consumer groups (create /
update / list / delete, heartbeat with shard balancing and consumer expiry, checkpoints, in-order
consumption), with v1 and v4 signature verification, SLS-format errors, fault injection, shard
split and merge (admin routes) and state inspection.

Running it
----------
    python tests/sls_emulator.py --port 0 --project NAME --logstore NAME --shards N \\
        --access-key-id ID --access-key-secret SECRET [--load FILE.jsonl ...] [--group-size N]
        [--load-cache DIR]

The first stdout line (flushed) is `SLS_EMULATOR_ADDR=127.0.0.1:PORT`. It serves until SIGTERM or
SIGINT and then exits 0. Clients reach it through an HTTP proxy setting, so no DNS or root is
needed: `HTTP_PROXY=http://127.0.0.1:PORT` with a fake endpoint such as `http://sls.emulator.test`
(NO_PROXY must not match that host). The project is the first label of the `Host` header.
`python tests/playground.py` runs it for the real forwarder CLI, with realistic logs, a syslog
receiver and a `.env.playground` holding these settings (README.md, "Trying it locally").

Log format (--load, POST /_emulator/logs, add_logs)
---------------------------------------------------
One JSON object per line, every value a string. `__time__` becomes Log.Time (now if absent),
`__time_ns_part__` Log.Time_ns, `__topic__` / `__source__` the LogGroup Topic / Source,
`__tag__:K` the LogGroup tag K; every other key is a content field, in file order. Consecutive
logs with the same topic, source and tags share a LogGroup (at most --group-size logs, default
100); LogGroups go to the read-write shards round-robin.
Invalid UTF-8 extension: strings are encoded with `surrogateescape`, so a lone surrogate
U+DC80..U+DCFF (JSON `"\\udcff"`, or a raw invalid byte in a --load file) is stored as the raw byte
0x80..0xFF. That is how tests express invalid UTF-8 in JSONL.
Receive time (what GetCursor with a unix time and GetCursorTime use): --load treats the file as
history, so a LogGroup counts as received at its first log's `__time__`; logs put over HTTP
(PutLogs or POST /_emulator/logs) are received now. Receive times never decrease within a shard.

Admin routes (origin-form, no signature; call them without the proxy)
----------------------------------------------------------------------
GET    /_emulator/state   JSON: {"project", "logstores": {LOGSTORE: {"shards": {"0": {
                          "status", "parents": [id], "children": [id], "begin_cursor",
                          "end_cursor", "logs", "groups", "expired_logs"}},
                          "consumer_groups": {CG: {"timeout", "order", "consumers": {NAME: [shard]},
                          "heartbeats": {NAME: {"seconds_ago", "listed", "releasing"}},
                          "checkpoints": {"0": C}, "checkpoint_consumers": {"0": NAME}}}}},
                          "requests": {op: n}, "errors": {errorCode: n}, "faults": [fault...],
                          "temporary_credentials": {AKID: {"expiration", "expired"}},
                          "requests_by_access_key": {AKID: n}, "requests_by_signature": {"v1"
                          or "v4 REGION": n}, "refusals_by_access_key": {AKID: {reason: n}},
                          "processors": {NAME: SPL}, "spl": {"pulls", "raw_logs", "result_logs",
                          "failed_logs"}}
                          ("logs" counts the logs between the begin and end cursors;
                          "requests_by_access_key" and "requests_by_signature" count the requests
                          that passed authentication, permanent key included (a v4 signature by
                          the region it names), refusal reasons are below; "spl" counts the pulls
                          with a statement and the logs they read, returned and failed on.)
POST   /_emulator/faults  body: one fault object or a list of them; answers {"faults": [...]}.
DELETE /_emulator/faults  removes every fault.
POST   /_emulator/logs    body: JSONL as above, received now; answers {"logs": n, "groups": g}.
POST   /_emulator/expire  body {"shard": N, "groups": K}: the TTL drops the shard's K oldest
                          LogGroups (the begin cursor moves), so older cursors become InvalidCursor.
POST   /_emulator/split   body {"shard": N} or {"shard": N, "splitKey": "32 hex digits"}: split a
                          read-write shard (see "Shards" below); answers the listings as
                          SplitShard does: [the shard, now readonly, new shard, new shard].
POST   /_emulator/merge   body {"shard": N}: merge it with the next read-write shard; answers
                          [the new shard, shard N, the other shard] as MergeShards does.
POST   /_emulator/credentials  body {"access_key_id", "access_key_secret", "security_token",
                          "expiration" (unix seconds)}: accept a temporary credential (see below);
                          answers {"access_key_id", "expiration"}. An AKID can be added once.
POST   /_emulator/processors  body {"name": NAME, "spl": SPL}: defines or replaces a consume
                          processor (see below); an invalid statement is 400 ParameterInvalid.

A fault object (every key but "op" optional):
    {"op": "pull|heartbeat|checkpoint|get_checkpoint|cursor|cursor_time|put|list_shards|
            list_cg|create_cg|update_cg|delete_cg|any",
     "action": "error" (default) | "invalid_cursor" (400 InvalidCursor) | "drop" (close the
               connection without an answer) | "delay" (only the latency, then the normal answer)
               | "replace" (the normal answer, changed as "headers" and "body" say: answers no
               real SLS sends, a forger's or a broken proxy's, to test a client's defences),
     "status": 500, "errorCode": "InternalServerError", "errorMessage": "...",  (for "error")
     "headers": {"name": "value" or null}, set over the answer's headers (names matched without
               regard to case; null removes one), "body": base64 of the bytes sent instead of
               the answer's body; Content-Length follows the body  (for "replace"),
     "latency": seconds to wait before acting,
     "count": apply to the next N matching requests only,
     "fraction": apply to this share of matching requests, deterministically (0.25 = every 4th),
     "shard": only requests naming this shard (pull, cursor, cursor_time, checkpoint,
              get_checkpoint), "consumer": only requests with this consumer (heartbeat, checkpoint),
     "duration": seconds after which the fault is inactive}
The first active matching fault applies, after the signature check. Remember that the SDK
retries 5xx answers 10 times, 1 s apart. It retries a dropped connection the same way, but only
because clients come through the proxy setting: urllib3 then reports "HTTPConnectionPool(...)
ProxyError", which the SDK treats as retryable; a direct connection to real SLS would report
"Connection aborted", which it does not retry.

Shards: split, merge, in-order consumption
------------------------------------------
Each shard covers the MD5 hash keys [inclusiveBeginKey, exclusiveEndKey); the initial shards
divide the key space evenly. A split turns a read-write shard read-only and creates two
read-write shards for [begin, splitKey) and [splitKey, end) (default splitKey: the middle). A
merge turns shard N and the read-write shard whose keys start where N's end read-only and
creates one shard for both ranges. New shards take the next ids after the largest (2 for a
split, 1 for a merge), their own cursor range and createTime now. A read-only shard keeps its
data and its end cursor: GetCursor and PullLogs work on it (at the end: 0 LogGroups, next cursor
== cursor), but writes never reach it: PutLogs (shards/lb round-robin, shards/route?key= by hash
key), --load and /_emulator/logs use the read-write shards only. ListShards lists every shard.
Errors, all 400 ParameterInvalid: "invalid shard id" (unknown or read-only shard), "invalid mid
hash" (split key not strictly inside the range), "can not merge the last shard" (no read-write
shard follows).

Consumer groups follow SLS's per-shard state machine. A read-only shard is consumed ("over")
once the group's checkpoint for it equals its end cursor, and is then assigned to nobody; until
then it is assigned like any shard, even one that never held data, so some consumer must write
that checkpoint (the Python SDK 0.9.52 does so only when its shard consumer shuts down: see
tests/test_emulator_shards.py). Moving the checkpoint back makes it assignable again. With
"order": true a shard is assigned only once all its ancestors (parents, their parents, ...) are
consumed ("wait"); without, new shards are assigned at once. Quotas count assignable shards
only. A shard taken from a live consumer is in transfer: nobody else gets it until that
consumer's heartbeat stops listing it or the consumer expires.

Sources: SplitShard https://www.alibabacloud.com/help/en/sls/developer-reference/api-sls-2020-12-30-splitshard
and, with its errors and example (33 -> 163, 164), http://help.aliyun.com/document_detail/29021.html;
MergeShards (the server finds the next adjacent shard; example 30 + 166 -> 167)
https://www.alibabacloud.com/help/doc-detail/29022.htm, its errors in the copy at
https://developer.aliyun.com/ask/213612; the SDK pages ("" splits evenly; merge takes the first
of two adjacent read-write shards) https://www.alibabacloud.com/help/en/sls/developer-reference/split-shard-by-sdk
and .../merge-shard-by-sdk; statuses .../api-sls-2020-12-30-struct-shard; order
.../api-sls-2020-12-30-struct-consumergroup; the state machine (already_alloc, not_alloc, wait,
transfer, over) in "Finite state automaton", README_EN.md of github.com/aliyun/aliyun-log-consumer-java;
empty read-only shards stay assigned until checkpointed: aliyun-log-go-sdk pull request 98,
aliyun-log-python-sdk issue 126.

Known differences from SLS:
- Split and merge are admin routes only: SplitShard / MergeShards (POST shards/{id}?action=...,
  LogClient.split_shard / merge_shard) and DeleteShard are not served, a split makes exactly two
  shards (no shardCount), and SLS's automatic splitting does not happen.
- "Next ids after the largest" fits the documented examples; the rule itself is not documented.
  Which code SLS gives an unknown or read-only shard is not documented beyond "invalid shard id".
- A read-only shard counts as consumed whenever its checkpoint equals its end cursor. The
  state-machine notes only say that UpdateCheckpoint checks this; a checkpoint already at the end
  when the shard turned read-only is assumed to count too, because the Java, Go and Python
  consumers never write the checkpoint they last wrote again.
- PullLogs sends no `x-log-end-of-cursor` header (SLS sends "1" at the end of the data; the Java
  consumer paces idle fetches with it, the Python SDK ignores it).
- Heartbeat: an unknown consumer with a non-empty body is registered silently where SLS documents
  400 NotExistConsumerWithBody; a shard in transfer goes to whichever under-quota consumer
  heartbeats first once the holder lets go, not to a "next consumer" chosen at the transfer.

Authentication
--------------
Requests are signed with v1 (`LOG AKID:signature`) or v4 (`SLS4-HMAC-SHA256`) and checked against
the permanent AccessKey pair given at start (which ignores any x-acs-security-token) or a temporary
one added with add_credentials. A temporary AccessKey needs its exact `x-acs-security-token` and is
refused from its expiration on. Refusals, as Alibaba documents them ("Simple Log Service: Error
codes", https://www.alibabacloud.com/help/en/sls/developer-reference/error-codes; the search
excerpt of that page stopped before its table, so the rows were read from Alibaba's copy of it in
aliyun/alibabacloud-observability-mcp-server, v1/src/mcp_server_aliyun_observability/api_error.py),
with the reason `refusals_by_access_key` counts them under:
    unknown AKID          401 Unauthorized "AccessKeyId not found: AKID"        unknown_key
    temporary, no token   401 Unauthorized "AccessKeyId not found: AKID"        token_missing
    wrong token           401 Unauthorized "The security token you provided is invalid."  token_invalid
    expired token         401 Unauthorized "The security token you provided has expired." token_expired
    bad signature         403 SignatureNotMatch (message without the token)      signature
Assumptions: the docs do not say what a temporary AKID without its token gets; real STS keys are
found through their token, so the emulator answers as for an unknown key. The token is checked
before the expiration and both before the signature (a token carries its key's secret). The docs
table gives SignatureNotMatch status 401, but this emulator has always answered 403 and its tests
rely on it. The SDK retries neither and does not count SignatureNotMatch as an auth error (its
credentials refresher looks for Unauthorized, InvalidAccessKeyId or SecurityToken in errorCode or
message); only the consumer's fetch task differs: it sleeps 5 s after any 403.

Python API (tests and benchmarks)
---------------------------------
SlsEmulator(project, logstore, shards, access_key_id, access_key_secret, port=0, group_size=100):
    in-process server; start() / stop() / context manager, .port, .addr, .endpoint,
    .client_env(), add_logs(logs, receive_time=None), load_logs(logs), state(), inject(**fault),
    clear_faults(), expire(shard, groups), split(shard, split_key=None), merge(shard),
    add_credentials(access_key_id, access_key_secret, security_token, expiration),
    add_processor(name, spl).
EmulatorProcess(...): the CLI in a subprocess, same client-side methods through the admin routes.
log_client(emulator, ...): a real `aliyun.log.LogClient` for it (the proxy comes from the
    environment: apply `emulator.client_env()` to os.environ first).

Rule-based consumption (SPL)
----------------------------
A pull with `query=<spl>` (the SDK adds `pullMode=scan_on_stream`; the emulator ignores that
parameter) or `processor=<name>` gets the pulled LogGroups processed by the statement. spl.py
is the engine; its docstring lists the SPL subset and its typing and null rules. Per pull:
  * the statement is checked once (syntax and types): an invalid one is 400 ParameterInvalid
    "invalid query: line L:C: ...", an unknown processor 404 ConsumeProcessorNotExist, both
    query and processor 400 ParameterInvalid;
  * `count` and the size cap apply to the LogGroups read; `x-log-cursor` moves past all of them,
    whatever the statement kept;
  * each LogGroup's logs are processed; those kept are written back as LogGroups (consecutive
    logs with equal topic, source and tags share one, so a LogGroup normally stays one); a
    LogGroup left without logs is not sent at all; a log the statement fails on (a cast of
    'abc' to bigint) is dropped and counted;
  * headers: `x-log-count` / `x-log-bodyrawsize` describe the processed body (0 / 0 when nothing
    is left); `x-log-rawdatacount` / `x-log-rawdatasize` the LogGroups read and their raw size
    (the SDK throttles on these when it sends a query or processor); `x-log-rawdatalines`,
    `x-log-resultlines`, `x-log-failedlines` the logs read, returned and failed on.
Sources: PullLogs https://help.aliyun.com/zh/sls/developer-reference/api-sls-2020-12-30-pulllogs
(the query parameter), "Consume Processor" https://www.alibabacloud.com/help/en/sls/data-consumption-processor,
PutConsumeProcessor https://help.aliyun.com/zh/sls/developer-reference/api-sls-2020-12-30-putconsumeprocessor
({"configuration": {"spl": ...}}); the header names and meanings from the SDKs: Python
pulllog_response.py and consumer/shard_worker.py, Java PullLogsResponse (x-log-count must equal
the LogGroups in the body), Go log_store.go/model.go (rawdatalines, resultlines, failedlines);
the error text format from an SLS answer quoted in aliyun/alibabacloud-observability-mcp-server#41
("ParameterInvalid", "invalid query: line 1:60 mismatched input ...", for a GetLogs SPL query).
Not documented, so chosen here: emptied LogGroups are omitted (the Go consumer expects "empty
content (filter by query)"); a failing log is dropped rather than failing the pull; the error
codes for an invalid statement (ParameterInvalid, as for GetLogs) and an unknown processor
(ConsumeProcessorNotExist, after ConsumerGroupNotExist); query together with processor is an
error. Known differences from SLS: processors are defined through the admin route, not
PutConsumeProcessor (no display name, description, List/Get/Delete); only the subset of SPL in
spl.py, and a statement outside it is answered ParameterInvalid even where SLS would accept it;
LogGroup fields the emulator never writes (Category, MachineUUID) are dropped by processing;
no SPL length, pipeline-depth, memory or time limits.
"""
from __future__ import annotations

import argparse
import base64
import bisect
import ctypes
import functools
import hashlib
import hmac
import itertools
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Optional
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import lz4.block

if __package__:
    from . import spl
else:  # run as a script: tests/ is sys.path[0]
    import spl

ADDR_LINE_PREFIX = "SLS_EMULATOR_ADDR="
FAKE_ENDPOINT = "http://sls.emulator.test"

# Cursors are base64 of a decimal integer, one integer per LogGroup (19 digits, like SLS). Each
# shard gets its own range, so a cursor used on the wrong shard is an InvalidCursor.
CURSOR_BASE = 1_700_000_000_000_000_000
SHARD_CURSOR_STRIDE = 10 ** 12
MAX_PULL_COUNT = 1000
# A PullLogs answer stops early past this much raw protobuf (always at least one LogGroup), as
# SLS caps its answers too; clients follow the next cursor either way.
MAX_PULL_RAW_BYTES = 10 * 1024 * 1024
HASH_KEY_SPACE = 1 << 128

FAULT_OPS = ("pull", "heartbeat", "checkpoint", "get_checkpoint", "cursor", "cursor_time", "put",
             "list_shards", "list_cg", "create_cg", "update_cg", "delete_cg", "any")
FAULT_ACTIONS = ("error", "invalid_cursor", "drop", "delay", "replace")


class SlsError(Exception):
    """An SLS error answer: HTTP status plus JSON errorCode / errorMessage."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


# ---------------------------------------------------------------------------------------------
# Protobuf (LogGroup / LogGroupList, proto2; see §6), written and scanned by hand so the emulator
# does not share the SDK's serialisation code it is testing.

_ONE_BYTE_VARINTS = [bytes((i,)) for i in range(0x80)]


def _varint(value: int) -> bytes:
    if value < 0x80:  # most keys and values are short: skip the loop
        return _ONE_BYTE_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def _encode_log_group(logs: list, topic: Optional[bytes], source: Optional[bytes],
                      tags: tuple) -> bytes:
    parts = [_length_delimited(1, log) for log in logs]
    if topic is not None:
        parts.append(_length_delimited(3, topic))
    if source is not None:
        parts.append(_length_delimited(4, source))
    for key, value in tags:
        parts.append(_length_delimited(6, _length_delimited(1, key) + _length_delimited(2, value)))
    return b"".join(parts)


def _read_varint(data: bytes, pos: int) -> tuple:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _scan(message: bytes):
    """(field number, wire type, start, end) of each field of a protobuf message, where
    message[start:end] is the value; ValueError if it is not well-formed protobuf."""
    pos = 0
    while pos < len(message):
        key, pos = _read_varint(message, pos)
        wire_type = key & 7
        if wire_type == 0:
            end = _read_varint(message, pos)[1]
        elif wire_type == 2:
            length, pos = _read_varint(message, pos)
            end = pos + length
        elif wire_type in (1, 5):
            end = pos + (8 if wire_type == 1 else 4)
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if end > len(message):
            raise ValueError("field runs past the end")
        yield key >> 3, wire_type, pos, end
        pos = end


def count_logs(log_group: bytes) -> int:
    """Number of Logs in a serialized LogGroup; ValueError if it is not well-formed protobuf."""
    return sum(1 for number, wire_type, _, _ in _scan(log_group) if (number, wire_type) == (1, 2))


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")  # raw 0x80..0xFF survive as U+DC80..U+DCFF


def _decode_log_group(log_group: bytes) -> list:
    """The Logs of a serialized LogGroup as spl.Log, each with the group's topic, source and tags
    (fields the emulator never writes, such as Category, are skipped)."""
    logs, topic, source, tags = [], None, None, []
    for number, wire_type, start, end in _scan(log_group):
        value = log_group[start:end]
        if (number, wire_type) == (1, 2):
            logs.append(_decode_log(value))
        elif (number, wire_type) == (3, 2):
            topic = _text(value)
        elif (number, wire_type) == (4, 2):
            source = _text(value)
        elif (number, wire_type) == (6, 2):
            tags.append(_decode_pair(value))
    for log in logs:
        log.topic, log.source, log.tags = topic, source, list(tags)
    return logs


def _decode_log(message: bytes) -> spl.Log:
    log = spl.Log(time=0)
    for number, wire_type, start, end in _scan(message):
        if (number, wire_type) == (1, 0):
            log.time = _read_varint(message, start)[0]
        elif (number, wire_type) == (2, 2):
            log.contents.append(_decode_pair(message[start:end]))
        elif (number, wire_type) == (4, 5):
            log.time_ns = int.from_bytes(message[start:end], "little")
    return log


def _decode_pair(message: bytes) -> tuple:
    """(Key = 1, Value = 2) of a Log.Content or LogTag."""
    pair = {number: _text(message[start:end]) for number, _, start, end in _scan(message)}
    return pair.get(1, ""), pair.get(2, "")


def _encode_logs(logs: list) -> list:
    """Serialized LogGroups of spl.Logs: consecutive logs with equal topic, source and tags share one."""
    groups = []
    for (topic, source, tags), members in itertools.groupby(
            logs, key=lambda log: (log.topic, log.source, tuple(log.tags))):
        groups.append(_encode_log_group(
            [_log_message(log.time, log.time_ns, log.contents) for log in members],
            None if topic is None else _wire(topic), None if source is None else _wire(source),
            tuple((_wire(key), _wire(value)) for key, value in tags)))
    return groups


def _frame(log_group: bytes) -> bytes:
    """The LogGroup as one `LogGroups` entry of a LogGroupList, so answers are concatenations."""
    return b"\x0a" + _varint(len(log_group)) + log_group


def _unframe(frame: bytes) -> bytes:
    return frame[_read_varint(frame, 1)[1]:]


# ---------------------------------------------------------------------------------------------
# Logs as dicts of strings (JSONL) -> serialized LogGroups.

@dataclass
class EncodedGroup:
    raw: bytes          # serialized LogGroup
    log_count: int
    first_time: int     # __time__ of its first log: the receive time when loaded as history


def _wire(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # lone U+DC80..U+DCFF -> raw 0x80..0xFF


@functools.lru_cache(maxsize=4096)
def _key_field(key: str) -> bytes:
    """A content key as the encoded `Key = 1` field (cached: every log repeats the same keys)."""
    return _length_delimited(1, _wire(key))


def encode_log_groups(logs: Iterable[dict], group_size: int):
    """Yield LogGroups of consecutive logs with equal topic/source/tags (up to group_size)."""
    current_key, current_logs, first_time = None, [], 0
    for number, log in enumerate(logs, 1):
        try:
            encoded, log_time, key = _encode_log(log)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"log {number}: {exc}") from None
        if current_logs and (key != current_key or len(current_logs) >= group_size):
            yield EncodedGroup(_encode_log_group(current_logs, *current_key), len(current_logs), first_time)
            current_logs = []
        if not current_logs:
            current_key, first_time = key, log_time
        current_logs.append(encoded)
    if current_logs:
        yield EncodedGroup(_encode_log_group(current_logs, *current_key), len(current_logs), first_time)


def _encode_log(log: dict) -> tuple:
    """(serialized Log, its time, its LogGroup key (topic, source, tags)) for one log dict."""
    if not isinstance(log, dict):
        raise TypeError("a log must be a JSON object")
    log_time, time_ns, topic, source, tags, contents = int(time.time()), None, None, None, [], []
    for key, value in log.items():
        if type(value) is not str:
            raise TypeError(f"value of {key!r} must be a string, not {type(value).__name__}")
        if key == "__time__":
            log_time = _unsigned(key, value, 2 ** 32 - 1)
        elif key == "__time_ns_part__":
            time_ns = _unsigned(key, value, 999_999_999)
        elif key == "__topic__":
            topic = _wire(value)
        elif key == "__source__":
            source = _wire(value)
        elif key.startswith("__tag__:"):
            tags.append((_wire(key[len("__tag__:"):]), _wire(value)))
        else:
            contents.append((key, value))
    return _log_message(log_time, time_ns, contents), log_time, (topic, source, tuple(tags))


def _log_message(log_time: int, time_ns: Optional[int], contents: list) -> bytes:
    """A serialized Log: Time = 1, then Contents = 2 ({Key, Value}) in order, then Time_ns = 4."""
    parts = [b"\x08", _varint(log_time)]
    for key, value in contents:
        value_bytes = _wire(value)
        content = _key_field(key) + b"\x12" + _varint(len(value_bytes)) + value_bytes
        parts += (b"\x12", _varint(len(content)), content)
    if time_ns is not None:
        parts.append(b"\x25" + time_ns.to_bytes(4, "little"))  # fixed32
    return b"".join(parts)


def _unsigned(key: str, value: str, maximum: int) -> int:
    if not value.isdigit() or int(value) > maximum:
        raise ValueError(f"{key} must be an integer from 0 to {maximum}, got {value!r}")
    return int(value)


def cached_log_groups(path: str, group_size: int, cache_dir: str):
    """The LogGroups of a JSONL file, encoded once into cache_dir (under a name made of the file's
    name, size, modification time and the group size) and read from there while the file stays
    unchanged: a benchmark loads the same backlog of hundreds of thousands of logs again and again.
    Record: little-endian u32 size, u32 log count, u64 first time, then the serialized LogGroup."""
    info = os.stat(path)
    cache = os.path.join(cache_dir, f"{os.path.basename(path)}-{info.st_size}-{info.st_mtime_ns}"
                                    f"-groups{group_size}.bin")
    if not os.path.exists(cache):
        temporary = f"{cache}.tmp{os.getpid()}"
        try:
            with open(temporary, "wb") as out:
                for group in encode_log_groups(iter_jsonl_file(path), group_size):
                    out.write(struct.pack("<IIQ", len(group.raw), group.log_count, group.first_time) + group.raw)
            os.replace(temporary, cache)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    with open(cache, "rb") as source:
        while header := source.read(16):
            size, log_count, first_time = struct.unpack("<IIQ", header)
            yield EncodedGroup(source.read(size), log_count, first_time)


def iter_jsonl(lines: Iterable[str], origin: str):
    """The logs of JSONL lines (blank lines skipped); errors name origin and line number."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{origin}:{number}: {exc}") from None


def iter_jsonl_file(path: str):
    """The logs of a JSONL file, streamed: a big file never sits in memory as dicts."""
    # surrogateescape: raw invalid UTF-8 bytes in the file survive as the same bytes on the wire.
    with open(path, encoding="utf-8", errors="surrogateescape") as source:
        yield from iter_jsonl(source, path)


# ---------------------------------------------------------------------------------------------
# Cursors.

def encode_cursor(shard_id: int, index: int) -> str:
    return base64.b64encode(str(CURSOR_BASE + shard_id * SHARD_CURSOR_STRIDE + index).encode()).decode()


def _cursor_number(cursor: str) -> int:
    """The integer inside a cursor; SlsError InvalidCursor if it is not base64 of digits."""
    text = cursor.strip()
    try:
        digits = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        if digits.isdigit():
            return int(digits)
    except ValueError:
        pass
    raise SlsError(400, "InvalidCursor", f"cursor {cursor!r} is not a valid cursor")


# ---------------------------------------------------------------------------------------------
# Storage and consumer-group state (all guarded by the service lock).

class Shard:
    """One shard: an append-only list of framed LogGroups, indexed by cursor position, covering
    the hash keys [begin_key, end_key). A split or merge seals it: it turns read-only, its end
    cursor stays where it is, and `children` name the shards that take its keys over."""

    def __init__(self, shard_id: int, begin_key: int, end_key: int, parents: tuple = ()):
        self.id = shard_id
        self.begin_key, self.end_key = begin_key, end_key
        self.parents = parents          # the shards it was split or merged from
        self.children: list = []
        self.writable = True
        self.create_time = int(time.time())
        self.frames: list = []          # _frame(LogGroup) per cursor position
        self.receive_times: list = []   # non-decreasing
        self.log_totals = [0]           # log_totals[i] = logs in LogGroups [0, i)
        self.begin = 0                  # first retained position (moved by the TTL)

    @property
    def end(self) -> int:
        return len(self.frames)

    @property
    def status(self) -> str:
        return "readwrite" if self.writable else "readonly"

    def seal(self, children: list):
        self.writable, self.children = False, [child.id for child in children]

    def append(self, log_group: bytes, log_count: int, receive_time: float):
        self.frames.append(_frame(log_group))
        last = self.receive_times[-1] if self.receive_times else receive_time
        self.receive_times.append(max(last, receive_time))
        self.log_totals.append(self.log_totals[-1] + log_count)

    def cursor(self, index: int) -> str:
        return encode_cursor(self.id, index)

    def index(self, cursor: str) -> int:
        """Position of a cursor in [begin, end]; SlsError InvalidCursor otherwise."""
        index = _cursor_number(cursor) - CURSOR_BASE - self.id * SHARD_CURSOR_STRIDE
        if not self.begin <= index <= self.end:
            raise SlsError(400, "InvalidCursor",
                           f"cursor {cursor.strip()} is out of range for shard {self.id}")
        return index

    def is_end(self, cursor: str) -> bool:
        try:
            return self.index(cursor) == self.end
        except SlsError:
            return False

    def index_at(self, unix_time: int) -> int:
        """First retained LogGroup received at or after unix_time (end if none)."""
        return max(self.begin, bisect.bisect_left(self.receive_times, unix_time))

    def describe(self) -> dict:
        return {
            "status": self.status,
            "parents": list(self.parents),
            "children": self.children,
            "begin_cursor": self.cursor(self.begin),
            "end_cursor": self.cursor(self.end),
            "logs": self.log_totals[self.end] - self.log_totals[self.begin],
            "groups": self.end - self.begin,
            "expired_logs": self.log_totals[self.begin],
        }

    def listing(self) -> dict:
        return {"shardID": self.id, "status": self.status,
                "inclusiveBeginKey": f"{self.begin_key:032x}",
                "exclusiveEndKey": f"{min(self.end_key, HASH_KEY_SPACE - 1):032x}",
                "createTime": self.create_time}


@dataclass
class Consumer:
    name: str
    last_seen: float
    listed: set = field(default_factory=set)     # shards in its last heartbeat body
    held: set = field(default_factory=set)       # shards the server assigns to it
    releasing: set = field(default_factory=set)  # taken from it, maybe still being consumed


@dataclass
class Checkpoint:
    cursor: str
    consumer: str
    update_time_us: int


class ConsumerGroup:
    def __init__(self, name: str, timeout: int, order: bool):
        self.name, self.timeout, self.order = name, timeout, order
        self.consumers: dict = {}
        self.checkpoints: dict = {}

    def heartbeat(self, name: str, listed: set, shards: list, now: float) -> list:
        consumer = self.consumers.setdefault(name, Consumer(name, now))
        consumer.last_seen, consumer.listed = now, listed
        consumer.releasing &= listed  # a shard no longer listed has drained (checkpoint saved)
        self.expire_consumers(now)
        self._rebalance(consumer, self.assignable(shards))
        return sorted(consumer.held)

    def expire_consumers(self, now: float):
        for name in [name for name, c in self.consumers.items() if now - c.last_seen > self.timeout]:
            del self.consumers[name]

    def finished(self, shard: Shard) -> bool:
        """A read-only shard whose checkpoint is its end cursor is consumed; one without data
        needs that checkpoint too."""
        checkpoint = self.checkpoints.get(shard.id)
        return not shard.writable and checkpoint is not None and shard.is_end(checkpoint.cursor)

    def assignable(self, shards: list) -> list:
        """Ids of the shards to share out (`shards` is indexed by id): every shard not finished;
        with `order`, only those whose ancestors are all finished."""
        finished = {s.id for s in shards if self.finished(s)}

        def ancestors_finished(shard: Shard) -> bool:
            return all(p in finished and ancestors_finished(shards[p]) for p in shard.parents)

        return [s.id for s in shards
                if s.id not in finished and (not self.order or ancestors_finished(s))]

    def _rebalance(self, caller: Consumer, assignable: list):
        """Even split of the assignable shards. Consumers holding more keep the larger quotas, so
        few shards move. Over-quota consumers lose shards at once (they learn it on their next
        heartbeat), and so do holders of shards no longer assignable, but only the heartbeating
        consumer gains shards, and never one in transfer: taken from another live consumer that
        still lists it (SLS's `transfer` state: the holder gives it up in a heartbeat first)."""
        consumers = sorted(self.consumers.values(), key=lambda c: (-len(c.held), c.name))
        base, extra = divmod(len(assignable), len(consumers))
        quota = {c.name: base + (i < extra) for i, c in enumerate(consumers)}
        for c in consumers:
            kept = set(sorted(c.held.intersection(assignable))[:quota[c.name]])
            c.releasing |= c.held - kept
            c.held = kept
        owned = set().union(*(c.held for c in consumers))
        in_transfer = set().union(*(c.releasing for c in consumers if c is not caller))
        for shard in assignable:
            if len(caller.held) >= quota[caller.name]:
                break
            if shard not in owned and shard not in in_transfer:
                caller.held.add(shard)
        caller.releasing -= caller.held  # given back to the consumer that was draining it

    def describe(self, now: float) -> dict:
        return {
            "timeout": self.timeout,
            "order": self.order,
            "consumers": {name: sorted(c.held) for name, c in sorted(self.consumers.items())},
            "heartbeats": {name: {"seconds_ago": round(now - c.last_seen, 3),
                                  "listed": sorted(c.listed), "releasing": sorted(c.releasing)}
                           for name, c in sorted(self.consumers.items())},
            "checkpoints": {str(s): cp.cursor for s, cp in sorted(self.checkpoints.items())},
            "checkpoint_consumers": {str(s): cp.consumer
                                     for s, cp in sorted(self.checkpoints.items())},
        }


# ---------------------------------------------------------------------------------------------
# Fault injection.

@dataclass
class Fault:
    id: int
    op: str
    action: str
    status: int
    error_code: str
    error_message: str
    latency: float
    count: Optional[int]
    fraction: Optional[float]
    shard: Optional[int]
    consumer: Optional[str]
    expires_at: Optional[float]
    headers: dict = field(default_factory=dict)  # "replace": name -> value, or None to remove it
    body: Optional[bytes] = None                 # "replace": the body sent instead
    matched: int = 0   # matching requests seen while active
    applied: int = 0

    SPEC_KEYS = {"op", "action", "status", "errorCode", "errorMessage", "latency", "count",
                 "fraction", "shard", "consumer", "duration", "headers", "body"}

    @classmethod
    def from_spec(cls, spec: dict, fault_id: int, now: float) -> "Fault":
        if not isinstance(spec, dict):
            raise ValueError("a fault must be a JSON object")
        unknown = set(spec) - cls.SPEC_KEYS
        if unknown:
            raise ValueError(f"unknown fault keys {sorted(unknown)}; allowed: {sorted(cls.SPEC_KEYS)}")
        op, action = spec.get("op"), spec.get("action", "error")
        if op not in FAULT_OPS:
            raise ValueError(f"op must be one of {FAULT_OPS}, got {op!r}")
        if action not in FAULT_ACTIONS:
            raise ValueError(f"action must be one of {FAULT_ACTIONS}, got {action!r}")
        defaults = ((400, "InvalidCursor", "cursor is invalid (injected fault)")
                    if action == "invalid_cursor"
                    else (500, "InternalServerError", "injected fault"))
        status = spec.get("status", defaults[0])
        if not isinstance(status, int) or not 300 <= status <= 599:
            raise ValueError(f"status must be an int from 300 to 599, got {status!r}")
        fraction = spec.get("fraction")
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        count = spec.get("count")
        if count is not None and (not isinstance(count, int) or count < 0):
            raise ValueError(f"count must be a non-negative int, got {count!r}")
        duration = spec.get("duration")
        headers = spec.get("headers", {})
        if not isinstance(headers, dict) or not all(
                isinstance(name, str) and (value is None or isinstance(value, str))
                for name, value in headers.items()):
            raise ValueError(f"headers must map names to strings or null, got {headers!r}")
        body = spec.get("body")
        return cls(id=fault_id, op=op, action=action, status=status,
                   error_code=str(spec.get("errorCode", defaults[1])),
                   error_message=str(spec.get("errorMessage", defaults[2])),
                   latency=float(spec.get("latency", 0)), count=count, fraction=fraction,
                   shard=spec.get("shard"), consumer=spec.get("consumer"),
                   expires_at=None if duration is None else now + float(duration),
                   headers=headers, body=None if body is None else base64.b64decode(body, validate=True))

    def active(self, now: float) -> bool:
        return ((self.count is None or self.applied < self.count)
                and (self.expires_at is None or now < self.expires_at))

    def matches(self, op: str, shard: Optional[int], consumer: Optional[str]) -> bool:
        return (self.op in ("any", op)
                and (self.shard is None or self.shard == shard)
                and (self.consumer is None or self.consumer == consumer))

    def replace(self, reply: "Reply") -> "Reply":
        """The answer changed as a "replace" fault says."""
        for name, value in self.headers.items():
            for existing in [key for key in reply.headers if key.lower() == name.lower()]:
                del reply.headers[existing]
            if value is not None:
                reply.headers[name] = value
        if self.body is not None:
            reply.body = self.body
        return reply

    def take(self) -> bool:
        """Count a matching request; True if the fault applies to it."""
        self.matched += 1
        if self.fraction is not None and \
                int(self.matched * self.fraction) == int((self.matched - 1) * self.fraction):
            return False
        self.applied += 1
        return True

    def describe(self, now: float) -> dict:
        return {"id": self.id, "op": self.op, "action": self.action, "status": self.status,
                "errorCode": self.error_code, "errorMessage": self.error_message,
                "latency": self.latency, "count": self.count, "fraction": self.fraction,
                "shard": self.shard, "consumer": self.consumer, "headers": self.headers,
                "body_bytes": None if self.body is None else len(self.body),
                "seconds_left": None if self.expires_at is None else round(self.expires_at - now, 3),
                "active": self.active(now), "matched": self.matched, "applied": self.applied}


# ---------------------------------------------------------------------------------------------
# The service: the SLS protocol on top of the state, independent of the HTTP transport.

@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    drop: bool = False  # close the connection without answering

    @classmethod
    def json(cls, value, status: int = 200) -> "Reply":
        return cls(status, json.dumps(value).encode(), {"Content-Type": "application/json"})


@dataclass
class Route:
    op: str
    handler: Callable
    shard: Optional[str] = None
    group: Optional[str] = None


def _is_signed_header(lower_name: str) -> bool:
    return lower_name.startswith("x-acs-") or (
        lower_name.startswith("x-log-") and not lower_name.startswith("x-log-meta-"))


def _hmac(key: bytes, message: str, digest) -> bytes:
    return hmac.new(key, message.encode(), digest).digest()


@dataclass
class TemporaryCredential:
    """A temporary AccessKey's secret and STS token (never shown), accepted until expiration."""
    secret: str = field(repr=False)
    security_token: str = field(repr=False)
    expiration: float  # unix seconds


@functools.lru_cache(maxsize=64)
def _parsed_statement(text: str) -> spl.Statement:
    """A consumer sends the same query with every pull: parse each text once."""
    return spl.parse_statement(text)


class SlsService:
    """One SLS project with one logstore of `shards` shards, checked against one permanent
    AccessKey pair and the temporary ones added with add_credentials."""

    def __init__(self, project: str, logstore: str, shards: int, access_key_id: str,
                 access_key_secret: str, group_size: int = 100):
        if shards < 1 or group_size < 1:
            raise ValueError("shards and group_size must be at least 1")
        self.project, self.logstore = project, logstore
        self.access_key_id, self.access_key_secret = access_key_id, access_key_secret
        self.group_size = group_size
        self._lock = threading.Lock()
        # Shard ids are list positions: new shards get the next ids, and none is ever removed.
        self._shards = [Shard(i, i * HASH_KEY_SPACE // shards, (i + 1) * HASH_KEY_SPACE // shards)
                        for i in range(shards)]
        self._writable = list(self._shards)  # the shards that take new logs, by id
        self._groups: dict = {}
        self._faults: list = []
        self._next_fault_id = 1
        self._next_lb_shard = 0
        self._request_counts: dict = {}
        self._error_counts: dict = {}
        self._temporary_credentials: dict = {}   # AccessKey ID -> TemporaryCredential
        self._requests_by_access_key: dict = {}  # AccessKey ID -> authenticated requests
        self._requests_by_signature: dict = {}  # "v1" or "v4 REGION" -> authenticated requests
        self._refusals_by_access_key: dict = {}  # AccessKey ID -> {reason: refused requests}
        self._processors: dict = {}  # consume processor name -> spl.Statement
        self._spl_counts = {"pulls": 0, "raw_logs": 0, "result_logs": 0, "failed_logs": 0}

    # -- entry point ----------------------------------------------------------------------

    def handle(self, method: str, target: str, headers, body: bytes) -> Reply:
        """Answer one HTTP request. `target` may be origin-form or absolute-form (proxy)."""
        url = urlsplit(target)
        path = unquote(url.path)
        query = parse_qsl(url.query, keep_blank_values=True)
        try:
            if path.startswith("/_emulator/"):
                reply = self._admin(method, path, body)
            else:
                reply = self._sls(method, path, query, headers, body)
        except SlsError as error:
            with self._lock:
                self._error_counts[error.code] = self._error_counts.get(error.code, 0) + 1
            reply = Reply.json({"errorCode": error.code, "errorMessage": error.message},
                               error.status)
        except Exception as exc:  # a bug here must look like a server error, not hang the client
            traceback.print_exc()
            reply = Reply.json({"errorCode": "InternalServerError", "errorMessage": repr(exc)}, 500)
        reply.headers["x-log-requestid"] = uuid.uuid4().hex[:24].upper()
        return reply

    def _sls(self, method: str, path: str, query: list, headers, body: bytes) -> Reply:
        params = dict(query)
        route = self._route(method, path, params)
        with self._lock:
            self._request_counts[route.op] = self._request_counts.get(route.op, 0) + 1
        host = (headers.get("Host") or "").split(":")[0]
        if host.split(".")[0] != self.project:
            raise SlsError(404, "ProjectNotExist", f"The Project does not exist : {host.split('.')[0]}")
        self._authenticate(method, path, query, headers, body)
        fault = self._take_fault(route, params, body)
        if fault is not None:
            time.sleep(fault.latency)
            if fault.action == "drop":
                return Reply(drop=True)
            if fault.action == "replace":
                return fault.replace(route.handler(route, params, headers, body))
            if fault.action != "delay":
                raise SlsError(fault.status, fault.error_code, fault.error_message)
        return route.handler(route, params, headers, body)

    # (collection, names an item, method, type or None when type is ignored) -> op
    _ROUTES = {
        ("shards", False, "GET", None): "list_shards",
        ("shards", True, "GET", "cursor"): "cursor",
        ("shards", True, "GET", "cursor_time"): "cursor_time",
        ("shards", True, "GET", "log"): "pull",
        ("shards", True, "GET", "logs"): "pull",  # the spelling in the public docs
        ("shards", True, "POST", None): "put",
        ("consumergroups", False, "GET", None): "list_cg",
        ("consumergroups", False, "POST", None): "create_cg",
        ("consumergroups", True, "PUT", None): "update_cg",
        ("consumergroups", True, "DELETE", None): "delete_cg",
        ("consumergroups", True, "POST", "heartbeat"): "heartbeat",
        ("consumergroups", True, "POST", "checkpoint"): "checkpoint",
        ("consumergroups", True, "GET", None): "get_checkpoint",
    }

    def _route(self, method: str, path: str, params: dict) -> Route:
        parts = path.strip("/").split("/")
        if len(parts) not in (3, 4) or parts[0] != "logstores":
            raise SlsError(404, "RequestNotSupported", f"{method} {path} is not supported")
        if parts[1] != self.logstore:
            raise SlsError(404, "LogStoreNotExist", f"logstore {parts[1]} does not exist")
        collection, name = parts[2], (parts[3] if len(parts) == 4 else None)
        key = (collection, name is not None, method)
        op = self._ROUTES.get(key + (params.get("type"),)) or self._ROUTES.get(key + (None,))
        if op is None or (op == "put" and name not in ("lb", "route")):
            raise SlsError(400, "ParameterInvalid",
                           f"{method} {path} with type={params.get('type')!r} is not supported")
        return Route(op, getattr(self, "_op_" + op), shard=name if collection == "shards" else None,
                     group=name if collection == "consumergroups" else None)

    # -- authentication: signatures (§3) and temporary credentials ---------------------------

    def _authenticate(self, method: str, path: str, query: list, headers, body: bytes):
        authorization = headers.get("Authorization") or ""
        if authorization.startswith("LOG "):
            access_key_id = self._check_v1(authorization, method, path, query, headers, body)
            signature = "v1"
        elif authorization.startswith("SLS4-HMAC-SHA256 "):
            access_key_id, region = self._check_v4(authorization, method, path, query, headers, body)
            signature = f"v4 {region}"
        else:
            raise SlsError(401, "Unauthorized", "the request is not signed (no LOG or SLS4 Authorization)")
        with self._lock:
            self._requests_by_access_key[access_key_id] = \
                self._requests_by_access_key.get(access_key_id, 0) + 1
            self._requests_by_signature[signature] = self._requests_by_signature.get(signature, 0) + 1

    def _refusal(self, access_key_id: str, reason: str, status: int, code: str, message: str) -> SlsError:
        """The error refusing a request signed with access_key_id, counted under its reason."""
        with self._lock:
            reasons = self._refusals_by_access_key.setdefault(access_key_id, {})
            reasons[reason] = reasons.get(reason, 0) + 1
        return SlsError(status, code, message)

    def _secret(self, access_key_id: str, headers) -> bytes:
        """The secret the request must be signed with. A temporary AccessKey also needs its exact
        security token, before its expiration; a permanent one ignores any token."""
        if access_key_id == self.access_key_id:
            return self.access_key_secret.encode()
        with self._lock:
            credential = self._temporary_credentials.get(access_key_id)
        token = headers.get("x-acs-security-token")
        if credential is None or token is None:  # without its token, an STS key is no key at all
            raise self._refusal(access_key_id, "unknown_key" if credential is None else "token_missing",
                                401, "Unauthorized", f"AccessKeyId not found: {access_key_id}")
        if token != credential.security_token:
            raise self._refusal(access_key_id, "token_invalid", 401, "Unauthorized",
                                "The security token you provided is invalid.")
        if time.time() >= credential.expiration:
            raise self._refusal(access_key_id, "token_expired", 401, "Unauthorized",
                                "The security token you provided has expired.")
        return credential.secret.encode()

    def _signature_mismatch(self, access_key_id: str, headers, message: str) -> SlsError:
        token = headers.get("x-acs-security-token")
        if token:  # it is a signed header: keep it out of the message, which clients may log
            message = message.replace(token, "<security token>")
        return self._refusal(access_key_id, "signature", 403, "SignatureNotMatch", message)

    def _check_v1(self, authorization, method, path, query, headers, body) -> str:
        access_key_id, _, signature = authorization[len("LOG "):].partition(":")
        secret = self._secret(access_key_id, headers)
        content_md5 = headers.get("Content-MD5") or ""
        if body and content_md5 != hashlib.md5(body).hexdigest().upper():
            raise SlsError(400, "ParameterInvalid", "Content-MD5 does not match the body")
        signed_headers = sorted((name.lower(), value) for name, value in headers.items()
                                if _is_signed_header(name.lower()) and name.lower() != "x-log-date")
        resource = path
        if query:
            resource += "?" + "&".join(f"{k}={v}" for k, v in sorted(query))
        string_to_sign = "\n".join([method, content_md5, headers.get("Content-Type") or "",
                                    headers.get("Date") or ""]) + "\n" \
            + "".join(f"{name}:{value}\n" for name, value in signed_headers) + resource
        expected = base64.b64encode(_hmac(secret, string_to_sign, hashlib.sha1)).decode()
        if not hmac.compare_digest(expected, signature):
            raise self._signature_mismatch(access_key_id, headers, f"signature {signature} not match, "
                                                                   f"string to sign {string_to_sign!r}")
        return access_key_id

    def _check_v4(self, authorization, method, path, query, headers, body) -> str:
        match = re.fullmatch(r"SLS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]*)/sls/"
                             r"aliyun_v4_request,\s*Signature=([0-9a-f]+)", authorization)
        if match is None:
            raise SlsError(401, "Unauthorized", "malformed SLS4-HMAC-SHA256 Authorization")
        access_key_id, date, region, signature = match.groups()
        secret = self._secret(access_key_id, headers)
        payload_hash = headers.get("x-log-content-sha256") or ""
        if payload_hash != hashlib.sha256(body).hexdigest():
            raise SlsError(400, "ParameterInvalid", "x-log-content-sha256 does not match the body")
        signed = sorted((name.lower(), value.strip()) for name, value in headers.items()
                        if name.lower() in ("content-type", "host") or _is_signed_header(name.lower()))
        canonical_query = "&".join(k + ("=" + quote(v, safe="~") if v else "") for k, v in sorted(query))
        canonical_request = "\n".join([
            method, path, canonical_query, "".join(f"{n}:{v}\n" for n, v in signed),
            ";".join(n for n, _ in signed), payload_hash])
        scope = f"{date}/{region}/sls/aliyun_v4_request"
        string_to_sign = "\n".join(["SLS4-HMAC-SHA256", headers.get("x-log-date") or "", scope,
                                    hashlib.sha256(canonical_request.encode()).hexdigest()])
        key = b"aliyun_v4" + secret
        for part in (date, region, "sls", "aliyun_v4_request"):
            key = _hmac(key, part, hashlib.sha256)
        expected = _hmac(key, string_to_sign, hashlib.sha256).hex()
        if not hmac.compare_digest(expected, signature):
            raise self._signature_mismatch(access_key_id, headers, f"v4 signature not match, canonical "
                                                                   f"request {canonical_request!r}")
        return access_key_id, region

    def add_credentials(self, access_key_id: str, access_key_secret: str, security_token: str,
                        expiration: float) -> dict:
        """Accept a temporary AccessKey (an STS credential) with its security token until
        `expiration` (unix seconds). Returns its description, which leaves out the secrets."""
        for name, value in (("access_key_id", access_key_id), ("access_key_secret", access_key_secret),
                            ("security_token", security_token)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        if isinstance(expiration, bool) or not isinstance(expiration, (int, float)):
            raise ValueError(f"expiration must be unix seconds, got {expiration!r}")
        with self._lock:
            if access_key_id == self.access_key_id or access_key_id in self._temporary_credentials:
                raise ValueError(f"AccessKey ID {access_key_id} is already in use")
            self._temporary_credentials[access_key_id] = TemporaryCredential(
                access_key_secret, security_token, expiration)
        return {"access_key_id": access_key_id, "expiration": expiration}

    # -- faults -----------------------------------------------------------------------------

    @staticmethod
    def _named_shard(route: Route, params: dict, body: bytes) -> Optional[int]:
        """The shard a request is about, for fault matching (None if it names none)."""
        if route.op == "checkpoint":
            try:
                shard = json.loads(body).get("shard")
            except (ValueError, AttributeError):
                return None
        else:
            shard = params.get("shard") if route.op == "get_checkpoint" else route.shard
        return int(shard) if str(shard).isdigit() else None

    def _take_fault(self, route: Route, params: dict, body: bytes) -> Optional[Fault]:
        shard = self._named_shard(route, params, body)
        now = time.time()
        with self._lock:
            for fault in self._faults:
                if fault.active(now) and fault.matches(route.op, shard, params.get("consumer")) \
                        and fault.take():
                    return fault
        return None

    def inject(self, **spec) -> dict:
        """Add a fault (keys as in the module docstring); returns its description."""
        now = time.time()
        with self._lock:
            fault = Fault.from_spec(spec, self._next_fault_id, now)
            self._next_fault_id += 1
            self._faults.append(fault)
            return fault.describe(now)

    def clear_faults(self):
        with self._lock:
            self._faults.clear()

    # -- data ------------------------------------------------------------------------------

    def add_logs(self, logs: Iterable[dict], receive_time: Optional[float] = None) -> int:
        """Append logs as received now (or at receive_time); returns the LogGroups added.
        All or nothing: a bad log raises ValueError before anything is stored."""
        when = time.time() if receive_time is None else receive_time
        groups = list(encode_log_groups(logs, self.group_size))
        return self._store(groups, lambda group: when)

    def load_logs(self, logs: Iterable[dict]) -> int:
        """Append logs as history: each LogGroup counts as received at its first log's __time__.
        Streams (for big --load files): on a bad log, the logs before it stay loaded."""
        return self.load_groups(encode_log_groups(logs, self.group_size))

    def load_groups(self, groups: Iterable[EncodedGroup]) -> int:
        """load_logs for LogGroups already encoded (cached_log_groups)."""
        return self._store(groups, lambda group: group.first_time)

    def _store(self, groups: Iterable[EncodedGroup], receive_time_of: Callable) -> int:
        stored = 0
        for group in groups:  # encoded lazily, outside the lock
            with self._lock:
                self._next_writable_shard().append(group.raw, group.log_count, receive_time_of(group))
            stored += 1
        return stored

    def expire(self, shard: int, groups: int) -> dict:
        """Let the TTL drop the shard's `groups` oldest LogGroups; returns the shard's state."""
        if not isinstance(groups, int) or groups < 0:
            raise ValueError(f"groups must be a non-negative int, got {groups!r}")
        with self._lock:
            target = self._shard(str(shard))
            target.begin = min(target.begin + groups, target.end)
            return target.describe()

    # -- shard split and merge (SplitShard, MergeShards) ------------------------------------

    def split(self, shard: int, split_key: Optional[str] = None) -> list:
        """Split a read-write shard at split_key (32 hex digits strictly inside its key range;
        default the middle): it turns read-only and two new shards take its keys. Returns the
        listings in SplitShard's order: the shard, then the two new ones."""
        with self._lock:
            parent = self._writable_shard(shard)
            middle = self._split_point(parent, split_key)
            children = [self._add_shard(parent.begin_key, middle, (parent.id,)),
                        self._add_shard(middle, parent.end_key, (parent.id,))]
            self._seal([parent], children)
            return [s.listing() for s in [parent] + children]

    def merge(self, shard: int) -> list:
        """Merge a read-write shard with the read-write shard whose keys follow its own: both
        turn read-only and one new shard takes both ranges. Returns the listings in
        MergeShards' order: the new shard, then the two merged ones."""
        with self._lock:
            left = self._writable_shard(shard)
            right = next((s for s in self._writable if s.begin_key == left.end_key), None)
            if right is None:
                raise SlsError(400, "ParameterInvalid", "can not merge the last shard")
            merged = self._add_shard(left.begin_key, right.end_key, (left.id, right.id))
            self._seal([left, right], [merged])
            return [s.listing() for s in (merged, left, right)]

    def _writable_shard(self, shard) -> Shard:
        if type(shard) is int and 0 <= shard < len(self._shards) and self._shards[shard].writable:
            return self._shards[shard]
        raise SlsError(400, "ParameterInvalid", f"invalid shard id: {shard!r} is no read-write shard")

    @staticmethod
    def _split_point(shard: Shard, split_key: Optional[str]) -> int:
        if split_key is None:
            return (shard.begin_key + shard.end_key) // 2
        # Strictly inside the range as ListShards shows it (the last shard ends at ff...f).
        if isinstance(split_key, str) and re.fullmatch(r"[0-9a-fA-F]{32}", split_key) \
                and shard.begin_key < int(split_key, 16) < min(shard.end_key, HASH_KEY_SPACE - 1):
            return int(split_key, 16)
        raise SlsError(400, "ParameterInvalid",
                       f"invalid mid hash: {split_key!r} is not 32 hex digits inside shard {shard.id}")

    def _add_shard(self, begin_key: int, end_key: int, parents: tuple) -> Shard:
        shard = Shard(len(self._shards), begin_key, end_key, parents)
        self._shards.append(shard)
        return shard

    def _seal(self, parents: list, children: list):
        for parent in parents:
            parent.seal(children)
        self._writable = [s for s in self._shards if s.writable]

    def add_processor(self, name: str, statement: str) -> dict:
        """Define or replace a consume processor (what PutConsumeProcessor does in SLS); an
        invalid statement raises spl.SplError (a ValueError) and defines nothing."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a processor name must be a non-empty string, got {name!r}")
        parsed = spl.parse_statement(statement)
        with self._lock:
            self._processors[name] = parsed
        return {"name": name, "spl": statement}

    def state(self) -> dict:
        now = time.time()
        with self._lock:
            for group in self._groups.values():
                group.expire_consumers(now)
            return {
                "project": self.project,
                "logstores": {self.logstore: {
                    "shards": {str(s.id): s.describe() for s in self._shards},
                    "consumer_groups": {name: g.describe(now) for name, g in sorted(self._groups.items())},
                }},
                "requests": dict(sorted(self._request_counts.items())),
                "errors": dict(sorted(self._error_counts.items())),
                "temporary_credentials": {
                    access_key_id: {"expiration": c.expiration, "expired": now >= c.expiration}
                    for access_key_id, c in sorted(self._temporary_credentials.items())},
                "requests_by_access_key": dict(sorted(self._requests_by_access_key.items())),
                "requests_by_signature": dict(sorted(self._requests_by_signature.items())),
                "refusals_by_access_key": {access_key_id: dict(sorted(reasons.items()))
                                           for access_key_id, reasons
                                           in sorted(self._refusals_by_access_key.items())},
                "faults": [f.describe(now) for f in self._faults],
                "processors": {name: s.text for name, s in sorted(self._processors.items())},
                "spl": dict(self._spl_counts),
            }

    # -- SLS operations (§5) -----------------------------------------------------------------

    def _shard(self, shard: str) -> Shard:
        if shard.isdigit() and int(shard) < len(self._shards):
            return self._shards[int(shard)]
        raise SlsError(404, "ShardNotExist", f"shard {shard} does not exist")

    def _group(self, name: str) -> ConsumerGroup:
        group = self._groups.get(name)
        if group is None:
            raise SlsError(404, "ConsumerGroupNotExist", f"consumer group {name} does not exist")
        return group

    @staticmethod
    def _json_body(body: bytes):
        try:
            return json.loads(body)
        except ValueError:
            raise SlsError(400, "PostBodyInvalid", "the body is not valid JSON") from None

    def _op_list_shards(self, route, params, headers, body) -> Reply:
        with self._lock:
            return Reply.json([s.listing() for s in self._shards])

    def _op_cursor(self, route, params, headers, body) -> Reply:
        start = params.get("from", "")
        with self._lock:
            shard = self._shard(route.shard)
            if start == "begin":
                index = shard.begin
            elif start == "end":
                index = shard.end
            elif start.lstrip("-").isdigit():
                index = shard.index_at(int(start))
            else:
                raise SlsError(400, "ParameterInvalid", f"from must be begin, end or unix seconds, got {start!r}")
            return Reply.json({"cursor": shard.cursor(index)})

    def _op_cursor_time(self, route, params, headers, body) -> Reply:
        with self._lock:
            shard = self._shard(route.shard)
            index = shard.index(params.get("cursor", ""))
            # The end cursor has no LogGroup yet: the next one will be received now or later.
            received = shard.receive_times[index] if index < shard.end else time.time()
            return Reply.json({"cursor_time": int(received)})

    def _op_pull(self, route, params, headers, body) -> Reply:
        count = params.get("count", "1000")
        if not count.isdigit() or not 0 < int(count) <= MAX_PULL_COUNT:
            raise SlsError(400, "ParameterInvalid", f"count must be 1..{MAX_PULL_COUNT}, got {count!r}")
        statement = self._pull_statement(params)
        with self._lock:
            shard = self._shard(route.shard)
            start = shard.index(params.get("cursor", ""))
            stop = min(start + int(count), shard.end)
            if params.get("end_cursor"):
                stop = max(start, min(stop, shard.index(params["end_cursor"])))
            frames = shard.frames[start:stop]
        raw_size, taken = 0, 0
        for frame in frames:
            if taken and raw_size + len(frame) > MAX_PULL_RAW_BYTES:
                break
            raw_size += len(frame)
            taken += 1
        reply_headers = {"Content-Type": "application/x-protobuf",
                         "x-log-cursor": shard.cursor(start + taken)}
        if statement is None:
            raw, group_count = b"".join(frames[:taken]), taken
        else:  # the cursor still moves over every LogGroup read, whatever the statement kept
            raw, group_count, spl_headers = self._process(statement, frames[:taken])
            reply_headers.update(spl_headers)
        reply_headers.update({"x-log-count": str(group_count), "x-log-bodyrawsize": str(len(raw))})
        if raw and "lz4" in (headers.get("Accept-Encoding") or "").lower():
            raw = lz4.block.compress(raw, store_size=False)
            reply_headers["x-log-compresstype"] = "lz4"
        return Reply(200, raw, reply_headers)

    def _pull_statement(self, params: dict) -> Optional[spl.Statement]:
        """The SPL statement of a pull (its query, or its consume processor's), checked once."""
        query, processor = params.get("query", ""), params.get("processor", "")
        if query.strip() and processor:
            raise SlsError(400, "ParameterInvalid", "give either query or processor, not both")
        if processor:
            with self._lock:
                statement = self._processors.get(processor)
            if statement is None:
                raise SlsError(404, "ConsumeProcessorNotExist", f"consume processor {processor} does not exist")
            return statement
        if not query.strip():
            return None
        try:
            return _parsed_statement(query)
        except spl.SplError as exc:
            raise SlsError(400, "ParameterInvalid", f"invalid query: {exc}") from None

    def _process(self, statement: spl.Statement, frames: list) -> tuple:
        """(body, LogGroups in it, SPL headers) for LogGroups processed by an SPL statement. A
        LogGroup left without logs is not sent; a log the statement fails on is dropped."""
        body, group_count, raw_logs, result_logs, failed_logs = [], 0, 0, 0, 0
        for frame in frames:
            results = []
            for log in _decode_log_group(_unframe(frame)):
                raw_logs += 1
                try:
                    result = statement.run(log)
                except spl.SplRuntimeError:
                    failed_logs += 1
                    continue
                if result is not None:
                    results.append(result)
            result_logs += len(results)
            groups = _encode_logs(results)
            group_count += len(groups)
            body += map(_frame, groups)
        with self._lock:
            for key, value in (("pulls", 1), ("raw_logs", raw_logs), ("result_logs", result_logs),
                               ("failed_logs", failed_logs)):
                self._spl_counts[key] += value
        return b"".join(body), group_count, {
            "x-log-rawdatacount": str(len(frames)), "x-log-rawdatasize": str(sum(map(len, frames))),
            "x-log-rawdatalines": str(raw_logs), "x-log-resultlines": str(result_logs),
            "x-log-failedlines": str(failed_logs)}

    def _op_put(self, route, params, headers, body) -> Reply:
        log_group = self._decompress(headers, body)
        try:
            log_count = count_logs(log_group)
        except ValueError as exc:
            raise SlsError(400, "PostBodyInvalid", f"the body is not a LogGroup: {exc}") from None
        with self._lock:
            if route.shard == "route":
                shard = self._shard_for_key(params.get("key", ""))
            else:
                shard = self._next_writable_shard()
            if log_count:  # an empty LogGroup is accepted and stores nothing
                shard.append(log_group, log_count, time.time())
        return Reply()

    @staticmethod
    def _decompress(headers, body: bytes) -> bytes:
        compress_type = (headers.get("x-log-compresstype") or "").lower()
        raw_size = headers.get("x-log-bodyrawsize") or ""
        try:
            if compress_type == "":
                return body
            if compress_type == "lz4":
                raw = lz4.block.decompress(body, uncompressed_size=int(raw_size))
            elif compress_type == "deflate":
                raw = zlib.decompress(body)
            else:
                raise SlsError(400, "InvalidCompressType", f"compress type {compress_type} is not supported")
        except (ValueError, lz4.block.LZ4BlockError, zlib.error) as exc:
            raise SlsError(400, "PostBodyUncompressError", f"cannot decompress the body: {exc}") from None
        if str(len(raw)) != raw_size:
            raise SlsError(400, "PostBodyUncompressError",
                           f"x-log-bodyrawsize is {raw_size} but the body is {len(raw)} bytes")
        return raw

    def _shard_for_key(self, key: str) -> Shard:
        if not re.fullmatch(r"[0-9a-fA-F]{32}", key):
            raise SlsError(400, "ParameterInvalid", f"hash key must be 32 hex digits, got {key!r}")
        value = int(key, 16)
        return next(s for s in self._writable if s.begin_key <= value < s.end_key)

    def _next_writable_shard(self) -> Shard:
        """Round-robin over the read-write shards: SLS's load-balancing mode (`shards/lb`)."""
        self._next_lb_shard %= len(self._writable)
        shard = self._writable[self._next_lb_shard]
        self._next_lb_shard += 1
        return shard

    def _op_list_cg(self, route, params, headers, body) -> Reply:
        with self._lock:
            return Reply.json([{"name": g.name, "timeout": g.timeout, "order": g.order}
                               for g in self._groups.values()])

    def _op_create_cg(self, route, params, headers, body) -> Reply:
        spec = self._json_body(body)
        if not isinstance(spec, dict) or not isinstance(spec.get("consumerGroup"), str) \
                or not isinstance(spec.get("timeout"), int) or spec["timeout"] <= 0:
            raise SlsError(400, "JsonInfoInvalid", "need consumerGroup (string) and timeout (int > 0)")
        with self._lock:
            if spec["consumerGroup"] in self._groups:
                raise SlsError(400, "ConsumerGroupAlreadyExist", "consumer group already exist")
            self._groups[spec["consumerGroup"]] = ConsumerGroup(
                spec["consumerGroup"], spec["timeout"], bool(spec.get("order", False)))
        return Reply()

    def _op_update_cg(self, route, params, headers, body) -> Reply:
        spec = self._json_body(body)
        if not isinstance(spec, dict) or ("timeout" in spec and not (
                isinstance(spec["timeout"], int) and spec["timeout"] > 0)):
            raise SlsError(400, "JsonInfoInvalid", "timeout must be an int > 0")
        with self._lock:
            group = self._group(route.group)
            group.timeout = spec.get("timeout", group.timeout)
            group.order = bool(spec.get("order", group.order))
        return Reply()

    def _op_delete_cg(self, route, params, headers, body) -> Reply:
        with self._lock:
            self._group(route.group)
            del self._groups[route.group]
        return Reply()

    def _op_heartbeat(self, route, params, headers, body) -> Reply:
        consumer = params.get("consumer", "")
        listed = self._json_body(body)
        if not consumer or not isinstance(listed, list) or not all(isinstance(s, int) for s in listed):
            raise SlsError(400, "ParameterInvalid", "need a consumer and a JSON list of shard ids")
        with self._lock:
            group = self._group(route.group)
            known = {shard for shard in listed if 0 <= shard < len(self._shards)}
            held = group.heartbeat(consumer, known, self._shards, time.time())
        return Reply.json(held)

    def _op_checkpoint(self, route, params, headers, body) -> Reply:
        spec = self._json_body(body)
        if not isinstance(spec, dict) or not isinstance(spec.get("shard"), int) \
                or not isinstance(spec.get("checkpoint"), str):
            raise SlsError(400, "ParameterInvalid", "need shard (int) and checkpoint (string)")
        try:
            _cursor_number(spec["checkpoint"])
        except SlsError:
            raise SlsError(400, "InvalidShardCheckPoint", "shard checkpoint not encoded by base64") from None
        consumer = params.get("consumer", "")
        force = params.get("forceSuccess", "").lower() == "true"
        now = time.time()
        with self._lock:
            group = self._group(route.group)
            self._shard(str(spec["shard"]))
            if not force:  # the SDK always forces; SLS checks ownership only without force
                group.expire_consumers(now)
                if consumer not in group.consumers:
                    raise SlsError(400, "ConsumerNotExsit", f"consumer {consumer} does not exist")
                if spec["shard"] not in group.consumers[consumer].held:
                    raise SlsError(400, "ConsumerNotMatch", f"shard {spec['shard']} is not held by {consumer}")
            group.checkpoints[spec["shard"]] = Checkpoint(spec["checkpoint"], consumer, int(now * 1e6))
        return Reply()

    def _op_get_checkpoint(self, route, params, headers, body) -> Reply:
        with self._lock:
            group = self._group(route.group)
            if "shard" in params:
                wanted = [int(params["shard"])] if params["shard"].isdigit() \
                    and int(params["shard"]) < len(self._shards) else []
            else:
                wanted = [s.id for s in self._shards]
            answer = []
            for shard in wanted:  # never checkpointed -> one element with an empty checkpoint
                checkpoint = group.checkpoints.get(shard, Checkpoint("", "", 0))
                answer.append({"shard": shard, "checkpoint": checkpoint.cursor,
                               "updateTime": checkpoint.update_time_us, "consumer": checkpoint.consumer})
            return Reply.json(answer)

    # -- admin routes ----------------------------------------------------------------------

    def _admin(self, method: str, path: str, body: bytes) -> Reply:
        try:
            if (method, path) == ("GET", "/_emulator/state"):
                return Reply.json(self.state())
            if (method, path) == ("POST", "/_emulator/faults"):
                specs = json.loads(body)
                return Reply.json({"faults": [self.inject(**spec) for spec in
                                              (specs if isinstance(specs, list) else [specs])]})
            if (method, path) == ("DELETE", "/_emulator/faults"):
                self.clear_faults()
                return Reply.json({"faults": []})
            if (method, path) == ("POST", "/_emulator/logs"):
                logs = list(iter_jsonl(body.decode("utf-8", "surrogateescape").splitlines(), "body"))
                return Reply.json({"logs": len(logs), "groups": self.add_logs(logs)})
            if (method, path) == ("POST", "/_emulator/expire"):
                spec = json.loads(body)
                return Reply.json(self.expire(spec["shard"], spec["groups"]))
            if (method, path) == ("POST", "/_emulator/split"):
                spec = json.loads(body)
                return Reply.json(self.split(spec["shard"], spec.get("splitKey")))
            if (method, path) == ("POST", "/_emulator/merge"):
                return Reply.json(self.merge(json.loads(body)["shard"]))
            if (method, path) == ("POST", "/_emulator/credentials"):
                return Reply.json(self.add_credentials(**json.loads(body)))
            if (method, path) == ("POST", "/_emulator/processors"):
                spec = json.loads(body)
                return Reply.json(self.add_processor(spec["name"], spec["spl"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise SlsError(400, "ParameterInvalid", f"bad admin request: {exc!r}") from None
        raise SlsError(404, "RequestNotSupported", f"no admin route {method} {path}")


# ---------------------------------------------------------------------------------------------
# HTTP transport.

class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the SDK reuses connections through a Session
    server_version = "sls-emulator"
    disable_nagle_algorithm = True

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length and hasattr(socket, "TCP_QUICKACK"):
            # Clients come through the proxy setting, where urllib3 leaves Nagle on: it holds the
            # body until the headers are ACKed, and a delayed ACK would stall every POST ~40 ms.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        body = self.rfile.read(length) if length else b""
        reply = self.server.service.handle(self.command, self.path, self.headers, body)
        if reply.drop:
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format, *args):
        pass  # quiet: a benchmark makes thousands of requests; state() has the counts


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, service: SlsService):
        super().__init__(address, _RequestHandler)
        self.service = service
        self._connections: set = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        # A client killed mid-request (tests kill -9 forwarders) is normal here, not a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)

    def close_connections(self):
        """End idle keep-alive connections, whose handler threads would otherwise linger."""
        with self._connections_lock:
            for connection in list(self._connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _ClientSide:
    """How clients reach an emulator listening on 127.0.0.1:`port`."""

    port: int
    endpoint = FAKE_ENDPOINT

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client_env(self) -> dict:
        """Proxy variables that route SDK traffic (fake endpoint host) to the emulator, while
        NO_PROXY keeps direct calls to 127.0.0.1 (admin routes) off the proxy. Merge them into
        os.environ or a subprocess environment."""
        proxy = f"http://{self.addr}"
        return {"HTTP_PROXY": proxy, "http_proxy": proxy,
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


class SlsEmulator(SlsService, _ClientSide):
    """The emulator in this process, serving HTTP on a daemon thread between start() and stop()."""

    def __init__(self, project: str, logstore: str, shards: int, access_key_id: str,
                 access_key_secret: str, port: int = 0, group_size: int = 100):
        super().__init__(project, logstore, shards, access_key_id, access_key_secret, group_size)
        self._requested_port = port
        self._server: Optional[_HttpServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "SlsEmulator":
        self._server = _HttpServer(("127.0.0.1", self._requested_port), self)
        # A short poll interval keeps stop() quick; serve_forever checks for shutdown that often.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="sls-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> "SlsEmulator":
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


def _die_with_parent():
    """In the emulator's process: get SIGTERM when the process that started it dies, however it
    dies, so no emulator outlives a test or a playground."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmulatorProcess(_ClientSide):
    """The emulator CLI in a subprocess, started by the constructor; admin calls go over HTTP."""

    STARTUP_TIMEOUT = 60

    def __init__(self, project: str = "waf-project", logstore: str = "waf-logstore", shards: int = 4,
                 access_key_id: str = "test-akid", access_key_secret: str = "test-secret",
                 load: Iterable[str] = (), extra_args: Iterable[str] = ()):
        self.project, self.logstore = project, logstore
        self.access_key_id, self.access_key_secret = access_key_id, access_key_secret
        command = [sys.executable, os.path.abspath(__file__), "--port", "0",
                   "--project", project, "--logstore", logstore, "--shards", str(shards),
                   "--access-key-id", access_key_id, "--access-key-secret", access_key_secret]
        for path in load:
            command += ["--load", str(path)]
        command += list(extra_args)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
        self._admin_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            self.port = self._read_port()
        except BaseException:
            self.kill()
            raise

    def _read_port(self) -> int:
        ready, _, _ = select.select([self.process.stdout], [], [], self.STARTUP_TIMEOUT)
        line = self.process.stdout.readline() if ready else ""
        if not line.startswith(ADDR_LINE_PREFIX):
            raise RuntimeError(f"emulator did not start (exit code {self.process.poll()}, "
                               f"first line {line!r})")
        return int(line.strip().rsplit(":", 1)[1])

    def _admin(self, method: str, route: str, payload: Optional[bytes] = None):
        request = urllib.request.Request(f"http://{self.addr}/_emulator/{route}", data=payload,
                                         method=method)
        with self._admin_opener.open(request, timeout=30) as response:
            return json.loads(response.read())

    def state(self) -> dict:
        return self._admin("GET", "state")

    def inject(self, **fault) -> dict:
        return self._admin("POST", "faults", json.dumps(fault).encode())["faults"][0]

    def clear_faults(self):
        self._admin("DELETE", "faults")

    def add_logs(self, logs: Iterable[dict]) -> dict:
        """Append logs, received now; returns {"logs": n, "groups": g}."""
        body = "".join(json.dumps(log, ensure_ascii=True) + "\n" for log in logs)
        return self._admin("POST", "logs", body.encode())

    def expire(self, shard: int, groups: int) -> dict:
        return self._admin("POST", "expire", json.dumps({"shard": shard, "groups": groups}).encode())

    def split(self, shard: int, split_key: Optional[str] = None) -> list:
        spec = {"shard": shard} if split_key is None else {"shard": shard, "splitKey": split_key}
        return self._admin("POST", "split", json.dumps(spec).encode())

    def merge(self, shard: int) -> list:
        return self._admin("POST", "merge", json.dumps({"shard": shard}).encode())

    def add_credentials(self, access_key_id: str, access_key_secret: str, security_token: str,
                        expiration: float) -> dict:
        return self._admin("POST", "credentials", json.dumps({
            "access_key_id": access_key_id, "access_key_secret": access_key_secret,
            "security_token": security_token, "expiration": expiration}).encode())

    def add_processor(self, name: str, statement: str) -> dict:
        return self._admin("POST", "processors", json.dumps({"name": name, "spl": statement}).encode())

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, wait, and return the exit code (0 when it shut down cleanly)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.stdout.close()
        return self.process.returncode

    def kill(self):
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()

    def __enter__(self) -> "EmulatorProcess":
        return self

    def __exit__(self, *exc_info):
        self.stop()


def log_client(emulator, access_key_id: Optional[str] = None,
               access_key_secret: Optional[str] = None, **kwargs):
    """A real `aliyun.log.LogClient` for the emulator's fake endpoint. Its requests.Session reads
    the proxy from the environment on every call, so apply `emulator.client_env()` to os.environ
    (e.g. with monkeypatch.setenv) before using it. kwargs go to LogClient (securityToken,
    auth_version, region, ...)."""
    from aliyun.log import LogClient
    return LogClient(emulator.endpoint,
                     emulator.access_key_id if access_key_id is None else access_key_id,
                     emulator.access_key_secret if access_key_secret is None else access_key_secret,
                     **kwargs)


# ---------------------------------------------------------------------------------------------
# Command line.

def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="listen port on 127.0.0.1 (0: any free)")
    parser.add_argument("--project", required=True)
    parser.add_argument("--logstore", required=True)
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--access-key-id", required=True)
    parser.add_argument("--access-key-secret", required=True)
    parser.add_argument("--load", action="extend", nargs="+", default=[], metavar="FILE.jsonl",
                        help="JSONL logs to preload as history (see the module docstring)")
    parser.add_argument("--group-size", type=int, default=100, help="logs per LogGroup when loading")
    parser.add_argument("--load-cache", metavar="DIR",
                        help="keep the --load files' LogGroups, encoded, in DIR and load them from there "
                             "while a file is unchanged (cached_log_groups)")
    args = parser.parse_args(argv)

    # A list, not an Event: a handler runs in this thread between any two bytecodes, even inside
    # another handler (SIGINT, then SIGTERM a moment later), and Event.set() would deadlock there.
    stop_requested = []
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda number, _frame: stop_requested.append(number))

    emulator = SlsEmulator(args.project, args.logstore, args.shards, args.access_key_id,
                           args.access_key_secret, port=args.port, group_size=args.group_size)
    for path in args.load:
        try:
            if args.load_cache:
                emulator.load_groups(cached_log_groups(path, args.group_size, args.load_cache))
            else:
                emulator.load_logs(iter_jsonl_file(path))
        except (OSError, ValueError) as exc:
            parser.error(f"--load {path}: {exc}")
    with emulator:
        print(f"{ADDR_LINE_PREFIX}{emulator.addr}", flush=True)
        while not stop_requested:
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
