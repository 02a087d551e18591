"""A test ECS instance metadata service that hands out rotating RAM role credentials.

On ECS, programs get the instance RAM role's temporary credentials from the metadata service at
http://100.100.100.200. This server answers the same routes on 127.0.0.1 for tests, mints a new
temporary credential every `period` seconds, and registers each with an SLS emulator before handing
it out, so that a client using the credentials is accepted until their expiration.

Routes (origin-form or absolute-form request targets)
-----------------------------------------------------
PUT /latest/api/token        header X-aliyun-ecs-metadata-token-ttl-seconds: 1..21600
                             -> 200, the token as text/plain. A missing or out-of-range TTL -> 400;
                             any other method -> 405.
GET /latest/meta-data/ram/security-credentials/        -> 200, the role name (text/plain, no newline)
GET /latest/meta-data/ram/security-credentials/ROLE    -> 200, application/json:
        {"AccessKeyId": "STS.…", "AccessKeySecret": "…", "SecurityToken": "CAIS…",
         "Expiration": "2026-01-01T00:00:20Z", "LastUpdated": "2026-01-01T00:00:00Z", "Code": "Success"}
    (Expiration and LastUpdated in UTC, whole seconds, format %Y-%m-%dT%H:%M:%SZ.) Another role -> 404.
Anything else -> 404. Error bodies are text/plain like "404 - Not Found".
A GET may carry header X-aliyun-ecs-metadata-token: an unknown or expired token -> 401 (the
client should fetch a new token), whatever the mode but v1-only.

Modes (set_mode at run time; "normal" at start)
-----------------------------------------------
normal          security hardening mode supported but not required (ECS's default, HttpTokens
                optional): GETs without a token are answered too.
token-required  hardening mode only (HttpTokens required): a GET without a token -> 403.
v1-only         a service without hardening mode: PUT /latest/api/token -> 404, and a token
                header is ignored.
slow            as normal, but every answer comes after `delay` seconds.
down            every request -> 500. A 500, not a refused connection: the port stays this
                server's, so a test can switch back to normal, and the client still sees a
                failing service. For "nothing listens" (connection refused), stop() the server;
                start() binds the same port again (unless another process took it meanwhile).

Credentials
-----------
The credential served is minted when first asked for and replaced by a new one (new AccessKey ID,
secret and token) once it is `period` seconds old, or at once by rotate(). Its Expiration is its
minting time + `lifetime`, rounded up to whole seconds (the emulator gets that same value), so a
served credential stays valid at least `lifetime - period` seconds (period < lifetime). Each is
registered with the emulator before it is served: `emulator` is an object with add_credentials
(SlsEmulator, EmulatorProcess) or the "host:port" of an emulator's admin routes.

Python API
----------
EcsMetadataServer(emulator=None, role_name="sls-forwarder-role", lifetime=20, period=10, port=0):
    start() / stop() / context manager, .port, .endpoint ("http://127.0.0.1:PORT"),
    set_mode(mode, delay=None) (delay: seconds, for "slow"), rotate() -> the new credential as
    served (the JSON fields above), state() -> {"mode", "delay", "requests": {route: n},
    "refused": {route: n}, "issued": [AccessKey ID, ...]} where route is token, role_name,
    credentials or other, and "refused" counts the answers other than 200.
There is no command line: tests run it in their own process (the forwarder, even as a
subprocess, reaches it over TCP), next to an in-process or subprocess emulator.

Sources
-------
Routes, header names, the 1..21600 TTL range and the two modes: "Elastic Compute Service:
Instance metadata" (https://www.alibabacloud.com/help/en/ecs/user-guide/view-instance-metadata)
and "获取临时授权Token" (obtain a temporary authorization token,
https://help.aliyun.com/zh/ecs/user-guide/obtain-a-temporary-authorization-token), whose sample
gives the JSON fields and the Expiration format; the same fields and format are what
aliyun/credentials-python (alibabacloud_credentials/provider/ecs_ram_role.py) parses, and its
role-name request uses the whole body as the name. The docs do not give the status codes of
refusals. Assumed: 403 for a GET without a token in hardening-only mode (what field code expects:
a public ECS tool's Go source, found by exact-string search, checks for "403 - Forbidden" there
and "404 - Not Found" for absent items); 401 for an unknown or expired token (Alibaba's own
AliyunContainerService/terway, pkg/aliyun/metadata/metadata.go, fetches a new token on 401);
404 for the token route of a service without hardening mode (an absent item); 400 for a bad TTL
and 405 for a GET on the token route (aliyun/credentials-nodejs issue 111 shows a real 405 there).
"""
from __future__ import annotations

import json
import math
import secrets
import sys
import threading
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlsplit

TOKEN_PATH = "/latest/api/token"
CREDENTIALS_PATH = "/latest/meta-data/ram/security-credentials/"
TOKEN_TTL_HEADER = "X-aliyun-ecs-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aliyun-ecs-metadata-token"
MAX_TOKEN_TTL = 21600
MODES = ("normal", "token-required", "v1-only", "slow", "down")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def _utc(unix_seconds: float) -> str:
    return time.strftime(TIME_FORMAT, time.gmtime(unix_seconds))


@dataclass
class Credential:
    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str = field(repr=False)
    expiration: int   # unix seconds
    last_updated: int

    def served(self) -> dict:
        """The credential as the metadata service's JSON answer."""
        return {"AccessKeyId": self.access_key_id, "AccessKeySecret": self.access_key_secret,
                "SecurityToken": self.security_token, "Expiration": _utc(self.expiration),
                "LastUpdated": _utc(self.last_updated), "Code": "Success"}


def _register_at_address(admin_addr: str, credential: Credential):
    """Register the credential through an emulator's admin route (called directly, not through
    any HTTP_PROXY of the environment)."""
    body = json.dumps({"access_key_id": credential.access_key_id,
                       "access_key_secret": credential.access_key_secret,
                       "security_token": credential.security_token,
                       "expiration": credential.expiration}).encode()
    request = urllib.request.Request(f"http://{admin_addr}/_emulator/credentials", data=body,
                                     method="POST", headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        response.read()


class EcsMetadataServer:
    """The metadata service in this process, on a daemon thread between start() and stop()."""

    def __init__(self, emulator=None, role_name: str = "sls-forwarder-role",
                 lifetime: float = 20, period: float = 10, port: int = 0):
        if not 0 < period < lifetime:
            raise ValueError("need 0 < period < lifetime: a served credential must be valid")
        self.emulator, self.role_name = emulator, role_name
        self.lifetime, self.period = lifetime, period
        self._port = port  # the one asked for, then the one bound (kept after stop())
        self._lock = threading.Lock()
        self._mode, self._delay = "normal", 0.0
        self._tokens: dict = {}  # token -> monotonic expiry
        self._credential: Optional[Credential] = None
        self._minted_at = 0.0    # monotonic
        self._issued: list = []
        self._requests: dict = {}
        self._refused: dict = {}
        self._stopping = threading.Event()  # wakes slow answers at stop()
        self._server: Optional[_HttpServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- control ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: str, delay: Optional[float] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if (mode == "slow") != (delay is not None):
            raise ValueError("give a delay with mode 'slow', and only then")
        with self._lock:
            self._mode, self._delay = mode, float(delay or 0)

    def rotate(self) -> dict:
        """Mint, register and serve a new credential now; returns it as served."""
        with self._lock:
            return self._mint().served()

    def state(self) -> dict:
        with self._lock:
            return {"mode": self._mode, "delay": self._delay, "requests": dict(self._requests),
                    "refused": dict(self._refused), "issued": list(self._issued)}

    def start(self) -> "EcsMetadataServer":
        self._stopping.clear()
        self._server = _HttpServer(("127.0.0.1", self._port), self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="ecs-metadata", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._stopping.set()
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = None

    def __enter__(self) -> "EcsMetadataServer":
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- credentials -----------------------------------------------------------------------

    def _mint(self) -> Credential:
        """A new credential, registered with the emulator (call with the lock held)."""
        now = time.time()
        credential = Credential(access_key_id="STS." + secrets.token_hex(12),
                                access_key_secret=secrets.token_urlsafe(24),
                                security_token="CAIS" + secrets.token_urlsafe(96),
                                expiration=math.ceil(now + self.lifetime), last_updated=int(now))
        if isinstance(self.emulator, str):
            _register_at_address(self.emulator, credential)
        elif self.emulator is not None:
            self.emulator.add_credentials(credential.access_key_id, credential.access_key_secret,
                                          credential.security_token, credential.expiration)
        self._credential, self._minted_at = credential, time.monotonic()
        self._issued.append(credential.access_key_id)
        return credential

    def _current_credential(self) -> Credential:
        with self._lock:
            if self._credential is None or time.monotonic() - self._minted_at >= self.period:
                return self._mint()
            return self._credential

    # -- answers ---------------------------------------------------------------------------

    def answer(self, method: str, target: str, headers) -> tuple:
        """(status, content type, body) for one request."""
        path = urlsplit(target).path
        if path == TOKEN_PATH:
            route = "token"
        elif path == CREDENTIALS_PATH:
            route = "role_name"
        elif path.startswith(CREDENTIALS_PATH):
            route = "credentials"
        else:
            route = "other"
        with self._lock:
            self._requests[route] = self._requests.get(route, 0) + 1
            mode, delay = self._mode, self._delay
        if mode == "slow":
            self._stopping.wait(delay)
        try:
            status, content_type, body = self._answer(mode, route, method, path, headers)
        except Exception:  # e.g. the emulator refused a registration: a failing service
            traceback.print_exc()
            status, content_type, body = HTTPStatus.INTERNAL_SERVER_ERROR, "", b""
        if status != HTTPStatus.OK:
            with self._lock:
                self._refused[route] = self._refused.get(route, 0) + 1
            content_type, body = "text/plain", f"{status.value} - {status.phrase}".encode()
        return status, content_type, body

    def _answer(self, mode: str, route: str, method: str, path: str, headers) -> tuple:
        if mode == "down":
            return HTTPStatus.INTERNAL_SERVER_ERROR, "", b""
        if route == "token":
            if mode == "v1-only":
                return HTTPStatus.NOT_FOUND, "", b""
            if method != "PUT":
                return HTTPStatus.METHOD_NOT_ALLOWED, "", b""
            return self._issue_token(headers.get(TOKEN_TTL_HEADER) or "")
        if method != "GET":
            return HTTPStatus.METHOD_NOT_ALLOWED, "", b""
        refusal = None if mode == "v1-only" else self._token_refusal(headers.get(TOKEN_HEADER), mode)
        if refusal is not None:
            return refusal, "", b""
        if route == "role_name":
            return HTTPStatus.OK, "text/plain", self.role_name.encode()
        if route == "credentials" and path[len(CREDENTIALS_PATH):] == self.role_name:
            body = json.dumps(self._current_credential().served(), indent=2).encode()
            return HTTPStatus.OK, "application/json", body
        return HTTPStatus.NOT_FOUND, "", b""

    def _issue_token(self, ttl: str) -> tuple:
        if not ttl.isdecimal() or not 1 <= int(ttl) <= MAX_TOKEN_TTL:
            return HTTPStatus.BAD_REQUEST, "", b""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.monotonic() + int(ttl)
        return HTTPStatus.OK, "text/plain", token.encode()

    def _token_refusal(self, token: Optional[str], mode: str) -> Optional[HTTPStatus]:
        """Why a GET is refused for its token (None: it is not)."""
        if token is None:
            return HTTPStatus.FORBIDDEN if mode == "token-required" else None
        with self._lock:
            expiry = self._tokens.get(token)
        return HTTPStatus.UNAUTHORIZED if expiry is None or time.monotonic() >= expiry else None


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, metadata: EcsMetadataServer):
        super().__init__(address, _RequestHandler)
        self.metadata = metadata

    def handle_error(self, request, client_address):
        # A client that gave up waiting (slow mode) closed its end: normal here, not a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class _RequestHandler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, as the metadata service's normal mode does.
    server_version = "ecs-metadata-test"
    timeout = 30  # an idle client does not hold a handler thread for ever

    def _serve(self):
        status, content_type, body = self.server.metadata.answer(self.command, self.path, self.headers)
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = _serve

    def log_message(self, format, *args):
        pass  # quiet: state() has the counts
