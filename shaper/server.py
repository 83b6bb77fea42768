"""The daemon (`shaper run`): attach, serve the API and /metrics, clean up on exit.

The HTTP side is the standard library's threading server in front of
`Api.handle`; every datapath access is serialised by the service's lock, so
threads only overlap in parsing and writing.  The main thread attaches the
classifier, applies the initial rules, then sleeps until SIGTERM/SIGINT,
waking once a second to remove rules whose TTL passed.  On exit it removes
everything shaper created on the interface, unless --keep-on-exit.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence

from prometheus_client import disable_created_metrics

from . import __version__
from .api import MAX_BODY_BYTES, Api, error
from .client import DEFAULT_PORT
from .errors import InvalidInput, ShaperError
from .model import Rule
from .service import Service, audit

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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"shaper/{__version__}"
    sys_version = ""
    timeout = 30  # a client that stops sending does not hold a thread forever

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without TCP_NODELAY the body waits for
        # the client's delayed ACK, ~40 ms per request on a keep-alive connection.
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a unix socketpair in the unit tests)

    def _serve(self) -> None:
        api: Api = self.server.api  # type: ignore[attr-defined]
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._send(error(411, "send the body with a Content-Length"), close=True)
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._send(error(400, "invalid Content-Length"), close=True)
            return
        if length > MAX_BODY_BYTES:
            self._send(error(413, f"body of {length} bytes exceeds {MAX_BODY_BYTES}"), close=True)
            return
        body = self.rfile.read(length) if length else b""
        self._send(api.handle(self.command, self.path, dict(self.headers.items()), body, self.client_address[0]))

    def _send(self, resp, close: bool = False) -> None:
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        for key, value in resp.headers.items():
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)

    do_GET = do_PUT = do_DELETE = do_POST = do_PATCH = do_HEAD = _serve

    def __getattr__(self, name: str):
        # Any other method (the stdlib answers 501 with an HTML page): the API says 405 or 404.
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def log_message(self, format: str, *args: object) -> None:
        pass  # no access log: changes are logged by the service, reads are not


MAX_CONNECTIONS = 64
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Retry-After: 1\r\nContent-Length: 45\r\n\r\n{\"error\": \"too many connections, try again\"}\n")


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most MAX_CONNECTIONS at once (more get a 503 at once)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api, family: int, tls=None):
        self.address_family = family
        self.api = api
        self.tls = tls  # webhook.CertificateFiles: serve HTTPS
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        if not self.slots.acquire(blocking=False):
            if self.tls is None:  # a TLS client would need a handshake first: just close
                try:
                    request.sendall(_BUSY)
                except OSError:
                    pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[override]
        try:
            if self.tls is not None:
                # The handshake runs here, in the connection's own thread and under its
                # timeout, so a client that never speaks holds one slot, not accept().
                request.settimeout(_Handler.timeout)
                try:
                    request = self.tls.context().wrap_socket(request, server_side=True)
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    log.debug("tls handshake failed", extra={"fields": {"client": client_address[0],
                                                                         "error": str(exc)}})
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, ssl.SSLError, TimeoutError)):
            # A client that went away or broke TLS mid-request: not worth a traceback.
            log.debug("connection error", extra={"fields": {"client": client_address[0], "error": str(exc)}})
            return
        log.error("request failed", extra={"fields": {"client": client_address[0]}}, exc_info=True)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # "::" serves IPv4 too (a pod IP may be either).
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def make_server(host: str, port: int, api, tls=None) -> _Server:
    """Bind `api` (anything with Api.handle's signature); every address (v4 and v6 where
    there is v6) when host is empty; HTTPS when `tls` (a webhook.CertificateFiles) is given."""
    where = f"{host or '*'}:{port}"
    try:
        if not host:
            try:
                return _Server(("::", port), api, socket.AF_INET6, tls)
            except OSError as exc:
                if exc.errno not in (97, 99):  # EAFNOSUPPORT, EADDRNOTAVAIL: no IPv6 here
                    raise
                return _Server(("0.0.0.0", port), api, socket.AF_INET, tls)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return _Server((host, port), api, family, tls)
    except (OSError, socket.gaierror) as exc:
        raise ShaperError(f"cannot listen on {where}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class DaemonOptions:
    iface: str
    netns: str | None = None
    listen: str = f":{DEFAULT_PORT}"
    rules: Sequence[Rule] | None = None  # None: keep what an adopted datapath holds
    initial_rules: Sequence[Rule] | None = None  # applied only to a fresh datapath, never fatal
    token: str | None = None
    keep_on_exit: bool = False
    insecure: bool = False  # serve changes to anyone beyond loopback, without a token


def load_initial_rules(path: str) -> Sequence[Rule] | None:
    """Rules from a file that may be absent, empty or wrong (the shaper.io/rules annotation seen
    through the downward API): wrong rules are logged, never fatal."""
    from .model import parse_ruleset_text

    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("rules.invalid", extra={"fields": {"source": path, "error": exc.strerror,
                                                       "action": "starting with no rules"}})
        return None
    if not text.strip():
        return None
    try:
        return parse_ruleset_text(text, "--initial-rules", path)
    except InvalidInput as exc:
        log.warning("rules.invalid", extra={"fields": {"source": path, "error": str(exc),
                                                       "action": "starting with no rules"}})
        return None


def run(opts: DaemonOptions) -> None:
    """Run until SIGTERM/SIGINT; raises ShaperError if it cannot start."""
    stop = threading.Event()
    caught: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        caught.append(signal.Signals(signum).name)
        stop.set()

    # Before importing bcc, which takes seconds in a slow VM: a SIGTERM then
    # killed the process instead of stopping it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    from .kernel import KernelDatapath, claim_interface

    host, port = parse_listen(opts.listen)
    check_exposure(host, opts.token, opts.insecure)
    # The *_created series double the exposition for nothing Prometheus uses.
    disable_created_metrics()
    if stop.is_set():
        audit("daemon.stop", signal=caught[0], before="start")
        return

    dp = KernelDatapath(opts.iface, opts.netns)
    try:
        claim = claim_interface(opts.iface, opts.netns)  # before anything is touched
    except ShaperError:
        dp.close()
        raise
    service = Service(dp, opts.iface)
    try:
        httpd = make_server(host, port, Api(service, opts.token))
    except ShaperError:
        dp.close()
        claim.close()
        raise
    bound = httpd.server_address
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True)
    thread.start()
    audit("daemon.listen", address=f"{bound[0]}:{bound[1]}", auth=bool(opts.token), version=__version__)
    if not opts.token and not is_loopback(host):
        log.warning("api.open", extra={"fields": {"reason": "--insecure: no token, anyone who can reach the port "
                                                            "can change shaping"}})
    try:
        try:
            how = dp.attach()
        except ShaperError:
            service.instruments.error("attach")
            raise
        if stop.is_set():
            pass  # stopped during the compile: remove what was attached, apply nothing
        elif opts.rules is None and opts.initial_rules and how == "attached":
            try:
                service.start(opts.initial_rules, who="initial-rules")
            except ShaperError as exc:
                # Pod annotations are not worth a crash loop: start with none and say why.
                log.warning("rules.refused", extra={"fields": {"source": "initial rules", "error": str(exc),
                                                               "action": "started with no rules"}})
                service.start(None, who="startup")
        else:
            service.start(opts.rules, who="startup")
        if not stop.is_set():
            audit("daemon.ready", interface=opts.iface, netns=opts.netns, datapath=how,
                  rules=len(service.rules()))
        while not stop.wait(1.0):
            if not service.datapath.tc.link_present():
                if not _follow_interface(service, opts, stop):
                    break
                continue
            try:
                service.expire()
            except ShaperError as exc:  # counted and logged by the service; try again next second
                log.debug("expire failed: %s", exc)
        audit("daemon.stop", signal=caught[0] if caught else None)
    finally:
        service.ready = False
        httpd.shutdown()
        httpd.server_close()
        with service.lock:
            try:
                if opts.keep_on_exit:
                    audit("daemon.exit", interface=opts.iface, kept=True)
                else:
                    removed = service.datapath.reset()
                    audit("daemon.exit", interface=opts.iface, kept=False, removed=removed)
            except ShaperError as exc:
                service.instruments.error("reset")
                audit("daemon.exit", interface=opts.iface, result="failed", error=str(exc))
                raise
            finally:
                service.datapath.close()
                claim.close()


STILL_WAITING_S = 30


def _follow_interface(service: Service, opts: DaemonOptions, stop: threading.Event) -> bool:
    """The interface vanished (a pod's veth deleted, a link recreated): wait for one of
    the same name, attach to it and put the rules back with the TTL they had left.

    Returns False if asked to stop while waiting.  Never raises for a missing
    interface, so a sidecar does not crash-loop; a vanished namespace is fatal.
    """
    from .kernel import KernelDatapath

    service.ready = False  # /readyz and mutations answer 503 meanwhile
    old = service.datapath
    try:
        rules = service.rules_to_restore()  # the maps are pinned: still readable
    except ShaperError as exc:
        rules = []
        log.warning("interface.rules_lost", extra={"fields": {"interface": opts.iface, "error": str(exc)}})
    audit("interface.gone", interface=opts.iface, rules=len(rules))
    waited = failures = 0
    while not stop.wait(min(30.0, 2.0 ** failures)):  # 1 s while absent; backs off while attach fails
        waited += 1
        if opts.netns and not os.path.exists(f"/run/netns/{opts.netns}"):
            raise ShaperError(f"network namespace {opts.netns} is gone, and {opts.iface} with it")
        try:
            dp = KernelDatapath(opts.iface, opts.netns)
        except InvalidInput:  # not back yet
            if waited % STILL_WAITING_S == 0:
                audit("interface.waiting", interface=opts.iface, seconds=waited)
            continue
        try:
            how = dp.attach()
            service.swap_datapath(dp)
            service.start(rules, who="interface")
        except ShaperError as exc:
            service.instruments.error("attach")
            log.warning("interface.attach_failed", extra={"fields": {"interface": opts.iface, "error": str(exc)}})
            service.swap_datapath(old)
            dp.close()
            failures += 1
            continue
        old.close()
        audit("interface.back", interface=opts.iface, ifindex=dp.tc.ifindex, datapath=how, rules=len(rules))
        return True
    return False
