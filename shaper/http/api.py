"""The HTTP API, as a function from a request to a response (no sockets here).

`Api.handle(method, path, headers, body, client)` routes a request, parses
its JSON into the model, calls the service and answers an error with the
status its class carries (shaper.errors): 400 malformed JSON, 404 unknown
rule, 422 a rule that cannot be applied, 500 the kernel refused, 501 this
kernel lacks what the rule needs (sch_netem), 503 not ready.  Routing and the
server add 401 missing or wrong token, 404 unknown route, 405 wrong method,
408/413/414/431 for requests too slow or too large.

A request is taken in two steps so that a server can refuse it before reading
a byte of its body: `prepare` routes it and checks the token and the query
from the headers alone (401, 404, 405, 422), `call` runs it with the body.
`handle` does both; shaper.http.server serves them, the unit tests call them directly.
Every route that changes state takes `?dry_run=1` (plans, applies nothing) and
no other query parameter; an unknown one is a 422 naming it.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from shaper import __version__
from shaper.core import changes, plan as P
from shaper.http import openapi
from shaper.errors import BadJson, InvalidInput, NotFound, ShaperError
from shaper.core.fields import FIELD_NAMES, NAME, unknown_field
from shaper.core.model import Rule, gc_paused, parse_rule, parse_ruleset
from shaper.control.service import LATENCY_DST, LATENCY_RULE, Service

log = logging.getLogger("shaper")

MAX_BODY_BYTES = 32 * 1024 * 1024  # 262,144 prefixes as JSON fit with room to spare
JSON = "application/json"


class Response:
    """An answer: status, body, content type and extra headers.

    A body too large to hold once per concurrent reader (GET /rules of 262,144 prefixes) is
    given as `chunks`, which the server sends as they come; reading `body` joins them (tests,
    in-process clients)."""

    def __init__(self, status: int, body: bytes = b"", content_type: str = JSON,
                 headers: dict[str, str] | None = None, chunks: Iterator[bytes] | None = None):
        self.status = status
        self._body = body
        self.content_type = content_type
        self.headers = headers or {}
        self.chunks = chunks

    @property
    def body(self) -> bytes:
        if self.chunks is not None:
            self._body, self.chunks = b"".join(self.chunks), None
        return self._body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Response({self.status}, {self._body[:80]!r}{', streamed' if self.chunks is not None else ''})"


def json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(status, (json.dumps(data, indent=2) + "\n").encode(), JSON, headers or {})


def error(status: int, message: str, **extra: Any) -> Response:
    headers = extra.pop("headers", None)
    return json_response(status, {"error": message, **extra}, headers)


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # the template, e.g. /rules/{name}
    pattern: re.Pattern
    handler: Callable[..., Response]
    mutates: bool  # needs the token when one is configured; takes ?dry_run
    kernel: bool  # reads or changes the datapath: runs on the thread that owns the netlink sockets

    @property
    def query(self) -> tuple[str, ...]:
        return ("dry_run",) if self.mutates else ()


@dataclass(frozen=True)
class Call:
    """A request routed and authorised from its headers: what `Api.call` runs with the body."""

    route: Route
    params: dict[str, str]
    query: dict[str, list[str]]
    who: str
    minimal: bool = False  # the client sent Prefer: return=minimal (RFC 7240)


class Api:
    def __init__(self, service: Service, token: str | None = None):
        self.service = service
        self.token = token
        self.routes: list[Route] = []
        no_kernel = {self.index, self.healthz, self.openapi}
        for method, path, handler, mutates in (
            ("GET", "/", self.index, False),
            ("GET", "/healthz", self.healthz, False),
            ("GET", "/readyz", self.readyz, False),
            ("GET", "/openapi.json", self.openapi, False),
            ("GET", "/metrics", self.metrics, False),
            ("GET", "/rules", self.list_rules, False),
            ("PUT", "/rules", self.replace_rules, True),
            ("DELETE", "/rules", self.delete_rules, True),
            ("GET", "/rules/{name}", self.get_rule, False),
            ("PUT", "/rules/{name}", self.put_rule, True),
            ("PATCH", "/rules/{name}", self.patch_rule, True),
            ("DELETE", "/rules/{name}", self.delete_rule, True),
            ("GET", "/stats", self.stats, False),
            # A GET that changes state: kept only for compatibility, so it needs the token.
            ("GET", "/latency/{duration}", self.latency, True),
        ):
            regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")
            self.routes.append(Route(method, path, regex, handler, mutates, handler not in no_kernel))

    # -- dispatch ---------------------------------------------------------------
    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes,
               client: str = "-") -> Response:
        call = self.prepare(method, target, headers, client)
        return call if isinstance(call, Response) else self.call(call, body)

    def prepare(self, method: str, target: str, headers: Mapping[str, str], client: str = "-") -> Call | Response:
        """Route, authorise and check the query from the request line and headers alone."""
        url = urlsplit(target)
        path = url.path.rstrip("/") or "/"
        try:
            # "?dry_run=" is a mistake to report, not absent; a query that is not UTF-8 is bad input.
            query = parse_qs(url.query, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return error(422, "the query string is not valid UTF-8", field="query", expected="key=value&...")
        allowed = []
        for route in self.routes:
            m = route.pattern.match(path)
            if not m:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            if route.mutates and not self._authorised(headers):
                return error(401, "this request changes state: it needs the header Authorization: Bearer <token>",
                             headers={"WWW-Authenticate": 'Bearer realm="shaper"'})
            for key in query:
                if key not in route.query:
                    # Like an unknown body field: ?DRY_RUN=1 or ?dryrun=1 must never apply for real.
                    exc = unknown_field(key, key, route.query, ", ".join(route.query) or "no query parameters",
                                        what=f"unknown query parameter on {route.method} {route.path}")
                    return error(422, str(exc), field=exc.field, expected=exc.accepted)
            params = {k: unquote(v) for k, v in m.groupdict().items()}
            return Call(route, params, query, client + (" (token)" if self.token else ""),
                        _prefers_minimal(_header(headers, "prefer")))
        if allowed:
            return error(405, f"{method} is not allowed on {_short(path)}", headers={"Allow": ", ".join(sorted(allowed))})
        return error(404, f"no such endpoint: {_short(path)} (see /openapi.json)")

    def call(self, call: Call, body: bytes) -> Response:
        """Run a prepared request; every error becomes its status and a JSON body."""
        try:
            return call.route.handler(body=body, query=call.query, who=call.who, minimal=call.minimal,
                                      **call.params)
        except InvalidInput as exc:  # BadJson (400) too: the field and the accepted form go with it
            return error(exc.http_status, str(exc), field=exc.field, expected=exc.accepted)
        except ShaperError as exc:  # its class says its status (shaper.errors)
            return error(exc.http_status, str(exc))
        except Exception as exc:  # a bug: say so, keep serving
            log.exception("internal error on %s %s", call.route.method, call.route.path)
            return error(500, f"internal error: {type(exc).__name__}: {exc}")

    def _authorised(self, headers: Mapping[str, str]) -> bool:
        if not self.token:
            return True
        value = _header(headers, "authorization") or ""
        scheme, _, given = value.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant time in the token's content; both sides encoded the same way.
        return hmac.compare_digest(given.strip().encode(), self.token.encode())

    # -- endpoints --------------------------------------------------------------
    def index(self, **_: Any) -> Response:
        return json_response(200, {"service": "shaper", "version": __version__,
                                   "interface": self.service.interface,
                                   "endpoints": [f"{r.method} {r.path}" for r in self.routes]})

    def healthz(self, **_: Any) -> Response:
        return json_response(200, {"status": "ok"})

    def readyz(self, **_: Any) -> Response:
        if self.service.is_ready():
            return json_response(200, {"status": "ready", "interface": self.service.interface})
        return error(503, f"not ready: the classifier is not attached to {self.service.interface}")

    def readyz_unchecked(self) -> Response:
        """/readyz while the kernel thread is busy with a long change: ready as far as known
        (that change runs on an attached datapath); a probe must not time out behind it."""
        if self.service.ready:
            return json_response(200, {"status": "ready", "interface": self.service.interface})
        return error(503, f"not ready: the classifier is not attached to {self.service.interface}")

    def openapi(self, **_: Any) -> Response:
        return json_response(200, openapi.document(__version__))

    def metrics(self, **_: Any) -> Response:
        return Response(200, self.service.metrics_text(), CONTENT_TYPE_LATEST)

    def list_rules(self, **_: Any) -> Response:
        return Response(200, b"", JSON, chunks=_rules_json(self.service.rules()))

    def get_rule(self, name: str, **_: Any) -> Response:
        return json_response(200, self.service.rule(_name(name)).to_dict())

    def put_rule(self, name: str, body: bytes, query: dict, who: str, **_: Any) -> Response:
        rule = parse_rule(_json(body), name=_name(name))
        if _flag(query, "dry_run"):
            with self.service.lock:
                return self._preview({**self._live(), rule.name: rule}.values(), rule.to_dict())
        return json_response(200, self.service.put(rule, who).to_dict())

    def patch_rule(self, name: str, body: bytes, query: dict, who: str, **_: Any) -> Response:
        """A JSON merge patch (RFC 7396) of one rule: fields given replace, null removes, the rest stay."""
        name = _name(name)
        patch = _object(_json(body), "an object of the rule fields to change")
        if not patch:
            raise InvalidInput("body", "nothing to change", "at least one rule field, e.g. {\"delay\": \"20ms\"}")
        for key, value in patch.items():
            if key not in FIELD_NAMES:
                raise unknown_field(key, key, FIELD_NAMES)
            if value is None and key in ("name", "dst"):
                raise InvalidInput(key, "cannot be removed", "a value (every rule has a name and destinations)")
        # Under the service's lock, so that two patches of one rule never lose one another's change.
        with self.service.lock:
            merged = self.service.rule(name).to_dict()
            # The rule reads back with dst; peers given as src replace them (and dst replaces a src).
            for given, other in (("src", "dst"), ("dst", "src")):
                if patch.get(given) is not None:
                    merged.pop(other, None)
            for key, value in patch.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            rule = parse_rule(merged, name=name)
            if _flag(query, "dry_run"):
                return self._preview({**self._live(), name: rule}.values(), rule.to_dict())
            return json_response(200, self.service.put(rule, who, event="rule.patch").to_dict())

    def delete_rule(self, name: str, query: dict, who: str, **_: Any) -> Response:
        name = _name(name)
        if _flag(query, "dry_run"):
            with self.service.lock:
                live = self._live()
                if live.pop(name, None) is None:
                    raise NotFound(f"no rule named {name!r}")
                return self._preview(live.values(), {"deleted": [name]})
        self.service.delete(name, who)
        return json_response(200, {"deleted": [name]})

    def replace_rules(self, body: bytes, query: dict, who: str, minimal: bool = False, **_: Any) -> Response:
        """The rules in force, or with Prefer: return=minimal only their names: a million
        destinations written back and read again cost the CLI's `apply -f` more than a second."""
        with gc_paused():  # a body of 100,000 destinations: see model.gc_paused
            rules = parse_ruleset(_object(_json(body), 'an object: {"rules": [...]}'))

        def shown(rules: Iterable[Rule]) -> tuple[dict, dict]:
            if minimal:
                return {"names": [r.name for r in rules]}, {"Preference-Applied": "return=minimal"}
            return {"rules": [r.to_dict() for r in rules]}, {}

        if _flag(query, "dry_run"):
            with self.service.lock:  # the operations and the rule changes from the same state
                ops = self.service.plan(rules)
                changed = changes.changes_from(self.service.observe(), rules, self.service.clock())
            out, headers = shown(rules)
            return json_response(200, {**out, "dry_run": True, "changes": [P.describe(op) for op in ops],
                                       "rule_changes": changed}, headers)
        return json_response(200, *shown(self.service.replace(rules, who)))

    def delete_rules(self, query: dict, who: str, **_: Any) -> Response:
        if _flag(query, "dry_run"):
            with self.service.lock:
                return self._preview([], {"deleted": sorted(self._live())})
        return json_response(200, {"deleted": self.service.clear(who)})

    def stats(self, **_: Any) -> Response:
        now = self.service.clock()
        return json_response(200, {"interface": self.service.interface,
                                   "rules": [s.to_dict(now) for s in self.service.stats()]})

    def latency(self, duration: str, query: dict, who: str, **_: Any) -> Response:
        if _flag(query, "dry_run"):
            rule = parse_rule({"dst": list(LATENCY_DST), "delay": duration}, where="path", name=LATENCY_RULE)
            with self.service.lock:
                live = self._live()
                if rule.delay_us:
                    return self._preview({**live, LATENCY_RULE: rule}.values(), rule.to_dict())
                deleted = [LATENCY_RULE] if live.pop(LATENCY_RULE, None) is not None else []
                return self._preview(live.values(), {"deleted": deleted})
        rule, deleted = self.service.latency(duration, who)
        if rule is None:
            return json_response(200, {"deleted": deleted})
        return json_response(200, rule.to_dict())

    # -- dry runs -----------------------------------------------------------------
    def _live(self) -> dict[str, Rule]:
        return {r.name: r for r in self.service.rules()}

    def _preview(self, desired: Any, shown: dict) -> Response:
        """What applying `desired` would do, in operations and in the rules' words; applies nothing.
        Called under the service's lock, so that both come from the state `desired` was made from."""
        desired = list(desired)
        ops = self.service.plan(desired)
        changed = changes.changes_from(self.service.observe(), desired, self.service.clock())
        return json_response(200, {**shown, "dry_run": True, "changes": [P.describe(op) for op in ops],
                                   "rule_changes": changed})


DST_CHUNK = 8192  # destinations encoded per piece of a streamed GET /rules


def _rules_json(rules: list[Rule]) -> Iterator[bytes]:
    """{"rules": [...]} in pieces of at most DST_CHUNK destinations: eight readers of 262,144
    prefixes each held the whole document three times over (list, str, bytes)."""
    yield b'{"rules": ['
    for i, rule in enumerate(rules):
        # The fields but dst from a copy with one destination: to_dict would format them all.
        fields = replace(rule, dst=rule.dst[:1]).to_dict()
        del fields["name"], fields["dst"]
        rest = json.dumps(fields)[1:-1]
        yield (("," if i else "") + "\n  {\"name\": " + json.dumps(rule.name) + ", \"dst\": [").encode()
        for start in range(0, len(rule.dst), DST_CHUNK):
            piece = json.dumps([str(p) for p in rule.dst[start:start + DST_CHUNK]])[1:-1]
            yield ((", " if start else "") + piece).encode()
        yield ("]" + (", " + rest if rest else "") + "}").encode()
    yield b"\n]}\n"


def _short(text: str, limit: int = 120) -> str:
    """A client's string quoted back in an error, cut short."""
    return text if len(text) <= limit else text[:limit] + "..."


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _prefers_minimal(value: str | None) -> bool:
    """Whether a Prefer header (RFC 7240) asks for return=minimal: preferences are comma-separated,
    each may carry parameters after ';', tokens are case-insensitive and a value may be quoted."""
    for preference in (value or "").split(","):
        key, _, given = preference.partition(";")[0].partition("=")
        if key.strip().lower() == "return" and given.strip().strip('"').lower() == "minimal":
            return True
    return False


def _name(name: str) -> str:
    return NAME.parse(name, "name")


def _flag(query: dict, key: str) -> bool:
    values = query.get(key, [])
    if not values:
        return False
    if len(values) > 1 or values[0].lower() not in ("1", "true", "0", "false"):
        raise InvalidInput(key, f"invalid value {','.join(values)!r}", "true or false, once")
    return values[0].lower() in ("1", "true")


def _object(document: Any, form: str) -> dict:
    """A body that must be a JSON object: parse_ruleset takes None (an empty YAML file) as no rules,
    and a body of `null` must not delete every rule."""
    if not isinstance(document, dict):
        raise InvalidInput("body", f"expected an object, got {type(document).__name__}", form)
    return document


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are all different: with a key twice, which one was meant is a guess."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BadJson(key, f"the key {key!r} appears twice in one object", "each key once")
            seen.add(key)
    return out


def _json(body: bytes) -> Any:
    if not body.strip():
        raise BadJson("body", "is empty", "a JSON object")
    try:
        return json.loads(body, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadJson("body", f"not valid JSON: {exc}", "a JSON object") from None
    except RecursionError:
        raise BadJson("body", "nested too deeply", "a JSON object") from None
