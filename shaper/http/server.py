"""The HTTP layer of the daemon and the webhook: uvicorn's httptools server, made strict.

HTTP is uvicorn's httptools (llhttp) server, in its own thread with its own
event loop, made strict by `StrictHttp` (a deadline for the whole header
section, a bound on its size, one Host / Content-Length / Authorization,
chunked or nothing, JSON errors) and `HttpApp`, which routes and checks the
token from the headers before it reads a byte of a body, bounds every body
(size, time, and the bytes in flight across all requests), and streams large
answers.  Every datapath access runs on one thread, `KernelThread`, the only
thread that ever opens a netlink socket: pyroute2 opens one per calling
thread, and a thread per connection leaked one per connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import ipaddress
import json
import logging
import socket
import threading
import time
from typing import Any, Callable

import httptools
from uvicorn import Config, Server
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shaper import __version__
from shaper.http.api import MAX_BODY_BYTES, Call, Response, error
from shaper.errors import InvalidInput, ShaperError

log = logging.getLogger("shaper")

LISTEN_FORM = "ADDR:PORT, :PORT (every address), [IPV6]:PORT or a port alone"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:2332' -> ('127.0.0.1', 2332); ':2332' and '2332' -> ('', 2332) (every address)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InvalidInput("--listen", f"{text!r}: write an IPv6 address in brackets", LISTEN_FORM)
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInput("--listen", f"{text!r} has no valid port", LISTEN_FORM)
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """Refuse an API that anyone on the network could use to change shaping, unless told."""
    if token or insecure or is_loopback(host):
        return
    raise InvalidInput("--listen", f"{host or 'every address'} is reachable from the network and no token is set",
                       "--token-file FILE (or SHAPER_TOKEN), a loopback address such as 127.0.0.1:2332, or "
                       "--insecure to allow changes from anyone")



# -- limits -----------------------------------------------------------------------------------------------------
HEADER_DEADLINE_S = 10.0  # the whole request line and header section, from its first byte (or the connect)
TLS_HANDSHAKE_S = 10.0  # a TLS handshake from the connect; asyncio's default is 60 s
MAX_HEADER_BYTES = 64 * 1024  # request line and headers: 431 beyond
MAX_TARGET_BYTES = 8 * 1024  # the request target alone: 414 beyond
BODY_DEADLINE_S = 60.0  # a whole body once the headers are in: 32 MiB at 4.5 Mbit/s
BODY_BUDGET_BYTES = 2 * MAX_BODY_BYTES  # declared body bytes being read or handled at once, every request
KEEP_ALIVE_S = 5.0  # an idle keep-alive connection
GRACE_S = 25.0  # on SIGTERM, requests in flight may finish for this long (Kubernetes gives 30 s)
READY_PROBE_S = 0.5
SEND_CHUNK_BYTES = 64 * 1024  # /readyz waits this long for the kernel thread, then answers from what it knows
TRIM_BODY_BYTES = 1024 * 1024  # after a request body this large is handled, the heap's free memory goes back

_REASONS = {400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large"}


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # the process's own symbols: libc's, without a search
    except (OSError, AttributeError):  # no glibc (musl has no malloc_trim): nothing to give back this way
        return None


def trim_heap() -> bool:
    """Give the C heap's free memory back to the system (glibc's malloc_trim, every thread's arena).

    A bulk change decodes its body into objects that are freed once it is applied, but the heap
    keeps their pages: with 1,000,000 prefixes applied, a process of 263 MB RSS was 215 MB once
    trimmed, and a pod's memory limit counts every page.  About 4 ms then; False without glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class KernelThread:
    """One thread for every netlink and map access, so the process holds one set of
    sockets however many connections come and go.  `busy` tells a probe whether it
    would wait behind a long change."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel")
        self._lock = threading.Lock()
        self._queued = 0

    @property
    def busy(self) -> bool:
        return self._queued > 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        with self._lock:
            self._queued += 1
        future = self._pool.submit(fn, *args)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: concurrent.futures.Future) -> None:
        with self._lock:
            self._queued -= 1

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn on the kernel thread and wait for it (from a thread that is not the event loop)."""
        return self.submit(fn, *args).result()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _refusal(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, with the API's JSON error body."""
    body = error(status, message).body
    return (b"HTTP/1.1 %d %s\r\nserver: shaper/%s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, _REASONS[status].encode(), __version__.encode(), len(body),
                                               body))


class StrictHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with what a server facing untrusted clients needs and it lacks:
    a deadline for the whole request head (slowloris: one header line every 20 s held a
    connection forever), a bound on its size, refusal of ambiguous framing and of a
    repeated Authorization, and JSON for every refusal (uvicorn answers text/plain).

    It overrides uvicorn's parser callbacks (on_headers_complete, on_body, data_received):
    pyproject pins uvicorn's minor version, and tests/unit/test_server.py drives it."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Head and body go out in two writes: without TCP_NODELAY the body waits for the
            # client's delayed ACK, ~40 ms a request on a keep-alive connection (asyncio sets it
            # only on sockets made with proto IPPROTO_TCP, and ours is made with 0).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._refused = False
        self._arm()  # a client that connects and sends nothing is a slow head too

    def _arm(self) -> None:
        self._head_bytes = 0
        self._deadline = self.loop.call_later(HEADER_DEADLINE_S, self._refuse, 408,
                                              f"the request line and headers took more than {HEADER_DEADLINE_S:g} s")

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _refuse(self, status: int, message: str) -> None:
        self._disarm()
        self._refused = True
        if not self.transport.is_closing():
            self.transport.write(_refusal(status, message))
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, msg)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first byte of the next request on a keep-alive connection
        if self._deadline is not None:
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # Upgrade (h2c, websocket) is not offered: the request was served as HTTP/1.1
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}")
            return
        if self._deadline is not None and self._head_bytes > MAX_HEADER_BYTES and not self._refused:
            if len(self.url) > MAX_TARGET_BYTES:
                self._refuse(414, f"the request target exceeds {MAX_TARGET_BYTES} bytes")
            else:
                self._refuse(431, f"the request line and headers exceed {MAX_HEADER_BYTES} bytes")

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            super().on_url(url)

    def on_headers_complete(self) -> None:
        self._disarm()
        why = self._problem()
        if why:
            self._refuse(*why)
            return
        super().on_headers_complete()

    def _problem(self) -> tuple[int, str] | None:
        version = self.parser.get_http_version()
        if len(self.url) > MAX_TARGET_BYTES:
            return 414, f"the request target exceeds {MAX_TARGET_BYTES} bytes"
        if len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > MAX_HEADER_BYTES:
            return 431, f"the request line and headers exceed {MAX_HEADER_BYTES} bytes"
        if version not in ("1.0", "1.1"):
            return 400, f"HTTP/{version} is not served: use HTTP/1.1"
        names = [n for n, _ in self.headers]
        if version == "1.1" and names.count(b"host") != 1:
            return 400, "an HTTP/1.1 request needs exactly one Host header"
        for once in (b"content-length", b"authorization", b"host"):
            if names.count(once) > 1:
                return 400, f"the header {once.decode()} is given {names.count(once)} times: send it once"
        te = [v.strip().lower() for n, v in self.headers if n == b"transfer-encoding"]
        if te and (te != [b"chunked"] or b"content-length" in names):
            return 400, "Transfer-Encoding must be a single 'chunked', without Content-Length"
        return None

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()


class BodyBudget:
    """The body bytes all requests may hold at once; used only from the event loop."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.total:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class HttpApp:
    """The ASGI application in front of `Api` (prepare, then call) or anything with `handle`
    (the webhook).  Nothing here touches the kernel: handlers run on `kernel`."""

    def __init__(self, api: Any, kernel: KernelThread, *, max_body: int = MAX_BODY_BYTES,
                 budget: BodyBudget | None = None):
        self.api = api
        self.kernel = kernel
        self.max_body = max_body
        self.budget = budget or BodyBudget(BODY_BUDGET_BYTES)
        self._probe: asyncio.Future | None = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        method = scope["method"]
        target = scope["raw_path"].decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = {n.decode("latin-1"): v.decode("latin-1") for n, v in scope["headers"]}
        client = scope["client"][0] if scope.get("client") else "-"
        if "transfer-encoding" in headers:
            await _send(send, error(411, "send the body with a Content-Length"), close=True)
            return
        try:
            length = int(headers.get("content-length", "0").strip())
        except ValueError:  # llhttp accepts only digits: a guard, not a path taken
            length = -1
        if length < 0:
            await _send(send, error(400, "invalid Content-Length"), close=True)
            return
        if length > self.max_body:
            await _send(send, error(413, f"body of {length} bytes exceeds {self.max_body}"), close=True)
            return
        call: Any = None
        if hasattr(self.api, "prepare"):
            # Routed and authorised from the headers alone: a refused client's body is never
            # read (and an Expect: 100-continue never answered 100), the connection is closed.
            call = self.api.prepare(method, target, headers, client)
            if isinstance(call, Response):
                await _send(send, call, close=length > 0)
                return
        if length and not self.budget.take(length):
            await _send(send, error(503, f"too many request bodies in flight ({self.budget.total} bytes at most): "
                                         "try again", headers={"Retry-After": "1"}), close=True)
            return
        try:
            try:
                body = await asyncio.wait_for(_read_body(receive, length), BODY_DEADLINE_S) if length else b""
            except asyncio.TimeoutError:
                await _send(send, error(408, f"the body of {length} bytes took more than {BODY_DEADLINE_S:g} s"),
                            close=True)
                return
            except ConnectionError:
                return  # the client went away: nothing to answer
            resp = await self._answer(call, method, target, headers, body, client)
            del body
        finally:
            if length:
                self.budget.give(length)
        await _send(send, resp)
        del resp
        if length >= TRIM_BODY_BYTES:
            trim_heap()  # the body, its JSON and the old state are garbage now (see trim_heap)

    async def _answer(self, call: Call | None, method: str, target: str, headers: dict, body: bytes,
                      client: str) -> Response:
        if call is None:
            return await self.kernel.call(self.api.handle, method, target, headers, body, client)
        if not call.route.kernel:
            return self.api.call(call, body)
        if call.route.path == "/readyz":
            return await self._readyz(call)
        return await self.kernel.call(self.api.call, call, body)

    async def _readyz(self, call: Call) -> Response:
        """Checked on the kernel thread when it is free; behind a long change, what is known.
        One check at a time: a probe storm during an apply does not queue behind it."""
        if self._probe is None or self._probe.done():
            if self.kernel.busy:
                return self.api.readyz_unchecked()
            self._probe = asyncio.wrap_future(self.kernel.submit(self.api.call, call, b""))
        try:
            return await asyncio.wait_for(asyncio.shield(self._probe), READY_PROBE_S)
        except asyncio.TimeoutError:
            return self.api.readyz_unchecked()


async def _read_body(receive: Callable, length: int) -> bytearray:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client disconnected")
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _send(send: Callable, resp: Response, close: bool = False) -> None:
    headers = [(b"content-type", resp.content_type.encode())]
    if resp.chunks is None:
        headers.append((b"content-length", str(len(resp.body)).encode()))
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    if resp.chunks is None:
        await send({"type": "http.response.body", "body": resp.body})
        return
    pending: list[bytes] = []
    size = 0
    for piece in resp.chunks:
        pending.append(piece)
        size += len(piece)
        if size >= SEND_CHUNK_BYTES:
            # Each send waits while the client is slow to read (uvicorn's flow control), so a
            # reader that stalls holds one piece, not the document.
            await send({"type": "http.response.body", "body": b"".join(pending), "more_body": True})
            pending, size = [], 0
    await send({"type": "http.response.body", "body": b"".join(pending)})


class _Uvicorn(Server):
    """uvicorn's Server with the TLS handshake bounded.  The header deadline starts only
    once a handshake is done (the HTTP protocol exists from then on), so a client that
    connects and never sends a ClientHello was held for asyncio's default 60 s; uvicorn
    has no setting for `ssl_handshake_timeout`, so its own create_server call is given one."""

    def __init__(self, config: Config, tls_handshake_s: float):
        super().__init__(config)
        self.tls_handshake_s = tls_handshake_s

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.config.ssl is not None:
            loop = asyncio.get_running_loop()  # this server's own loop (asyncio.run in HttpServer._serve)
            loop.create_server = functools.partial(loop.create_server,  # type: ignore[method-assign]
                                                   ssl_handshake_timeout=self.tls_handshake_s)
        await super().startup(sockets)


class HttpServer:
    """A bound socket served by uvicorn in thread `name`; `stop` is graceful."""

    def __init__(self, sock: socket.socket, app: HttpApp, tls=None, name: str = "http", *,
                 tls_handshake_s: float = TLS_HANDSHAKE_S):
        self.socket = sock
        name = sock.getsockname()
        self.server_address = name[:2] if isinstance(name, tuple) else (name, 0)  # a unix socket in tests
        self.app = app
        config = Config(app, http=StrictHttp, ws="none", lifespan="off", interface="asgi3", log_config=None,
                        access_log=False, proxy_headers=False, server_header=False,
                        headers=[("server", f"shaper/{__version__}")], timeout_keep_alive=KEEP_ALIVE_S,
                        timeout_graceful_shutdown=GRACE_S)
        config.load()
        # uvicorn's own start and stop lines are not events of ours (the JSON log has one per change).
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        if tls is not None:
            # uvicorn loads certificate files once; CertificateFiles follows rotation, so every
            # handshake gets its current context.
            ctx = tls.context()
            ctx.sni_callback = lambda ssl_obj, _name, _ctx: setattr(ssl_obj, "context", tls.context())
            config.ssl = ctx
        self.uvicorn = _Uvicorn(config, tls_handshake_s)
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def _serve(self) -> None:
        try:
            asyncio.run(self.uvicorn.serve(sockets=[self.socket]))
        except BaseException as exc:  # noqa: BLE001 (reported by start/stop)
            self.failed = exc
            log.error("http.failed", extra={"fields": {"error": str(exc)}}, exc_info=True)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not self.uvicorn.started:
            raise ShaperError(f"the HTTP server did not start on {self.server_address}: {self.failed or 'timed out'}")

    def stop(self) -> None:
        """Stop accepting; requests in flight may finish within GRACE_S; idle connections close."""
        self.uvicorn.should_exit = True
        self.thread.join(GRACE_S + 5)
        self.socket.close()


def _bind(address: tuple[str, int], family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" serves IPv4 too (a pod IP may be either).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(1024)
        sock.set_inheritable(False)
    except OSError:
        sock.close()
        raise
    return sock


def make_server(host: str, port: int, api, tls=None, kernel: KernelThread | None = None, *,
                max_body: int = MAX_BODY_BYTES, name: str = "http",
                tls_handshake_s: float = TLS_HANDSHAKE_S) -> HttpServer:
    """Bind `api` (an Api, or anything with Api.handle's signature); every address (v4 and v6
    where there is v6) when host is empty; HTTPS when `tls` (a webhook.CertificateFiles) is
    given, closing connections whose handshake is not done within `tls_handshake_s`.
    Handlers run on `kernel` (a new one if not given).  Call start() to serve."""
    where = f"{host or '*'}:{port}"
    try:
        if not host:
            try:
                sock = _bind(("::", port), socket.AF_INET6)
            except OSError as exc:
                if exc.errno not in (97, 99):  # EAFNOSUPPORT, EADDRNOTAVAIL: no IPv6 here
                    raise
                sock = _bind(("0.0.0.0", port), socket.AF_INET)
        else:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            sock = _bind((host, port), family)
    except (OSError, socket.gaierror) as exc:
        raise ShaperError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return HttpServer(sock, HttpApp(api, kernel or KernelThread(), max_body=max_body), tls, name,
                      tls_handshake_s=tls_handshake_s)
