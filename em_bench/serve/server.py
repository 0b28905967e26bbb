"""The HTTP server around a policy, and `em-bench serve`.

With a key (`serve(..., api_key=)`; `em-bench serve` reads it from EM_BENCH_SERVE_KEY), every
route wants `Authorization: Bearer KEY` (what an OpenAI client sends as its API key) and answers
401 without it. Without a key the server binds only loopback addresses.

The server is the stdlib's threading HTTP server, one thread per connection, speaking HTTP/1.1
with persistent connections (every reply has a Content-Length; the request body is always read
before replying, so the next request on the connection starts where it should). An idle
connection is dropped after IDLE_TIMEOUT seconds, and `close()` hangs up every open connection's
reading side, so it never waits on an idle keep-alive socket (`keep_alive=False` speaks HTTP/1.0:
a connection per request). It never logs or echoes request headers, so an Authorization header
cannot leak.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from em_bench.errors import ConfigError
from em_bench.serve.faults import FaultInjector, check_faults, parse_faults
from em_bench.serve.policies import AdapterError, ModelPolicy, Policy, UnknownModel, resolve_stores
from em_bench.serve.protocol import (
    BadRequest,
    Fault,
    _model_card,
    completion_body,
    error_body,
    parse_request,
)

logger = logging.getLogger(__name__)

IDLE_TIMEOUT = 60.0  # seconds a keep-alive connection may sit idle (clients drop theirs sooner)
KEY_ENV = "EM_BENCH_SERVE_KEY"  # where `em-bench serve` reads the key clients must send


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow request in flight must not hold up close()
    request_queue_size = 128  # the default 5 would stall a burst of concurrent connects

    def __init__(self, address: tuple[str, int], policy: Policy, keep_alive: bool = True,
                 api_key: str | None = None):
        super().__init__(address, _Handler)
        self.policy, self.api_key = policy, api_key
        self.protocol = "HTTP/1.1" if keep_alive else "HTTP/1.0"
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def hang_up(self) -> None:
        """End every open connection's reading side: an idle keep-alive connection's thread
        reads the end of its stream and exits; one mid-request still sends its reply first."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RD)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = IDLE_TIMEOUT  # on the connection's socket: an idle keep-alive one times out
    wbufsize = -1  # buffered: a reply's headers and body leave in one write (see _send)

    def setup(self) -> None:
        super().setup()
        self.protocol_version = self.server.protocol
        # Small replies on a persistent connection: Nagle would hold one back for an ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        # The request line and status only; headers (Authorization) are never logged.
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes,
              headers: tuple[tuple[str, str], ...] = ()) -> None:
        try:
            self.send_response(status)
            names = {name.lower() for name, _ in headers}
            if "content-type" not in names:
                self.send_header("Content-Type", "application/json")
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection and self.protocol_version >= "HTTP/1.1":
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            logger.debug("the client left before its reply (%s)", self.path)

    def _text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), (("Content-Type", "text/plain; charset=utf-8"),))

    def _body(self) -> bytes | None:
        """The request body, always read before replying (on a kept-alive connection the next
        request follows it); None, with the connection closing, when it cannot be framed."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._send(HTTPStatus.LENGTH_REQUIRED,
                       error_body("send the body with a Content-Length, not chunked",
                                  "invalid_request_error"))
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError(length)
        except ValueError:
            self.close_connection = True
            self._send(400, error_body("bad Content-Length", "invalid_request_error"))
            return None
        return self.rfile.read(length) if length else b""

    def _route(self) -> str:
        return urlsplit(self.path).path.rstrip("/")

    def _not_found(self) -> None:
        self._send(404, error_body(f"no route {self.command} {self._route()}",
                                   "invalid_request_error", code="unknown_url"))

    def _authorized(self) -> bool:
        """Whether the request carries the server's key (any does when it has none); else a
        401. Compared in constant time, so the reply's timing tells nothing of the key."""
        key = self.server.api_key
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        token = token.strip()
        if key is None or (scheme.lower() == "bearer" and token.isascii()
                           and hmac.compare_digest(token, key)):
            return True
        self._send(401, error_body(f"Incorrect or missing API key: send the key this server was "
                                   f"started with ({KEY_ENV}) as the API key",
                                   "invalid_request_error", code="invalid_api_key"),
                   (("WWW-Authenticate", "Bearer"),))
        return False

    def do_GET(self) -> None:
        # the body is read first even when refused: the connection's next request follows it
        if self._body() is None or not self._authorized():
            return None
        if self._route() != "/v1/models":
            return self._not_found()
        policy = self.server.policy
        models = policy.models() if hasattr(policy, "models") else [
            _model_card(policy.name, policy.name)]
        self._send(200, json.dumps({"object": "list", "data": models}).encode())

    def do_POST(self) -> None:
        body = self._body()
        if body is None or not self._authorized():
            return None
        route = self._route()
        if route == "/v1/chat/completions":
            return self._chat(body)
        if route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            return self._adapter(route.removeprefix("/v1/").split("_")[0], body)
        return self._not_found()

    def _chat(self, body: bytes) -> None:
        policy = self.server.policy
        try:
            outcome = policy.respond(parse_request(body))
        except BadRequest as e:
            return self._send(400, error_body(str(e), "invalid_request_error", e.param, e.code))
        except UnknownModel as e:
            return self._send(404, error_body(str(e), "invalid_request_error",
                                              code="model_not_found"))
        except Exception as e:  # a policy bug is the client's 500, not a dead server thread
            logger.exception("the policy failed on a request")
            return self._send(500, error_body(f"the policy failed: {type(e).__name__}: {e}",
                                              "server_error"))
        if isinstance(outcome, Fault):
            return self._send(outcome.status, outcome.body, outcome.headers)
        self._send(200, json.dumps(completion_body(outcome, policy.name)).encode())

    def _adapter(self, action: Literal["load", "unload"], body: bytes) -> None:
        """vLLM's runtime LoRA routes: a plain-text "Success: ..." or its JSON error."""
        policy = self.server.policy
        if not hasattr(policy, f"{action}_adapter"):
            return self._not_found()
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            request = None
        fields = ("lora_name", "lora_path") if action == "load" else ("lora_name",)
        if not (isinstance(request, dict)
                and all(isinstance(request.get(f), str) and request[f] for f in fields)):
            names = " and ".join(f"'{f}'" for f in fields)
            return self._send(400, error_body(f"{names} must be provided.", "InvalidUserInput",
                                              code=400))
        name = request["lora_name"]
        try:
            if action == "load":
                policy.load_adapter(name, request["lora_path"])
            else:
                policy.unload_adapter(name)
        except AdapterError as e:
            return self._send(e.status, error_body(str(e), e.kind, code=e.status))
        done = "added" if action == "load" else "removed"
        self._text(200, f"Success: LoRA adapter '{name}' {done} successfully.")


class Server:
    """A running server; `url` is the base URL an OpenAI client takes (ends in /v1)."""

    def __init__(self, httpd: _HTTPServer):
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="em-bench-serve",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def keyed(self) -> bool:
        """Whether requests must carry the server's key."""
        return self._httpd.api_key is not None

    def close(self) -> None:
        """Stop accepting, hang up open connections (replies in flight still go out), close."""
        self._httpd.shutdown()
        self._httpd.hang_up()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback ('' binds them all)."""
    if not host:
        return False
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_exposure(host: str, api_key: str | None) -> None:
    """ConfigError for serving beyond this machine without a key, or a key that an HTTP
    header cannot carry as sent."""
    if api_key and not all("!" <= c <= "~" for c in api_key):
        raise ConfigError(f"{KEY_ENV} must be visible ASCII characters without spaces (clients "
                          f"send it in an HTTP header)")
    if not api_key and not is_loopback(host):
        raise ConfigError(f"refusing to serve on {host or 'every address'} (not loopback) without "
                          f"a key: set {KEY_ENV} to the key clients must send as their API key")


def serve(policy: Policy, host: str = "127.0.0.1", port: int = 0, keep_alive: bool = True,
          api_key: str | None = None) -> Server:
    """Serve `policy` in a background thread; port 0 picks a free port (see `Server.url`).

    With `api_key`, every request must send it as `Authorization: Bearer KEY`; without one, a
    `host` that is not loopback is a ConfigError (check_exposure). `keep_alive=False` speaks
    HTTP/1.0, a connection per request (for comparison).
    """
    check_exposure(host, api_key)
    return Server(_HTTPServer((host, port), policy, keep_alive, api_key or None))


def start_serving(model: str = "organism", host: str = "127.0.0.1", port: int = 8000,
                  stores: Sequence[str | Path] = (), faults: Sequence[str] = (),
                  fault_seed: int = 0, fault_delay: float = 1.0, fault_latency: float = 0.0,
                  fault_retry_after: int = 1) -> tuple[Server, Policy]:
    """`em-bench serve`'s server, started: ModelPolicy over `load_base(model)`, behind a
    FaultInjector when faults or latency are asked for, with the key from EM_BENCH_SERVE_KEY.
    Every setting is checked before the model loads."""
    from em_bench.models import load_base

    key = os.environ.get(KEY_ENV) or None
    check_exposure(host, key)
    folders = resolve_stores(stores)
    rates = parse_faults(faults)
    try:
        check_faults(rates, fault_delay, fault_latency, fault_retry_after)
    except ValueError as e:
        raise ConfigError(f"--fault: {e}") from None
    base, tokenizer = load_base(model)
    policy: Policy = ModelPolicy(base, tokenizer, name=model, stores=folders)
    if rates or fault_latency:
        policy = FaultInjector(policy, rates, fault_seed, fault_delay, fault_latency,
                               fault_retry_after)
    return serve(policy, host, port, api_key=key), policy


def main_serve(model: str = "organism", host: str = "127.0.0.1", port: int = 8000,
               **options: Any) -> None:
    """`em-bench serve`: start_serving(model, host, port, **options) until Ctrl-C, printing the
    URL first and the faults injected last."""
    # A process started in the background by a shell inherits Ctrl-C as ignored; a server must
    # still stop on it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server, policy = start_serving(model, host, port, **options)
    with server:
        key = f"the key in {KEY_ENV} required" if server.keyed else "no key"
        print(f"serving {model} at {server.url} ({key}; Ctrl-C to stop)", flush=True)  # noqa: T201
        try:
            # Short waits, not one long one: Ctrl-C may land on another thread (torch's, the
            # server's), and only a main thread that wakes up runs Python's handler for it.
            while True:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    if isinstance(policy, FaultInjector):
        print(f"faults injected: {dict(policy.injected)}", flush=True)  # noqa: T201
