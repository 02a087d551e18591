#!/usr/bin/env python3
"""sync_waf_to_syslog - forward Alibaba Cloud WAF logs from Log Service (SLS) to a syslog server.

WHAT IT DOES
  Joins an SLS consumer group on the WAF logstore (aliyun-log-python-sdk), turns every WAF log into
  exactly one syslog message and sends it to your syslog server / SIEM over UDP, TCP, TLS or RELP
  (plain or over TLS). A shard's checkpoint moves only past logs the syslog transport accepted, so a
  crash, a restart or a syslog outage never loses a log (it may repeat some: about the last second).
  Over TCP and TLS "accepted" is the server's kernel acknowledging the bytes; when a connection breaks
  other than by a clean close, the last second is sent again, as the server may not have read it.
  With RELP "accepted" is the server's own acknowledgement of every message, so not even a crashing
  syslog server loses one. With several collectors (SYSLOG_HOST=a,b) a batch a collector did not
  confirm goes to the next one: failover (and back), or round-robin. Shards that SLS splits or
  merges are followed without a restart: a read-only shard is read to its end and released, new
  shards are taken up (README.md, "Shard splits and merges").

RUN
  python sync_waf_to_syslog.py              run until SIGTERM / SIGINT (Ctrl-C), then exit 0
  python sync_waf_to_syslog.py --check      check settings, SLS access and every syslog collector
  python sync_waf_to_syslog.py --dry-run    print the messages that would be sent next; send nothing
  python sync_waf_to_syslog.py --progress   a replay (SLS_CURSOR_END) with a live progress bar
  Settings come from the environment, or from a `.env` file beside this script (or --env-file);
  a variable set in the real environment wins over the file. The file must belong to you or root
  and not be writable by group or others (it can set every variable), as must the TLS files. Of
  its values only the proxy variables (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY, also in lower
  case) are exported to the process environment, where the SDK reads them.
  A stop (SIGTERM / SIGINT) takes at most SYNC_STOP_TIMEOUT seconds, whatever a batch is doing.
  The log says which shards this consumer took (and each later change), the statistics line comes
  after 10 s and then every SYNC_STATS_INTERVAL, and while syslog fails it ends with "syslog
  failing for N s". Under systemd (Type=notify) it sends READY=1 once its first heartbeat is
  answered, STATUS= with the statistics line, and WATCHDOG=1 (WatchdogSec=) while its loop runs.

EXIT STATUS
  0  stopped on request, finished a replay (SLS_CURSOR_END), or another instance already runs
  1  runtime failure (e.g. SLS refused the AccessKey, SLS_STS_TOKEN expired, the RAM role's
     credentials could not be had at start, the consumer thread died or got stuck, the lock file
     cannot be trusted, or the SDK is missing or lacks an internal this file relies on: see
     SDK_TESTED_VERSION)
  2  bad settings: one line per problem, naming the variable

CHANGING WHAT IS SENT
  Edit the section "EDIT HERE" below the settings: STATIC_FIELDS (fields added to every message),
  customize(fields) (rename, add or drop fields, or drop a whole class of logs) and the CEF, LEEF and
  severity tables. Every encoding and every path (the fast key=value path, messages cut to
  SYSLOG_MAX_MESSAGE_SIZE, --dry-run) follows them. README.md ("Changing the messages") has worked
  examples and the quick test command that checks an edit in seconds.

SETTINGS
  Each variable is the Settings field of the same name in lower case: SYSLOG_SEP is
  settings.syslog_sep, so searching this file for a variable's name in either case finds its uses.

SETTINGS: SLS (names as in Alibaba's WAF-to-syslog guide)
  SLS_ENDPOINT            SLS endpoint, e.g. cn-hangzhou-intranet.log.aliyuncs.com        (required)
                          reached over https:// unless it starts with http:// (then unencrypted:
                          the AccessKey's signatures, the STS token and every log; warned at
                          start and by --check; acceptable only on an intranet endpoint in a VPC)
  SLS_PROJECT             project, e.g. wafng-project-<uid>-cn-hangzhou                   (required)
  SLS_LOGSTORE            logstore, e.g. wafng-logstore                                   (required)
  SLS_CG                  consumer group name                                     default WAF-SLS
  SLS_CONSUMER_NAME       this consumer's name in the group; keep it stable so a restart takes its
                          shards back at once                          default {SLS_CG}-{hostname}
  SLS_CURSOR_START        where a new group starts: begin, end, or an ISO-8601 time
                          (e.g. 2026-11-01T00:00:00+08:00); ignored once checkpoints exist, and
                          by shards a split or merge makes while this runs (read whole)
                                                                                    default begin
  SLS_CURSOR_END          stop after logs received up to this ISO-8601 time (replay/backfill)
  SLS_HEARTBEAT_INTERVAL  seconds between consumer-group heartbeats (and shard listings) default 20
  SLS_FETCH_BYTES         raw (uncompressed) bytes a pull should carry: each shard's next pull asks
                          for as many log groups as its last pulls say fit, whether a group holds
                          one log or a thousand (K, M suffixes allowed)                 default 2M
  SLS_BUFFER_BYTES        most raw bytes all shards of this process hold at once (each shard holds
                          up to three pulls: being sent, waiting, being fetched); pulls shrink
                          when many shards are held                                    default 64M
  SLS_MAX_FETCH_GROUPS    most log groups a pull asks for (1-1000, SLS's own limit)   default 1000
  SLS_FETCH_INTERVAL      seconds between fetch rounds while a shard has a backlog; each round
                          hands every shard at most one pull. Without a backlog rounds are 0.1 s
                          apart and an idle shard is pulled twice a second            default 0.02
  SLS_WORKER_POOL_SIZE    SDK threads shared by fetching and processing                  default 2
  SLS_TOPICS              send only logs of these topics (comma list, e.g. waf_access_log); the
                          others are skipped, yet checkpointed as done                default all
  SLS_IN_ORDER            true: the group hands out the shards a split or merge made only once
                          their parents are read to the end (SLS's in-order consumption), so a
                          key's logs leave in order; set on the group at every start  default false
  SLS_QUERY               an SPL statement SLS applies to the logs before it hands them over
                          (rule-based consumption), e.g. * | where final_action is not null; the
                          logs it drops are counted and checkpointed as done (README.md, "Volume
                          control")                                                  default none
  SLS_CONSUME_PROCESSOR   the name of a consume processor defined in SLS, instead of SLS_QUERY

SETTINGS: SLS credentials (one source: an AccessKey, or the ECS instance's RAM role; never printed)
  SLS_AK_ID               AccessKey ID                            (required without SLS_ECS_RAM_ROLE)
  SLS_AK_KEY              AccessKey secret                        (required without SLS_ECS_RAM_ROLE)
  SLS_STS_TOKEN           STS security token, when the AccessKey is temporary. Nothing renews it:
                          once SLS says it expired, the forwarder exits 1 naming it
  SLS_AK_ID_FILE, SLS_AK_KEY_FILE, SLS_STS_TOKEN_FILE
                          read that value from this file instead (systemd credentials, Docker or
                          Kubernetes secrets), and again whenever the file changes
  SLS_ECS_RAM_ROLE        use the temporary credentials of this ECS instance RAM role, or auto
                          (the role attached to the instance), from the ECS metadata service:
                          fetched again when half their lifetime has passed, retried every few
                          seconds while the service fails; no AccessKey on the host
  SLS_ECS_METADATA_ENDPOINT  the metadata service, reached without any proxy
                                                                   default http://100.100.100.200
  SLS_ECS_METADATA_V1     on | off: read the metadata service without a session token (normal
                          mode, IMDSv1) when it gives none (security hardening mode, IMDSv2, is
                          always tried first)                                          default on
  SLS_AUTH_VERSION        request signature: v4 (HMAC-SHA256, region-scoped) or v1     default v4
  SLS_REGION              region of the project for v4, e.g. cn-hangzhou
                                                          default derived from SLS_ENDPOINT

SETTINGS: syslog
  SYSLOG_HOST             syslog server host name or IP, or several collectors as a comma list of
                          host, host:port or [IPv6]:port (no port: SYSLOG_PORT), e.g.
                          siem-a,siem-b:1514; a list needs tcp, tls, relp or relp+tls   (required)
  SYSLOG_BALANCE          with several collectors: failover (everything to the first healthy one in
                          list order) or round-robin (batches take turns over the healthy ones)
                                                                                  default failover
  SYSLOG_FAILBACK_AFTER   seconds a failed collector must stay reachable (probed in the background)
                          before it takes traffic again                                 default 60
  SYSLOG_PROTOCOL         udp | tcp | tls | relp | relp+tls                            default tcp
                          relp: rsyslog's Reliable Event Logging Protocol (imrelp), where the
                          server acknowledges every message; relp+tls: RELP inside TLS, with the
                          same certificate settings and host-name check as tls
  SYSLOG_PORT             port                   default 514 (6514 for tls, 2514 for relp, relp+tls)
  SYSLOG_FORMAT           rfc5424 | rfc3164                                        default rfc5424
  SYSLOG_FRAMING          octet-counting | lf   (tcp/tls only)                default octet-counting
  SYSLOG_ENCODING         MSG: kv (key=value), json, cef (ArcSight) or leef (QRadar)    default kv
  SYSLOG_SEP              kv: separator between key=value pairs; ASCII punctuation, space or TAB,
                          not \\ or =                                                  default ,
  SYSLOG_LEEF_DELIMITER   leef: attribute delimiter; TAB or one ASCII punctuation character
                          other than = | _ : \\, or its hex code (x09, 0x5e)           default TAB
  SYSLOG_FIELDS_INCLUDE   send only the fields matching these shell-style patterns (comma list,
                          case-sensitive, e.g. __tag__:*,host,real_client_ip)          default all
  SYSLOG_FIELDS_EXCLUDE   do not send the fields matching these patterns, e.g. wxbb_*,upstream_*
  SYSLOG_FIELDS_RENAME    send fields under other names: old:new,... (split at the last colon);
                          the patterns above match the old names
  SYSLOG_STATIC_FIELDS    fields added to every message after STATIC_FIELDS, whatever is selected:
                          name=value,... e.g. env=prod,dc=hz (split at the first =)
  SYSLOG_FACILITY         facility name (kern, user, ..., local0..local7) or number     default user
  SYSLOG_SEVERITY         severity name (emerg ... debug) or number                    default info
  SYSLOG_HOSTNAME         HOSTNAME field of every message                     default this host
  SYSLOG_TAG              APP-NAME (RFC 5424) / TAG (RFC 3164)                   default AliyunWAF
  SYSLOG_MAX_MESSAGE_SIZE bytes per message; longer messages have their longest values cut
                          (counted and logged); UDP can never exceed 65507          default 65507
  SYSLOG_TIMEOUT          seconds a send may stall before it is retried (a connect or TLS
                          handshake: at most 10)                                     default 120
  SYSLOG_RETRY_MAX_DELAY  longest pause between reconnect attempts, seconds           default 30
  SYSLOG_RELP_WINDOW      relp: most messages sent ahead of the server's acknowledgements  default 128
  SYSLOG_MAX_EPS          most messages per second to the syslog server from this host, all
                          --workers and other forwarders of this server together; never drops a
                          log: SLS keeps what waits (the lag grows); 0 = no ceiling     default 0
  SYSLOG_CERT_PATH        CA bundle that signed the server's certificate (tls, relp+tls); system
                          CAs if unset
  SYSLOG_CLIENT_CERT      client certificate (PEM) for mutual TLS (rsyslog's imrelp with TLS
                          requires one)
  SYSLOG_CLIENT_KEY       its private key (PEM); required with SYSLOG_CLIENT_CERT

SETTINGS: this program
  SYNC_LOG_LEVEL          DEBUG | INFO | WARNING | ERROR                               default INFO
  SYNC_LOG_FILE           also write the log to this file; reopened when logrotate moves it
                          (the log has two INFO lines per batch: rotate it); created 0600; a
                          symbolic link, another user's file or one others can write is refused
                                                                              default stderr only
  SYNC_LOCK_FILE          lock that keeps a second copy from starting (--lock-file); it must be
                          a file of this user that group and others cannot write, in a directory
                          they cannot change (else exit 1)
                          default sync_waf_to_syslog-<consumer name>.lock in $RUNTIME_DIRECTORY
                          (systemd), else in /run/sync_waf_to_syslog/ as root, else beside
                          this script
  SYNC_STATS_INTERVAL     seconds between statistics lines, 0 = off (--stats-interval)  default 60
  SYNC_STOP_TIMEOUT       seconds a stop may take (saving checkpoints, ending a batch) before the
                          process exits anyway, still 0 on SIGTERM; --workers kills a worker
                          that has not exited 2 s after that                         default 30
  SYNC_WORKERS            consumer processes on this host, or auto = one per CPU core but no more
                          than read-write shards (--workers); each is consumer
                          {SLS_CONSUMER_NAME}-{i}, restarted if it dies (but credentials
                          nothing renews, an expired SLS_STS_TOKEN, stop them all)      default 1
  SYNC_METRICS_ADDR       host:port to serve /metrics (Prometheus) and /healthz on, e.g.
                          127.0.0.1:9108 (:9108 = every interface); with --workers one endpoint,
                          served by the supervisor, covers every worker        default off
  SYNC_HEALTH_FAILING_AFTER  seconds syslog may fail before /healthz answers 503    default 300

MESSAGE
  One message per log. RFC 5424: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID - - MSG, where TIMESTAMP is
  the log's own time (__time__ and its nanosecond part) in local time with its UTC offset.
  RFC 3164: <PRI>Mmm dd hh:mm:ss HOSTNAME TAG: MSG. MSG holds STATIC_FIELDS and SYSLOG_STATIC_FIELDS,
  then __topic__, __source__, every __tag__:* and the WAF fields in their original order (as
  customize() returns them and SYSLOG_FIELDS_* select them); invalid UTF-8 becomes U+FFFD.
  U+0085, U+2028 and U+2029 are sent as they are in every encoding: they are text, not line
  breaks, to syslog framing and to JSON (only this program's own log escapes them).
  By SYSLOG_ENCODING:
  kv    key=value pairs joined by SYSLOG_SEP. Escaping in keys and values: \\ -> \\\\, LF -> \\n,
        CR -> \\r, the separator -> \\ + separator, other control characters except TAB -> \\xHH, and
        = in keys -> \\=. (With a multi-character separator, a value that ends in the separator's
        first characters has those written as \\xHH, so splitting stays exact.)
  json  one compact JSON object of strings, UTF-8.
  cef   CEF:0|Alibaba Cloud|WAF|3.0|<module>:<rule id>|<module> <rule type> <action>|<severity>|...
        then key=value pairs separated by spaces: WAF fields under CEF keys (CEF_KEYS, e.g.
        real_client_ip -> src, time -> rt in epoch ms), the others as AliyunWaf<Name>. Escaping per
        CEF (header \\ and |, extension \\ = LF CR); other control characters become \\xHH text.
  leef  LEEF:2.0|Alibaba Cloud|WAF|3.0|<module>:<rule id>|<delimiter>|sev=<severity><delimiter>...
        WAF fields under LEEF keys (LEEF_KEYS, e.g. real_client_ip -> src, time -> devTime), the
        others under their own name. LEEF cannot escape: in values LF, CR, the delimiter and other
        control characters become \\n, \\r, \\t or \\xHH text, in header fields | becomes \\x7c.
  cef and leef leave out empty values; their event id, name and severity say what WAF did (blocked
  8, challenged 5-6, monitored 5, nothing 2: EVENT_SEVERITY), from all fields, whatever is selected.
  The mapping tables are in "EDIT HERE"; README.md has examples.
"""
import argparse
import base64
import calendar
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import fnmatch
import functools
import http.client
import http.server
import ipaddress
import itertools
import json
import logging
import logging.handlers
import os
import random
import re
import signal
import socket
import ssl
import stat
import string
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor

# The one place the SDK (and protobuf, which comes with it) is imported. Without it the encoders
# still work (and the quick tests run); main() says in one line that it is missing. The SDK is
# pinned in requirements.txt: its internals this file uses are listed in sdk_internals().
try:
    from aliyun.log import LogClient, LogException
    from aliyun.log.consumer import ConsumerProcessorBase, ConsumerWorker, CursorPosition, LogHubConfig
    from aliyun.log.consumer.checkpoint_tracker import ConsumerCheckpointTracker
    from aliyun.log.consumer.consumer_client import ConsumerClient
    from aliyun.log.consumer.exceptions import ClientWorkerException
    from aliyun.log.consumer.heart_beat import ConsumerHeatBeat
    from aliyun.log.consumer.shard_worker import ShardConsumerWorker
    from aliyun.log.consumer.worker import ConsumerWorkerLoggerAdapter
    from aliyun.log.credentials import Credentials, CredentialsProvider
    from aliyun.log.pulllog_response import PullLogResponse
    from aliyun.log.version import USER_AGENT, __version__ as SDK_VERSION
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    SDK_IMPORT_ERROR = None
except ImportError as _error:
    SDK_IMPORT_ERROR = _error
    # so that the classes below can be defined
    ConsumerProcessorBase = ConsumerWorker = ConsumerClient = CredentialsProvider = object
    LogException = Exception

log = logging.getLogger("sync_waf_to_syslog")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_SETTINGS = 0, 1, 2
EXIT_NO_RESTART = 3  # a worker of --workers that a restart would not help: all stop, exit 1 (run_workers)
UDP_MAX_PAYLOAD = 65507  # IPv4: 65535 - 8 (UDP header) - 20 (IP header)


# ================================================================================================
# Utilities
# ================================================================================================

class RateLimiter:
    """Says yes to a given key at most once per interval: one log line per condition, not per request."""

    def __init__(self, interval):
        self.interval = interval
        self.last = {}

    def ready(self, key):
        now = time.monotonic()
        if now - self.last.get(key, -self.interval) >= self.interval:
            self.last[key] = now
            return True
        return False


def describe_error(exc):
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text):
    """text with its control characters (C0, DEL, C1) and line separators written as \\xHH or
    \\uHHHH: what a server or a file sent can then neither forge a line nor drive the terminal.
    Everything printed or logged goes through it (PrintableFormatter, check())."""
    return _UNPRINTABLE.sub(lambda match: f"\\x{ord(match.group()):02x}" if ord(match.group()) < 0x100
                            else f"\\u{ord(match.group()):04x}", str(text))


def trusted_owners():
    """Who may own a file this program trusts (.env, the TLS files): this user and root."""
    return {os.geteuid(), 0}


def trust_problem(status, owners):
    """Why a file (its os.stat_result) cannot be trusted, or None: it must belong to one of owners
    (uids) and not be writable by group or others, who could otherwise change what it says."""
    if status.st_uid not in owners:
        return f"belongs to uid {status.st_uid}, not to uid {' or '.join(map(str, sorted(owners)))}"
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(status.st_mode):04o})"
    return None


def parse_time(text):
    """Unix seconds from an ISO-8601 time (naive = local time) or from digits; None if neither."""
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        return int(value.timestamp())
    except (ValueError, OverflowError, OSError):  # not a time, or one the platform cannot convert
        return None


def safe_file_name(text):
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def cursor_number(cursor):
    """SLS cursors are base64 of a decimal position; None for anything else."""
    try:
        return int(base64.b64decode(cursor.strip() + "=" * (-len(cursor.strip()) % 4)))
    except (ValueError, TypeError):
        return None


def utf8_boundary(data, end):
    """The largest index <= end that does not split a UTF-8 character of data."""
    if end >= len(data):
        return len(data)
    while end > 0 and (data[end] & 0xC0) == 0x80:
        end -= 1
    return end


# ================================================================================================
# Settings: read once from the environment, validated here
# ================================================================================================

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "console": 14,
    "solaris-cron": 15, **{f"local{i}": 16 + i for i in range(8)},
}
SEVERITIES = {
    "emerg": 0, "alert": 1, "crit": 2, "err": 3, "error": 3, "warning": 4, "warn": 4,
    "notice": 5, "info": 6, "debug": 7,
}
PRINTABLE_ASCII = frozenset(chr(c) for c in range(33, 127))
DEFAULT_PORTS = {"udp": 514, "tcp": 514, "tls": 6514, "relp": 2514, "relp+tls": 2514}
TLS_PROTOCOLS = {"tls", "relp+tls"}
SEPARATOR_CHARS = frozenset(string.punctuation + " \t") - {"\\", "="}
ENCODINGS = ("kv", "json", "cef", "leef")
# LEEF cannot escape: "=" ends a key, "|" a header field, "_" and ":" appear in keys (__tag__:x),
# and "\\" starts the \xHH text that replaces a delimiter inside a value.
LEEF_DELIMITERS = frozenset(string.punctuation + "\t") - {"=", "|", "_", ":", "\\"}


class SettingsError(Exception):
    """Bad settings: one line per problem, each naming the variable."""

    def __init__(self, problems):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting, named as its variable in lower case (SYSLOG_SEP -> syslog_sep)."""
    sls_endpoint: str              # a URL: https:// unless the variable said http://
    sls_ak_id: str                 # the credential settings: "" when not set (see sls_credentials)
    sls_ak_key: str = dataclasses.field(repr=False)
    sls_sts_token: str = dataclasses.field(repr=False)
    sls_ak_id_file: str
    sls_ak_key_file: str
    sls_sts_token_file: str
    sls_ecs_ram_role: str          # a role name, "auto" or ""
    sls_ecs_metadata_endpoint: str
    sls_ecs_metadata_v1: bool
    sls_auth_version: str          # v1 | v4
    sls_region: str                # as set, or derived from sls_endpoint
    sls_project: str
    sls_logstore: str
    sls_cg: str
    sls_consumer_name: str
    sls_cursor_start: str          # "begin", "end" or unix seconds as a string
    sls_cursor_end: str            # "" (run forever) or unix seconds as a string
    sls_heartbeat_interval: int
    sls_fetch_bytes: int
    sls_buffer_bytes: int
    sls_max_fetch_groups: int
    sls_fetch_interval: float
    sls_worker_pool_size: int
    sls_topics: frozenset          # empty = every topic
    sls_in_order: bool
    sls_query: str                 # an SPL statement, or ""
    sls_consume_processor: str     # a consume processor's name, or ""
    syslog_host: str               # as given; syslog_targets(settings) is its list of targets
    syslog_port: int
    syslog_protocol: str
    syslog_format: str
    syslog_framing: str
    syslog_encoding: str           # kv | json | cef | leef
    syslog_sep: str
    syslog_leef_delimiter: str     # one character
    syslog_fields_include: tuple   # shell-style patterns; empty = every field
    syslog_fields_exclude: tuple   # shell-style patterns
    syslog_fields_rename: tuple    # (old name, new name) pairs
    syslog_static_fields: tuple    # (name, value) pairs added to every message
    syslog_facility: int
    syslog_severity: int
    syslog_hostname: str
    syslog_tag: str
    syslog_max_message_size: int
    syslog_timeout: float
    syslog_retry_max_delay: float
    syslog_relp_window: int
    syslog_balance: str            # failover | round-robin (several targets in SYSLOG_HOST)
    syslog_failback_after: float
    syslog_max_eps: int            # 0 = no ceiling
    syslog_cert_path: str          # CA bundle for the server certificate; "" = the system's
    syslog_client_cert: str
    syslog_client_key: str
    sync_log_level: str
    sync_log_file: str
    sync_lock_file: str
    sync_stats_interval: float
    sync_stop_timeout: float
    sync_workers: object           # a count, or "auto" = min(CPU cores, shards)
    sync_metrics_addr: tuple       # (host, port) of /metrics and /healthz; () = off
    sync_health_failing_after: float

    @classmethod
    def from_environment(cls, env):
        """Build and validate the settings from a mapping of variables; raise SettingsError."""
        return _SettingsReader(env).read()


def is_sent(name, include, exclude):
    """Does a field pass the include and exclude patterns (shell-style, case-sensitive)?"""
    return ((not include or any(fnmatch.fnmatchcase(name, pattern) for pattern in include))
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude))


def tls_context(settings):
    """Certificate and host-name verification on, TLS 1.2 or newer, optional client certificate.
    Built while the settings are read too, so a bad file is a settings error, not a retry loop."""
    context = ssl.create_default_context(cafile=settings.syslog_cert_path or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.syslog_client_cert:
        context.load_cert_chain(settings.syslog_client_cert, settings.syslog_client_key)
    return context


class SyslogTarget(collections.namedtuple("SyslogTarget", "host port")):
    """One syslog collector of SYSLOG_HOST: a host name or IP address and a port."""
    __slots__ = ()

    def __str__(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_targets(text, default_port):
    """The targets of SYSLOG_HOST, in order: a comma-separated list of host, host:port or
    [IPv6]:port (a bare IPv6 address is a host without a port; default_port fills a missing
    port). Raises ValueError saying what is wrong with the first bad item."""
    targets = []
    for item in (item.strip() for item in text.split(",")):
        if not item:
            raise ValueError(f"{text.strip()!r} has an empty item (two commas, or one at an end)")
        target = _parse_target(item, default_port)
        if target in targets:
            raise ValueError(f"{target} is listed twice")
        targets.append(target)
    return tuple(targets)


def _parse_target(item, default_port):
    if item.startswith("["):
        host, closed, rest = item[1:].partition("]")
        if not closed:
            raise ValueError(f"{item!r}: the [ of an IPv6 address is not closed by ]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{item!r}: only :port may follow [IPv6 address]")
        port = rest[1:] if rest else None
        if not _is_ipv6(host):
            raise ValueError(f"{item!r}: {host!r} is not an IPv6 address")
    elif item.count(":") > 1:  # an IPv6 address without brackets cannot carry a port
        if not _is_ipv6(item):
            raise ValueError(f"{item!r} is neither host:port nor an IPv6 address ([address]:port)")
        host, port = item, None
    else:
        host, colon, port = item.partition(":")
        port = port if colon else None
        if not re.fullmatch(r"[^\s\[\]]+", host):
            raise ValueError(f"{item!r}: {host!r} is not a host name or IP address")
    if port is None:
        return SyslogTarget(host, default_port)
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{item!r}: {port!r} is not a port number (1..65535)")
    return SyslogTarget(host, int(port))


def _is_ipv6(text):
    try:
        ipaddress.IPv6Address(text)
        return True
    except ValueError:
        return False


def syslog_targets(settings):
    """The targets of settings.syslog_host (which keeps SYSLOG_HOST as given), checked when the
    settings were read."""
    return parse_targets(settings.syslog_host, settings.syslog_port)


def default_hostname():
    """This host's name, reduced to what an RFC 5424 HOSTNAME may contain."""
    name = "".join(c if c in PRINTABLE_ASCII else "-" for c in socket.gethostname())[:255]
    return name or "-"


# An SLS endpoint names its region (cn-hangzhou.log.aliyuncs.com, and in a VPC
# cn-hangzhou-intranet.log.aliyuncs.com): the rule of the Go SDK's util.ParseRegion.
SLS_ENDPOINT_PATTERN = re.compile(r"(?:https?://)?([a-z0-9-]+?)(?:-intranet|-share|-vpc)?"
                                  r"\.(?:log|sls)\.aliyuncs\.com(?::\d+)?/?", re.IGNORECASE)
DEFAULT_ECS_METADATA_ENDPOINT = "http://100.100.100.200"
# Each part of an AccessKey is set by its variable or read from the file its _FILE names.
ACCESS_KEY_FILES = {"SLS_AK_ID": "SLS_AK_ID_FILE", "SLS_AK_KEY": "SLS_AK_KEY_FILE",
                    "SLS_STS_TOKEN": "SLS_STS_TOKEN_FILE"}


def endpoint_region(endpoint):
    """The region an SLS endpoint names (cn-hangzhou for cn-hangzhou-intranet.log.aliyuncs.com);
    "" when it names none (an IP address, a private DNS name)."""
    match = SLS_ENDPOINT_PATTERN.fullmatch(endpoint)
    return match.group(1).lower() if match else ""


def read_secret_file(variable, path):
    """The text of the file a _FILE variable names, stripped (such files often end in a newline);
    ValueError says what is wrong with it, naming the variable, never quoting the file."""
    try:
        with open(path, "rb") as file:
            text = file.read().decode("utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{variable}: cannot read file {path!r} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{variable}: file {path!r} is not UTF-8 text") from None
    if not text:
        raise ValueError(f"{variable}: file {path!r} is empty")
    return text


ROOT_LOCK_DIRECTORY = "/run/sync_waf_to_syslog"


def default_lock_file(env, consumer_name):
    """The lock's path when SYNC_LOCK_FILE is not set, in a directory other users cannot write
    (the shared temp directory let them plant or remove the lock): systemd's RuntimeDirectory=
    ($RUNTIME_DIRECTORY, its first entry), else ROOT_LOCK_DIRECTORY as root, else the directory
    of this script. Not $XDG_RUNTIME_DIR: cron has none, so a copy started by hand in a login
    session would lock another file than the copy cron starts."""
    directory = (env.get("RUNTIME_DIRECTORY") or "").split(":")[0] or (
        ROOT_LOCK_DIRECTORY if os.geteuid() == 0 else os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(directory, f"sync_waf_to_syslog-{safe_file_name(consumer_name)}.lock")


class _SettingsReader:
    """Reads every variable once and collects all problems, so the operator sees them together."""

    def __init__(self, env):
        self.env = env
        self.problems = []

    def text(self, name, default=""):
        value = self.env.get(name)
        return default if value is None or value.strip() == "" else value.strip()

    def required(self, name):
        value = self.text(name)
        if not value:
            self.problems.append(f"{name}: required but not set")
        return value

    def number(self, name, default, minimum, maximum, kind=int):
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            self.problems.append(f"{name}: {raw!r} is not a {'whole ' if kind is int else ''}number")
            return default
        if not minimum <= value <= maximum:
            self.problems.append(f"{name}: {raw} is out of range ({minimum}..{maximum})")
            return default
        return value

    def size(self, name, default, minimum, maximum):
        """A number of bytes, with an optional K, M or G suffix (powers of 1024)."""
        raw = self.text(name)
        if not raw:
            return default
        match = re.fullmatch(r"(\d+)\s*([KMG]?)i?B?", raw, re.IGNORECASE)
        if not match:
            self.problems.append(f"{name}: {raw!r} is not a size in bytes, e.g. 2097152 or 2M")
            return default
        value = int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]
        if not minimum <= value <= maximum:
            self.problems.append(f"{name}: {raw} is out of range ({minimum}..{maximum} bytes)")
            return default
        return value

    def choice(self, name, default, choices):
        value = self.text(name, default).lower()
        if value not in choices:
            self.problems.append(f"{name}: {value!r} is not one of {', '.join(sorted(choices))}")
            return default
        return value

    def code(self, name, default, names, maximum):
        value = self.text(name, default).lower()
        if value.isdigit() and int(value) <= maximum:
            return int(value)
        if value in names:
            return names[value]
        self.problems.append(f"{name}: {value!r} is not a name ({', '.join(names)}) or 0..{maximum}")
        return 0

    def timestamp(self, name, default, keywords):
        value = self.text(name, default)
        if value == "" or value.lower() in keywords:
            return value.lower()
        seconds = parse_time(value)
        if seconds is None:
            allowed = " or ".join(list(keywords) + ["an ISO-8601 time such as 2026-11-01T00:00:00+08:00"])
            self.problems.append(f"{name}: {value!r} is not {allowed}")
            return default
        return str(seconds)

    def readable_file(self, name):
        """A file this program reads and trusts (a CA bundle, a client certificate or key)."""
        path = self.text(name)
        if path and not os.access(path, os.R_OK):
            self.problems.append(f"{name}: cannot read file {path!r}")
        elif path:
            problem = trust_problem(os.stat(path), trusted_owners())
            if problem:
                self.problems.append(f"{name}: file {path!r} {problem}; whoever can change it "
                                     "controls the TLS connection (chown it, chmod go-w)")
        return path

    def sls_credentials(self, endpoint):
        """The credential settings, as Settings fields: one source, an AccessKey (each part from its
        variable or its _FILE) or SLS_ECS_RAM_ROLE; then the signature version and region."""
        fields = {}
        given = []  # the AccessKey variables set
        for name, file_name in ACCESS_KEY_FILES.items():
            value, path = self.text(name), self.text(file_name)
            if value and path:
                self.problems.append(f"{file_name}: set {name} or {file_name}, not both")
            elif path:
                try:
                    read_secret_file(file_name, path)
                except ValueError as exc:
                    self.problems.append(str(exc))
            given += [variable for variable, setting in ((name, value), (file_name, path)) if setting]
            fields[name.lower()], fields[file_name.lower()] = value, path
        role = self.text("SLS_ECS_RAM_ROLE")
        if role.lower() == "auto":
            role = "auto"
        elif role and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", role):
            self.problems.append(f"SLS_ECS_RAM_ROLE: {role!r} is not a RAM role name or auto")
        if role and given:
            self.problems.append(f"SLS_ECS_RAM_ROLE: set it or an AccessKey ({', '.join(given)}), not both")
        if not role:
            for name in ("SLS_AK_ID", "SLS_AK_KEY"):
                if not (fields[name.lower()] or fields[ACCESS_KEY_FILES[name].lower()]):
                    self.problems.append(f"{name}: required (or {ACCESS_KEY_FILES[name]}), unless "
                                         "SLS_ECS_RAM_ROLE names the ECS instance's RAM role")
        metadata = self.text("SLS_ECS_METADATA_ENDPOINT", DEFAULT_ECS_METADATA_ENDPOINT).rstrip("/")
        if not re.fullmatch(r"https?://[^/\s]+", metadata):
            self.problems.append(f"SLS_ECS_METADATA_ENDPOINT: {metadata!r} is not http://HOST[:PORT]")
        auth_version = self.choice("SLS_AUTH_VERSION", "v4", {"v1", "v4"})
        region = self.text("SLS_REGION").lower() or endpoint_region(endpoint)
        if region and not re.fullmatch(r"[a-z0-9-]+", region):
            self.problems.append(f"SLS_REGION: {region!r} is not a region ID such as cn-hangzhou")
        if auth_version == "v4" and endpoint and not region:
            self.problems.append(f"SLS_REGION: required for signature v4 (SLS_AUTH_VERSION, default v4), "
                                 f"as SLS_ENDPOINT {endpoint!r} names no region: set it (e.g. "
                                 "cn-hangzhou) or SLS_AUTH_VERSION=v1")
        return dict(fields, sls_ecs_ram_role=role, sls_ecs_metadata_endpoint=metadata,
                    sls_ecs_metadata_v1=self.choice("SLS_ECS_METADATA_V1", "on", {"on", "off"}) == "on",
                    sls_auth_version=auth_version, sls_region=region)

    def endpoint(self, name):
        """The SLS endpoint as a URL: https:// unless it names its scheme, http:// or https://."""
        value = self.required(name)
        scheme, separator, rest = value.partition("://")
        if not separator:
            return "https://" + value if value else value
        if scheme.lower() not in ("http", "https") or not rest:
            self.problems.append(f"{name}: {value!r} must be a host name, optionally after "
                                 "https:// or http://")
        return f"{scheme.lower()}://{rest}"

    def header_field(self, name, default, max_length):
        value = self.text(name, default)
        if not set(value) <= PRINTABLE_ASCII or len(value) > max_length:
            self.problems.append(f"{name}: {value!r} must be 1..{max_length} printable ASCII "
                                 f"characters without spaces")
        return value

    def name_list(self, name):
        """A comma-separated list; items are stripped and empty ones ignored."""
        return tuple(item.strip() for item in self.text(name).split(",") if item.strip())

    def leef_delimiter(self, name):
        raw = self.env.get(name, "")
        text = raw.strip() or raw  # a TAB given literally is kept
        hex_code = re.fullmatch(r"0?x([0-9a-f]{2})", text, re.IGNORECASE)
        delimiter = chr(int(hex_code.group(1), 16)) if hex_code else text or "\t"
        if delimiter not in LEEF_DELIMITERS:
            self.problems.append(f"{name}: {raw!r} must be TAB or one ASCII punctuation character "
                                 "other than = | _ : \\, or its hex code such as x09 or 0x5e")
            return "\t"
        return delimiter

    def static_fields(self, name):
        """name=value,... (split at the first =) as (name, value) pairs."""
        fields = []
        for item in self.name_list(name):
            field_name, equals, value = item.partition("=")
            if not equals or not field_name.strip():
                self.problems.append(f"{name}: {item!r} is not name=value")
            else:
                fields.append((field_name.strip(), value.strip()))
        return tuple(fields)

    def listen_address(self, name):
        """host:port (host empty = every interface; [v6 address]:port) as (host, port); () if unset."""
        raw = self.text(name)
        if not raw:
            return ()
        host, colon, port = raw.rpartition(":")
        if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
            self.problems.append(f"{name}: {raw!r} is not host:port, e.g. 127.0.0.1:9108 or :9108")
            return ()
        return host.strip("[]"), int(port)

    def consume_processor(self):
        """SLS_CONSUME_PROCESSOR; SLS takes either it or SLS_QUERY, not both."""
        name = self.text("SLS_CONSUME_PROCESSOR")
        if name and self.text("SLS_QUERY"):
            self.problems.append("SLS_CONSUME_PROCESSOR: set it or SLS_QUERY, not both")
        return name

    def field_selection(self):
        """(include, exclude, rename) from SYSLOG_FIELDS_*; contradictions are problems."""
        include = self.name_list("SYSLOG_FIELDS_INCLUDE")
        exclude = self.name_list("SYSLOG_FIELDS_EXCLUDE")
        for entry in include:
            literal = not set(entry) & set("*?[")
            if entry in exclude or (literal and not is_sent(entry, (), exclude)):
                self.problems.append(f"SYSLOG_FIELDS_INCLUDE: {entry!r} is excluded again by "
                                     "SYSLOG_FIELDS_EXCLUDE")
        rename = []
        for item in self.name_list("SYSLOG_FIELDS_RENAME"):
            old, _, new = item.rpartition(":")  # the last colon: tag names contain one themselves
            old, new = old.strip(), new.strip()
            if not old or not new:
                self.problems.append(f"SYSLOG_FIELDS_RENAME: {item!r} is not old:new")
            elif not is_sent(old, include, exclude):
                self.problems.append(f"SYSLOG_FIELDS_RENAME: {old!r} is not sent "
                                     "(SYSLOG_FIELDS_INCLUDE / SYSLOG_FIELDS_EXCLUDE)")
            else:
                rename.append((old, new))
        olds, news = [old for old, _ in rename], [new for _, new in rename]
        for old in sorted({old for old in olds if olds.count(old) > 1}):
            self.problems.append(f"SYSLOG_FIELDS_RENAME: {old!r} is renamed more than once")
        for new in sorted({new for new in news if news.count(new) > 1}):
            self.problems.append(f"SYSLOG_FIELDS_RENAME: more than one field is renamed to {new!r}")
        return include, exclude, tuple(rename)

    def syslog_host(self, protocol, default_port):
        """SYSLOG_HOST as given, once parse_targets accepts it; UDP takes one target only: it
        cannot tell a working collector from a dead one (see README.md, "Several collectors")."""
        text = self.required("SYSLOG_HOST")
        if not text:
            return text
        try:
            targets = parse_targets(text, default_port)
        except ValueError as exc:
            self.problems.append(f"SYSLOG_HOST: {exc}")
            return text
        if len(targets) > 1 and protocol == "udp":
            self.problems.append("SYSLOG_HOST: a list of collectors needs SYSLOG_PROTOCOL tcp, tls, "
                                 "relp or relp+tls; over udp nothing tells a dead collector from a "
                                 "working one, so failover would lose logs silently")
        return text

    def read(self):
        sls_cg = self.text("SLS_CG", "WAF-SLS")
        protocol = self.choice("SYSLOG_PROTOCOL", "tcp", set(DEFAULT_PORTS))
        port = self.number("SYSLOG_PORT", DEFAULT_PORTS[protocol], 1, 65535)
        syslog_format = self.choice("SYSLOG_FORMAT", "rfc5424", {"rfc5424", "rfc3164"})
        separator = self.env.get("SYSLOG_SEP", ",")  # not stripped: " " and TAB are separators
        if separator == "" or not set(separator) <= SEPARATOR_CHARS:
            self.problems.append(f"SYSLOG_SEP: {separator!r} must be one or more ASCII punctuation, "
                                 "space or TAB characters, not \\ or =")
        max_size = self.number("SYSLOG_MAX_MESSAGE_SIZE", UDP_MAX_PAYLOAD, 480,
                               UDP_MAX_PAYLOAD if protocol == "udp" else 16 * 1024 * 1024)
        client_cert = self.readable_file("SYSLOG_CLIENT_CERT")
        client_key = self.readable_file("SYSLOG_CLIENT_KEY")
        if bool(client_cert) != bool(client_key):
            missing = "SYSLOG_CLIENT_KEY" if client_cert else "SYSLOG_CLIENT_CERT"
            self.problems.append(f"{missing}: required for mutual TLS together with "
                                 f"{'SYSLOG_CLIENT_CERT' if client_cert else 'SYSLOG_CLIENT_KEY'}")
        consumer_name = self.text("SLS_CONSUMER_NAME", f"{sls_cg}-{socket.gethostname()}")
        lock_file = self.text("SYNC_LOCK_FILE", default_lock_file(self.env, consumer_name))
        workers = self.text("SYNC_WORKERS", "1").lower()
        if workers != "auto":
            workers = self.number("SYNC_WORKERS", 1, 1, 256)
        include, exclude, rename = self.field_selection()
        endpoint = self.endpoint("SLS_ENDPOINT")
        settings = Settings(
            sls_endpoint=endpoint,
            **self.sls_credentials(endpoint),
            sls_project=self.required("SLS_PROJECT"),
            sls_logstore=self.required("SLS_LOGSTORE"),
            sls_cg=sls_cg,
            sls_consumer_name=consumer_name,
            sls_cursor_start=self.timestamp("SLS_CURSOR_START", "begin", ("begin", "end")),
            sls_cursor_end=self.timestamp("SLS_CURSOR_END", "", ("end",)),
            sls_heartbeat_interval=self.number("SLS_HEARTBEAT_INTERVAL", 20, 1, 3600),
            sls_fetch_bytes=self.size("SLS_FETCH_BYTES", 2 << 20, 16 << 10, 256 << 20),
            sls_buffer_bytes=self.size("SLS_BUFFER_BYTES", 64 << 20, 1 << 20, 16 << 30),
            sls_max_fetch_groups=self.number("SLS_MAX_FETCH_GROUPS", 1000, 1, 1000),
            sls_fetch_interval=self.number("SLS_FETCH_INTERVAL", 0.02, 0.01, 3600, float),
            sls_worker_pool_size=self.number("SLS_WORKER_POOL_SIZE", 2, 1, 64),
            sls_topics=frozenset(self.name_list("SLS_TOPICS")),
            sls_in_order=self.choice("SLS_IN_ORDER", "false", {"true", "false"}) == "true",
            sls_query=self.text("SLS_QUERY"),
            sls_consume_processor=self.consume_processor(),
            syslog_host=self.syslog_host(protocol, port),
            syslog_port=port,
            syslog_protocol=protocol,
            syslog_format=syslog_format,
            syslog_framing=self.choice("SYSLOG_FRAMING", "octet-counting", {"octet-counting", "lf"}),
            syslog_encoding=self.choice("SYSLOG_ENCODING", "kv", set(ENCODINGS)),
            syslog_sep=separator,
            syslog_leef_delimiter=self.leef_delimiter("SYSLOG_LEEF_DELIMITER"),
            syslog_fields_include=include,
            syslog_fields_exclude=exclude,
            syslog_fields_rename=rename,
            syslog_static_fields=self.static_fields("SYSLOG_STATIC_FIELDS"),
            syslog_facility=self.code("SYSLOG_FACILITY", "user", FACILITIES, 23),
            syslog_severity=self.code("SYSLOG_SEVERITY", "info", SEVERITIES, 7),
            syslog_hostname=self.header_field("SYSLOG_HOSTNAME", default_hostname(), 255),
            syslog_tag=self.header_field("SYSLOG_TAG", "AliyunWAF",
                                         32 if syslog_format == "rfc3164" else 48),
            syslog_max_message_size=max_size,
            syslog_timeout=self.number("SYSLOG_TIMEOUT", 120.0, 1, 86400, float),
            syslog_retry_max_delay=self.number("SYSLOG_RETRY_MAX_DELAY", 30.0, 0.1, 3600, float),
            syslog_relp_window=self.number("SYSLOG_RELP_WINDOW", 128, 1, 100000),
            syslog_balance=self.choice("SYSLOG_BALANCE", "failover", {"failover", "round-robin"}),
            syslog_failback_after=self.number("SYSLOG_FAILBACK_AFTER", 60.0, 0, 86400, float),
            syslog_max_eps=self.number("SYSLOG_MAX_EPS", 0, 0, 10_000_000),
            syslog_cert_path=self.readable_file("SYSLOG_CERT_PATH"),
            syslog_client_cert=client_cert,
            syslog_client_key=client_key,
            sync_log_level=self.choice("SYNC_LOG_LEVEL", "info", {"debug", "info", "warning", "error"}).upper(),
            sync_log_file=self.text("SYNC_LOG_FILE"),
            sync_lock_file=lock_file,
            sync_stats_interval=self.number("SYNC_STATS_INTERVAL", 60.0, 0, 86400, float),
            sync_stop_timeout=self.number("SYNC_STOP_TIMEOUT", 30.0, 1, 3600, float),
            sync_workers=workers,
            sync_metrics_addr=self.listen_address("SYNC_METRICS_ADDR"),
            sync_health_failing_after=self.number("SYNC_HEALTH_FAILING_AFTER", 300.0, 1, 86400, float),
        )
        if protocol in TLS_PROTOCOLS and not self.problems:
            self.check_tls_files(settings)
        if self.problems:
            raise SettingsError(self.problems)
        return settings

    def check_tls_files(self, settings):
        try:
            tls_context(settings)
        except (ssl.SSLError, OSError) as exc:
            names = "SYSLOG_CERT_PATH" if not settings.syslog_client_cert else \
                "SYSLOG_CERT_PATH / SYSLOG_CLIENT_CERT / SYSLOG_CLIENT_KEY"
            self.problems.append(f"{names}: cannot load the TLS files: {exc}")


def load_env_file(path, environ):
    """Variables from a .env file, overridden by the real environment. The file (and a symbolic
    link to it) must belong to this user or root, and the file not be writable by group or
    others: its variables choose the files this program writes and the servers it trusts."""
    try:
        from dotenv import dotenv_values
    except ImportError:
        raise SettingsError([f"{path}: reading it needs python-dotenv, which is not installed "
                             "(pip install -r requirements.txt), or set the variables in the environment"]) from None
    try:
        link = os.lstat(path)
        with open(path, encoding="utf-8") as stream:
            problem = trust_problem(os.fstat(stream.fileno()), trusted_owners())
            if stat.S_ISLNK(link.st_mode) and link.st_uid not in trusted_owners():
                problem = f"is a symbolic link of uid {link.st_uid}"
            if problem:
                raise SettingsError([f"{path}: {problem}; it can set every variable, so it is not "
                                     "read (chown it, chmod go-w)"])
            values = {k: v for k, v in dotenv_values(stream=stream).items() if v is not None}
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError([f"{path}: cannot read it: {exc}"]) from None
    values.update(environ)
    return values


# The SDK's HTTP library (requests) reads its proxy from the process environment only.
PROXY_VARIABLES = tuple(name for upper in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
                        for name in (upper, upper.lower()))


def export_proxy_variables(environment):
    """Put the proxy variables a .env file sets into os.environ, where the SDK finds them (the
    real environment still wins). Other .env values stay settings only: not exported."""
    for name in PROXY_VARIABLES:
        if name in environment:
            os.environ.setdefault(name, environment[name])


# ================================================================================================
# EDIT HERE: what every message carries
# ================================================================================================
# The one place to change the messages without reading the rest of this file. Every encoding (kv,
# json, cef, leef) and every path (the fast key=value path, messages cut to SYSLOG_MAX_MESSAGE_SIZE,
# --dry-run) follows what is here. After an edit, run the quick tests (README.md, "Tests"):
#     python -m pytest -q -m "not slow and not rsyslog" tests

# Fields added to every message, first, whatever SYSLOG_FIELDS_* select; SYSLOG_STATIC_FIELDS adds
# more after these. Example: STATIC_FIELDS = [("env", "prod"), ("dc", "hz")]
STATIC_FIELDS = []


def customize(fields):
    """Called for every log with its fields, a list of (name, value) text pairs in this order:
    __topic__, __source__, every __tag__:*, then the WAF fields. Return the fields to send (this
    list, changed, or a new one), or None to drop the log: a dropped log counts as filtered and
    its checkpoint moves on like a sent one's. SYSLOG_FIELDS_* then select from what this returns,
    and cef and leef take the WAF's decision for their header from it.

    As it stands (`return fields`) key=value messages take the fast path; any edit here sends every
    log through the per-field path: the kv encoder then runs about 2.5x slower (README.md,
    "Changing the messages").

    Examples, to combine as needed:
        # rename a field
        fields = [("client_ip" if name == "real_client_ip" else name, value) for name, value in fields]
        # add a field computed from others
        values = dict(fields)
        fields.append(("url", values.get("host", "") + values.get("request_uri", "")))
        # drop a class of logs: health checks
        if dict(fields).get("request_uri", "").startswith("/healthz"):
            return None
    """
    return fields


# SIEM mappings for SYSLOG_ENCODING=cef and leef: which WAF field goes under which key. They are
# looked up with the names fields are sent under (after customize() and SYSLOG_FIELDS_RENAME). A
# field not listed keeps a custom key (cef_key, leef_key); a field with an empty value is left out.

DEVICE_VENDOR, DEVICE_PRODUCT, DEVICE_VERSION = "Alibaba Cloud", "WAF", "3.0"
CEF_KEYS = {  # WAF field -> CEF extension key
    "real_client_ip": "src",             # the client as WAF saw it through proxies
    "src_port": "spt",
    "host": "dhost",
    "dst_port": "dpt",
    "request_uri": "request",            # path and query string
    "request_method": "requestMethod",
    "http_user_agent": "requestClientApplication",
    "http_referer": "requestContext",
    "http_cookie": "requestCookies",
    "request_length": "in",
    "body_bytes_sent": "out",
    "final_action": "act",
    "request_traceid": "externalId",
    "time": "rt",                        # as epoch milliseconds (see CEF_TIME_KEYS)
    "final_rule_id": "cs1",              # csN, cnN, flexStringN ...: csNLabel = the WAF field name
    "final_rule_type": "cs2",
    "final_plugin": "cs3",
    "http_x_forwarded_for": "cs4",
    "matched_host": "cs5",
    "request_body": "cs6",
}
CEF_TIME_KEYS = {"rt", "start", "end"}   # values (ISO 8601 or Unix seconds) sent as epoch ms
CEF_CUSTOM_KEY_PREFIX = "AliyunWaf"      # other fields: prefix + name in CamelCase (AliyunWafSslCipher)

LEEF_KEYS = {  # WAF field -> LEEF attribute; other fields keep their name (see leef_custom_key)
    "real_client_ip": "src",
    "src_port": "srcPort",
    "dst_port": "dstPort",
    "request_uri": "url",
    "request_length": "srcBytes",
    "body_bytes_sent": "dstBytes",
    "final_rule_type": "cat",            # with the EventID, what QRadar maps to a QID
    "time": "devTime",                   # in LEEF_TIME_FORMAT, UTC, followed by devTimeFormat
}
LEEF_TIME_FORMAT = "MMM dd yyyy HH:mm:ss z"  # Java SimpleDateFormat, e.g. Nov 27 2026 10:11:05 GMT

# Severity (CEF 0-10, LEEF sev 1-10) by what WAF did: its final_action, "monitor" (a module in
# observation mode matched and let the request pass) or "access" (no module acted).
EVENT_SEVERITY = {
    "block": 8,
    "captcha_strict": 6, "captcha": 5, "sigchl": 5, "js": 5,
    "monitor": 5,
    "access": 2,
}
OTHER_ACTION_SEVERITY = 5  # a final_action the table does not list


# ================================================================================================
# Encoders: pure functions from a WAF log to the bytes of one syslog message (the reference)
# ================================================================================================
# These are written for reading: one field at a time. The fast path further down gives the same
# bytes with fewer Python steps; to understand or change what is sent, read only this section.
#
# A pull arrives as LogGroups (read by read_log_groups, further down). A LogGroup holds the logs
# that reached SLS together, with what they share:
#   group.Topic, group.Source (bytes), group.LogTags.Key / .Value (lists of bytes), group.Logs
# and each log its time and its own fields:
#   log.Time, log.Time_ns, log.Contents.Key / .Value (lists of bytes, possibly invalid UTF-8)

def text_of(raw):
    """The text of a raw key or value: invalid UTF-8 becomes U+FFFD."""
    return raw.decode("utf-8", "replace")


def group_fields(log_group):
    """The fields every log of a LogGroup shares: __topic__, __source__ and each __tag__:*."""
    tags = log_group.LogTags
    return [("__topic__", text_of(log_group.Topic)), ("__source__", text_of(log_group.Source)),
            *((f"__tag__:{text_of(key)}", text_of(value)) for key, value in zip(tags.Key, tags.Value))]


def texts(raw_items):
    """text_of of each raw key or value, decoded in one pass (NUL is never part of a multi-byte
    UTF-8 character, so joining by it changes nothing), unless one holds NUL itself."""
    decoded = b"\x00".join(raw_items).decode("utf-8", "replace").split("\x00")
    return decoded if len(decoded) == len(raw_items) else list(map(text_of, raw_items))


def log_fields(log):
    """A log's own fields as (key, value) text pairs, in order."""
    return list(zip(texts(log.Contents.Key), texts(log.Contents.Value)))


# ------------------------------------------------------------------------------------------------
# key=value (SYSLOG_ENCODING=kv, the default)
# ------------------------------------------------------------------------------------------------

_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in range(32) if c != 9}  # TAB is kept
_CONTROL_ESCAPES.update({10: "\\n", 13: "\\r", 92: "\\\\"})


def encode_kv(fields, separator):
    """MSG body: key=value pairs joined by the separator, escaped so the split is exact."""
    escape_key, escape_value = kv_escapers(separator)
    return separator.join(f"{escape_key(k)}={escape_value(v)}" for k, v in fields)


@functools.lru_cache(maxsize=8)
def kv_escapers(separator):
    """(escape_key, escape_value) for one separator; see MESSAGE in the docstring for the rules."""
    return _escaper(separator, "="), _escaper(separator)


def _escaper(separator, extra="", value_end=r"\Z", joiner=""):
    """escape(text) for keys (extra="=") or values. A value ends where `value_end` matches; the
    `joiner` of joined values is left as it is."""
    specials = "".join(re.escape(chr(c)) for c in _CONTROL_ESCAPES if chr(c) != joiner)
    # A value that ends in a proper prefix of a multi-character separator would run into the
    # separator that follows it; those characters are written as \xHH instead.
    tails = "".join(f"|{re.escape(separator[:n])}{value_end}" for n in range(len(separator) - 1, 0, -1))

    def replacement(match):
        text = match.group()
        if text == separator:
            return "\\" + separator
        if len(text) == 1 and ord(text) in _CONTROL_ESCAPES:
            return _CONTROL_ESCAPES[ord(text)]
        if text == "=":
            return "\\="
        return "".join(f"\\x{ord(c):02x}" for c in text)

    pattern = re.compile(f"{re.escape(separator)}{tails}|[{specials}{extra}]")
    quick = re.compile(f"[{specials}{extra}{re.escape(separator[0])}]")
    return lambda text: pattern.sub(replacement, text) if quick.search(text) else text


# ------------------------------------------------------------------------------------------------
# Field selection (every encoding): SYSLOG_FIELDS_INCLUDE / _EXCLUDE / _RENAME (is_sent: Settings)
# ------------------------------------------------------------------------------------------------

def field_selector(include, exclude, rename):
    """sent_name(name) -> the name a field is sent under, or None if it is not sent; or None when
    every field is sent as it is. Patterns match the SLS names; renaming comes after. The decision
    per name is cached: names repeat in every log."""
    if not (include or exclude or rename):
        return None
    new_names = dict(rename)

    @functools.lru_cache(maxsize=4096)
    def sent_name(name):
        return new_names.get(name, name) if is_sent(name, include, exclude) else None

    return sent_name


def select_fields(fields, sent_name):
    """The fields whose sent_name is not None, renamed to it, in their order (all, if sent_name is None)."""
    if sent_name is None:
        return fields
    return [(name, value) for name, value in ((sent_name(k), v) for k, v in fields) if name is not None]


# ------------------------------------------------------------------------------------------------
# JSON, CEF and LEEF (SYSLOG_ENCODING=json / cef / leef)
# ------------------------------------------------------------------------------------------------

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_json(fields):
    """MSG body: one compact JSON object, keys in field order. A name given twice (possible only
    through SYSLOG_FIELDS_RENAME) keeps its first position and its last value."""
    return _JSON_ENCODER.encode(dict(fields))


def waf_event(fields):
    """(event id, name, severity) of a WAF log for the CEF and LEEF headers: what the deciding
    module did, e.g. ("waf:113001", "waf sqli block", 8), or ("access", "access", 2) if none acted."""
    values = dict(fields)
    action = values.get("final_action", "")
    module = values.get("final_plugin", "")
    rule_id, rule_type = values.get("final_rule_id", ""), values.get("final_rule_type", "")
    if not action:
        # Observation mode: a module logs its <module>_action but lets the request pass.
        module = next((key[:-5] for key, value in fields if value == "true" and key.endswith("_test")
                       and values.get(key[:-5] + "_action")), "")
        if module:
            action = "monitor"
            rule_id, rule_type = values.get(module + "_rule_id", ""), values.get(module + "_rule_type", "")
    event_id = f"{module}:{rule_id}" if module and rule_id else module or "access"
    name = " ".join(part for part in (module, rule_type, action) if part) or "access"
    return event_id, name, EVENT_SEVERITY.get(action or "access", OTHER_ACTION_SEVERITY)


@functools.lru_cache(maxsize=4096)
def log_time_seconds(text):
    """Unix seconds of a time field (WAF `time` is ISO 8601); None if it is not a time."""
    return parse_time(text)


def replacer(table):
    """A function replacing every character that is a key of `table` by its value, in one pass."""
    pattern = re.compile("[" + "".join(map(re.escape, table)) + "]")
    return functools.partial(pattern.sub, lambda match: table[match.group()])


# CEF and LEEF cannot carry control characters (CEF only LF and CR, escaped): they become this text.
_CONTROL_TEXT = {"\t": "\\t", "\n": "\\n", "\r": "\\r",
                 **{chr(c): f"\\x{c:02x}" for c in range(32) if chr(c) not in "\t\n\r"}}
_OTHER_CONTROLS = {c: text for c, text in _CONTROL_TEXT.items() if c not in "\t\n\r"}

# CEF escaping: header \ and |; extension \ and =, line breaks as \n and \r. The backslash of a
# control character's text is escaped too, so a parser gives back that text.
_escape_cef_header = replacer({"\\": "\\\\", "|": "\\|", **{c: "\\" + t for c, t in _CONTROL_TEXT.items()}})
_CEF_VALUE_ESCAPES = {"\\": "\\\\", "=": "\\=", "\n": "\\n", "\r": "\\r",
                      **{c: "\\" + t for c, t in _OTHER_CONTROLS.items()}}
_escape_cef_value = replacer(_CEF_VALUE_ESCAPES)
_CEF_LABELED_KEY = re.compile(r"(cs|cn|cfp|c6a|flexString|flexNumber|flexDate)\d")
_CEF_PREFIX = "CEF:0|" + "|".join(map(_escape_cef_header, (DEVICE_VENDOR, DEVICE_PRODUCT,
                                                             DEVICE_VERSION)))


def cef_custom_key(name):
    """CEF_CUSTOM_KEY_PREFIX + the name's letters and digits in CamelCase: CEF keys are alphanumeric."""
    return CEF_CUSTOM_KEY_PREFIX + "".join(word[:1].upper() + word[1:]
                                           for word in re.findall("[A-Za-z0-9]+", name))


@functools.lru_cache(maxsize=4096)
def cef_key(name):
    """(extension key, its label key or None) for a field name."""
    key = CEF_KEYS.get(name) or cef_custom_key(name)
    return key, (key + "Label" if _CEF_LABELED_KEY.fullmatch(key) else None)


@functools.lru_cache(maxsize=1024)
def cef_header(event):
    """The CEF header, up to the extension, for `event` (from waf_event)."""
    event_id, name, severity = event
    return f"{_CEF_PREFIX}|{_escape_cef_header(event_id)}|{_escape_cef_header(name)}|{severity}|"


def encode_cef(fields, event):
    """MSG body in CEF: the header names the WAF's decision (`event`, from waf_event), the
    extension holds the fields under their keys (CEF_KEYS, cef_key), empty values left out."""
    pairs = []
    for field, value in fields:
        if not value:
            continue
        key, label = cef_key(field)
        if key in CEF_TIME_KEYS:
            seconds = log_time_seconds(value)
            if seconds is None:  # not a time: sent as it is, under a custom key
                key, label = cef_custom_key(field), None
            else:
                value = str(seconds * 1000)
        pairs.append(f"{key}={_escape_cef_value(value)}")
        if label:
            pairs.append(f"{label}={_escape_cef_value(field)}")
    return cef_header(event) + " ".join(pairs)


# LEEF has no escaping: what would break an event is replaced by text (\n, \r, \t, \xHH): control
# characters, "|" in header fields and the delimiter in values. "=" stays (a key ends at the first).
_replace_leef_header = replacer({"|": "\\x7c", **_CONTROL_TEXT})
_LEEF_PREFIX = "LEEF:2.0|" + "|".join(map(_replace_leef_header, (DEVICE_VENDOR, DEVICE_PRODUCT,
                                                                   DEVICE_VERSION)))


def leef_value_replacements(delimiter):
    """What replaces each character of a value that would break a LEEF event."""
    return {**_OTHER_CONTROLS, "\n": "\\n", "\r": "\\r",
            delimiter: _CONTROL_TEXT.get(delimiter, f"\\x{ord(delimiter):02x}")}


@functools.lru_cache(maxsize=8)
def leef_value_replacer(delimiter):
    return replacer(leef_value_replacements(delimiter))


def leef_custom_key(name):
    """The name with every character but letters, digits, _ and : as _: LEEF keys are single words."""
    return re.sub("[^A-Za-z0-9_:]", "_", name) or "_"


@functools.lru_cache(maxsize=4096)
def leef_key(name):
    return LEEF_KEYS.get(name) or leef_custom_key(name)


@functools.lru_cache(maxsize=4096)
def leef_time(seconds):
    """A time in LEEF_TIME_FORMAT, in UTC."""
    t = time.gmtime(seconds)
    return (f"{MONTHS[t.tm_mon - 1]} {t.tm_mday:02d} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


@functools.lru_cache(maxsize=1024)
def leef_header(event_id, delimiter):
    """The LEEF header, up to the attributes, for an event id."""
    # The delimiter field: the character itself, or its hex code when it is not printable (TAB).
    declared = delimiter if delimiter.isprintable() else f"x{ord(delimiter):02x}"
    return f"{_LEEF_PREFIX}|{_replace_leef_header(event_id)}|{declared}|"


def encode_leef(fields, event, delimiter):
    """MSG body in LEEF 2.0: the EventID names the WAF's decision (`event`, from waf_event), then
    sev and the fields under their keys (LEEF_KEYS, leef_key), empty values left out."""
    event_id, _, severity = event
    replace = leef_value_replacer(delimiter)
    attributes = [f"sev={severity}"]
    for field, value in fields:
        if not value:
            continue
        key = leef_key(field)
        if key == "devTime":
            seconds = log_time_seconds(value)
            if seconds is not None:
                attributes += [f"devTime={leef_time(seconds)}", f"devTimeFormat={LEEF_TIME_FORMAT}"]
                continue
            key = leef_custom_key(field)  # not a time: sent as it is, under its own name
        attributes.append(f"{key}={replace(value)}")
    return leef_header(event_id, delimiter) + delimiter.join(attributes)


# ------------------------------------------------------------------------------------------------
# The syslog message around the body
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def rfc3339_parts(seconds):
    """('YYYY-MM-DDThh:mm:ss', '+hh:mm') in local time: computed once per second of log time."""
    t = time.localtime(seconds)
    offset = t.tm_gmtoff // 60
    sign = "-" if offset < 0 else "+"
    return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}",
            f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}")


def rfc3339(seconds, nanoseconds=0):
    """RFC 3339 / RFC 5424 TIMESTAMP with microseconds (the most RFC 5424 allows) and UTC offset.
    A nanosecond part that is not one (1e9 or more) is left out."""
    clock, offset = rfc3339_parts(seconds)
    if 0 < nanoseconds < 1_000_000_000:
        return f"{clock}.{nanoseconds // 1000:06d}{offset}"
    return f"{clock}{offset}"


@functools.lru_cache(maxsize=4096)
def rfc3164_timestamp(seconds):
    """'Mmm dd hh:mm:ss' in local time, English month, day padded with a space (RFC 3164 4.1.2)."""
    t = time.localtime(seconds)
    return f"{MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"


def rfc5424_header(pri, timestamp, hostname, app_name, procid):
    return f"<{pri}>1 {timestamp} {hostname} {app_name} {procid} - - "


def rfc3164_header(pri, timestamp, hostname, tag):
    return f"<{pri}>{timestamp} {hostname} {tag}: "


# ------------------------------------------------------------------------------------------------
# Messages longer than SYSLOG_MAX_MESSAGE_SIZE
# ------------------------------------------------------------------------------------------------

TRUNCATION_MARK = "..."


def fit_message(head, fields, encode_body, max_size):
    """The header (bytes) + body within max_size; (bytes, truncated?).

    Values longer than a common cap are cut to it at a character boundary, marked "...": the
    largest cap that fits, so the longest values are cut and every field stays present, and the body
    stays well-formed in every encoding. If even values cut to "..." do not fit, fields are left out
    from the end; a header that alone is too long is cut at a UTF-8 boundary as a last resort.
    Each try encodes the body once, and the number of tries grows with the logarithm of the cap and
    of the fields kept, so a log with a million fields costs seconds, not hours.

    A body that cannot fit is never built whole: its names and values alone (and one character
    between each name and value) already exceed the room. That is a lower bound in kv and json;
    cef and leef may map names to shorter keys and leave empty values out, and then cut a body
    that would have fit, which gives the same bytes, reported as not truncated."""
    room = max_size - len(head)
    if sum(len(key) + len(value) + 1 for key, value in fields) <= room:
        body = encode_body(fields).encode()
        if len(body) <= room:
            return head + body, False
    raws = [value.encode() for _, value in fields]

    def body_with(cap, count):
        """The body of the first `count` fields, values longer than `cap` bytes cut to it."""
        kept = len(TRUNCATION_MARK)
        return encode_body([
            (key, value if len(raw) <= cap else raw[:utf8_boundary(raw, cap - kept)].decode() + TRUNCATION_MARK)
            for (key, value), raw in zip(fields[:count], raws)]).encode()

    shortest = len(TRUNCATION_MARK)
    count = largest(lambda n: len(body_with(shortest, n)) <= room, len(fields))
    longest = max(map(len, raws[:count]), default=shortest)
    cap = largest(lambda c: len(body_with(c, count)) <= room, min(longest, max(room, shortest)), shortest)
    message = head + body_with(cap, count)
    truncated = count < len(fields) or cap < longest or len(message) > max_size
    return message[:utf8_boundary(message, max_size)], truncated


def largest(fits, high, low=0):
    """The largest n in [low, high] for which fits(n), for a fits() that holds up to some n and not
    after it; low if none. Probes low+1, low+2, low+4, ... then bisects, so the cost follows the
    answer, not high."""
    step = 1
    while low + step <= high and fits(low + step):
        low, step = low + step, step * 2
    high = min(high, low + step - 1)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


# ================================================================================================
# FAST PATH: internals, not needed to understand or change what is sent
# ================================================================================================
# What is below gives, byte for byte, what the reference encoders above give, with a few C-level
# passes per log instead of Python work per field (which is what limits the forwarder). It must
# stay identical to them: tests/test_encoders.py (kv) and tests/test_encoders_siem.py (json, cef,
# leef) prove it for any keys, values (invalid UTF-8, NUL, separators, times), separators, static
# fields and field selection (test_fast_*_equals_the_reference*, hypothesis), and for the reader
# against the SDK's own parse (test_reading_a_pull_*). MessageEncoder takes the fast path only
# while customize() is unchanged (customize_is_unchanged).

# ------------------------------------------------------------------------------------------------
# Reading a pull: the uncompressed body of PullLogs, a serialized LogGroupList
# ------------------------------------------------------------------------------------------------
# The SDK parses a pull into one protobuf object per Log.Content, and reading Key and Value off those
# costs more than all the encoding. Here protobuf's C parser reads the same bytes (SLS's LogGroupList:
# Log{1 Time, 2 Contents{1 Key, 2 Value}, 4 Time_ns}, LogGroup{1 Logs, 3 Topic, 4 Source, 6 LogTags})
# with a schema in which a Log's repeated Contents are ONE optional message of repeated Key and
# repeated Value: protobuf merges the occurrences of an optional message, so each Log comes out
# holding its keys and its values as two lists of bytes, in order. LogTags likewise.

@functools.lru_cache(maxsize=2)
def log_group_list_class(merged):
    """The LogGroupList message class with Contents and LogTags merged (see above), or, unmerged,
    as SLS defines it but with every field optional bytes (for bytes that do not pair up)."""
    field = descriptor_pb2.FieldDescriptorProto
    pairs_label = field.LABEL_OPTIONAL if merged else field.LABEL_REPEATED
    text_label = field.LABEL_REPEATED if merged else field.LABEL_OPTIONAL
    schema = descriptor_pb2.FileDescriptorProto(name=f"sync_waf_to_syslog_{merged}.proto", package="waf")
    for name, fields in {
        "Pairs": [("Key", 1, field.TYPE_BYTES, text_label), ("Value", 2, field.TYPE_BYTES, text_label)],
        "Log": [("Time", 1, field.TYPE_UINT32, field.LABEL_OPTIONAL), ("Contents", 2, ".waf.Pairs", pairs_label),
                ("Time_ns", 4, field.TYPE_FIXED32, field.LABEL_OPTIONAL)],
        "LogGroup": [("Logs", 1, ".waf.Log", field.LABEL_REPEATED),
                     ("Topic", 3, field.TYPE_BYTES, field.LABEL_OPTIONAL),
                     ("Source", 4, field.TYPE_BYTES, field.LABEL_OPTIONAL),
                     ("LogTags", 6, ".waf.Pairs", pairs_label)],
        "LogGroupList": [("LogGroups", 1, ".waf.LogGroup", field.LABEL_REPEATED)],
    }.items():
        message = schema.message_type.add(name=name)
        for field_name, number, kind, label in fields:
            if isinstance(kind, str):  # the name of a message type
                message.field.add(name=field_name, number=number, label=label, type=field.TYPE_MESSAGE,
                                  type_name=kind)
            else:
                message.field.add(name=field_name, number=number, label=label, type=kind)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    descriptor = pool.FindMessageTypeByName("waf.LogGroupList")
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.21
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(pool).GetPrototype(descriptor)


def read_log_groups(raw):
    """The LogGroups of a serialized LogGroupList, in the shape above. Raises protobuf's DecodeError
    if the bytes do not parse."""
    groups = log_group_list_class(merged=True).FromString(raw).LogGroups
    if keys_match_values(groups):
        return groups
    # A Content or LogTag without its Key or its Value: merged lists would pair the wrong keys and
    # values, so read them one by one, a missing one empty, as the SDK does, into the same shape.
    # (SLS requires both, so this does not happen; only a log with one Content lacking its Key and
    # another lacking its Value would pass the count above, and its fields would be shifted.)
    paired = log_group_list_class(merged=True)()
    for group in log_group_list_class(merged=False).FromString(raw).LogGroups:
        into = paired.LogGroups.add(Topic=group.Topic, Source=group.Source)
        pair_up(group.LogTags, into.LogTags)
        for entry in group.Logs:
            log = into.Logs.add(Time=entry.Time, Time_ns=entry.Time_ns)
            pair_up(entry.Contents, log.Contents)
    return paired.LogGroups


def pair_up(items, pairs):
    pairs.Key.extend(item.Key for item in items)
    pairs.Value.extend(item.Value for item in items)


def keys_match_values(log_groups):
    """Whether every log and every LogGroup's tags have as many keys as values."""
    for group in log_groups:
        if len(group.LogTags.Key) != len(group.LogTags.Value):
            return False
        for entry in group.Logs:
            if len(entry.Contents.Key) != len(entry.Contents.Value):
                return False
    return True


# A log's keys, as one tuple per set of keys: reading 55 keys out of protobuf makes 55 bytes objects,
# and that costs as much as encoding the log. Its values are read first, joined by NUL; then the
# Contents, holding only the keys, serialize to one short string that finds the tuple (and the plans
# cached for it). So the fast path takes the values out of each log it reads (take_values), and puts
# them back (put_back_values) when the log goes to the reference path after all.
_key_sets = {}  # serialized Contents without values -> the tuple of their keys


def take_values(contents, limit):
    """(keys, values joined by NUL) of a log's Contents, the values taken out of it; or None, and
    the Contents left as they are, if a value holds NUL itself (rare: the joined values could not
    be split apart again) or the values alone are longer than limit: the message will (nearly
    always) be cut, so the reference path builds it, not whole."""
    # Held in no variable: a list of values still referred to when ClearField runs is copied.
    count = len(contents.Value)
    if not count:
        return (), b""
    joined = joined_by_nul(contents.Value, count)
    if joined is None or len(joined) > limit:
        return None
    contents.ClearField("Value")
    serialized = contents.SerializeToString()
    keys = _key_sets.get(serialized)
    if keys is None:
        if len(_key_sets) >= 1024:  # bounded: a server may send a new set of keys every log
            _key_sets.clear()
        keys = _key_sets[serialized] = tuple(contents.Key)
    return keys, joined


def joined_by_nul(raw_values, count):
    """The `count` raw values joined by NUL, or None if one holds NUL itself (the joined values
    could not be split apart again)."""
    joined = b"\x00".join(raw_values)
    return joined if joined.count(b"\x00") == count - 1 else None


def put_back_values(contents, taken):
    """Undo take_values."""
    keys, joined = taken
    if keys:
        contents.Value.extend(joined.split(b"\x00"))


def read_pull(response):
    """The LogGroups of a PullLogResponse, read from its uncompressed body, which the SDK (0.9)
    keeps and parses only when asked. ResilientConsumerClient.pull_logs reads every pull with it,
    so a pull that does not parse is a failed pull, fetched again."""
    raw = getattr(response, "_raw_uncompressed_body", None)  # SDK internal, hence the fallback
    if not isinstance(raw, (bytes, bytearray)):
        raw = response.get_loggroup_list().SerializeToString()
    return read_log_groups(raw)


# ------------------------------------------------------------------------------------------------
# key=value from templates
# ------------------------------------------------------------------------------------------------
# The values of a log are joined by NUL into one bytes object, escaped in one pass, split again and
# put into a %-template of the escaped keys, cached per tuple of keys. NUL is never part of a
# multi-byte UTF-8 character, and escaping only adds ASCII next to ASCII, so invalid UTF-8 turns into
# the same U+FFFD as when each value is decoded and escaped on its own.

_CONTROL_BYTES = bytes(c for c in _CONTROL_ESCAPES if c not in (0, 92))  # NUL joins, \ is not a control


@functools.lru_cache(maxsize=1024)
def kv_plan(keys, separator, sent_name):
    """(template, positions) for a tuple of raw keys: the template b"key1=%s<separator>key2=%s..."
    of the fields sent (sent_name: field selection, see field_selector; None sends all, as they
    are), and the positions of their values (None: all). Logs differ in which fields they have (a
    module that did not act leaves its fields out), so a logstore has many, from few keys."""
    names = list(map(text_of, keys))
    positions = None
    if sent_name is not None:
        sent = [(position, sent_name(name)) for position, name in enumerate(names)]
        positions = tuple(position for position, name in sent if name is not None)
        names = [name for _, name in sent if name is not None]
    template = separator.replace("%", "%%").encode().join(kv_template_part(name, separator) for name in names)
    return template, positions


@functools.lru_cache(maxsize=4096)
def kv_template_part(name, separator):
    """b"key=%s" for one field name, escaped."""
    return (kv_escapers(separator)[0](name).replace("%", "%%") + "=%s").encode()


@functools.lru_cache(maxsize=8)
def joined_values_escaper(separator):
    """escape(joined) -> the escaped values, UTF-8, from a log's raw values joined by NUL."""
    escape_text = _escaper(separator, value_end=r"(?=\x00|\Z)", joiner="\x00")
    sep = separator.encode()

    def escape(joined):
        if len(sep) == 1 and len(joined.translate(None, _CONTROL_BYTES)) == len(joined):
            # The usual case: only \ and the separator to escape, by two bytes.replace (no regex).
            joined = joined.replace(b"\\", b"\\\\").replace(sep, b"\\" + sep)
            return joined if joined.isascii() else joined.decode("utf-8", "replace").encode()
        return escape_text(joined.decode("utf-8", "replace")).encode()

    return escape


def kv_body(keys, joined, separator, sent_name=None, limit=float("inf")):
    """encode_kv(select_fields(fields, sent_name), separator).encode() for the fields of these raw
    keys and their raw values joined by NUL (take_values), or None if the template of the names is
    longer than limit: the message will be cut, so the reference path builds it, not whole."""
    if not keys:
        return b""
    template, positions = kv_plan(keys, separator, sent_name)
    if len(template) > limit:
        return None
    escaped = joined_values_escaper(separator)(joined).split(b"\x00")
    return template % (tuple(escaped) if positions is None else tuple(map(escaped.__getitem__, positions)))


@functools.lru_cache(maxsize=1024)
def shared_keys(tag_keys):
    """The raw keys of a LogGroup's shared fields (group_fields) for these tag keys."""
    return (b"__topic__", b"__source__", *(b"__tag__:" + key for key in tag_keys))


def kv_shared_body(log_group, separator, sent_name):
    """encode_kv(select_fields(group_fields(log_group), sent_name)), UTF-8, from the raw values as
    kv_body reads a log's: a LogGroup may hold a single log, so this is per-log work too."""
    tags = log_group.LogTags
    values = [log_group.Topic, log_group.Source, *tags.Value]
    joined = joined_by_nul(values, len(values))
    if joined is None:
        return encode_kv(select_fields(group_fields(log_group), sent_name), separator).encode()
    return kv_body(shared_keys(tuple(tags.Key)), joined, separator, sent_name)


def kv_group_bodies(head, separator, sent_name, limit):
    """For the logs of one LogGroup: a function ((keys, joined values) of a log, from take_values
    -> its kv body, UTF-8, or None for the reference path) giving head + the separator +
    encode_kv(select_fields(log_fields(log))), where head is what comes first (the static fields
    and the group's selected shared fields, encoded)."""
    prefix = head + separator.encode() if head else b""

    def body(taken):
        own = kv_body(*taken, separator, sent_name, limit)
        if own is None:
            return None
        return prefix + own if own else head

    return body


def _returns_its_argument(fields):
    return fields


def customize_is_unchanged():
    """Whether customize() still only returns its argument (the same bytecode as
    _returns_its_argument), so that the fast path, which does not call it, gives the same bytes."""
    return customize.__code__.co_code == _returns_its_argument.__code__.co_code


# ------------------------------------------------------------------------------------------------
# json, cef and leef from per-key-set plans
# ------------------------------------------------------------------------------------------------
# As for kv: what repeats from log to log (which fields are sent under which name and key, where
# the WAF's decision is read, the template) is worked out once per set of keys and, for cef and
# leef, per set of non-empty values; per log there remain one escaping pass over its values joined
# by NUL (escaping never makes or removes a NUL), one split and a %-template. The WAF's decision
# and the times are read from the escaped values: where escaping changed one of those (it always
# adds a backslash), the log takes the reference path.

def joined_replacer(table):
    """For UTF-8 bytes of values joined by NUL: what replacer(table) does to their text (NUL stays,
    as the joiner). Every character of the table is ASCII, and ASCII is never part of a multi-byte
    character, so replacing bytes is replacing characters. Without control characters (the usual
    case) the others are replaced one by one, by bytes.replace, with no regular expression."""
    table = {c.encode(): text.encode() for c, text in table.items() if c != "\x00"}
    pattern = re.compile(b"[" + b"".join(map(re.escape, table)) + b"]")
    replace_all = functools.partial(pattern.sub, lambda match: table[match.group()])
    controls = bytes(c[0] for c in table if c[0] < 32)
    # The backslash first: the other replacements add backslashes, which must stay as they are.
    others = sorted(((c, text) for c, text in table.items() if c[0] >= 32), key=lambda item: item[0] != b"\\")
    if any(c in text for i, (_, text) in enumerate(others) for c, _ in others[i + 1:]):
        return replace_all

    def replace(joined):
        if len(joined.translate(None, controls)) != len(joined):
            return replace_all(joined)
        for c, text in others:
            joined = joined.replace(c, text)
        return joined

    return replace


_escape_cef_joined = joined_replacer(_CEF_VALUE_ESCAPES)


@functools.lru_cache(maxsize=8)
def leef_joined_replacer(delimiter):
    return joined_replacer(leef_value_replacements(delimiter))


def json_escaped_values(text, count):
    """The JSON string escapes of `count` values joined by NUL (text), or None if they cannot be
    told apart: NUL is escaped as \\u0000, so a value holding that text itself takes the
    reference path."""
    escaped = json.encoder.encode_basestring(text)[1:-1]
    if escaped.count("\\u0000") != count - 1:
        return None
    return escaped.split("\\u0000")


def siem_group_bodies(encoding, static_fields, shared, sent_name, delimiter):
    """For the logs of one LogGroup whose shared fields are `shared`: a function ((keys, joined
    values) of a log, from take_values -> its json, cef or leef body, UTF-8, or None for the
    reference path) giving what the reference path gives for static_fields +
    select_fields(shared + log_fields(log))."""
    shared_names = tuple(name for name, _ in shared)
    shared_text = "\x00".join(value for _, value in shared)
    static = tuple(static_fields)
    as_text = encoding == "json"  # json escapes text; cef and leef escape UTF-8 bytes
    if as_text:
        shared_values = json_escaped_values(shared_text, len(shared))
    else:
        escape = _escape_cef_joined if encoding == "cef" else leef_joined_replacer(delimiter)
        shared_values = escape(shared_text.encode()).split(b"\x00")
    if shared_values is None or len(shared_values) != len(shared):  # a shared value holding NUL
        return lambda taken: None

    def body(taken):
        keys, joined = taken
        plan = siem_plan(encoding, static, shared_names, keys, sent_name, delimiter)
        if plan is None:
            return None
        if not keys:
            return plan(shared_values)
        if as_text:
            values = json_escaped_values(joined.decode("utf-8", "replace"), len(keys))
            return None if values is None else plan(shared_values + values)
        if not joined.isascii():  # invalid UTF-8 becomes U+FFFD, as text_of does (NUL stays NUL)
            joined = joined.decode("utf-8", "replace").encode()
        return plan(shared_values + escape(joined).split(b"\x00"))

    return body


@functools.lru_cache(maxsize=1024)
def siem_plan(encoding, static_fields, shared_names, keys, sent_name, delimiter):
    """plan(escaped values) -> the UTF-8 body for a log whose fields are shared_names + the names of
    keys with these values (text for json, UTF-8 bytes for cef and leef, escaped for the encoding),
    or None for the reference path; None when this set of keys always takes it (json: a name sent
    twice)."""
    names = shared_names + tuple(map(text_of, keys))
    positions = [i for i, name in enumerate(names) if sent_name is None or sent_name(name) is not None]
    sent_names = [name if sent_name is None else sent_name(name) for name in map(names.__getitem__, positions)]
    quote = json.encoder.encode_basestring
    if encoding == "json":
        static_names = [name for name, _ in static_fields]
        if len(set(static_names + sent_names)) != len(static_names) + len(sent_names):
            return None
        parts = [f"{quote(name)}:{quote(value)}".replace("%", "%%") for name, value in static_fields]
        template = "{" + ",".join(parts + [quote(name).replace("%", "%%") + ':"%s"' for name in sent_names]) + "}"
        return lambda values: (template % tuple(map(values.__getitem__, positions))).encode()
    if encoding == "cef":
        heading_of = heading_plan(names, lambda event: (cef_header(event).encode(),))
    else:
        heading_of = heading_plan(names, lambda event: (leef_header(event[0], delimiter).encode(),
                                                        str(event[2]).encode()))
    static_present = tuple(bool(value) for _, value in static_fields)
    templates = {}  # which of the log's sent values are non-empty -> siem_template(), as bytes
    every_field = len(positions) == len(names)

    def plan(values):
        sent = values if every_field else list(map(values.__getitem__, positions))
        present = bytes(map(bool, sent))
        found = templates.get(present)
        if found is None:
            if len(templates) >= 256:  # bounded: which values are empty is the attacker's choice
                templates.clear()
            fields = [field for field, kept in zip(static_fields, static_present) if kept] + \
                     [(name, None) for name, kept in zip(sent_names, present) if kept]
            template = siem_template(encoding, fields, delimiter)
            found = templates[present] = template and (template[0].encode(), template[1])
        if not found:
            return None
        template, time_at = found
        kept = list(itertools.compress(sent, present))
        for i in time_at:
            kept[i] = siem_time(kept[i], encoding)
            if kept[i] is None:  # not a time: the reference path sends it as it is
                return None
        heading = heading_of(values)  # cef: (header,); leef: (header, sev)
        if heading is None:
            return None
        return heading[0] + template % (*heading[1:], *kept)

    return plan


@functools.lru_cache(maxsize=4096)
def siem_time(value, encoding):
    """A time field's escaped value (UTF-8) as cef (milliseconds) or leef (LEEF_TIME_FORMAT) sends
    it, or None if it is not a time. Escaped, a value holds a backslash, which no time does; and a
    time as sent is digits, letters, spaces and colons: nothing to escape for any LEEF_DELIMITERS."""
    seconds = log_time_seconds(value.decode())
    if seconds is None:
        return None
    return (str(seconds * 1000) if encoding == "cef" else leef_time(seconds)).encode()


def siem_template(encoding, fields, delimiter):
    """(%-template of a cef extension or of leef attributes for these non-empty fields, positions
    among the log's values of those that are times), or None for the reference path. A field's
    value is None for a log's value (a %s), or a static value, escaped into the template here."""
    parts, time_at, slots = [], [], 0
    for name, value in fields:
        static = value is not None
        if encoding == "cef":
            key, label = cef_key(name)
            timed = key in CEF_TIME_KEYS
        else:
            key, label = leef_key(name), None
            timed = key == "devTime"
        if timed and static:
            return None  # a static time field: the reference path converts it
        if timed:
            time_at.append(slots)
        if static:
            escaped = _escape_cef_value(value) if encoding == "cef" else leef_value_replacer(delimiter)(value)
            parts.append(f"{key}={escaped}".replace("%", "%%"))
        else:
            parts.append(key.replace("%", "%%") + "=%s")
            slots += 1
        if label:
            parts.append(f"{label}={_escape_cef_value(name)}".replace("%", "%%"))
        if timed and encoding == "leef":
            parts.append(f"devTimeFormat={LEEF_TIME_FORMAT}".replace("%", "%%"))
    if encoding == "cef":
        return " ".join(parts), time_at
    return delimiter.replace("%", "%%").join(["sev=%s"] + parts), time_at


def heading_plan(names, header_of):
    """heading(escaped values) -> header_of(waf_event of the fields (names, values)), or None if
    escaping changed a value waf_event reads (it holds a backslash: the reference path reads it).
    waf_event of only the fields it reads, in their order, gives the same; and logs share few
    decisions, so each one's heading is worked out once (among the last 4,096)."""
    modules = {name[:-5] for name in names if name.endswith("_test")}
    read = {"final_action", "final_plugin", "final_rule_id", "final_rule_type",
            *(f"{module}{suffix}" for module in modules for suffix in ("_test", "_action", "_rule_id", "_rule_type"))}
    positions = [i for i, name in enumerate(names) if name in read]
    read_names = [names[i] for i in positions]
    headings = {}

    def heading(values):  # values: UTF-8 bytes
        read_values = tuple(map(values.__getitem__, positions))
        found = headings.get(read_values)
        if found is None:
            if len(headings) >= 4096:
                headings.clear()
            if any(b"\\" in value for value in read_values):
                found = headings[read_values] = False
            else:
                event = waf_event([(name, value.decode()) for name, value in zip(read_names, read_values)])
                found = headings[read_values] = header_of(event)
        return found or None

    return heading


# ================================================================================================
# The encoder: a pull's LogGroups -> syslog messages
# ================================================================================================

Encoded = collections.namedtuple("Encoded", "messages newest truncated filtered")


class MessageEncoder:
    """Turns the LogGroups of a pull (read_log_groups) into syslog messages, one per log.

    The reference path, for every encoding: a log's fields (its group's shared fields, then its own)
    go through customize() (None drops the log); cef and leef take their header's WAF decision from
    the result; SYSLOG_FIELDS_* select from it; STATIC_FIELDS and SYSLOG_STATIC_FIELDS come first;
    the body is encoded and cut to SYSLOG_MAX_MESSAGE_SIZE if need be. Every encoding takes the fast
    path instead while customize() is unchanged, with the same bytes."""

    def __init__(self, settings, procid=None):
        self.settings = settings
        self.pri = settings.syslog_facility * 8 + settings.syslog_severity
        self.procid = str(procid or os.getpid())
        self.sent_name = field_selector(settings.syslog_fields_include, settings.syslog_fields_exclude,
                                        settings.syslog_fields_rename)
        self.static_fields = [*STATIC_FIELDS, *settings.syslog_static_fields]
        self.customize = customize
        self.fast = customize_is_unchanged()
        self.kv_static = encode_kv(self.static_fields, settings.syslog_sep).encode()

    def header(self, seconds, nanoseconds):
        s = self.settings
        if s.syslog_format == "rfc3164":
            return rfc3164_header(self.pri, rfc3164_timestamp(seconds), s.syslog_hostname, s.syslog_tag)
        return rfc5424_header(self.pri, rfc3339(seconds, nanoseconds), s.syslog_hostname,
                              s.syslog_tag, self.procid)

    def body_encoder(self, fields):
        """The function (fields to send -> MSG body text) of SYSLOG_ENCODING for a log with these
        fields: cef and leef put the WAF's decision, from all of them, in their header."""
        s = self.settings
        if s.syslog_encoding == "kv":
            return functools.partial(encode_kv, separator=s.syslog_sep)
        if s.syslog_encoding == "json":
            return encode_json
        if s.syslog_encoding == "cef":
            return functools.partial(encode_cef, event=waf_event(fields))
        return functools.partial(encode_leef, event=waf_event(fields), delimiter=s.syslog_leef_delimiter)

    def reference_message(self, header, fields):
        """(message, truncated?) for a log's fields by the reference path, or None if customize()
        drops the log."""
        fields = self.customize(fields)
        if fields is None:
            return None
        fields = list(fields)
        sent = self.static_fields + select_fields(fields, self.sent_name)
        return fit_message(header, sent, self.body_encoder(fields), self.settings.syslog_max_message_size)

    def group_bodies(self, log_group):
        """The fast path's function ((keys, joined values) of a log, from take_values -> its body,
        or None) for the logs of a LogGroup."""
        s = self.settings
        if s.syslog_encoding == "kv":
            shared = kv_shared_body(log_group, s.syslog_sep, self.sent_name)
            head = s.syslog_sep.encode().join(part for part in (self.kv_static, shared) if part)
            return kv_group_bodies(head, s.syslog_sep, self.sent_name, s.syslog_max_message_size)
        return siem_group_bodies(s.syslog_encoding, self.static_fields, group_fields(log_group), self.sent_name,
                                 s.syslog_leef_delimiter)

    def encode(self, log_groups):
        """Encoded(messages, time of the newest log, messages truncated, logs filtered) for one
        pulled batch. Filtered logs (of a topic not in SLS_TOPICS, or dropped by customize()) give
        no message, yet count as done: their checkpoint moves. The fast path takes the values out
        of the logs it encodes (take_values): a pull is read for one encoding."""
        messages, newest, truncated, filtered = [], 0, 0, 0
        max_size = self.settings.syslog_max_message_size
        topics = self.settings.sls_topics
        headers = {}  # (seconds, nanoseconds) -> header: the logs of a batch share few timestamps
        for group in log_groups:
            if topics and text_of(group.Topic) not in topics:
                newest = max(newest, max((entry.Time for entry in group.Logs), default=0))
                filtered += len(group.Logs)
                continue
            fast_body = self.group_bodies(group) if self.fast else None
            shared = None  # group_fields(group), once a log needs it
            for entry in group.Logs:
                stamp = entry.Time, entry.Time_ns
                newest = max(newest, stamp[0])
                header = headers.get(stamp)
                if header is None:
                    header = headers[stamp] = self.header(*stamp).encode()
                taken = take_values(entry.Contents, max_size) if fast_body else None
                if taken is not None:
                    body = fast_body(taken)
                    if body is not None and len(header) + len(body) <= max_size:
                        messages.append(header + body)
                        continue
                    put_back_values(entry.Contents, taken)
                if shared is None:
                    shared = group_fields(group)
                result = self.reference_message(header, shared + log_fields(entry))
                if result is None:
                    filtered += 1
                    continue
                messages.append(result[0])
                truncated += result[1]
        return Encoded(messages, newest, truncated, filtered)


# ================================================================================================
# Transports: one small class each for UDP, TCP, TLS and RELP (plain and over TLS)
# ================================================================================================

SIOCOUTQ = 0x5411      # Linux ioctl: bytes in the send queue not yet acknowledged by the peer
TCP_CLOSE_STATE = 7    # tcpi_state after a reset


class StopRequested(Exception):
    """The program is stopping: abandon the batch in hand (it stays unacknowledged in SLS)."""


class ServerClosed(ConnectionError):
    """The syslog server closed the connection (an EOF, not a reset)."""


class UdpTransport:
    """One datagram per message. UDP cannot confirm delivery: a send error is the only signal."""

    unread_messages = 0  # nothing to send again first (see TcpTransport)

    def __init__(self, settings, target=None):
        self.address = target or syslog_targets(settings)[0]
        self.sock = None

    def connect(self, stop):
        family, kind, proto, _, address = socket.getaddrinfo(*self.address, type=socket.SOCK_DGRAM)[0]
        self.sock = socket.socket(family, kind, proto)
        self.sock.connect(address)  # a connected socket reports ICMP port-unreachable as ECONNREFUSED

    def send(self, messages, stop):
        send = self.sock.send
        for message in messages:
            send(message)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class TcpTransport:
    """RFC 6587 syslog over one persistent TCP connection.

    `send` returns only when the peer's TCP stack has acknowledged every byte (the kernel send
    queue is empty), so a batch counts as delivered only once it really reached the receiver's
    host; a connection closed or reset before that raises, and the caller sends the batch again.

    Acknowledged is not read: a server that resets the connection (e.g. rsyslogd stopping, which
    stops reading first) or stalls drops what it had not read yet. So when a connection breaks
    other than by the server closing it after reading everything, what it confirmed in the last
    RESEND_WINDOW seconds (at most RESEND_LIMIT bytes) goes out again before the next batch: a
    duplicate at worst. If that batch goes to another collector (Delivery), that collector's
    transport takes it over (adopt_unread).

    Every transport talks to one target (host, port): the first of SYSLOG_HOST unless given; its
    name is resolved again at every connect, and each of its addresses is tried in turn."""

    POLL = 0.5  # seconds between checks of the stop flag while blocked
    CONNECT_TIMEOUT = 10  # a connect or TLS handshake cannot watch the stop flag: keep it short
    RESEND_WINDOW = 1.0
    RESEND_LIMIT = 4 << 20  # about the most a Linux receive buffer holds unread

    def __init__(self, settings, target=None):
        self.address = target or syslog_targets(settings)[0]
        self.timeout = settings.syslog_timeout
        self.octet_counting = settings.syslog_framing == "octet-counting"
        self.sock = None
        self.confirmed = collections.deque()  # (when, bytes, messages) confirmed on this connection
        self.unread, self.unread_messages = b"", 0  # confirmed on a broken connection, maybe never
                                                    # read: sent again first

    def open_socket(self):
        sock = socket.create_connection(self.address, timeout=min(self.timeout, self.CONNECT_TIMEOUT))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock

    def connect(self, stop):
        self.sock = self.open_socket()
        self.sock.settimeout(self.POLL)

    def frame(self, message):
        return b"%d %s" % (len(message), message) if self.octet_counting else message + b"\n"

    def send(self, messages, stop):
        data = self.unread + b"".join(map(self.frame, messages))
        try:
            self.check_connection("")
            self.send_all(data, stop)
            self.wait_until_acknowledged(stop)
            # A receiver that closes while our bytes arrive may drop them although its kernel has
            # acknowledged them: an EOF or reset seen now leaves the batch unconfirmed, so resend it.
            self.check_connection(" before confirming the batch")
        except ServerClosed:
            self.confirmed.clear()  # it read everything before it closed
            raise
        except OSError:
            self.unread = b"".join(sent for _, sent, _ in self.confirmed) + self.unread
            self.unread_messages += sum(count for _, _, count in self.confirmed)
            self.confirmed.clear()
            raise
        self.remember(data, len(messages) + self.unread_messages)
        self.unread, self.unread_messages = b"", 0

    def adopt_unread(self, other):
        """Send first, with the next batch, what a broken connection of another target's
        transport may have left unread (the same framing: one SYSLOG_FRAMING for all)."""
        self.unread, self.unread_messages = self.unread + other.unread, self.unread_messages + other.unread_messages
        other.unread, other.unread_messages = b"", 0

    def remember(self, data, messages):
        """Keep what was just confirmed, and of the rest only the last RESEND_WINDOW seconds, at
        most RESEND_LIMIT bytes (whole batches)."""
        now = time.monotonic()
        self.confirmed.append((now, data, messages))
        kept = sum(len(sent) for _, sent, _ in self.confirmed)
        while len(self.confirmed) > 1 and (now - self.confirmed[0][0] > self.RESEND_WINDOW
                                           or kept > self.RESEND_LIMIT):
            kept -= len(self.confirmed.popleft()[1])

    def check_connection(self, when):
        """Raise if the server has closed (ServerClosed) or reset the connection."""
        gone = self.peer_gone()
        if gone == "closed":
            raise ServerClosed(f"the syslog server closed the connection{when}")
        if gone == "reset":
            raise ConnectionResetError(errno.ECONNRESET, f"the syslog server reset the connection{when}")

    def send_all(self, data, stop):
        """Write all of data, for as long as the server keeps reading it."""
        data = memoryview(data)
        deadline = time.monotonic() + self.timeout
        while data:
            try:
                sent = self.sock.send(data[:1 << 20])
            except (socket.timeout, ssl.SSLWantWriteError):
                sent = 0
            if sent:
                data, deadline = data[sent:], time.monotonic() + self.timeout
            self.check_progress(stop, deadline)

    def wait_until_acknowledged(self, stop):
        """Block until the peer acknowledged everything sent, or raise if the connection broke."""
        fd = self.sock.fileno()
        pause, unacked = 0.0005, None
        deadline = time.monotonic() + self.timeout
        while True:
            left = struct.unpack("i", fcntl.ioctl(fd, SIOCOUTQ, b"\0\0\0\0"))[0]
            if left == 0:
                return
            if self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE_STATE:
                raise ConnectionResetError(errno.ECONNRESET, "connection reset before the syslog "
                                                             f"server acknowledged {left} bytes")
            if left != unacked:
                unacked, deadline = left, time.monotonic() + self.timeout
            self.check_progress(stop, deadline)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def check_progress(self, stop, deadline):
        if stop.is_set():
            raise StopRequested()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the syslog server accepted nothing for {self.timeout:g} s")

    def peer_gone(self):
        """None while the connection is open; "closed" once the server has closed it (an EOF: it
        read everything first), "reset" once it is broken otherwise."""
        self.sock.setblocking(False)
        try:
            return "closed" if self.sock.recv(4096) == b"" else None
        except (BlockingIOError, ssl.SSLWantReadError):
            return None
        except ssl.SSLEOFError:  # TLS: a plain EOF without close_notify
            return "closed"
        except OSError:
            return "reset"
        finally:
            self.sock.settimeout(self.POLL)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.confirmed.clear()  # closed by us, so read by the server: a next connection starts afresh


class TlsTransport(TcpTransport):
    """RFC 5425: the TCP transport inside TLS (SNI and host-name check on; close_notify on close)."""

    def __init__(self, settings, target=None):
        super().__init__(settings, target)
        self.context = tls_context(settings)

    def open_socket(self):
        sock = super().open_socket()
        try:
            return self.context.wrap_socket(sock, server_hostname=self.address[0])
        except BaseException:
            sock.close()
            raise

    def close(self):
        if self.sock is not None:
            try:
                self.sock.settimeout(1)
                self.sock.unwrap()  # close_notify; many servers just close, which is fine
            except (OSError, ValueError):
                pass
        super().close()


RELP_MAX_TXNR = 999_999_999  # then transaction numbers start again at 1
RELP_OFFERS = b"relp_version=0\nrelp_software=sync_waf_to_syslog\ncommands=syslog"
RELP_HEADER = re.compile(rb"(\d{1,9}) ([A-Za-z]{1,32}) (\d{1,9})([ \n])")
RELP_MAX_HEADER = 53  # 9 digits, SP, 32 letters, SP, 9 digits, SP or LF


class RelpError(ConnectionError):
    """The RELP server refused a command or broke the protocol: drop the connection, resend."""


def relp_frame(txnr, command, data=b""):
    """TXNR SP COMMAND SP DATALEN [SP DATA] LF (the frame of librelp's doc/relp.html)."""
    if not data:
        return b"%d %s 0\n" % (txnr, command)
    return b"%d %s %d %s\n" % (txnr, command, len(data), data)


def parse_relp_frames(buffer):
    """([(txnr, command, data), ...], bytes used) for the complete frames at the start of buffer;
    raises RelpError for bytes that cannot begin a frame."""
    frames, position = [], 0
    while True:
        header = RELP_HEADER.match(buffer, position)
        if header is None:
            rest = bytes(buffer[position:position + RELP_MAX_HEADER + 1])
            if b"\n" in rest or len(rest) > RELP_MAX_HEADER:
                raise RelpError(f"the server sent something that is not a RELP frame: {rest!r}")
            return frames, position  # the header is still arriving
        length = int(header[3])
        if header[4] == b"\n" and length:
            raise RelpError(f"RELP frame without its {length} bytes of data: {header[0]!r}")
        start = header.end()
        end = start + length if header[4] == b" " else start - 1  # at the trailer LF
        if end >= len(buffer):
            return frames, position  # the rest of the frame is still arriving
        if buffer[end] != ord("\n"):
            raise RelpError(f"RELP frame {header[0]!r} does not end in LF after {length} bytes")
        frames.append((int(header[1]), header[2], bytes(buffer[start:end])))
        position = end + 1


def relp_ok(response):
    """Whether the data of a `rsp` frame starts with status 200 ("200 OK")."""
    return response[:3] == b"200" and response[3:4] in (b"", b" ", b"\n")


class RelpTransport(TcpTransport):
    """RELP, the Reliable Event Logging Protocol of rsyslog's librelp (its doc/relp.html), over the
    connection of TcpTransport; RelpTlsTransport runs it inside TLS.

    A session opens with an `open` command offering relp_version=0 and commands=syslog; every
    message is then a `syslog` command with the next transaction number (1, 2, ... in a session;
    999,999,999 is followed by 1), and up to SYSLOG_RELP_WINDOW commands may await their `rsp`.
    `send` returns only when the server answered "200 OK" to every message of the batch: its
    acknowledgement that it took the message, so a checkpoint moves only past acknowledged logs.
    Any other answer, a `serverclose` hint, a closed connection, a protocol error or
    SYSLOG_TIMEOUT without progress raises, and the caller reconnects and sends the whole batch
    again: the server may get a message twice, never not at all. `close` ends an idle session
    politely with a `close` command."""

    CLOSE_TIMEOUT = 1.0  # seconds to wait for the answer to `close`

    def __init__(self, settings, target=None):
        super().__init__(settings, target)
        self.window = settings.syslog_relp_window
        self.txnr = 0
        self.received = bytearray()  # bytes from the server not yet parsed into frames
        self.server_closed = False   # a `serverclose` hint came
        self.idle = False            # a session is open and has no command unanswered

    def connect(self, stop):
        super().connect(stop)
        self.txnr, self.received, self.server_closed = 0, bytearray(), False
        try:
            self.open_session(stop)
        except BaseException:
            self.close()
            raise

    def open_session(self, stop):
        txnr = self.next_txnr()
        self.send_all(relp_frame(txnr, b"open", RELP_OFFERS), stop)
        status, _, offer_lines = self.answer(txnr, stop, self.timeout).partition(b"\n")
        if not relp_ok(status):
            raise RelpError(f"the RELP server refused the session: {status.decode(errors='replace')}")
        offers = {}  # the features the server accepted: name -> values
        for line in offer_lines.splitlines():
            name, _, values = line.partition(b"=")
            offers[name] = values.split(b",")
        # The spec: no relp_version in the answer means no session; no syslog means no messages.
        if b"relp_version" not in offers or b"syslog" not in offers.get(b"commands", []):
            raise RelpError("the RELP server does not accept syslog messages; it offered "
                            f"{offer_lines.decode(errors='replace')!r}")
        self.idle = True

    def next_txnr(self):
        self.txnr = self.txnr % RELP_MAX_TXNR + 1
        return self.txnr

    def send(self, messages, stop):
        if self.server_closed:  # after the previous batch was acknowledged
            raise ConnectionError("the RELP server ended the session (serverclose)")
        self.idle = False
        unanswered = set()  # transaction numbers of the messages sent and not yet acknowledged
        position = 0        # messages[:position] have been sent
        while position < len(messages) or unanswered:
            if len(unanswered) < self.window and position < len(messages):
                ahead = messages[position:position + self.window - len(unanswered)]
                frames = []
                for message in ahead:
                    txnr = self.next_txnr()
                    unanswered.add(txnr)
                    frames.append(relp_frame(txnr, b"syslog", message))
                self.send_all(b"".join(frames), stop)
                position += len(ahead)
            for txnr, answer in self.answers(stop, self.timeout):
                if txnr not in unanswered:
                    raise RelpError(f"the RELP server answered transaction {txnr}, which was not sent")
                if not relp_ok(answer):
                    raise RelpError(f"the RELP server refused a message: {answer.decode(errors='replace')}")
                unanswered.remove(txnr)
            if self.server_closed and (unanswered or position < len(messages)):
                raise ConnectionError(f"the RELP server ended the session (serverclose) with "
                                      f"{len(unanswered) + len(messages) - position} messages "
                                      "of the batch unacknowledged")
        self.idle = not self.server_closed

    def answer(self, txnr, stop, timeout):
        """The data of the server's answer to txnr, the only command outstanding."""
        answers = self.answers(stop, timeout)
        if not answers:  # only a serverclose hint came
            raise ConnectionError("the RELP server ended the session (serverclose)")
        answered = [number for number, _ in answers]
        if answered != [txnr]:
            raise RelpError(f"the RELP server answered transactions {answered}, not {txnr}")
        return answers[0][1]

    def answers(self, stop, timeout):
        """[(txnr, data)] of the `rsp` frames that arrive next: waits until at least one frame
        came, or timeout seconds without a byte. A `serverclose` hint sets server_closed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (socket.timeout, ssl.SSLWantReadError):
                self.check_progress(stop, deadline)
                continue
            if not data:
                raise ConnectionError("the RELP server closed the connection")
            self.received += data
            deadline = time.monotonic() + timeout
            frames, used = parse_relp_frames(self.received)
            del self.received[:used]
            if frames:
                break
        answers = []
        for txnr, command, answer in frames:
            if command == b"rsp":
                answers.append((txnr, answer))
            elif command == b"serverclose":
                self.server_closed = True
            else:
                raise RelpError(f"unexpected RELP command from the server: {command.decode()}")
        return answers

    def close(self):
        if self.sock is not None and self.idle:
            self.idle = False
            try:
                txnr = self.next_txnr()
                self.send_all(relp_frame(txnr, b"close"), threading.Event())
                self.answer(txnr, threading.Event(), self.CLOSE_TIMEOUT)
            except OSError:
                pass  # the server is gone or slow; closing the connection is enough
        super().close()


class RelpTlsTransport(RelpTransport, TlsTransport):
    """RELP inside TLS, as rsyslog's imrelp with tls="on": TlsTransport's connection and checks."""


TRANSPORTS = {"udp": UdpTransport, "tcp": TcpTransport, "tls": TlsTransport,
              "relp": RelpTransport, "relp+tls": RelpTlsTransport}


def transport_for(settings, target):
    """A new transport of SYSLOG_PROTOCOL to one target."""
    return TRANSPORTS[settings.syslog_protocol](settings, target)


class EventsPerSecond:
    """SYSLOG_MAX_EPS: a token bucket of at most BURST_SECONDS' worth of messages, refilled at the
    ceiling, shared by every process of this host that sends to the same syslog server (--workers,
    other forwarders): its state is a small file beside the lock file, read and written under an
    exclusive lock. take(n) waits until n messages may go; nothing is ever dropped."""

    BURST_SECONDS = 0.2
    STATE = struct.Struct("dd")  # tokens, CLOCK_MONOTONIC (one clock for every process) of the last update
    WARN_EVERY = 60

    def __init__(self, settings):
        self.rate = settings.syslog_max_eps
        self.burst = max(1, int(self.rate * self.BURST_SECONDS))
        name = f"sync_waf_to_syslog-{safe_file_name(settings.syslog_host)}-{settings.syslog_port}.eps"
        self.path = os.path.join(os.path.dirname(os.path.abspath(settings.sync_lock_file)), name)
        self.fd = None
        self.lock = threading.Lock()  # flock() does not exclude this process's other threads
        self.warned = RateLimiter(self.WARN_EVERY)

    def take(self, count, stop):
        """Wait until `count` (at most self.burst) messages may go; False if stopping meanwhile."""
        waited = 0.0
        while not stop.is_set():
            wait = self.try_take(count)
            if wait == 0:
                if waited and self.warned.ready("ceiling"):
                    log.warning("SYSLOG_MAX_EPS=%d holds the syslog rate back; SLS keeps the logs "
                                "until they can go (the statistics line shows the lag)", self.rate)
                return True
            waited += wait
            stop.wait(min(wait, 0.1))
        return False

    def try_take(self, count):
        """0 after taking `count` tokens, else the seconds until there will be enough."""
        with self.lock:
            fd = self.state_file()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                return self.take_from_file(fd, count)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def take_from_file(self, fd, count):
        """try_take() on the locked file: refill the bucket for the time since its last update."""
        stored = os.pread(fd, self.STATE.size, 0)
        now = time.monotonic()
        tokens, updated = self.STATE.unpack(stored) if len(stored) == self.STATE.size else (self.burst, now)
        tokens = min(self.burst, tokens + max(0.0, now - min(updated, now)) * self.rate)
        wait = 0.0 if tokens >= count else (count - tokens) / self.rate
        os.pwrite(fd, self.STATE.pack(tokens - count if not wait else tokens, now), 0)
        return wait

    def state_file(self):
        """The shared file, opened once: created 0600, never through a symbolic link, and only
        if it is ours (another user could otherwise slow this host's forwarders down)."""
        if self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            info = os.fstat(fd)
            if info.st_uid != os.geteuid() or info.st_mode & 0o022:
                os.close(fd)
                raise PermissionError(f"{self.path} is not this user's own file; remove it")
            self.fd = fd
        return self.fd


def retry_delay(attempts, settings):
    """Seconds to wait after `attempts` failures in a row: capped exponential backoff with jitter."""
    return min(settings.syslog_retry_max_delay, 0.5 * 2 ** min(attempts, 16)) * random.uniform(0.5, 1.0)


class PoolMember:
    """A target of the TargetPool with its own transport (so its own connection, and its own record
    of what that connection confirmed), and whether it takes batches."""

    def __init__(self, target, transport):
        self.target = target
        self.transport = transport
        self.connected = False     # the transport's connection is open (Delivery's lock guards it)
        self.in_service = True     # takes batches
        self.healthy_since = None  # out of service: when its current run of good probes began
        self.failed_probes = 0     # out of service: probes failed in a row
        self.next_probe = 0.0      # out of service: time.monotonic() of its next probe


class TargetPool:
    """The syslog targets of SYSLOG_HOST, and which of them take batches (SYSLOG_BALANCE).

    Targets in service take the batches: with failover the first of them in list order, with
    round-robin each in turn. A target whose send fails leaves service. While another one serves,
    a background thread probes it (a connect, with the TLS handshake or the RELP session, then a
    close) with backoff, and it serves again once its probes have succeeded for
    SYSLOG_FAILBACK_AFTER seconds without a failure in between: with failover, traffic then
    returns to it if it comes first. When no target is in service, Delivery tries each in turn,
    in list order from the one after the target that failed last, and the first to take a batch
    serves again at once. With one target all this is what Delivery always did: retry it.
    Every change of service is logged in one line (with several targets)."""

    PROBE_TICK = 0.25  # seconds between looks for a probe that is due

    def __init__(self, settings, stop):
        self.settings = settings
        self.stop = stop
        self.members = [PoolMember(target, transport_for(settings, target))
                        for target in syslog_targets(settings)]
        self.several = len(self.members) > 1
        self.round_robin = settings.syslog_balance == "round-robin"
        self.lock = threading.RLock()
        self.turn = 0          # round-robin: batches handed out so far
        self.retry_turn = 0    # none in service: the next target to try (an index, modulo their number)
        self.prober = None     # the thread probing targets out of service, from the first failure

    def serving(self):
        with self.lock:
            return [member for member in self.members if member.in_service]

    def choose(self):
        """The target for the next batch."""
        with self.lock:
            serving = self.serving()
            if not serving:
                member = self.members[self.retry_turn % len(self.members)]
                self.retry_turn += 1
                return member
            if not self.round_robin:
                return serving[0]
            member = serving[self.turn % len(serving)]
            self.turn += 1
            return member

    def served(self, member):
        """member took a batch: one out of service (none was in service) serves again at once."""
        with self.lock:
            if not member.in_service:
                self.return_to_service(member, "it took a batch")

    def failed(self, member):
        """A send to member failed: it leaves service and is probed in the background."""
        with self.lock:
            if not member.in_service:
                return
            member.in_service, member.healthy_since, member.failed_probes = False, None, 1
            member.next_probe = time.monotonic() + retry_delay(1, self.settings)
            self.retry_turn = self.members.index(member) + 1
            if self.several:
                log.warning("syslog target %s is out of service; %s", member.target, self.plan())
                if self.prober is None:
                    self.prober = threading.Thread(target=self.probe_out_of_service, name="syslog-probe",
                                                   daemon=True)
                    self.prober.start()

    def return_to_service(self, member, why):
        member.in_service, member.healthy_since, member.failed_probes = True, None, 0
        if self.several:
            log.info("syslog target %s is back in service (%s); %s", member.target, why, self.plan())

    def plan(self):
        """Where batches go now, for the log."""
        serving = self.serving()
        if not serving:
            return "no target is in service: trying each in turn, nothing is skipped"
        if not self.round_robin or len(serving) == 1:
            return f"sending to {serving[0].target}"
        return f"sending to {', '.join(str(member.target) for member in serving)} in turn"

    def active(self):
        """The targets taking batches, for the statistics line; None with one target."""
        if not self.several:
            return None
        active = [str(member.target) for member in self.serving()]
        return ",".join(active if self.round_robin else active[:1]) or "none"

    def probe_out_of_service(self):
        """The prober thread: probes every target out of service when due, while another one
        serves (when none does, Delivery tries them all itself)."""
        while not self.stop.wait(self.PROBE_TICK):
            with self.lock:
                now = time.monotonic()
                due = [member for member in self.members if not member.in_service
                       and now >= member.next_probe] if self.serving() else []
            for member in due:
                self.probe(member)

    def probe(self, member):
        """Connect to member's target on a transport of its own, close again, and return it to
        service once its probes have succeeded for SYSLOG_FAILBACK_AFTER seconds in a row."""
        transport = transport_for(self.settings, member.target)
        try:
            transport.connect(self.stop)
            error = None
        except StopRequested:
            return
        except (OSError, ssl.SSLError) as exc:
            error = exc
        finally:
            transport.close()
        s = self.settings
        with self.lock:
            now = time.monotonic()
            if member.in_service:  # Delivery found it working meanwhile
                return
            if error is not None:
                log.debug("probe of syslog target %s failed: %s", member.target, describe_error(error))
                member.healthy_since = None
                member.failed_probes += 1
                member.next_probe = now + retry_delay(member.failed_probes, s)
                return
            if member.healthy_since is None:
                member.healthy_since = now
            healthy_for = now - member.healthy_since
            if healthy_for >= s.syslog_failback_after:
                self.return_to_service(member, f"reachable for {healthy_for:.0f} s")
            else:
                member.next_probe = now + min(s.syslog_retry_max_delay, s.syslog_failback_after - healthy_for)


class Delivery:
    """Sends batches to the syslog targets (TargetPool), shared by all shards of this process.

    A failed send closes that target's connection, and the whole batch is sent again: at once to
    the next target in service if there is one; when none is left, to each target in turn with a
    pause (capped exponential backoff with jitter) after each round, for as long as it takes: the
    shard waits meanwhile, so nothing is skipped. With one target: reconnect after a pause and
    send again. Only a stop request abandons a batch, which then stays unacknowledged in SLS.
    With failover only the target in use keeps a connection; with round-robin every target in
    service keeps one."""

    def __init__(self, settings, stop, stats):
        self.settings = settings
        self.pool = TargetPool(settings, stop)
        self.stop = stop
        self.stats = stats
        self.lock = threading.Lock()
        self.warned = RateLimiter(60)

    def deliver(self, messages):
        """True once a target accepted every message; False if the program is stopping."""
        s = self.settings
        with self.lock:
            failures, unpaused, pauses, since = 0, 0, 0, time.monotonic()
            while not self.stop.is_set():
                member = self.pool.choose()
                try:
                    self.send(member, messages, failures)
                except StopRequested:
                    break
                except (OSError, ssl.SSLError) as exc:
                    failures += 1
                    unpaused += 1
                    self.stats.add(send_errors=1)
                    self.disconnect(member)
                    # One line when an outage starts, then one a minute while it lasts.
                    if failures == 1 or self.warned.ready("send"):
                        log.warning("cannot send %d messages to %s over %s (%d failed attempts so "
                                    "far): %s; retrying, nothing is skipped", len(messages),
                                    member.target, s.syslog_protocol, failures, describe_error(exc))
                    self.pool.failed(member)
                    if not self.pool.serving() and unpaused >= len(self.pool.members):
                        unpaused, pauses = 0, pauses + 1
                        self.stop.wait(retry_delay(pauses, s))
                    continue
                self.pool.served(member)
                if failures:
                    log.info("syslog server %s accepted the batch again after %d failed attempts "
                             "in %.0f s", member.target, failures, time.monotonic() - since)
                return True
            self.disconnect_all()
            return False

    def send(self, member, messages, failures):
        """Send the batch to one target, after what broken connections to any target may have left
        unread; with failover, close the connection to any other target first."""
        if not self.pool.round_robin:
            for other in self.pool.members:
                if other is not member:
                    self.disconnect(other)
        if not member.connected:
            member.transport.connect(self.stop)
            member.connected = True
        for other in self.pool.members:  # never with UDP: it takes one target only
            if other is not member and not other.connected:
                member.transport.adopt_unread(other.transport)
        # Counted as sent again: this batch after a failure, and what TcpTransport sends again
        # first because a broken connection may have left it unread.
        repeated = (len(messages) if failures else 0) + member.transport.unread_messages
        if repeated:
            self.stats.add(resent=repeated)
        member.transport.send(messages, self.stop)

    def disconnect(self, member):
        if member.connected:
            member.transport.close()
        member.connected = False

    def disconnect_all(self):
        for member in self.pool.members:
            self.disconnect(member)

    def close(self):
        with self.lock:
            self.disconnect_all()


# ================================================================================================
# SLS credentials: an AccessKey (variables or files) or the ECS instance's RAM role, kept current
# ================================================================================================
# The SDK signs each request it sends (each retry too) with what its credentials provider's
# get_credentials() returns at that moment (LogClient(credentials_provider=...)), in whatever thread
# sends it. So get_credentials() only hands out what is held, and keeping that current happens
# beside it: key files are looked at again at most once a second, by one thread while the others
# go on; the RAM role's credentials are fetched again by a thread of their own, long before they
# expire.

class CredentialsError(Exception):
    """No credentials to start with: one line saying why, naming the variable."""


def refuses_credentials(exc):
    """Did SLS refuse the credentials themselves (401: an unknown or disabled AccessKey, an invalid
    or expired STS token)?"""
    return exc.get_resp_status() == 401 or \
        exc.get_error_code().startswith(("Unauthorized", "InvalidAccessKeyId", "SecurityToken"))


def utc_time(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def duration(seconds):
    """'5 h 59 min', '3 min 20 s' or '20 s'."""
    seconds = max(0, int(seconds))
    hours, minutes = seconds // 3600, seconds // 60 % 60
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {seconds % 60} s" if minutes else f"{seconds} s"


class SlsCredentials(CredentialsProvider):
    """What each source of credentials offers besides the SDK's get_credentials()."""

    failure = None  # one line, once SLS refused credentials that nothing renews: supervise() exits 1

    def describe(self):
        """Where the credentials come from, for the log and --check (an AccessKey ID, never a secret)."""
        raise NotImplementedError

    def expiry(self):
        """What --check says about when the current credentials expire."""
        raise NotImplementedError

    def refused(self, exc):
        """SLS refused a request signed with these credentials (refuses_credentials(exc) holds)."""

    def close(self):
        """Stop keeping them current: this process needs them no more."""


class AccessKeyCredentials(SlsCredentials):
    """An AccessKey: SLS_AK_ID, SLS_AK_KEY and, for a temporary one, SLS_STS_TOKEN, each from its
    variable or from the file its _FILE names. A file is read again when it changes (its inode, size
    or modification time: replaced by a rename, as Kubernetes does, or rewritten in place); one
    that cannot be read then leaves the credentials read before in use until it can. Variables
    never change, so SLS refusing an AccessKey that comes from them all is final (exit 1)."""

    RECHECK_INTERVAL = 1.0  # seconds between looks at the files

    def __init__(self, settings):
        self.values = {name: getattr(settings, name.lower()) for name in ACCESS_KEY_FILES}
        self.files = {name: getattr(settings, file_name.lower())
                      for name, file_name in ACCESS_KEY_FILES.items() if getattr(settings, file_name.lower())}
        self.lock = threading.Lock()
        self.warned = RateLimiter(60)
        self.checked = time.monotonic()
        self.stamps = self.file_stamps()
        try:
            self.credentials = self.read()
        except ValueError as exc:
            raise CredentialsError(str(exc)) from None

    def file_stamps(self):
        stamps = {}
        for name, path in self.files.items():
            try:
                info = os.stat(path)
                stamps[name] = (info.st_ino, info.st_size, info.st_mtime_ns)
            except OSError:
                stamps[name] = None
        return stamps

    def read(self):
        values = dict(self.values)
        for name, path in self.files.items():
            values[name] = read_secret_file(ACCESS_KEY_FILES[name], path)
        return Credentials(values["SLS_AK_ID"], values["SLS_AK_KEY"], values["SLS_STS_TOKEN"] or None)

    def get_credentials(self):
        if self.files and time.monotonic() - self.checked >= self.RECHECK_INTERVAL:
            self.read_changed_files()
        return self.credentials

    def read_changed_files(self):
        """Read the files again if one changed; True if that gave new credentials. One thread
        looks while the others go on with the current credentials."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            self.checked = time.monotonic()
            stamps = self.file_stamps()
            if stamps == self.stamps:
                return False
            try:
                credentials = self.read()
            except ValueError as exc:  # e.g. caught half-written: looked at again in a second
                if self.warned.ready("read"):
                    log.warning("%s; going on with the credentials read before", exc)
                return False
            self.stamps, self.credentials = stamps, credentials
            log.info("SLS credentials read again from %s: AccessKey %s", self.sources(),
                     credentials.get_access_key_id())
            return True
        finally:
            self.lock.release()

    def sources(self):
        return " / ".join(ACCESS_KEY_FILES[name] if name in self.files else name
                          for name in ACCESS_KEY_FILES if self.values[name] or name in self.files)

    def describe(self):
        return f"AccessKey {self.credentials.get_access_key_id()} from {self.sources()}"

    def expiry(self):
        if not self.credentials.get_security_token():
            return "a permanent AccessKey: it does not expire"
        if "SLS_STS_TOKEN" in self.files:
            return "its STS token expires when SLS says so; SLS_STS_TOKEN_FILE is read again whenever it changes"
        return ("its STS token expires when SLS says so (SLS does not tell in advance), and nothing "
                "renews SLS_STS_TOKEN: the forwarder then exits 1")

    def refused(self, exc):
        if self.failure or (self.files and self.read_changed_files()):
            return
        reason = f"{exc.get_error_code()}: {exc.get_error_message()}"
        if self.files:
            if self.warned.ready("refused"):
                log.warning("SLS refuses the credentials from %s (%s); waiting for the files to change",
                            self.sources(), reason)
        elif self.credentials.get_security_token() and "expired" in reason.lower():
            self.failure = (f"SLS_STS_TOKEN has expired ({reason}), and nothing renews it: set a new "
                            "one, or let the forwarder keep its credentials current (SLS_ECS_RAM_ROLE, "
                            "or SLS_STS_TOKEN_FILE kept up to date)")
        else:
            self.failure = f"SLS refuses the {self.describe()} ({reason})"


class EcsMetadataError(Exception):
    """The ECS metadata service did not give what was asked: one line, never its answer's body."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class EcsMetadataService:
    """The ECS instance metadata service (SLS_ECS_METADATA_ENDPOINT) in security hardening mode
    (IMDSv2: a session token from PUT /latest/api/token goes with every read) or, when it gives no
    token and SLS_ECS_METADATA_V1 allows it, in normal mode (IMDSv1: reads without a token). It is
    reached directly, never through an HTTP proxy set for SLS traffic, and it is on the instance
    itself: it answers at once or not at all, hence the short timeout."""

    TIMEOUT = 2  # seconds
    TOKEN_TTL = 300  # seconds a session token is asked for: each fetch of credentials takes a new one
    TOKEN_PATH = "/latest/api/token"
    ROLES_PATH = "/latest/meta-data/ram/security-credentials/"

    def __init__(self, endpoint, allow_v1):
        self.endpoint, self.allow_v1 = endpoint, allow_v1
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.without_token = None  # why the last fetch read without a session token

    def call(self, path, method="GET", headers=None):
        request = urllib.request.Request(self.endpoint + path, method=method, headers=headers or {})
        try:
            with self.opener.open(request, timeout=self.TIMEOUT) as response:
                return response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            exc.close()
            raise EcsMetadataError(f"{method} {path}: HTTP {exc.code}", exc.code) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise EcsMetadataError(f"{method} {path}: "
                                   f"{describe_error(reason) if isinstance(reason, Exception) else reason}") from None

    def session_token(self):
        """A session token, or None to read without one when that is allowed."""
        try:
            return self.call(self.TOKEN_PATH, "PUT", {"X-aliyun-ecs-metadata-token-ttl-seconds": str(self.TOKEN_TTL)})
        except EcsMetadataError as exc:
            if not self.allow_v1:
                raise EcsMetadataError(f"no session token ({exc}), and SLS_ECS_METADATA_V1=off forbids "
                                       "reading without one") from None
            self.without_token = str(exc)
            return None

    def role_credentials(self, role):
        """(role name, Credentials, expiration in unix seconds) of the role, or of the role attached
        to the instance for "auto"."""
        self.without_token = None
        token = self.session_token()
        headers = {"X-aliyun-ecs-metadata-token": token} if token else {}
        if role == "auto":
            role = (self.call(self.ROLES_PATH, headers=headers).strip().splitlines() or [""])[0]
            if not role:
                raise EcsMetadataError("no RAM role is attached to this instance")
        try:
            answer = self.call(self.ROLES_PATH + urllib.parse.quote(role), headers=headers)
        except EcsMetadataError as exc:
            if exc.status == 404:
                raise EcsMetadataError(f"no RAM role {role} is attached to this instance ({exc})") from None
            raise
        try:
            fields = json.loads(answer)
            if fields.get("Code") != "Success":
                raise EcsMetadataError(f"role {role}: its credentials come with Code {fields.get('Code')!r}")
            expiration = calendar.timegm(time.strptime(fields["Expiration"], "%Y-%m-%dT%H:%M:%SZ"))
            credentials = Credentials(fields["AccessKeyId"], fields["AccessKeySecret"], fields["SecurityToken"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EcsMetadataError(f"role {role}: the answer is not temporary credentials in JSON") from None
        return role, credentials, expiration


class EcsRamRoleCredentials(SlsCredentials):
    """The temporary credentials of the ECS instance's RAM role (SLS_ECS_RAM_ROLE), from the metadata
    service: fetched at start (none, no start: exit 1), then by a thread of their own whenever half
    of their remaining lifetime has passed (6-hour credentials after 3 hours, then 1.5 hours before
    they expire, ...): new ones are in use long before the old ones expire, and a slow or failing
    metadata service has hours to come back. A failed fetch is retried after 0.5, 1, 2, 4 and then
    every 5 s, with a warning once a minute; the current credentials stay in use meanwhile. Once they
    have expired SLS refuses every request and the shards wait: nothing is lost, and consumption
    resumes with the next credentials."""

    FIRST_RETRY, LAST_RETRY = 0.5, 5.0  # seconds between fetches while the service fails
    SOONEST_REFETCH = 1.0  # seconds, however short-lived the credentials
    REFETCH_ON_REFUSAL = 5.0  # seconds since the last fetch before a refusal by SLS asks for another

    def __init__(self, settings):
        self.service = EcsMetadataService(settings.sls_ecs_metadata_endpoint, settings.sls_ecs_metadata_v1)
        self.role_setting = settings.sls_ecs_ram_role
        self.role = None  # the role's name once known ("auto" finds it at the first fetch)
        self.current = None  # (Credentials, expiration): replaced whole, so read without a lock
        self.last_fetch = 0.0
        self.warned = RateLimiter(60)
        self.warned_without_token = False
        self.wake = threading.Event()
        self.closed = False
        try:
            self.fetch()
        except EcsMetadataError as exc:
            raise CredentialsError(f"SLS_ECS_RAM_ROLE: cannot get the RAM role's credentials from the ECS "
                                   f"metadata service at {self.service.endpoint}: {exc}") from None
        threading.Thread(target=self.keep_current, name="ram-role-credentials", daemon=True).start()

    def fetch(self):
        self.last_fetch = time.monotonic()
        role, credentials, expiration = self.service.role_credentials(self.role or self.role_setting)
        if expiration <= time.time():
            raise EcsMetadataError(f"role {role}: the credentials it gives expired at {utc_time(expiration)}")
        if self.service.without_token and not self.warned_without_token:
            self.warned_without_token = True
            log.warning("the ECS metadata service gave no session token (%s): read without one (normal "
                        "mode, IMDSv1); SLS_ECS_METADATA_V1=off forbids that", self.service.without_token)
        previous, self.role, self.current = self.current, role, (credentials, expiration)
        if previous is None or previous[0].get_access_key_id() != credentials.get_access_key_id():
            log.info("RAM role %s: AccessKey %s, valid until %s", role, credentials.get_access_key_id(),
                     utc_time(expiration))

    def get_credentials(self):
        return self.current[0]

    def keep_current(self):
        failures = 0
        while not self.closed:
            if failures:
                delay = min(self.FIRST_RETRY * 2 ** (failures - 1), self.LAST_RETRY)
            else:
                delay = max((self.current[1] - time.time()) / 2, self.SOONEST_REFETCH)
            self.wake.wait(delay)
            self.wake.clear()
            if self.closed:
                return
            try:
                self.fetch()
            except EcsMetadataError as exc:
                failures += 1
                self.report(exc)
                continue
            if failures:
                log.info("RAM role credentials fetched again after %d failed attempts", failures)
            failures = 0

    def report(self, exc):
        expiration = self.current[1]
        if time.time() < expiration:
            if self.warned.ready("failing"):
                log.warning("cannot renew the RAM role credentials from the ECS metadata service at %s "
                            "(%s); the current ones stay valid until %s (%s more); retrying",
                            self.service.endpoint, exc, utc_time(expiration), duration(expiration - time.time()))
        elif self.warned.ready("expired"):
            log.warning("the RAM role credentials expired at %s, and the ECS metadata service at %s still "
                        "fails (%s): SLS refuses every request until it answers; retrying every %.0f s. "
                        "Nothing is lost: consumption resumes with the next credentials",
                        utc_time(expiration), self.service.endpoint, exc, self.LAST_RETRY)

    def describe(self):
        return (f"ECS RAM role {self.role} (SLS_ECS_RAM_ROLE={self.role_setting}) from the metadata "
                f"service at {self.service.endpoint}: AccessKey {self.current[0].get_access_key_id()}")

    def expiry(self):
        expiration = self.current[1]
        return (f"they expire at {utc_time(expiration)} (in {duration(expiration - time.time())}) and "
                "are renewed before")

    def refused(self, exc):
        if time.monotonic() - self.last_fetch >= self.REFETCH_ON_REFUSAL:
            if self.warned.ready("refused"):
                log.warning("SLS refuses the RAM role credentials (%s: %s); fetching new ones",
                            exc.get_error_code(), exc.get_error_message())
            self.wake.set()

    def close(self):
        self.closed = True
        self.wake.set()


def open_credentials(settings):
    """The credentials the settings name (SLS_ECS_RAM_ROLE, or the AccessKey); CredentialsError when
    there are none to be had."""
    if settings.sls_ecs_ram_role:
        return EcsRamRoleCredentials(settings)
    return AccessKeyCredentials(settings)


def sls_client(settings, credentials):
    """A LogClient signing every request with the current credentials, as SLS_AUTH_VERSION says,
    taking no answer beyond bound_answers(): the one way this program makes them (--check,
    --dry-run, counting shards, the consumer)."""
    client = LogClient(settings.sls_endpoint, auth_version=settings.sls_auth_version,
                       region=settings.sls_region, credentials_provider=credentials)
    bound_answers(client, answer_limit(settings))
    return client


def warn_if_readable_by_others(paths):
    """Warn about each file that can hold a secret (.env, key files) and that group or others can read."""
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue
        if mode & 0o044:
            log.warning("%s can hold a secret but is readable by group or others (mode %04o): chmod 600 %s",
                        path, mode & 0o7777, path)


# ================================================================================================
# The SDK consumer: a processor per shard, the fixes to the SDK, and the program's statistics
# ================================================================================================

class Stats:
    """Counters for the periodic statistics line and /metrics (thread-safe). Every counter of
    `totals` is exported as sync_waf_to_syslog_<name>_total; `gauges` holds what other code sets
    with set_gauge / set_info (e.g. the syslog target)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.totals = dict(logs=0, bytes=0, send_errors=0, resent=0, truncated=0, filtered=0,
                           filtered_by_sls=0, failed_pulls=0, checkpoint_writes=0, checkpoint_failures=0)
        self.newest = {}  # shard -> time of the newest log sent
        self.since = time.monotonic()
        self.reported = dict(self.totals)
        self.failing_since = None  # when the first send error since the last delivered batch came
        self.gauges = {}  # (name, ((label, value), ...)) -> number

    def add(self, **counts):
        with self.lock:
            for name, count in counts.items():
                self.totals[name] += count
            if counts.get("send_errors") and self.failing_since is None:
                self.failing_since = time.monotonic()

    def sent(self, shard, messages, newest):
        with self.lock:
            self.totals["logs"] += len(messages)
            self.totals["bytes"] += sum(map(len, messages))
            self.newest[shard] = max(newest, self.newest.get(shard, 0))
            if messages:  # the syslog server took a batch: an outage is over
                self.failing_since = None

    def failing_for(self):
        """Seconds since syslog sends began to fail without a batch delivered since; 0 if none failed."""
        since = self.failing_since
        return 0.0 if since is None else time.monotonic() - since

    def set_gauge(self, name, value, **labels):
        with self.lock:
            self.gauges[(name, tuple(sorted(labels.items())))] = value

    def set_info(self, name, **labels):
        """An info-style gauge: one series of `name`, with these labels and the value 1."""
        with self.lock:
            self.gauges = {key: value for key, value in self.gauges.items() if key[0] != name}
            self.gauges[(name, tuple(sorted(labels.items())))] = 1

    def snapshot(self):
        """(counters, {shard: lag seconds}, [(gauge name, labels, value)]) as they are now."""
        with self.lock:
            now = time.time()
            return (dict(self.totals), {shard: max(0.0, now - t) for shard, t in self.newest.items()},
                    [(name, dict(labels), value) for (name, labels), value in self.gauges.items()])

    def line(self, active=None):
        """The statistics line; `active`: the syslog targets taking batches (several targets)."""
        with self.lock:
            now = time.monotonic()
            elapsed = max(now - self.since, 1e-9)
            rate = {k: (self.totals[k] - self.reported[k]) / elapsed for k in ("logs", "bytes")}
            lag = ",".join(f"{shard}:{max(0, int(time.time()) - t)}s" for shard, t in sorted(self.newest.items()))
            self.since, self.reported = now, dict(self.totals)
            t = self.totals
            return (f"stats: {rate['logs']:.0f} logs/s, {rate['bytes']:.0f} bytes/s, total {t['logs']} logs, "
                    f"lag {lag or '-'}, send errors {t['send_errors']}, resent {t['resent']}, "
                    f"truncated {t['truncated']}, filtered {t['filtered']}, filtered by SLS {t['filtered_by_sls']}, "
                    f"failed pulls {t['failed_pulls']}" + (f", active {active}" if active else "")
                    + (f", syslog failing for {now - self.failing_since:.0f} s" if self.failing_since is not None else ""))


Pull = collections.namedtuple("Pull", "groups filtered_by_sls")


def logs_filtered_by_sls(response):
    """How many logs SLS read for a pull and then filtered out (SLS_QUERY / SLS_CONSUME_PROCESSOR),
    from the headers it sends with such pulls; 0 without them."""
    headers = {name.lower(): value for name, value in response.headers.items()}
    read, returned = headers.get("x-log-rawdatalines", ""), headers.get("x-log-resultlines", "")
    return max(0, int(read) - int(returned)) if read.isdigit() and returned.isdigit() else 0


class FetchBudget:
    """How many LogGroups each shard's next pull asks for, so that a pull carries about
    SLS_FETCH_BYTES of raw logs whether a LogGroup holds one log or a thousand (which no operator
    controls: producers, quiet hours and Logtail's batching decide), and all held shards together
    keep at most SLS_BUFFER_BYTES: a shard holds up to PULLS_PER_SHARD pulls at once (the SDK
    prefetches one while another waits and a third is sent). A LogGroup's size is learnt from each
    shard's pulls (x-log-bodyrawsize / x-log-count). Under SYSLOG_MAX_EPS a pull carries at most one
    second of the ceiling's logs: more could not go faster, and a stop repeats what a batch has
    already sent (its checkpoint moves once it is all sent).

    ResilientConsumerClient.pull_logs asks groups() and reports the answer (observe_pull); the
    worker loop tells how many shards it holds and reads asked() and backlog(). Thread-safe."""

    PULLS_PER_SHARD = 3
    FIRST_GROUP_BYTES = 1 << 20  # until a shard's pulls tell: assume big LogGroups, pull few
    LEARNING = 0.5               # weight of the newest pull in a shard's LogGroup size

    def __init__(self, settings):
        self.pull_bytes = settings.sls_fetch_bytes
        self.buffer_bytes = settings.sls_buffer_bytes
        self.most_groups = settings.sls_max_fetch_groups
        self.most_logs = settings.syslog_max_eps  # 0: no ceiling
        self.lock = threading.Lock()
        self.shards_held = 1
        self.group_bytes = {}  # shard -> raw bytes of one of its LogGroups, as learnt
        self.group_logs = {}   # shard -> logs in one of its LogGroups, as learnt (under a ceiling)
        self.last_asked = {}   # shard -> LogGroups its last pull asked for
        self.full = {}         # shard -> whether its last pull got all it asked for (a backlog)

    def hold(self, shards):
        """The worker holds this many shards: they share SLS_BUFFER_BYTES."""
        self.shards_held = max(1, shards)

    def groups(self, shard):
        """The LogGroups the shard's next pull asks for (noted: asked())."""
        pull_bytes = min(self.pull_bytes, self.buffer_bytes // (self.PULLS_PER_SHARD * self.shards_held))
        with self.lock:
            count = min(self.most_groups, int(pull_bytes / self.group_bytes.get(shard, self.FIRST_GROUP_BYTES)))
            if self.most_logs:
                count = min(count, int(self.most_logs / self.group_logs.get(shard, self.most_logs)))
            count = self.last_asked[shard] = max(1, count)
        return count

    def asked(self, shard, default):
        """The LogGroups the shard's last pull asked for (default before its first)."""
        with self.lock:
            return self.last_asked.get(shard, default)

    def observe(self, shard, asked, groups, raw_bytes, logs=None):
        """A pull of the shard that asked for `asked` LogGroups came back with `groups`, `raw_bytes`
        uncompressed (holding `logs` logs, when known)."""
        with self.lock:
            if groups > 0:
                self.learn(self.group_bytes, shard, raw_bytes / groups)
                if logs:
                    self.learn(self.group_logs, shard, logs / groups)
            self.full[shard] = groups > 0 and groups >= asked

    def learn(self, sizes, shard, size):
        known = sizes.get(shard)
        sizes[shard] = size if known is None else known + self.LEARNING * (size - known)

    def observe_pull(self, shard, asked, response, groups):
        """observe() a PullLogResponse and its LogGroups (read_pull); with a statement (SLS_QUERY),
        what SLS read before it filtered, which is what `count` bounds."""
        logs = sum(len(group.Logs) for group in groups)
        read_groups = response.get_raw_log_group_count_before_query()  # -1 without a statement
        if read_groups >= 0:
            self.observe(shard, asked, read_groups, response.get_raw_size_before_query(),
                         logs + logs_filtered_by_sls(response))
        else:
            self.observe(shard, asked, response.get_loggroup_count(), response.get_raw_size(), logs)

    def backlog(self):
        """Whether some shard's last pull was full: logs are waiting."""
        with self.lock:
            return any(self.full.values())


class ShardDirectory:
    """The logstore's shards as ListShards lists them, for what the SDK does not check itself:

    * a shard in a heartbeat answer is consumed only once ListShards lists it: an answer naming
      thousands of shards that do not exist (corrupt, or forged) would otherwise start thousands
      of shard consumers, whose failing start-ups starve the real shards and flood the log;
    * which shards are read-only (split or merged away) and their end cursors, so that
      Forwarder.finish_read_only_shards can have SLS release them;
    * which shards a split or merge made while this process runs (those its first listing did not
      have), which SLS_CURSOR_START=end must not skip into (ResilientConsumerClient.get_end_cursor).

    Once started, it lists the shards every heartbeat interval, and at once when a heartbeat names
    one it does not know (a split or merge just made it), on its own thread: no heartbeat waits for
    ListShards, and a new shard is taken up one heartbeat later."""

    def __init__(self, settings):
        self.settings = settings
        self.client = None     # the LogClient it lists with, from start()
        self.lock = threading.Lock()
        self.statuses = None   # shard -> "readwrite" | "readonly"; None until a listing succeeds
        self.first_listed = None  # the shards of the first listing that succeeded
        self.end_cursors = {}  # read-only shard -> its end cursor, which never moves again
        self.unlisted = set()  # shards heartbeats named that the last listing did not have
        self.list_now = threading.Event()
        self.warned = RateLimiter(60)

    def start(self, log_client, stop):
        """List the shards now (before the first heartbeat answer, which the listing checks), then
        on a thread of its own until stopped."""
        self.client = log_client
        self.refresh()
        threading.Thread(target=self.watch, args=(stop,), name="shards", daemon=True).start()

    def watch(self, stop):
        while not stop.is_set():
            self.list_now.wait(self.settings.sls_heartbeat_interval)
            self.list_now.clear()
            self.refresh()

    def refresh(self):
        """List the shards; when that fails, the last listing stays (and it says so once a minute)."""
        s = self.settings
        with self.lock:
            asked_about = set(self.unlisted)
        try:
            listed = self.client.list_shards(s.sls_project, s.sls_logstore).get_shards_info()
            statuses = {shard["shardID"]: str(shard.get("status", "readwrite")).lower() for shard in listed}
        except Exception as exc:  # refused, or an answer that is no listing: this thread must go on
            if self.warned.ready("list"):
                log.warning("cannot list the shards (%s); until that works, %s", describe_error(exc),
                            "a new shard is not taken up" if self.statuses else
                            "heartbeat answers are not checked and empty read-only shards stay held")
            return
        with self.lock:
            before, self.statuses = self.statuses, statuses
            if self.first_listed is None:
                self.first_listed = set(statuses)
            self.unlisted -= asked_about | set(statuses)
        if before is not None and before != statuses:
            sealed = [shard for shard, status in before.items() if statuses.get(shard, status) != status]
            log.info("shards split or merged: now read-only: %s; new: %s", sealed,
                     sorted(set(statuses) - set(before)))
        never_listed = sorted(asked_about - set(statuses))
        if never_listed and self.warned.ready("unlisted"):
            log.warning("SLS assigned this consumer %d shards that ListShards does not list (%s%s); "
                        "they are ignored", len(never_listed), ", ".join(map(str, never_listed[:5])),
                        ", ..." if len(never_listed) > 5 else "")

    def listed(self, shards):
        """The shards of a heartbeat answer that the last listing has, in order (all of them
        before any listing succeeded). The others are left out, and listed again at once."""
        with self.lock:
            if self.statuses is None:
                return list(shards)
            known = [shard for shard in shards if shard in self.statuses]
            self.unlisted.update(shard for shard in shards if shard not in self.statuses)
        if len(known) < len(shards):
            self.list_now.set()
        return known

    def end_cursor(self, shard):
        """The end cursor of a read-only shard; None for any other shard, or if SLS cannot say now."""
        with self.lock:
            if (self.statuses or {}).get(shard) != "readonly" or shard in self.end_cursors:
                return self.end_cursors.get(shard)
        s = self.settings
        try:
            cursor = self.client.get_end_cursor(s.sls_project, s.sls_logstore, shard).get_cursor()
        except Exception as exc:  # as in refresh(): the checkpoint thread that asks must go on
            if self.warned.ready("end"):
                log.warning("cannot read the end cursor of read-only shard %d (%s); retrying",
                            shard, describe_error(exc))
            return None
        with self.lock:
            self.end_cursors[shard] = cursor
        return cursor

    def made_while_running(self, shard):
        """Did a split or merge make this shard while this process runs? (Listings, not createTime,
        tell: that is SLS's clock, and counts whole seconds.)"""
        with self.lock:
            return self.first_listed is not None and shard not in self.first_listed


class Forwarder:
    """Everything one consumer process shares across its shards."""

    def __init__(self, settings, stop):
        self.settings = settings
        self.stop = stop
        self.stats = Stats()
        self.budget = FetchBudget(settings)
        self.encoder = MessageEncoder(settings)
        self.delivery = Delivery(settings, stop, self.stats)
        self.ceiling = EventsPerSecond(settings) if settings.syslog_max_eps else None
        self.trackers = {}  # shard -> checkpoint tracker of its processor
        self.encoding = {}  # shard -> (monotonic time, logs) of the batch being encoded (supervise)
        self.shards = ShardDirectory(settings)
        self.held = {}  # shard -> checkpoint tracker of each shard consumer (WafConsumerWorker)
        self.finished = weakref.WeakSet()  # trackers of read-only shards whose end was saved
        self.note_syslog_target()

    def note_syslog_target(self):
        """The syslog_target metric: the collector(s) taking batches now."""
        active = self.delivery.pool.active() or f"{self.settings.syslog_host}:{self.settings.syslog_port}"
        self.stats.set_info("syslog_target", target=active, protocol=self.settings.syslog_protocol)

    def stats_line(self):
        self.note_syslog_target()
        return self.stats.line(self.delivery.pool.active())

    def send(self, messages):
        """Deliver a batch (under SYSLOG_MAX_EPS, in pieces as the ceiling lets them go); False if
        stopping. A batch whose logs were all filtered out needs no syslog server to be done."""
        if not self.ceiling:
            return not messages or self.delivery.deliver(messages)
        for start in range(0, len(messages), self.ceiling.burst):
            piece = messages[start:start + self.ceiling.burst]
            if not (self.ceiling.take(len(piece), self.stop) and self.delivery.deliver(piece)):
                return False
        return True

    def flush_checkpoints(self, client, interval=1.0):
        """Save every shard's delivered position in SLS about once a second (a thread of its own,
        as a write can block for the SDK's retries). The SDK alone saves at most every 3 s while
        data flows and only 30 s after a shard goes idle: a crash then repeats more logs. Writes
        SLS refused are tried again here too, so a quiet shard's last one is not left until exit."""
        while not self.stop.wait(interval):
            for tracker in list(self.trackers.values()):
                save_delivered_checkpoint(tracker)
            client.save_unsaved(set(self.held))
            self.finish_read_only_shards()

    def finish_read_only_shards(self):
        """Save the end cursor of each held read-only shard whose every log was delivered, even if
        that very checkpoint was saved before. SLS releases a read-only shard (and, in order mode,
        hands out its children) when a checkpoint write puts it at its end, but the SDK writes only
        after a batch with data and never writes the same checkpoint twice: a read-only shard that
        never held data, or was already saved at its end, stayed held until the consumer stopped."""
        for shard, tracker in list(self.held.items()):
            if tracker in self.finished:
                continue
            end = cursor_number(self.shards.end_cursor(shard) or "")
            if end is not None and cursor_number(tracker.get_check_point()) == end \
                    and save_delivered_checkpoint(tracker, again=True):
                self.finished.add(tracker)
                log.info("shard %d is read-only and every log in it was delivered: its end checkpoint "
                         "is saved, so SLS releases it", shard)


def save_delivered_checkpoint(tracker, again=False):
    """Persist a shard's delivered position (a failed write is kept by ResilientConsumerClient);
    again=True writes it even if it is the position saved last. True if SLS stored it now.

    Not the SDK's tracker.flush_check_point(): it reads the position before the write and again
    after it, so when process() moves it meanwhile (the flush thread runs beside it) it records
    as saved a position it never wrote, and the shard's last position is then never saved."""
    with tracker.lock:
        cursor = tracker.get_check_point()
        if not cursor or (cursor == tracker.last_persistent_checkpoint and not again):
            return False
        stored = tracker.consumer_group_client.update_check_point(tracker.shard_id, tracker.consumer_name, cursor)
        tracker.set_persistent_check_point(cursor)
        return stored


class FilteredPull:
    """A pull of which SLS_QUERY left nothing while its cursor moved on. The SDK hands process() only
    pulls of more than 0 LogGroups, so the checkpoint would stay behind such stretches until the
    next pull with logs (a restart reads them again); counted as one LogGroup, the empty batch goes
    through process() in its turn and its checkpoint moves on like any delivered batch's."""

    def __init__(self, response):
        self.response = response

    def get_loggroup_count(self):
        return 1

    def __getattr__(self, name):
        return getattr(self.response, name)


class WafLogProcessor(ConsumerProcessorBase):
    """One per shard: encode a batch, deliver it, and only then move the checkpoint."""

    RETRY_DELAY = 5  # seconds before a batch that failed unexpectedly is fetched again

    def __init__(self, forwarder):
        super().__init__()
        self.forwarder = forwarder
        self._preprocessor = self.read  # the fetch task hands process() what this returns
        self.warned = RateLimiter(60)

    def read(self, response):
        """The pull as process() takes it: its LogGroups (which ResilientConsumerClient.pull_logs
        read) and how many logs SLS filtered out of it (SLS_QUERY), after noting its size for the
        fetch budget. It runs in the SDK's fetch task, for every pull."""
        return Pull(response.log_groups, logs_filtered_by_sls(response))

    def process(self, pull, tracker):
        try:
            return self.forward(pull, tracker)
        except Exception:
            # The SDK drops a batch whose process() raises, and the next batch's checkpoint
            # then moves past it. Roll back instead: the batch is fetched and tried again.
            if self.warned.ready("error"):
                log.exception("shard %d: unexpected error with a batch of %d log groups; it is "
                              "fetched and tried again, nothing is skipped", self.shard_id, len(pull.groups))
            self.forwarder.stop.wait(self.RETRY_DELAY)
            return tracker.get_check_point()

    def forward(self, pull, tracker):
        forwarder = self.forwarder
        forwarder.encoding[self.shard_id] = (time.monotonic(), sum(len(group.Logs) for group in pull.groups))
        try:
            batch = forwarder.encoder.encode(pull.groups)
        finally:
            del forwarder.encoding[self.shard_id]
        log.info("Get data from shard %d, log count: %d", self.shard_id, len(batch.messages))
        if batch.truncated:
            forwarder.stats.add(truncated=batch.truncated)
            log.warning("shard %d: %d logs were longer than SYSLOG_MAX_MESSAGE_SIZE=%d bytes; their "
                        "longest values were cut", self.shard_id, batch.truncated,
                        forwarder.settings.syslog_max_message_size)
        if not forwarder.send(batch.messages):
            # Stopping: roll back to the start of this batch so nothing past it is saved.
            return tracker.get_check_point()
        forwarder.stats.add(filtered=batch.filtered, filtered_by_sls=pull.filtered_by_sls)
        forwarder.stats.sent(self.shard_id, batch.messages, batch.newest)
        log.info("Complete send data to remote")
        tracker.save_check_point(False)  # in memory; Forwarder.flush_checkpoints saves it
        forwarder.trackers[self.shard_id] = tracker
        return None

    def shutdown(self, tracker):
        # The SDK's default saves the cursor of the last batch *handed* to process(); the
        # tracker's checkpoint here only ever moved past delivered batches, so flush that.
        if self.forwarder.trackers.get(self.shard_id) is tracker:
            del self.forwarder.trackers[self.shard_id]
        save_delivered_checkpoint(tracker)


class WafConsumerWorker(ConsumerWorker):
    """The SDK's ConsumerWorker, run with a WafLogProcessor per shard around the consumer client it
    is given, and:

    * a fix (SDK 0.9.52): its heartbeat keeps listing every shard the group gave this consumer until
      that shard's consumer has shut down. A shard given and taken back between two rounds of the
      worker (a heartbeat interval not much longer than the fetch interval) never got a shard
      consumer, so it stayed listed for ever and the group never handed it to the consumer it now
      belongs to: nobody read it. Here such shards leave the heartbeat;
    * fetching by volume: each pull asks for what the FetchBudget says (ResilientConsumerClient),
      the SDK judges it by that count, and the rounds follow each other at SLS_FETCH_INTERVAL
      while a shard has a backlog, IDLE_INTERVAL otherwise;
    * the forwarder is shown the checkpoint tracker of each shard consumer (`held`, for
      Forwarder.finish_read_only_shards);
    * `last_round`: when its loop last went round, so supervise() sees a stuck loop."""

    # Seconds between rounds without a backlog: a round picks up a finished pull and starts the next
    # (the SDK pulls an idle shard twice a second), so this adds to the latency; README.md,
    # "Performance": 0.25 s gave a p99 of 0.96 s at 2,000 logs/s, 0.1 s 0.70-0.73 s, for idle CPU
    # 1.3 -> 1.4-1.7 % of a core.
    IDLE_INTERVAL = 0.1

    def __init__(self, forwarder, config, client):
        # Not ConsumerWorker.__init__: that builds a ConsumerClient of its own, with static keys
        # only, and creates the group with it at once. This sets what it sets (sdk_internals()), with
        # `client` for the group, the heartbeat and every shard consumer alike.
        threading.Thread.__init__(self)
        self.make_processor, self.process_args, self.process_kwargs = WafLogProcessor, (forwarder,), {}
        self.option = config
        self.consumer_client = client
        self.shut_down_flag = False
        self.logger = ConsumerWorkerLoggerAdapter(logging.getLogger(ConsumerWorker.__module__),
                                                  {"consumer_worker": self})
        self.shard_consumers = {}
        self.last_owned_consumer_finish_time = 0
        client.ensure_consumer_group_created(config.consumer_group_time_out, config.in_order)
        self.heart_beat = ConsumerHeatBeat(client, config.heartbeat_interval, config.consumer_group_time_out)
        self.own_executor, self._executor = True, ThreadPoolExecutor(max_workers=config.worker_pool_size)
        self.forwarder = forwarder
        self.budget = forwarder.budget
        self.backlog_interval = config.data_fetch_interval
        self.last_round = time.monotonic()  # supervise() checks that the loop keeps going round

    def clean_shard_consumer(self, owned_shards):
        self.last_round = time.monotonic()  # called once in every round of ConsumerWorker.run
        super().clean_shard_consumer(owned_shards)
        beat = self.heart_beat
        with beat.lock:  # the heartbeat thread changes both lists under this (re-entrant) lock
            for shard in set(beat.mheart_shards) - set(beat.mheld_shards) - set(self.shard_consumers):
                beat.remove_heart_shard(shard)
        held = list(self.shard_consumers.items())
        self.forwarder.held = {shard: consumer.checkpoint_tracker for shard, consumer in held}
        self.budget.hold(len(held))
        # The SDK judges a finished pull by its count against max_fetch_log_group_size (fewer: the
        # shard is idle, its next pull waits up to 0.5 s): give it what the pull asked for, as
        # ResilientConsumerClient.pull_logs asks the FetchBudget, whatever the SDK passes.
        for shard, consumer in held:
            consumer.max_fetch_log_group_size = self.budget.asked(shard, self.option.max_fetch_log_group_size)
        self.option.data_fetch_interval = (self.backlog_interval if self.budget.backlog()
                                           else max(self.backlog_interval, self.IDLE_INTERVAL))


# Every SLS answer is read whole into memory, then decompressed and parsed: its size is capped
# (answer_limit: four pulls' worth, at least this). An answer larger than that, or
# declaring more uncompressed bytes, is refused (a failed pull, tried again), so that no answer,
# real or forged, can take the memory. SLS answers far less: it stops a pull at a few MB (the
# emulator at 10 MB), and one LogGroup holds at most 5 MB.
MIN_ANSWER_LIMIT = 32 << 20


def answer_limit(settings):
    """The most bytes an SLS answer may have, compressed or not (bound_answers): a pull asks for
    about SLS_FETCH_BYTES, yet one LogGroup can hold several MB and SLS answers up to 10 MB."""
    return max(MIN_ANSWER_LIMIT, 4 * settings.sls_fetch_bytes)


PULL_RETRY_DELAY, PULL_RETRY_MAX_DELAY = 0.5, 30.0  # seconds: backoff after failed pulls of a shard


class UnsafeAnswer(Exception):
    """An SLS answer refused before its body is read: see refuse_unsafe_answer."""


class BoundedBody:
    """An answer's body as requests reads it (Response.raw.stream), raising UnsafeAnswer past
    `limit` bytes; never decoded (refuse_unsafe_answer lets no Content-Encoding through)."""

    def __init__(self, raw, limit):
        self.raw, self.limit, self.size = raw, limit, 0

    def stream(self, amount, decode_content=None):  # requests asks for decoding: not done
        for chunk in self.raw.stream(amount, decode_content=False):
            self.size += len(chunk)
            if self.size > self.limit:
                self.raw.close()
                raise UnsafeAnswer(f"the answer is longer than {self.limit} bytes (SLS_FETCH_BYTES: a quarter of it)")
            yield chunk

    def close(self):
        self.raw.close()

    def release_conn(self):
        self.raw.release_conn()


def refuse_unsafe_answer(response, limit):
    """A requests response hook (see bound_answers), run before the body is read: refuses a
    redirect (SLS never redirects, and the STS token header would follow it), an answer compressed
    other than as asked (a Content-Encoding, or an x-log-compresstype other than lz4: the SDK would
    inflate deflate without a limit), and one larger than `limit` bytes, by its Content-Length,
    its x-log-bodyrawsize (the size lz4 decompresses to, at most) or in fact. The SDK turns the
    exception into a LogException (LogRequestError) carrying its text."""
    headers = response.headers
    if response.is_redirect:
        raise UnsafeAnswer(f"the server redirected to {headers.get('Location', '')[:200]!r}")
    content_encoding = (headers.get("Content-Encoding") or "identity").strip().lower()
    compress_type = (headers.get("x-log-compresstype") or "").strip().lower()
    if content_encoding != "identity":
        raise UnsafeAnswer(f"the answer has Content-Encoding {content_encoding[:40]!r}, which was not asked for")
    if compress_type not in ("", "lz4"):
        raise UnsafeAnswer(f"the answer is compressed as {compress_type[:40]!r}; only lz4 was asked for")
    for name in ("Content-Length", "x-log-bodyrawsize"):
        size = (headers.get(name) or "0").strip()
        if not size.isdigit() or int(size) > limit:
            raise UnsafeAnswer(f"the answer's {name} is {size[:20]!r}, more than {limit} "
                               "(SLS_FETCH_BYTES: a quarter of it)")
    response.raw = BoundedBody(response.raw, limit)


def bound_answers(log_client, limit):
    """Make every answer to an SDK LogClient pass refuse_unsafe_answer with `limit`: the client sends
    each request through its requests Session (its _session), whose response hooks run before the
    body is read."""
    log_client._session.hooks["response"].append(lambda response, **_: refuse_unsafe_answer(response, limit))


class PullFailed(LogException):
    """A pull that failed or was refused: ResilientConsumerClient counted and reported it, so the
    SDK's own warning about it is left out (SdkLogFilter)."""


class PullDeferred(PullFailed):
    """A pull not made: its shard waits out the backoff that follows failed pulls."""


class ResilientConsumerClient(ConsumerClient):
    """The SDK's ConsumerClient signing with the current credentials, with fixes for a no-loss
    forwarder that takes no answer on trust (SDK 0.9.52 behaviour):

    * its LogClient is sls_client(): the SDK's has static keys only, renewed by a
      credentials_refresher it calls only after SLS refused a request (sleeping up to 5 minutes in
      the refused thread when that happens again);
    * a refusal of the credentials, from the heartbeat, a pull or a checkpoint write, is reported
      to them (credentials.refused): RAM role credentials are fetched again at once, and an expired
      SLS_STS_TOKEN ends the process (supervise) rather than failing every request for ever;
    * an expired checkpoint cursor (InvalidCursor) makes the SDK jump to the END of the shard,
      skipping everything still retained; here it resumes from the oldest retained log instead,
      and says loudly that the logs deleted by the logstore's retention are gone;
    * a failed checkpoint write raised from the SDK's idle flush kills its worker thread while the
      heartbeat keeps holding the shards; here the failure is logged, kept, and retried with the
      next checkpoint write, so consumption goes on (at worst, a restart repeats some logs);
    * a pull is asked for lz4 only and its answer bounded (bound_answers), its next cursor must be
      a cursor not before the one pulled from, and its LogGroups are read here (read_pull). A pull
      that fails any of that, or fails in SLS, is counted ("failed pulls" in the stats line),
      logged (once a minute per shard) and made again after a backoff (PULL_RETRY_DELAY, doubling
      up to PULL_RETRY_MAX_DELAY). The SDK would decompress any size, follow a bad cursor to the
      end of the shard, or print the traceback of a pull that does not parse twice a second;
    * a pull that SLS_QUERY filtered to nothing is a FilteredPull, so its checkpoint moves on;
    * the SDK starts a shard consumer for every shard id a heartbeat answer names; here only for
      those ListShards lists (`shards`, the process's ShardDirectory: ShardDirectory.listed);
    * with SLS_CURSOR_START=end, the SDK starts a shard without a checkpoint at its end, so a shard
      a split or merge made would lose what was written to it before the group handed it out;
      here such a shard, made while this process runs, starts at its beginning."""

    def __init__(self, settings, credentials, stats, shards, budget):
        super().__init__(settings.sls_endpoint, None, None, settings.sls_project, settings.sls_logstore,
                         settings.sls_cg, settings.sls_consumer_name, accept_compress_type="lz4")
        self.mclient = sls_client(settings, credentials)  # every method sends through mclient
        self.mclient.set_user_agent(f"{USER_AGENT}-consumergroup-{settings.sls_cg}-{settings.sls_consumer_name}")
        self.credentials = credentials
        self.stats = stats  # counts failed pulls, checkpoint writes and failures
        self.shards = shards
        self.budget = budget
        self.unsaved = {}  # shard -> (consumer, cursor) whose write failed
        self.unsaved_lock = threading.Lock()
        self.write_locks = collections.defaultdict(threading.RLock)  # shard -> its checkpoint writes
        self.pull_failures = {}  # shard -> (failed pulls in a row, monotonic time of the next try)
        self.warned = RateLimiter(60)

    def note_refusal(self, exc):
        if refuses_credentials(exc):
            self.credentials.refused(exc)

    def heartbeat(self, shards, responce=None):
        """The SDK's heartbeat, but a refusal is reported (the SDK's only logs it), and the answer
        keeps only the shards ListShards lists."""
        try:
            granted = self.mclient.heart_beat(self.mproject, self.mlogstore, self.mconsumer_group,
                                              self.mconsumer, shards).get_shards()
        except LogException as exc:
            self.note_refusal(exc)
            if self.warned.ready("heartbeat"):
                log.warning("consumer group heartbeat failed (%s: %s); retrying", exc.get_error_code(),
                            exc.get_error_message())
            return False
        if responce is not None:
            responce.extend(self.shards.listed(granted))
        return True

    def get_end_cursor(self, shard_id):
        if self.shards.made_while_running(shard_id):
            return self.get_begin_cursor(shard_id)
        return super().get_end_cursor(shard_id)

    def pull_logs(self, shard_id, cursor, **kwargs):
        """The pull, with its LogGroups read into response.log_groups (a FilteredPull if SLS_QUERY
        left none while the cursor moved on); raises PullFailed."""
        failures, next_try = self.pull_failures.get(shard_id, (0, 0.0))
        if time.monotonic() < next_try:
            raise PullDeferred("PullDeferred", f"shard {shard_id} waits after {failures} failed pulls")
        asked = kwargs["count"] = self.budget.groups(shard_id)  # fetching by volume (FetchBudget)
        try:
            response = self.pull_resuming_expired(shard_id, cursor, **kwargs)
        except LogException as exc:
            if "invalidcursor" in exc.get_error_code().lower():
                raise  # the SDK continues from the end of the shard: see pull_resuming_expired
            raise self.failed_pull(shard_id, failures, exc.get_error_code(), exc.get_error_message(),
                                   exc.get_resp_status()) from None
        except Exception as exc:  # an answer the SDK could not read: a header missing, bad lz4
            raise self.failed_pull(shard_id, failures, type(exc).__name__, str(exc)) from None
        next_cursor = response.get_next_cursor()
        if cursor_number(next_cursor or "") is None or \
                cursor_number(next_cursor) < (cursor_number(cursor) or 0):
            raise self.failed_pull(shard_id, failures, "BadNextCursor",
                                   f"the next cursor {next_cursor!r} is no cursor after {cursor!r}")
        try:
            response.log_groups = read_pull(response)
        except Exception as exc:  # protobuf's DecodeError, or the SDK's own parse failing
            raise self.failed_pull(shard_id, failures, "BadPullBody",
                                   f"the pulled LogGroups do not parse: {describe_error(exc)}") from None
        self.pull_failures.pop(shard_id, None)
        self.budget.observe_pull(shard_id, asked, response, response.log_groups)
        if response.get_loggroup_count() == 0 and next_cursor != cursor:
            return FilteredPull(response)
        return response

    def pull_resuming_expired(self, shard_id, cursor, **kwargs):
        try:
            return super().pull_logs(shard_id, cursor, **kwargs)
        except LogException as exc:
            self.note_refusal(exc)
            if "invalidcursor" not in exc.get_error_code().lower():
                raise
            begin = self.get_begin_cursor(shard_id)
            if cursor_number(cursor) is not None and cursor_number(begin) is not None \
                    and cursor_number(cursor) < cursor_number(begin):
                log.error("shard %d: the checkpoint cursor %s has expired (older than the oldest "
                          "log the logstore retains); resuming from the oldest retained log %s. "
                          "Logs between them were deleted by the logstore's retention and are "
                          "lost.", shard_id, cursor, begin)
                return super().pull_logs(shard_id, begin, **kwargs)
            log.error("shard %d: SLS rejected the cursor %s as invalid (%s); the SDK continues "
                      "from the end of the shard, so logs between the checkpoint and the end may "
                      "have been skipped", shard_id, cursor, exc.get_error_message())
            raise

    def failed_pull(self, shard_id, failures, code, message, status=200):
        """The PullFailed to raise for a failed pull of shard_id, the one after `failures` others in
        a row: counted, logged, and the shard's next pull put off."""
        failures += 1
        delay = min(PULL_RETRY_MAX_DELAY, PULL_RETRY_DELAY * 2 ** min(failures - 1, 16))
        self.pull_failures[shard_id] = (failures, time.monotonic() + delay)
        self.stats.add(failed_pulls=1)
        if self.warned.ready(("pull", shard_id)):
            log.warning("shard %d: pull failed (%d in a row): %s: %s; pulling again in %.1f s, "
                        "nothing is skipped", shard_id, failures, code, message[:500], delay)
        return PullFailed(code, message, resp_status=status)

    def update_check_point(self, shard, consumer, check_point):
        """True if SLS stored the checkpoint; if not, it is kept for save_unsaved. A shard's writes
        take turns: otherwise a retry of an older failed write could land after a newer one and
        move the checkpoint back."""
        with self.write_lock(shard):
            try:
                super().update_check_point(shard, consumer, check_point)
            except LogException as exc:
                self.note_refusal(exc)
                self.stats.add(checkpoint_failures=1)
                with self.unsaved_lock:
                    self.unsaved[shard] = (consumer, check_point)
                if self.warned.ready("checkpoint"):
                    log.warning("cannot save checkpoints in SLS (%s: %s); keeping them, trying again "
                                "every second", exc.get_error_code(), exc.get_error_message())
                return False
            self.stats.add(checkpoint_writes=1)
            with self.unsaved_lock:
                self.unsaved.pop(shard, None)
            return True

    def write_lock(self, shard):
        """The (re-entrant) lock a shard's checkpoint writes take turns by."""
        with self.unsaved_lock:
            return self.write_locks[shard]

    def save_unsaved(self, held=None):
        """One more attempt for every checkpoint whose write failed, the newest of each shard, or of
        the shards in `held` only (about once a second by Forwarder.flush_checkpoints: the SDK
        writes with forceSuccess, so a shard's old position must not land once another consumer
        holds it), and at exit. True if none is left."""
        with self.unsaved_lock:
            shards = [shard for shard in self.unsaved if held is None or shard in held]
        for shard in shards:
            with self.write_lock(shard):
                with self.unsaved_lock:
                    entry = self.unsaved.get(shard)
                if entry and not self.update_check_point(shard, *entry):
                    break  # SLS refuses still: the rest waits for the next attempt
        return not self.unsaved


class SdkLogFilter(logging.Filter):
    """Lets each distinct SDK message through once a minute, without its traceback, and none about
    a pull ResilientConsumerClient has reported itself (PullFailed). Decided once per record, as
    every handler asks."""

    def __init__(self, interval=60):
        super().__init__()
        self.limiter = RateLimiter(interval)

    def filter(self, record):
        if not record.name.startswith("aliyun"):
            return True
        if not hasattr(record, "sdk_filter_verdict"):
            reported = bool(record.exc_info) and isinstance(record.exc_info[1], PullFailed)
            record.exc_info = record.exc_text = None
            text = re.sub(r'"requestId": "[^"]*"', "", record.getMessage())  # unique per request
            record.sdk_filter_verdict = not reported and self.limiter.ready((record.name, text[:160]))
        return record.sdk_filter_verdict


def consumer_config(settings):
    start = settings.sls_cursor_start
    position = {"begin": CursorPosition.BEGIN_CURSOR, "end": CursorPosition.END_CURSOR}.get(
        start, CursorPosition.SPECIAL_TIMER_CURSOR)
    # No credentials, no signature: WafConsumerWorker's client (ResilientConsumerClient) has them.
    return LogHubConfig(
        settings.sls_endpoint, None, None,
        settings.sls_project, settings.sls_logstore, settings.sls_cg,
        settings.sls_consumer_name, cursor_position=position,
        cursor_start_time=start if position == CursorPosition.SPECIAL_TIMER_CURSOR else None,
        cursor_end_time=settings.sls_cursor_end or None,
        heartbeat_interval=settings.sls_heartbeat_interval,
        data_fetch_interval=settings.sls_fetch_interval,
        max_fetch_log_group_size=settings.sls_max_fetch_groups,
        worker_pool_size=settings.sls_worker_pool_size,
        query=settings.sls_query or None, processor=settings.sls_consume_processor or None,
        in_order=settings.sls_in_order,
        accept_compress_type="lz4")  # the only compression this file accepts (bound_answers)


# ------------------------------------------------------------------------------------------------
# The SDK internals this file relies on
# ------------------------------------------------------------------------------------------------
# requirements.txt pins the SDK to the version tested here. The classes above hook into parts of it
# that are not its public interface; each is listed below, checked at start (check_sdk: exit 1 with
# one line if one is gone) and proved in use by tests/test_sdk_canaries.py, which fails if the SDK
# stops using it. To upgrade the SDK: change the pin, run those tests (README.md, "Upgrading the SDK").

SDK_TESTED_VERSION = "0.9.52"
# What ConsumerWorker.__init__ sets, and so WafConsumerWorker.__init__ in its place.
WORKER_ATTRIBUTES = {"make_processor", "process_args", "process_kwargs", "option", "consumer_client",
                     "shut_down_flag", "logger", "shard_consumers", "last_owned_consumer_finish_time",
                     "heart_beat", "own_executor", "_executor"}


def sdk_internals():
    """[(what this file relies on, SDK class, its method, attribute names that method's code must
    use)] for every SDK internal relied on."""
    return [
        ("a shard consumer hands each pull to its processor's _preprocessor (read_pull)",
         ShardConsumerWorker, "__init__", {"_preprocessor"}),
        ("PullLogResponse keeps the uncompressed body in _raw_uncompressed_body (read_pull)",
         PullLogResponse, "__init__", {"_raw_uncompressed_body"}),
        ("ConsumerWorker.run calls clean_shard_consumer once per round, stops on shut_down_flag and "
         "waits option.data_fetch_interval between rounds, read every round",
         ConsumerWorker, "run", {"clean_shard_consumer", "shut_down_flag", "option", "data_fetch_interval"}),
        ("ConsumerWorker.__init__ sets what WafConsumerWorker.__init__ sets in its place",
         ConsumerWorker, "__init__", WORKER_ATTRIBUTES),
        ("a new shard consumer takes the worker's consumer_client",
         ConsumerWorker, "_get_shard_consumer", {"consumer_client"}),
        ("the heartbeat keeps mheld_shards and mheart_shards under lock",
         ConsumerHeatBeat, "__init__", {"mheld_shards", "mheart_shards", "lock"}),
        ("the heartbeat's remove_heart_shard changes both lists",
         ConsumerHeatBeat, "remove_heart_shard", {"mheld_shards", "mheart_shards", "lock"}),
        ("the checkpoint tracker's lock, last_persistent_checkpoint and consumer_group_client",
         ConsumerCheckpointTracker, "__init__",
         {"lock", "last_persistent_checkpoint", "consumer_group_client", "shard_id", "consumer_name"}),
        ("the checkpoint tracker's set_persistent_check_point",
         ConsumerCheckpointTracker, "set_persistent_check_point", {"last_persistent_checkpoint"}),
        ("the SDK tells each processor its shard_id",
         ConsumerProcessorBase, "initialize", {"shard_id"}),
        ("a shard consumer asks each pull for its max_fetch_log_group_size LogGroups (FetchBudget)",
         ShardConsumerWorker, "fetch_data", {"max_fetch_log_group_size"}),
        ("ConsumerClient keeps its LogClient in mclient, which ResilientConsumerClient replaces, and "
         "its names in mproject, mlogstore, mconsumer_group, mconsumer (its heartbeat)",
         ConsumerClient, "__init__", {"mclient", "mproject", "mlogstore", "mconsumer_group", "mconsumer"}),
        ("ConsumerClient sends its requests through mclient (e.g. reading a checkpoint)",
         ConsumerClient, "get_check_point", {"mclient"}),
        ("ConsumerClient sends its requests through its LogClient, mclient (bound_answers)",
         ConsumerClient, "pull_logs", {"mclient"}),
        ("LogClient sends every request through its requests Session, _session (bound_answers)",
         LogClient, "_get_http_sender", {"_session"}),
        ("the heartbeat asks its log_client's heartbeat() for the shards (ResilientConsumerClient."
         "heartbeat) and notes when SLS answered in last_hearbeat_successed_unixtime (ConsumerMonitor)",
         ConsumerHeatBeat, "run", {"log_client", "heartbeat", "last_hearbeat_successed_unixtime"}),
        ("a shard consumer hands process() its checkpoint_tracker (Forwarder.finish_read_only_shards)",
         ShardConsumerWorker, "_generate_next_task", {"checkpoint_tracker"}),
    ]


def check_sdk():
    """None if the installed SDK has every internal this file relies on, else one line saying what
    is missing or changed."""
    if SDK_IMPORT_ERROR is not None:
        return (f"the Alibaba Cloud SLS SDK cannot be imported ({SDK_IMPORT_ERROR}); install it with "
                f"pip install -r requirements.txt (aliyun-log-python-sdk=={SDK_TESTED_VERSION})")
    for what, owner, method, names in sdk_internals():
        code = getattr(getattr(owner, method, None), "__code__", None)
        missing = sorted(names - set(code.co_names)) if code else [method]
        if missing:
            return (f"aliyun-log-python-sdk {SDK_VERSION} no longer has what this file relies on: {what} "
                    f"({owner.__name__}.{method} lacks {', '.join(missing)}); it was tested with "
                    f"{SDK_TESTED_VERSION}: install that (pip install -r requirements.txt) or see "
                    "README.md, 'Upgrading the SDK'")
    return None


# ================================================================================================
# Operating it: start and assignment lines, /metrics and /healthz, systemd, replay progress
# ================================================================================================
# A consumer process (ConsumerMonitor) describes itself in a snapshot: a dict of plain values. The
# metrics, the health verdict, systemd's notifications and the replay progress are made from
# snapshots by one Reporter, so that one process and the --workers supervisor, which reads the
# snapshot file each worker writes (WorkersMonitor), report alike.

METRICS_PREFIX = "sync_waf_to_syslog_"
METRICS_HELP = {  # a counter of Stats.totals not listed here is exported all the same
    "logs_total": "logs sent to the syslog server",
    "bytes_total": "bytes of syslog messages sent",
    "send_errors_total": "failed syslog sends (each batch is retried until it is accepted)",
    "resent_total": "messages sent again after a failure",
    "truncated_total": "messages cut to SYSLOG_MAX_MESSAGE_SIZE",
    "filtered_total": "logs not sent because of SLS_TOPICS or customize()",
    "filtered_by_sls_total": "logs SLS_QUERY or SLS_CONSUME_PROCESSOR left out",
    "checkpoint_writes_total": "checkpoints saved in SLS",
    "checkpoint_failures_total": "checkpoint writes that failed (kept and retried)",
    "lag_seconds": "now minus the time of the newest log sent, per shard",
    "shard_held": "1 for each shard held",
    "shards_held": "number of shards held",
    "syslog_failing_seconds": "how long syslog sends have been failing; 0 while they succeed",
    "syslog_target": "the syslog server the messages go to",
    "consumer_loop_age_seconds": "seconds since the consumer loop last went round",
    "replay_log_groups": "SLS_CURSOR_END: log groups to replay, per shard",
    "replay_done_log_groups": "SLS_CURSOR_END: log groups replayed, per shard",
    "healthy": "1 while /healthz answers 200",
}
STUCK_AFTER_MIN = 10     # /healthz: a loop that did not go round for this long (and 2 heartbeats) is stuck
REPORT_STALE_AFTER = 10  # seconds: a worker whose snapshot is older than this hangs


def empty_snapshot(worker, written):
    """The snapshot of a consumer that has not described itself yet."""
    return {"worker": worker, "written": written, "ready": False, "loop_age": 0.0, "held": [],
            "failing_for": 0.0, "counters": {}, "lag": {}, "gauges": [], "replay": None}


def write_snapshot(path, snapshot):
    """Replace the file in one step (a 0600 file beside it, renamed), so readers never see half."""
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(snapshot, file)
    os.replace(temporary, path)


def read_snapshot(path):
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def health_problems(snapshots, settings, now):
    """Why /healthz answers 503, one line each; [] while every consumer is consuming and delivering."""
    if not snapshots:
        return ["no consumer process is running"]
    stuck_after = max(STUCK_AFTER_MIN, 2 * settings.sls_heartbeat_interval)
    problems = []
    for snapshot in snapshots:
        who = f"worker {snapshot['worker']}" if snapshot["worker"] else "consumer"
        age = max(0.0, now - snapshot["written"])
        if age > REPORT_STALE_AFTER:
            problems.append(f"{who}: no report for {age:.0f} s")
        elif not snapshot["ready"]:
            problems.append(f"{who}: has not joined the consumer group yet")
        elif snapshot["loop_age"] + age > stuck_after:
            problems.append(f"{who}: the consumer loop is stuck ({snapshot['loop_age'] + age:.0f} s)")
        if snapshot["failing_for"] and snapshot["failing_for"] + age > settings.sync_health_failing_after:
            problems.append(f"{who}: syslog failing for {snapshot['failing_for'] + age:.0f} s "
                            f"(SYNC_HEALTH_FAILING_AFTER={settings.sync_health_failing_after:g})")
    if not problems and not any(snapshot["held"] for snapshot in snapshots):
        problems.append("no shard held")
    return problems


def progressing(snapshots, now, window):
    """Whether every consumer's loop went round in the last `window` seconds."""
    return bool(snapshots) and all(now - s["written"] + s["loop_age"] < window for s in snapshots)


_escape_label_value = replacer({"\\": "\\\\", '"': '\\"', "\n": "\\n"})


def metric_sample(name, labels, value):
    """One line of the text format: name{label="value",...} value."""
    text = ",".join(f'{label}="{_escape_label_value(str(v))}"' for label, v in labels.items())
    return f"{METRICS_PREFIX}{name}{{{text}}} {value!r}" if text else f"{METRICS_PREFIX}{name} {value!r}"


def render_metrics(snapshots, healthy):
    """The Prometheus text format (0.0.4): every counter of Stats.totals as <name>_total, the
    gauges, per shard where they are about shards; a `worker` label under --workers."""
    families = collections.defaultdict(list)  # (name, type) -> [(labels, value)]
    for snapshot in snapshots:
        worker = {"worker": snapshot["worker"]} if snapshot["worker"] else {}
        for name, value in snapshot["counters"].items():
            families[(f"{name}_total", "counter")].append((worker, value))
        for shard, lag in snapshot["lag"].items():
            families[("lag_seconds", "gauge")].append(({**worker, "shard": shard}, lag))
        for shard in snapshot["held"]:
            families[("shard_held", "gauge")].append(({**worker, "shard": shard}, 1))
        families[("shards_held", "gauge")].append((worker, len(snapshot["held"])))
        families[("syslog_failing_seconds", "gauge")].append((worker, snapshot["failing_for"]))
        families[("consumer_loop_age_seconds", "gauge")].append((worker, snapshot["loop_age"]))
        for name, labels, value in snapshot["gauges"]:
            families[(name, "gauge")].append(({**worker, **labels}, value))
        for shard, (start, position, end) in ((snapshot["replay"] or {}).get("shards") or {}).items():
            families[("replay_log_groups", "gauge")].append(({**worker, "shard": shard}, end - start))
            families[("replay_done_log_groups", "gauge")].append(({**worker, "shard": shard}, position - start))
    families[("healthy", "gauge")].append(({}, int(healthy)))
    lines = []
    for (name, kind), samples in families.items():
        if name in METRICS_HELP:
            lines.append(f"# HELP {METRICS_PREFIX}{name} {METRICS_HELP[name]}")
        lines.append(f"# TYPE {METRICS_PREFIX}{name} {kind}")
        lines += [metric_sample(name, labels, value) for labels, value in samples]
    return "\n".join(lines) + "\n"


class MetricsServer:
    """SYNC_METRICS_ADDR: GET /metrics and GET /healthz (200 "ok", or 503 and one line per
    problem) on a thread of its own, from report() -> (snapshots, problems). Binds at once, so a
    taken port is an error at start."""

    def __init__(self, address, report):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                if path not in ("/metrics", "/healthz"):
                    return self.answer(404, "not found: try /metrics or /healthz\n")
                snapshots, problems = report()
                if path == "/metrics":
                    return self.answer(200, render_metrics(snapshots, not problems),
                                       "text/plain; version=0.0.4; charset=utf-8")
                return self.answer(503 if problems else 200, "".join(f"{p}\n" for p in problems) or "ok\n")

            def answer(self, status, text, content_type="text/plain; charset=utf-8"):
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass  # scrapes every few seconds would flood the log

        server_class = type("Server", (http.server.ThreadingHTTPServer,), {
            "daemon_threads": True, "address_family": socket.AF_INET6 if ":" in address[0] else socket.AF_INET})
        self.server = server_class(address, Handler)
        threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class SystemdNotifier:
    """systemd's notification protocol (sd_notify(3)): datagrams of KEY=VALUE lines to the Unix
    socket in $NOTIFY_SOCKET (an abstract one when it starts with @); nothing without it.
    WatchdogSec= sets $WATCHDOG_USEC: WATCHDOG=1 is then due that often, and is sent at half of it."""

    def __init__(self, environ):
        path = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if path else None
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())  # a watchdog meant for another process is not ours
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) and ours else None
        self.next_ping = 0.0
        self.warned = RateLimiter(60)

    def send(self, *fields):
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if self.warned.ready("send"):
                log.warning("cannot notify systemd through NOTIFY_SOCKET: %s", describe_error(exc))

    def watchdog(self, progress, now):
        """WATCHDOG=1 when one is due, but only while the consumer makes progress: a stuck process
        lets the watchdog run out, and systemd restarts it (WatchdogSec=, Restart=)."""
        if self.watchdog_interval and progress and now >= self.next_ping:
            self.send("WATCHDOG=1")
            self.next_ping = now + self.watchdog_interval


def replay_progress(shards, elapsed):
    """(percent, done, total, log groups/s, ETA seconds or None) of a replay from {shard: [start,
    position, end]} cursor numbers."""
    total = sum(end - start for start, _, end in shards.values())
    done = sum(min(position, end) - start for start, position, end in shards.values())
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else None
    return (100.0 * done / total if total else 100.0), done, total, rate, eta


def replay_line(shards, elapsed):
    if not shards:
        return "replay: no shard held yet"
    percent, done, total, rate, eta = replay_progress(shards, elapsed)
    per_shard = ", ".join(f"{shard}: {replay_progress({shard: shards[shard]}, elapsed)[0]:.0f}%"
                          for shard in sorted(shards, key=int))
    return (f"replay: {percent:.1f}% ({done} of {total} log groups done, {total - done} to go), "
            f"{rate:.0f} log groups/s, ETA {'-' if eta is None else datetime.timedelta(seconds=round(eta))}; "
            f"shards {per_shard}")


def replay_bar(shards, elapsed, width=30):
    percent, done, total, _, eta = replay_progress(shards, elapsed)
    filled = int(width * percent / 100)
    return (f"[{'#' * filled}{'.' * (width - filled)}] {percent:5.1f}% {done}/{total} log groups, "
            f"ETA {'-' if eta is None else datetime.timedelta(seconds=round(eta))}")


def group_checkpoints(client, settings):
    """{shard: checkpoint cursor} of the consumer group; {} before the group exists."""
    try:
        return {item["shard"]: item["checkpoint"] for item in client.get_check_point(
            settings.sls_project, settings.sls_logstore, settings.sls_cg).get_consumer_group_check_points() or []}
    except LogException as exc:
        if exc.get_error_code() != "ConsumerGroupNotExist":
            raise
        return {}


def start_cursor(client, settings, shard, checkpoints):
    """Where a shard's consumption starts: its checkpoint, or SLS_CURSOR_START."""
    return checkpoints.get(shard) or client.get_cursor(
        settings.sls_project, settings.sls_logstore, shard, settings.sls_cursor_start).get_cursor()


class ReplayProgress:
    """SLS_CURSOR_END: how far a replay has come. SLS cursors are consecutive numbers, one per
    LogGroup (cursor_number), so a shard's replay runs from where it starts (its checkpoint, or
    SLS_CURSOR_START) to the cursor of SLS_CURSOR_END, and its delivered checkpoint says where it
    is. The bounds of each shard this process takes are asked from SLS once, on a thread, with
    `client` (the consumer's LogClient)."""

    def __init__(self, settings, forwarder, client):
        self.settings = settings
        self.forwarder = forwarder
        self.client = client
        self.started = time.time()
        self.lock = threading.Lock()
        self.bounds = {}     # shard -> (start, end) cursor numbers
        self.positions = {}  # shard -> delivered cursor number
        self.asked = set()   # shards whose bounds are asked for or known
        self.first_log_time = None  # receive time of the first LogGroup to replay
        self.held = []

    def update(self, held):
        self.held = held
        for shard, tracker in list(self.forwarder.trackers.items()):
            number = cursor_number(tracker.get_check_point() or "")
            if number is not None:
                self.positions[shard] = number
        new = sorted(set(held) - self.asked)
        if new:
            self.asked.update(new)
            threading.Thread(target=self.ask_bounds, args=(new,), name="replay-bounds", daemon=True).start()

    def ask_bounds(self, shards):
        s = self.settings
        try:
            client = self.client
            checkpoints = group_checkpoints(client, s)
            for shard in shards:
                start = start_cursor(client, s, shard, checkpoints)
                end = client.get_cursor(s.sls_project, s.sls_logstore, shard, s.sls_cursor_end).get_cursor()
                with self.lock:
                    self.bounds[shard] = (cursor_number(start), cursor_number(end))
                if cursor_number(start) < cursor_number(end):
                    seconds = client.get_cursor_time(s.sls_project, s.sls_logstore, shard, start).get_cursor_time()
                    self.first_log_time = min(seconds, self.first_log_time or seconds)
        except LogException as exc:
            log.warning("replay progress: cannot ask SLS where shards %s start and end (%s); no "
                        "progress for them", shards, exc.get_error_code())

    def shards(self, finished_too=False):
        """{shard (text): [start, position, end]} of the shards held now whose bounds are known
        (a shard taken over by another consumer is its to report), and of those finished."""
        with self.lock:
            shards = {str(shard): [start, min(max(self.positions.get(shard, start), start), end), end]
                      for shard, (start, end) in self.bounds.items()}
        return {shard: bounds for shard, bounds in shards.items()
                if finished_too or int(shard) in self.held or bounds[1] == bounds[2]}

    def line(self):
        return replay_line(self.shards(), time.time() - self.started)

    def final_line(self, sent):
        """What was replayed, from the checkpoints saved in SLS (the last positions, which the
        consumer no longer holds)."""
        try:
            for shard, cursor in group_checkpoints(self.client, self.settings).items():
                if shard in self.bounds and cursor_number(cursor) is not None:
                    self.positions[shard] = cursor_number(cursor)
        except LogException as exc:
            log.warning("replay progress: cannot read the saved checkpoints (%s)", exc.get_error_code())
        shards = self.shards(finished_too=True)
        percent, done, total, _, _ = replay_progress(shards, 1)
        since = "" if self.first_log_time is None else \
            f" received from {datetime.datetime.fromtimestamp(self.first_log_time).isoformat()}"
        until = datetime.datetime.fromtimestamp(int(self.settings.sls_cursor_end)).isoformat()
        return (f"replay {'finished' if done == total else 'stopped'}: {percent:.1f}% ({done} of {total} "
                f"log groups) of shards {', '.join(sorted(shards, key=int)) or '-'}, logs{since} up to "
                f"{until} (SLS_CURSOR_END); {sent} logs sent in {time.time() - self.started:.0f} s")


class Reporter:
    """Everything made from snapshots: the /metrics and /healthz endpoint (SYNC_METRICS_ADDR),
    systemd's READY=1 (once every consumer holds its first heartbeat answer), STATUS= and
    WATCHDOG=1 (while every consumer loop goes round), and the replay's live bar (--progress, on
    a terminal). snapshots() is called from the endpoint's threads too."""

    def __init__(self, settings, snapshots, progress_bar):
        self.settings = settings
        self.snapshots = snapshots
        self.notifier = SystemdNotifier(os.environ)
        self.server = MetricsServer(settings.sync_metrics_addr, self.report) if settings.sync_metrics_addr else None
        self.progress_bar = progress_bar and bool(settings.sls_cursor_end) and sys.stderr.isatty()
        self.started = time.time()
        self.ready = False

    def report(self):
        snapshots = self.snapshots()
        return snapshots, health_problems(snapshots, self.settings, time.time())

    def tick(self, status):
        """Called twice a second; `status` says in one line what the consumers do."""
        snapshots, now = self.snapshots(), time.time()
        if not self.ready and snapshots and all(s["ready"] for s in snapshots):
            self.ready = True
            self.notifier.send("READY=1", f"STATUS={status}")
        self.notifier.watchdog(progressing(snapshots, now, max(2.0, self.notifier.watchdog_interval or 0)), now)
        if self.progress_bar:
            shards = {k: v for s in snapshots for k, v in ((s["replay"] or {}).get("shards") or {}).items()}
            sys.stderr.write("\r\x1b[K" + replay_bar(shards, now - self.started))
            sys.stderr.flush()

    def status(self, line):
        self.notifier.send(f"STATUS={line}")

    def close(self):
        self.notifier.send("STOPPING=1")
        if self.progress_bar:
            sys.stderr.write("\n")
        if self.server:
            self.server.close()


def cannot_serve_metrics(settings, exc):
    """The exit status after SYNC_METRICS_ADDR could not be bound (taken, or not this host's)."""
    log.error("SYNC_METRICS_ADDR: cannot serve /metrics on %s:%d: %s", *settings.sync_metrics_addr,
              describe_error(exc))
    return EXIT_FAILURE


class ConsumerMonitor:
    """What a consumer process tells its operators, called by supervise() twice a second: a line
    with the consumer and the shards it took once its first heartbeat is answered, a line for each
    later change of the shards held, the statistics line, the replay progress (SLS_CURSOR_END) and,
    through a Reporter, /metrics, /healthz and systemd's notifications. A worker of --workers
    writes its snapshot to a file instead (status_file), for the supervisor to report."""

    SNAPSHOT_INTERVAL = 1.0

    def __init__(self, settings, worker, forwarder, status_file=None, progress_bar=False):
        self.settings, self.worker, self.forwarder = settings, worker, forwarder
        self.status_file = status_file
        self.first_beat = worker.heart_beat.last_hearbeat_successed_unixtime  # changes with the first answer
        self.held = None  # the shards held, once the first heartbeat is answered
        self.replay = ReplayProgress(settings, forwarder, worker.consumer_client.mclient) \
            if settings.sls_cursor_end else None
        self.reporter = None if status_file else Reporter(settings, lambda: [self.snapshot()], progress_bar)
        self.next_snapshot = 0.0
        self.warned = RateLimiter(60)

    def snapshot(self):
        counters, lag, gauges = self.forwarder.stats.snapshot()
        return {"worker": self.settings.sls_consumer_name if self.status_file else "",
                "written": time.time(), "ready": self.held is not None,
                "loop_age": time.monotonic() - self.worker.last_round,
                "held": sorted(self.worker.heart_beat.mheld_shards),
                "failing_for": self.forwarder.stats.failing_for(), "counters": counters,
                "lag": {str(shard): round(seconds, 3) for shard, seconds in lag.items()}, "gauges": gauges,
                "replay": {"shards": self.replay.shards()} if self.replay else None}

    def tick(self, now):
        held = sorted(self.worker.heart_beat.mheld_shards)
        name = self.settings.sls_consumer_name
        if self.held is None:
            if self.worker.heart_beat.last_hearbeat_successed_unixtime != self.first_beat:
                log.info("consumer %s joined group %s and holds shards %s", name, self.settings.sls_cg,
                         ", ".join(map(str, held)) or "none (other consumers hold them all)")
                self.held = held
        elif held != self.held:
            log.info("consumer %s now holds shards %s (took %s, gave up %s)", name,
                     ", ".join(map(str, held)) or "none", sorted(set(held) - set(self.held)) or "none",
                     sorted(set(self.held) - set(held)) or "none")
            self.held = held
        if self.replay:
            self.replay.update(held)
        if self.reporter:
            self.reporter.tick(f"consumer {name} holds shards {held}")
        elif now >= self.next_snapshot:
            self.next_snapshot = now + self.SNAPSHOT_INTERVAL
            try:
                write_snapshot(self.status_file, self.snapshot())
            except OSError as exc:  # the supervisor then reports this worker as silent
                if self.warned.ready("snapshot"):
                    log.warning("cannot write %s for the supervisor: %s", self.status_file, describe_error(exc))

    def report(self, line):
        """The statistics line (and the replay's progress line): logged, and systemd's STATUS=."""
        log.info(line)
        if self.replay:
            log.info(self.replay.line())
        if self.reporter:
            self.reporter.status(line)

    def close(self):
        if self.replay:
            log.info(self.replay.final_line(self.forwarder.stats.snapshot()[0]["logs"]))
        if self.reporter:
            self.reporter.close()


class WorkersMonitor:
    """The --workers supervisor's Reporter: the snapshots are the files its running workers write
    (a worker not yet described is reported as not ready); STATUS= sums them up."""

    def __init__(self, settings, status_files, progress_bar):
        self.settings = settings
        self.status_files = status_files  # worker name -> its snapshot file
        self.running = {}  # worker name -> time.time() it started
        self.status = ""
        self.reporter = Reporter(settings, self.snapshots, progress_bar)

    def snapshots(self):
        return [read_snapshot(self.status_files[name]) or empty_snapshot(name, started)
                for name, started in list(self.running.items())]

    def started(self, name):
        self.running[name] = time.time()

    def stopped(self, name):
        self.running.pop(name, None)
        for path in (self.status_files[name], f"{self.status_files[name]}.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def tick(self):
        snapshots = self.snapshots()
        logs = sum(s["counters"].get("logs", 0) for s in snapshots)
        errors = sum(s["counters"].get("send_errors", 0) for s in snapshots)
        held = sorted(shard for s in snapshots for shard in s["held"])
        status = f"{len(snapshots)} workers, shards held {held}, total {logs} logs, send errors {errors}"
        self.reporter.tick(status)
        if status != self.status:
            self.reporter.status(status)
            self.status = status

    def close(self):
        for name in list(self.running):
            self.stopped(name)
        self.reporter.close()


# ================================================================================================
# Program
# ================================================================================================

def stop_on_signals():
    """An Event that SIGTERM and SIGINT set, by way of a pipe: Python's own C-level handler writes
    each signal's number to it (signal.set_wakeup_fd), and a thread reading it sets the Event. A
    Python handler calling stop.set() runs in the main thread between any two bytecodes, so it could
    run inside the main thread's own use of the Event's lock, or inside another handler's set()
    (Ctrl-C sends SIGINT, and --workers' supervisor SIGTERM, a moment apart): a deadlock."""
    stop = threading.Event()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    stopping = {signal.SIGTERM, signal.SIGINT}
    for signum in stopping:
        signal.signal(signum, lambda *_: None)  # the pipe carries it

    def watch():
        while os.read(read_end, 1)[0] not in stopping:
            pass
        stop.set()

    threading.Thread(target=watch, name="signals", daemon=True).start()
    return stop


def stopped(stop, seconds):
    """Sleep, then say whether a stop was requested (see stop_on_signals)."""
    time.sleep(seconds)
    return stop.is_set()


def credentials_or_none(settings):
    """open_credentials(settings), or None once the reason is logged (the caller exits 1)."""
    try:
        credentials = open_credentials(settings)
    except CredentialsError as exc:
        log.error("%s", exc)
        return None
    log.info("SLS credentials: %s", credentials.describe())
    return credentials


class StopDeadline(threading.Thread):
    """Ends the process SYNC_STOP_TIMEOUT seconds after a stop began (`stopping` was set) if it has
    not ended by then: a stop must not wait for ever on a batch that does not end, a pull SLS does
    not answer or a checkpoint it does not take. Exits with `status` (0 for a requested stop)."""

    def __init__(self, stopping, seconds):
        super().__init__(name="stop-deadline", daemon=True)
        self.stopping, self.seconds, self.status = stopping, seconds, EXIT_OK

    def run(self):
        self.stopping.wait()
        time.sleep(self.seconds)
        log.warning("still stopping after SYNC_STOP_TIMEOUT=%g s; exiting anyway: the logs delivered "
                    "since the checkpoints were last saved (about a second) will be sent again",
                    self.seconds)
        logging.shutdown()
        os._exit(self.status)


def use_one_malloc_arena():
    """glibc gives threads that allocate at once malloc arenas of their own (up to 8 a core), and
    the pool threads each parse pulls of megabytes: what they free stays spread over the arenas.
    One arena kept the peak resident size 11-26 MB lower at the same speed (README.md,
    "Performance"). Left alone if MALLOC_ARENA_MAX is set, or where the C library is not glibc."""
    M_ARENA_MAX = -8
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None and "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(M_ARENA_MAX, 1)


def run(settings, status_file=None, progress_bar=False):
    """Consume until stopped; returns the exit status. A worker of --workers writes its snapshot
    to status_file (ConsumerMonitor)."""
    use_one_malloc_arena()
    stop = stop_on_signals()
    deadline = StopDeadline(stop, settings.sync_stop_timeout)
    deadline.start()
    credentials = credentials_or_none(settings)
    if credentials is None:
        return EXIT_FAILURE
    forwarder = Forwarder(settings, stop)
    client = ResilientConsumerClient(settings, credentials, forwarder.stats, forwarder.shards, forwarder.budget)
    try:
        worker = WafConsumerWorker(forwarder, consumer_config(settings), client)
    except ClientWorkerException as exc:
        log.error("cannot join consumer group %s of %s/%s with the %s: %s", settings.sls_cg,
                  settings.sls_project, settings.sls_logstore, credentials.describe(), join_problem(exc))
        return EXIT_FAILURE
    try:
        monitor = ConsumerMonitor(settings, worker, forwarder, status_file, progress_bar)
    except OSError as exc:
        return cannot_serve_metrics(settings, exc)
    log.info("*** start to consume data...")
    targets = syslog_targets(settings)
    log.info("consumer %s of group %s on %s/%s -> %s %s%s", settings.sls_consumer_name,
             settings.sls_cg, settings.sls_project, settings.sls_logstore, settings.syslog_protocol,
             ",".join(map(str, targets)), f" ({settings.syslog_balance})" if len(targets) > 1 else "")
    forwarder.shards.start(sls_client(settings, credentials), stop)
    worker.start()
    threading.Thread(target=forwarder.flush_checkpoints, args=(client,), name="checkpoints",
                     daemon=True).start()
    status = supervise(settings, worker, forwarder, stop, monitor)
    if status_file and credentials.failure:
        status = EXIT_NO_RESTART  # the same credentials would fail the same way after a restart
    log.info("stopping: saving the checkpoints of delivered logs and releasing the shards")
    deadline.status = status
    stop.set()
    # ConsumerWorker.shutdown() stops the heartbeat at once, so after the group timeout another
    # member may get a shard before this one has saved its last checkpoint there (duplicates).
    # Keep heartbeating, so the shards stay ours, until every shard consumer has shut down.
    worker.shut_down_flag = True
    worker.join()
    worker.heart_beat.shutdown()
    forwarder.delivery.close()
    if not client.save_unsaved():
        log.error("some checkpoints could not be saved in SLS; their logs will be sent again next time")
    if settings.sync_stats_interval:
        log.info(forwarder.stats_line())
    monitor.close()
    log.info("stopped")
    return status


FIRST_STATS_AFTER = 10  # seconds: the first statistics line comes early, then every interval


def supervise(settings, worker, forwarder, stop, monitor):
    """Wait for a stop signal; watch the SDK's worker thread and print statistics meanwhile.

    The thread's loop goes round every SLS_FETCH_INTERVAL (the work itself runs in the pool), so a
    loop that has not gone round for 10 heartbeat intervals is stuck, and its shards, which the
    heartbeat keeps holding, would be read by nobody. Credentials that SLS refuses and nothing
    renews (an expired SLS_STS_TOKEN) end it too. A batch still being encoded after three
    heartbeat intervals (its shard waits meanwhile) is reported, then once a minute; a batch
    waiting for the syslog server is reported by Delivery."""
    credentials = worker.consumer_client.credentials
    next_stats = time.monotonic() + (min(FIRST_STATS_AFTER, settings.sync_stats_interval)
                                     if settings.sync_stats_interval else float("inf"))
    stuck_after = 10 * settings.sls_heartbeat_interval
    slow_after, slow_reported = 3 * settings.sls_heartbeat_interval, RateLimiter(60)
    last_check = time.monotonic()
    while not stopped(stop, 0.5):
        now = time.monotonic()
        monitor.tick(now)
        # After a pause of the whole process (SIGSTOP, a frozen VM) the worker needs a moment too.
        paused, last_check = now - last_check > 5, now
        if not worker.is_alive():
            if worker.shut_down_flag and settings.sls_cursor_end:
                log.info("replay finished: every shard reached SLS_CURSOR_END")
                return EXIT_OK
            log.error("the SDK consumer thread stopped unexpectedly; exiting so a supervisor "
                      "(systemd, cron, --workers) restarts the forwarder")
            return EXIT_FAILURE
        if not paused and now - worker.last_round > stuck_after:
            log.error("the SDK consumer thread is stuck (its loop has not gone round for %.0f s; shards "
                      "held: %s); exiting so a supervisor (systemd, cron, --workers) restarts the "
                      "forwarder", now - worker.last_round, list(worker.heart_beat.mheld_shards))
            logging.shutdown()
            os._exit(EXIT_FAILURE)  # a stuck thread cannot be joined, and would hold up a normal exit
        if credentials.failure:
            log.error("%s; exiting", credentials.failure)
            return EXIT_FAILURE
        for shard, (since, logs) in list(forwarder.encoding.items()):
            if now - since > slow_after and slow_reported.ready((shard, since)):
                log.warning("shard %d: encoding a batch of %d logs has taken %.0f s so far (a log with "
                            "a great many fields? a slow customize()?); the shard waits for it",
                            shard, logs, now - since)
        if now >= next_stats:
            monitor.report(forwarder.stats_line())
            next_stats += settings.sync_stats_interval
    return EXIT_OK


def check_sls(settings, client):
    """(OK or FAIL, what it found) of --check for SLS: the logstore's shards and the consumer group."""
    where = f"SLS {settings.sls_project}/{settings.sls_logstore}"
    try:
        shards = client.list_shards(settings.sls_project, settings.sls_logstore).get_shards_info()
        groups = client.list_consumer_group(settings.sls_project, settings.sls_logstore).get_consumer_groups()
    except LogException as exc:
        return "FAIL", f"{where}: {sls_problem(exc.get_error_code(), exc.get_error_message())}"
    state = "exists" if settings.sls_cg in [g.get_consumer_group_name() for g in groups] else "will be created"
    return "OK", (f"{where}: {len(shards)} shards, consumer group {settings.sls_cg} {state} "
                  f"(signature {settings.sls_auth_version})")


STATEMENT_REFUSED = {"ParameterInvalid", "InvalidParameter", "ConsumeProcessorNotExist"}


def statement_problem(settings, client):
    """The setting error when SLS refuses SLS_QUERY or SLS_CONSUME_PROCESSOR (one pull of one
    LogGroup with it, at the start of the first shard; SLS checks a statement before it reads); None
    if SLS takes it, if there is none, or if SLS cannot be asked now (the consumer reports that)."""
    if not (settings.sls_query or settings.sls_consume_processor):
        return None
    name = "SLS_QUERY" if settings.sls_query else "SLS_CONSUME_PROCESSOR"
    try:
        shard = client.list_shards(settings.sls_project, settings.sls_logstore).get_shards_info()[0]["shardID"]
        cursor = client.get_cursor(settings.sls_project, settings.sls_logstore, shard, "begin").get_cursor()
        client.pull_logs(settings.sls_project, settings.sls_logstore, shard, cursor, count=1,
                         query=settings.sls_query or None, processor=settings.sls_consume_processor or None)
    except LogException as exc:
        if exc.get_error_code() in STATEMENT_REFUSED:
            return f"{name}: SLS refused it: {exc.get_error_code()}: {exc.get_error_message()}"
    except (IndexError, KeyError):  # no shard to try it on
        pass
    return None


SLS_ERROR_VARIABLES = {  # SLS errorCode -> (the variable to fix, what the error means)
    "SignatureNotMatch": ("SLS_AK_KEY", "the AccessKey secret is not the one of SLS_AK_ID"),
    "InvalidAccessKeyId": ("SLS_AK_ID", "SLS does not know this AccessKey ID"),
    "ProjectNotExist": ("SLS_PROJECT", "no such project at this endpoint (or SLS_ENDPOINT is another region's)"),
    "LogStoreNotExist": ("SLS_LOGSTORE", "no such logstore in SLS_PROJECT"),
}
# How urllib3 and the resolver word a host name that does not resolve.
NAME_NOT_RESOLVED = re.compile(r"Failed to resolve|NameResolutionError|Name or service not known|"
                               r"Temporary failure in name resolution|nodename nor servname", re.IGNORECASE)
DNS_TIMEOUT = 5  # seconds; the SDK would retry a name that does not resolve for about 10 s


def sls_problem(code, message):
    """An SLS error as one line naming the variable behind it, where one is."""
    if code == "Unauthorized" and "AccessKeyId not found" in message:  # how SLS says InvalidAccessKeyId
        code = "InvalidAccessKeyId"
    if code in SLS_ERROR_VARIABLES:
        variable, meaning = SLS_ERROR_VARIABLES[code]
        return f"{variable}: {meaning} ({code})"
    if NAME_NOT_RESOLVED.search(message):
        return f"SLS_ENDPOINT: its host name does not resolve ({code}: {message[:300]})"
    return f"{code}: {message}"


def join_problem(exc):
    """sls_problem() of the SDK's ClientWorkerException, which quotes the SLS error in its text."""
    quoted = re.search(r"errorCode: (\S+), errorMessage: (.*)", str(exc), re.DOTALL)
    return sls_problem(*quoted.groups()) if quoted else str(exc)


def resolve_within(host, seconds):
    """None once `host` resolves, else why it does not; gives up after `seconds`."""
    outcome = []

    def resolve():
        try:
            socket.getaddrinfo(host, None)
            outcome.append(None)
        except OSError as exc:
            outcome.append(describe_error(exc))

    thread = threading.Thread(target=resolve, name="resolve", daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else f"no answer from DNS within {seconds} s"


def endpoint_problem(settings):
    """SLS_ENDPOINT's host checked before the SDK is asked, which would retry for ~10 s; None if it
    resolves, or if a proxy (HTTP_PROXY, ...) will resolve it."""
    endpoint = settings.sls_endpoint
    url = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    proxies = urllib.request.getproxies()
    if (proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(url.hostname or ""):
        return None
    problem = resolve_within(url.hostname or endpoint, DNS_TIMEOUT)
    return problem and f"SLS_ENDPOINT: cannot resolve {url.hostname or endpoint!r}: {problem}"


def syslog_problem(exc):
    """A failed connection to the syslog server as one line naming the variable to look at."""
    if isinstance(exc, socket.gaierror):
        return f"SYSLOG_HOST: it does not resolve ({describe_error(exc)})"
    if isinstance(exc, ConnectionRefusedError):
        return f"refused: nothing listens there (SYSLOG_HOST, SYSLOG_PORT) ({describe_error(exc)})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"SYSLOG_CERT_PATH / SYSLOG_HOST: the server certificate is not trusted ({describe_error(exc)})"
    return describe_error(exc)


UDP_PROBE_WAIT = 1.0  # seconds to wait for an ICMP port unreachable after the probe


def probe_udp(transport):
    """UDP has no connection: send an empty datagram (syslog servers ignore it) on the connected
    socket and listen briefly. A closed port answers ICMP port unreachable, which the socket
    reports as ConnectionRefusedError; silence proves nothing."""
    transport.sock.send(b"")
    transport.sock.settimeout(UDP_PROBE_WAIT)
    try:
        transport.sock.recv(1)
    except socket.timeout:
        pass


def check_syslog(settings, target):
    """(verdict, text) for one syslog target: OK, WARN (UDP: cannot be confirmed) or FAIL."""
    transport = transport_for(settings, target)
    name = f"syslog {settings.syslog_protocol}://{target}"
    try:
        transport.connect(threading.Event())
        if settings.syslog_protocol == "udp":
            probe_udp(transport)
            return "WARN", (f"{name}: no refusal within {UDP_PROBE_WAIT:g} s, but UDP delivery cannot be "
                            "confirmed (UDP has no acknowledgement): check that the server receives")
        return "OK", f"{name}: connected" + (" (TLS handshake and certificate verified)"
                                             if settings.syslog_protocol in TLS_PROTOCOLS else "")
    except (OSError, ssl.SSLError) as exc:
        return "FAIL", f"{name}: {syslog_problem(exc)}"
    finally:
        transport.close()


def refused_statement(settings):
    """statement_problem() before the consumer starts, with credentials of its own (they are
    needed only when there is a statement); None also when there are no credentials: the run
    reports that."""
    if not (settings.sls_query or settings.sls_consume_processor):
        return None
    try:
        credentials = open_credentials(settings)
    except CredentialsError:
        return None
    try:
        return statement_problem(settings, sls_client(settings, credentials))
    finally:
        credentials.close()


def plain_http_warning(settings):
    """The warning for an SLS endpoint reached without TLS, or None."""
    if not settings.sls_endpoint.startswith("http://"):
        return None
    return (f"SLS_ENDPOINT {settings.sls_endpoint} is plain HTTP: the AccessKey's signatures, the STS "
            "token and every log cross the network unencrypted and can be changed on the way; use "
            "https:// unless this is an intranet endpoint inside your VPC")


def check(settings):
    """--check: one verdict line per check (OK, WARN or FAIL, naming the variable to fix; what
    servers said is escaped by printable()); 0 when none failed, 1 otherwise, 2 for a statement SLS
    refuses (a setting error)."""
    warning = plain_http_warning(settings)
    results = [("WARN", warning)] if warning else []
    try:
        credentials = open_credentials(settings)
    except CredentialsError as exc:
        results.append(("FAIL", f"credentials: {exc}"))
    else:
        results.append(("OK", f"credentials: {credentials.describe()}; {credentials.expiry()}"))
        unresolved = endpoint_problem(settings)
        if unresolved:
            results.append(("FAIL", f"SLS {settings.sls_project}/{settings.sls_logstore}: {unresolved}"))
        else:
            client = sls_client(settings, credentials)
            refused = statement_problem(settings, client)
            if refused:
                print(f"setting error: {printable(refused)}", file=sys.stderr, flush=True)
                return EXIT_BAD_SETTINGS
            results.append(check_sls(settings, client))
    # each target: a collector may be down while others serve
    results += [check_syslog(settings, target) for target in syslog_targets(settings)]
    for verdict, text in results:
        print(f"{verdict:4} {printable(text)}", flush=True)
    return EXIT_FAILURE if any(verdict == "FAIL" for verdict, _ in results) else EXIT_OK


def dry_run(settings):
    """--dry-run: print the next messages of every shard (from the group's checkpoints, or from
    SLS_CURSOR_START) up to the current end of each shard; join no group, save nothing."""
    credentials = credentials_or_none(settings)
    if credentials is None:
        return EXIT_FAILURE
    client = sls_client(settings, credentials)
    encoder, budget = MessageEncoder(settings), FetchBudget(settings)
    project, logstore = settings.sls_project, settings.sls_logstore
    try:
        checkpoints = group_checkpoints(client, settings)
        for shard in client.list_shards(project, logstore).get_shards_info():
            shard_id = shard["shardID"]
            cursor = start_cursor(client, settings, shard_id, checkpoints)
            end = client.get_cursor(project, logstore, shard_id,
                                    settings.sls_cursor_end or "end").get_cursor()
            while cursor != end:
                asked = budget.groups(shard_id)
                response = client.pull_logs(project, logstore, shard_id, cursor, count=asked, end_cursor=end,
                                            query=settings.sls_query or None,
                                            processor=settings.sls_consume_processor or None)
                groups = read_pull(response)
                budget.observe_pull(shard_id, asked, response, groups)
                messages = encoder.encode(groups).messages
                for message in messages:
                    sys.stdout.buffer.write(message + b"\n")
                if response.get_next_cursor() == cursor:
                    break
                cursor = response.get_next_cursor()
        sys.stdout.flush()
    except LogException as exc:
        log.error("SLS: %s: %s", exc.get_error_code(), exc.get_error_message())
        return EXIT_FAILURE
    except BrokenPipeError:  # e.g. `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def worker_count(settings):
    """SYNC_WORKERS as a number: "auto" is one process per CPU core, but no more than shards (those
    a split or merge left read-only, soon consumed to their end, do not count)."""
    if settings.sync_workers != "auto":
        return settings.sync_workers
    cores = os.cpu_count() or 1
    credentials = credentials_or_none(settings)
    if credentials is None:
        log.warning("cannot count the shards without credentials; starting one worker per core")
        return cores
    try:
        listed = sls_client(settings, credentials).list_shards(settings.sls_project, settings.sls_logstore)
        shards = sum(1 for shard in listed.get_shards_info() if shard.get("status", "readwrite") != "readonly")
    except LogException as exc:
        log.warning("cannot count the shards (%s); starting one worker per core", exc.get_error_code())
        return cores
    finally:
        credentials.close()  # the workers get credentials of their own
    return max(1, min(cores, shards))


STOP_GRACE = 2.0  # seconds --workers gives a worker beyond SYNC_STOP_TIMEOUT before killing it


def die_with(parent):
    """A preexec_fn for a worker process: it gets SIGTERM when `parent` (the supervisor's pid) dies,
    so no worker is left orphaned, and so stops within SYNC_STOP_TIMEOUT. A parent gone already,
    before the request took effect, would never send it: then the worker ends at once."""
    def die_with_parent():
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return die_with_parent


SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")  # the supervisor's own


def run_workers(settings, count, environment, progress_bar=False):
    """--workers N: N consumer processes of the group on this host ({name}-0 ... {name}-N-1),
    restarted when one dies, unless a restart would not help (EXIT_NO_RESTART: credentials nothing
    renews), which stops them all; SIGTERM / SIGINT is passed on and waited for, and a worker that
    has not exited SYNC_STOP_TIMEOUT + STOP_GRACE seconds later is killed. Each worker writes a
    snapshot file beside its lock file, from which this process alone reports (WorkersMonitor)."""
    stop = stop_on_signals()
    names = [f"{settings.sls_consumer_name}-{i}" for i in range(count)]
    children, started, delays = {}, {}, {name: 1.0 for name in names}
    locks = {name: f"{settings.sync_lock_file}.{safe_file_name(name)}" for name in names}
    try:
        monitor = WorkersMonitor(settings, {name: f"{locks[name]}.status" for name in names}, progress_bar)
    except OSError as exc:
        return cannot_serve_metrics(settings, exc)
    worker_environment = {k: v for k, v in environment.items() if k not in SYSTEMD_VARIABLES}

    def start(name):
        env = dict(worker_environment, SLS_CONSUMER_NAME=name, SYNC_WORKERS="1", SYNC_LOCK_FILE=locks[name])
        children[name] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--status-file",
                                           monitor.status_files[name]], env=env,
                                          stdin=subprocess.DEVNULL, preexec_fn=die_with(os.getpid()))
        started[name] = time.monotonic()
        monitor.started(name)
        log.info("started worker %s (pid %d)", name, children[name].pid)

    log.info("*** starting %d workers in consumer group %s", count, settings.sls_cg)
    for name in names:
        start(name)
    restart_at, cannot_go_on = {}, False
    while children or restart_at:
        if stopped(stop, 0.5):
            break
        monitor.tick()
        for name, child in list(children.items()):
            status = child.poll()
            if status is None:
                continue
            del children[name]
            monitor.stopped(name)
            if status == EXIT_OK and settings.sls_cursor_end:
                log.info("worker %s finished its replay", name)
                continue
            if status == EXIT_NO_RESTART:
                log.error("worker %s cannot go on, and a restart would not help (see its error); "
                          "stopping every worker", name)
                cannot_go_on = True
                continue
            ran = time.monotonic() - started[name]
            delay = 1.0 if ran > 60 else delays[name]
            delays[name] = min(delay * 2, 60.0)
            log.error("worker %s exited with status %d after %.0f s; restarting it in %.0f s",
                      name, status, ran, delay)
            restart_at[name] = time.monotonic() + delay
        if cannot_go_on:
            break
        for name, when in list(restart_at.items()):
            if time.monotonic() >= when:
                del restart_at[name]
                start(name)
    for child in children.values():
        child.send_signal(signal.SIGTERM)
    # A worker still starting up has no handler yet and dies of the signal itself: that is fine.
    deadline = time.monotonic() + settings.sync_stop_timeout + STOP_GRACE
    failed = []
    for name, child in children.items():
        try:
            status = child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            status = child.wait()
            log.error("worker %s (pid %d) had not stopped %.0f s after SIGTERM; killed it", name,
                      child.pid, settings.sync_stop_timeout + STOP_GRACE)
        if status not in (EXIT_OK, EXIT_NO_RESTART, -signal.SIGTERM):
            failed.append(name)
    if failed:
        log.error("workers %s did not stop cleanly", ", ".join(failed))
    monitor.close()
    log.info("all workers stopped")
    return EXIT_FAILURE if failed or cannot_go_on else EXIT_OK


class LockError(Exception):
    """A lock file this program cannot trust or use: exit 1 with this one line."""


def own_file_problem(status):
    """Why a file opened to be written (its os.stat_result) is not this program's own, or None: it
    must be a regular file of this user with no other hard link (else another user may have
    linked a file of root's there), not writable by group or others."""
    if not stat.S_ISREG(status.st_mode):
        return "is not a regular file"
    if status.st_nlink != 1:
        return f"has {status.st_nlink} hard links"
    return trust_problem(status, {os.geteuid()})


def lock_file_problem(status, directory, folder):
    """Why a lock file (status: its os.stat_result) in directory (folder: the directory's) cannot
    be trusted, or None."""
    problem = own_file_problem(status)
    if problem:
        return problem
    if folder.st_uid not in trusted_owners():
        return f"is in {directory}, which belongs to uid {folder.st_uid}"
    if folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not folder.st_mode & stat.S_ISVTX:
        return f"is in {directory}, where others can remove or replace it"
    return None


def acquire_lock(path):
    """(handle, None) holding an exclusive lock for the life of the process, or (None, the pid the
    holder wrote, printable) if another instance holds it. Raises LockError for a lock another user
    could plant, hold, replace or redirect: the file must be opened without following a symbolic
    link, be a regular file of this user with one link, not writable by group or others, in a
    directory (created 0700 if missing) that belongs to this user or root and whose entries others
    cannot remove (not writable by them, or sticky like /tmp). Such a file is the only one it ever
    truncates. A lock file readable by others (an older version created it 0644) is made 0600; if
    it is held at that moment, the holder may be anyone, so that is a LockError too."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        if not os.path.isdir(directory):
            os.mkdir(directory, 0o700)
        folder = os.stat(directory)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        link = " (a symbolic link, not followed)" if exc.errno == errno.ELOOP else ""
        raise LockError(f"cannot open the lock file {path}{link}: {exc.strerror}") from None
    status = os.fstat(fd)
    mode = stat.S_IMODE(status.st_mode)
    problem = lock_file_problem(status, directory, folder)
    if problem:
        os.close(fd)
        raise LockError(f"the lock file {path} {problem}, so another user could plant, hold or "
                        "remove it; use a private directory (SYNC_LOCK_FILE)")
    if mode & 0o077:
        os.fchmod(fd, 0o600)
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = printable(handle.read(40).strip()) or "unknown"
        handle.close()
        if mode & 0o077:
            raise LockError(f"the lock file {path} is held, but it was readable by others (mode "
                            f"{mode:04o}), so the holder (pid {holder}?) may be anyone's process; "
                            "it is 0600 now: stop the other instance, or remove the file") from None
        return None, holder
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle, None


class PrivateLogFile(logging.handlers.WatchedFileHandler):
    """SYNC_LOG_FILE: a WatchedFileHandler (reopened when logrotate has moved the file away) that
    creates the file 0600 and opens no symbolic link, and only a file of its own (own_file_problem):
    root would otherwise append to whatever file another user points it at."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        problem = own_file_problem(os.fstat(fd))
        if problem:
            os.close(fd)
            raise OSError(errno.EPERM, f"{problem}, so it is not written")
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


class PrintableFormatter(logging.Formatter):
    """Log lines whose message is printable(): what servers and files said cannot forge a line."""

    def formatMessage(self, record):
        record.message = printable(record.message)
        return super().formatMessage(record)


def setup_logging(settings):
    """Raises OSError if SYNC_LOG_FILE cannot be opened (see PrivateLogFile)."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if settings.sync_log_file:
        # Safe with --workers, whose processes all append to this file.
        handlers.append(PrivateLogFile(settings.sync_log_file))
    logging.basicConfig(level=settings.sync_log_level, handlers=handlers, force=True)
    # The SDK is chatty at INFO and repeats each failing request: keep its warnings, once a minute.
    logging.getLogger("aliyun").setLevel(logging.WARNING)
    formatter = PrintableFormatter("%(asctime)s %(levelname)s [%(process)d] %(message)s")
    sdk_filter = SdkLogFilter()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(sdk_filter)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        prog="sync_waf_to_syslog.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="check the settings, SLS access and every syslog collector, then exit")
    mode.add_argument("--dry-run", action="store_true",
                      help="print the messages that would be sent next to stdout; send and save nothing")
    parser.add_argument("--env-file", metavar="PATH",
                        help="read settings from this file (default: .env beside this script)")
    parser.add_argument("--progress", action="store_true",
                        help="replay (SLS_CURSOR_END): draw a live progress bar when stderr is a terminal")
    parser.add_argument("--status-file", help=argparse.SUPPRESS)  # a worker of --workers: its snapshot
    # Flags that have a variable override it (and are validated with it).
    parser.add_argument("--lock-file", metavar="PATH", dest="SYNC_LOCK_FILE",
                        help="lock file path (SYNC_LOCK_FILE)")
    parser.add_argument("--stats-interval", metavar="SECONDS", dest="SYNC_STATS_INTERVAL",
                        help="seconds between statistics lines, 0 = off (SYNC_STATS_INTERVAL)")
    parser.add_argument("--workers", metavar="N|auto", dest="SYNC_WORKERS",
                        help="consumer processes on this host (SYNC_WORKERS)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    env_file = args.env_file or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".env")
    if args.env_file and not (os.path.isfile(env_file) and os.access(env_file, os.R_OK)):
        print(f"--env-file: cannot read file {env_file!r}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    try:
        environment = load_env_file(env_file, os.environ) if os.path.isfile(env_file) else dict(os.environ)
        environment.update({name: value for name, value in vars(args).items()
                            if name.startswith("SYNC_") and value is not None})
        settings = Settings.from_environment(environment)
        export_proxy_variables(environment)
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"setting error: {problem}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    try:
        setup_logging(settings)
    except OSError as exc:
        print(f"setting error: SYNC_LOG_FILE: cannot open {settings.sync_log_file!r}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_BAD_SETTINGS
    secret_files = [settings.sls_ak_key_file, settings.sls_sts_token_file]
    if os.path.isfile(env_file):
        secret_files.append(env_file)
    warn_if_readable_by_others(path for path in secret_files if path)
    sdk_problem = check_sdk()
    if sdk_problem:
        log.error("%s", sdk_problem)
        return EXIT_FAILURE
    if args.check:
        return check(settings)
    if not args.dry_run:
        refused = refused_statement(settings)
        if refused:
            print(f"setting error: {printable(refused)}", file=sys.stderr)
            return EXIT_BAD_SETTINGS
        try:
            lock, holder = acquire_lock(settings.sync_lock_file)
        except LockError as exc:
            print(printable(exc), file=sys.stderr)
            return EXIT_FAILURE
        if lock is None:
            print(f"another instance is running (pid {holder}) for consumer {settings.sls_consumer_name}; "
                  f"lock {settings.sync_lock_file}", file=sys.stderr)
            return EXIT_OK
    if plain_http_warning(settings):  # once at start, by every process that starts working
        log.warning("%s", plain_http_warning(settings))
    if args.dry_run:
        return dry_run(settings)
    count = worker_count(settings)
    if count > 1:
        return run_workers(settings, count, environment, args.progress)
    return run(settings, args.status_file, args.progress)


if __name__ == "__main__":
    sys.exit(main())

