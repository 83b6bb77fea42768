"""A small client of the daemon's HTTP API, used by the CLI's client commands.

Errors come back as ShaperError subclasses carrying the daemon's one-line
reason, with the CLI's exit code: 2 when the daemon refused the input
(400/413/422), 1 otherwise (401, 404, 5xx, daemon unreachable).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from shaper.errors import ApiError, InvalidInput, ShaperError

DEFAULT_PORT = 2332  # the port of the latency agent people already call
DEFAULT_AGENT_PORT = 2333  # shaper agent's, beside it: a node may run both (the agent on hostNetwork)
DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_PORT}"
# (client, method, path, headers, body) -> (status, body): set on the class in tests to reach an
# in-process Api instead of a socket.
Transport = Callable[["Client", str, str, dict, bytes], tuple[int, bytes]]


def read_token(token_file: str | None) -> str | None:
    """The bearer token: from a file (whitespace stripped), else $SHAPER_TOKEN, else none."""
    if token_file:
        try:
            with open(token_file) as f:
                token = f.read().strip()
        except OSError as exc:
            raise InvalidInput("--token-file", f"cannot read {token_file}: {exc.strerror}", "a readable file") from None
        if not token:
            raise InvalidInput("--token-file", f"{token_file} is empty", "a file holding the token")
        return token
    return os.environ.get("SHAPER_TOKEN") or None


class Client:
    transport: Transport | None = None

    def __init__(self, server: str = DEFAULT_SERVER, token: str | None = None, timeout: float = 120,
                 target: str | None = None):
        if "://" not in server:
            server = "http://" + server
        url = urlsplit(server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise InvalidInput("--server", f"{server!r} is not an http(s) URL", "a URL like http://127.0.0.1:2332")
        self.server = server.rstrip("/")
        self.url = url
        self.token = token
        self.timeout = timeout
        # A node agent's target (shaper agent): /rules and /stats become /targets/{target}/...
        self.target = target or None

    def _http(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, bytes]:
        cls = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.url.hostname, self.url.port, timeout=self.timeout)
        try:
            conn.request(method, self.url.path.rstrip("/") + path, body=body or None, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            if isinstance(exc, socket.timeout):
                reason = f"no answer within {self.timeout:g}s"
            raise ShaperError(f"cannot reach the shaper daemon at {self.server}: {reason} "
                              "(is `shaper run` running? set --server or SHAPER_SERVER)") from None
        finally:
            conn.close()

    def request(self, method: str, path: str, data: Any = None, extra: dict[str, str] | None = None) -> Any:
        headers = {"Accept": "application/json", **(extra or {})}
        body = b""
        if data is not None:
            body = data if isinstance(data, bytes) else json.dumps(data).encode()  # bytes: JSON already
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.target and path.startswith(("/rules", "/stats")):
            path = f"/targets/{quote(self.target, safe='')}{path}"
        send = self.transport if self.transport is not None else self._http
        status, raw = send(method, path, headers, body)
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        if status >= 400:
            message = payload.get("error") if isinstance(payload, dict) else None
            field = payload.get("field") if isinstance(payload, dict) else None
            if status == 404 and path.startswith("/targets") and (message or "").startswith("no such endpoint"):
                message = (f"{self.server} is no node agent (it has no /targets): give --server the agent's "
                           f"URL, http://NODE:{DEFAULT_AGENT_PORT} by default (`shaper agent`)")
            raise ApiError(status, message or f"HTTP {status} from {self.server}{path}",
                           field if isinstance(field, str) else None)
        if payload is None:
            raise ShaperError(f"{self.server}{path} did not answer with JSON (is it a shaper daemon?)")
        return payload

    # -- the API ------------------------------------------------------------------
    def rules(self) -> list[dict]:
        return self.request("GET", "/rules")["rules"]

    def rule(self, name: str) -> dict:
        return self.request("GET", f"/rules/{quote(name, safe='')}")

    def put(self, name: str, rule: dict) -> dict:
        return self.request("PUT", f"/rules/{quote(name, safe='')}", rule)

    def delete(self, name: str) -> list[str]:
        return self.request("DELETE", f"/rules/{quote(name, safe='')}")["deleted"]

    def replace(self, document: dict | bytes, dry_run: bool = False, minimal: bool = False) -> dict:
        """PUT /rules (a document, or one encoded as JSON already). minimal: ask for the rules' names
        only (Prefer: return=minimal); a daemon from before it answers with the rules, so read `rules`
        or `names`, whichever came."""
        extra = {"Prefer": "return=minimal"} if minimal else None
        return self.request("PUT", "/rules" + ("?dry_run=1" if dry_run else ""), document, extra)

    def clear(self) -> list[str]:
        return self.request("DELETE", "/rules")["deleted"]

    def stats(self) -> dict:
        return self.request("GET", "/stats")

    def patch(self, name: str, changes: dict) -> dict:
        """Change some fields of a rule (a JSON merge patch: null removes a field); returns the stored rule."""
        return self.request("PATCH", f"/rules/{quote(name, safe='')}", changes)

    # -- the node agent -------------------------------------------------------------
    def targets(self) -> list[dict]:
        return self.request("GET", "/targets")["targets"]

    def remove_target(self, target: str) -> dict:
        return self.request("DELETE", f"/targets/{quote(target, safe='')}")
