"""The HTTP API, as a function from a request to a response (no sockets here).

`Api.handle(method, path, headers, body, client)` routes a request, parses
its JSON into the model, calls the service and maps errors to statuses:
400 malformed JSON, 401 missing or wrong token, 404 unknown rule or route,
405 wrong method, 409 state shaper does not own, 413 body too large,
422 a rule that cannot be applied, 500 the kernel refused, 501 this kernel
lacks what the rule needs (sch_netem), 503 not ready.
server.py puts it behind http.server; the unit tests call it directly.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__, changes, openapi, plan as P
from .errors import Conflict, InvalidInput, NotSupported, ShaperError
from .model import FIELD_NAMES, NAME_FORM, NAME_RE, gc_paused, parse_rule, parse_ruleset, unknown_field
from .service import NotFound, NotReady, Service

log = logging.getLogger("shaper")

MAX_BODY_BYTES = 32 * 1024 * 1024  # 262,144 prefixes as JSON fit with room to spare
JSON = "application/json"


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


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
    mutates: bool  # needs the token when one is configured


class Api:
    def __init__(self, service: Service, token: str | None = None):
        self.service = service
        self.token = token
        self.routes: list[Route] = []
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
            self.routes.append(Route(method, path, regex, handler, mutates))

    # -- dispatch ---------------------------------------------------------------
    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes,
               client: str = "-") -> Response:
        url = urlsplit(target)
        path = url.path.rstrip("/") or "/"
        query = parse_qs(url.query, keep_blank_values=True)  # "?dry_run=" is a mistake to report, not absent
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
            params = {k: unquote(v) for k, v in m.groupdict().items()}
            who = client + (" (token)" if self.token else "")
            try:
                return route.handler(body=body, query=query, who=who, **params)
            except BadJson as exc:
                return error(400, str(exc), field=exc.field, expected=exc.accepted)
            except InvalidInput as exc:
                return error(422, str(exc), field=exc.field, expected=exc.accepted)
            except NotFound as exc:
                return error(404, str(exc))
            except NotReady as exc:
                return error(503, str(exc))
            except Conflict as exc:
                return error(409, str(exc))
            except NotSupported as exc:  # this kernel lacks what the request needs (sch_netem)
                return error(501, str(exc))
            except ShaperError as exc:
                return error(500, str(exc))
            except Exception as exc:  # a bug: say so, keep serving
                log.exception("internal error on %s %s", method, path)
                return error(500, f"internal error: {type(exc).__name__}: {exc}")
        if allowed:
            return error(405, f"{method} is not allowed on {_short(path)}", headers={"Allow": ", ".join(sorted(allowed))})
        return error(404, f"no such endpoint: {_short(path)} (see /openapi.json)")

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

    def openapi(self, **_: Any) -> Response:
        return json_response(200, openapi.document(__version__))

    def metrics(self, **_: Any) -> Response:
        return Response(200, generate_latest(self.service.registry), CONTENT_TYPE_LATEST)

    def list_rules(self, **_: Any) -> Response:
        return json_response(200, {"rules": [r.to_dict() for r in self.service.rules()]})

    def get_rule(self, name: str, **_: Any) -> Response:
        return json_response(200, self.service.rule(_name(name)).to_dict())

    def put_rule(self, name: str, body: bytes, who: str, **_: Any) -> Response:
        rule = parse_rule(_json(body), name=_name(name))
        return json_response(200, self.service.put(rule, who).to_dict())

    def patch_rule(self, name: str, body: bytes, who: str, **_: Any) -> Response:
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
            for key, value in patch.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            rule = parse_rule(merged, name=name)
            return json_response(200, self.service.put(rule, who, event="rule.patch").to_dict())

    def delete_rule(self, name: str, who: str, **_: Any) -> Response:
        self.service.delete(_name(name), who)
        return json_response(200, {"deleted": [name]})

    def replace_rules(self, body: bytes, query: dict, who: str, **_: Any) -> Response:
        with gc_paused():  # a body of 100,000 destinations: see model.gc_paused
            rules = parse_ruleset(_object(_json(body), 'an object: {"rules": [...]}'))
        if _flag(query, "dry_run"):
            with self.service.lock:  # the operations and the rule changes from the same state
                ops = self.service.plan(rules)
                changed = changes.changes_from(self.service.observe(), rules, self.service.clock())
            return json_response(200, {"rules": [r.to_dict() for r in rules], "dry_run": True,
                                       "changes": [P.describe(op) for op in ops], "rule_changes": changed})
        stored = self.service.replace(rules, who)
        return json_response(200, {"rules": [r.to_dict() for r in stored]})

    def delete_rules(self, who: str, **_: Any) -> Response:
        return json_response(200, {"deleted": self.service.clear(who)})

    def stats(self, **_: Any) -> Response:
        now = self.service.clock()
        return json_response(200, {"interface": self.service.interface,
                                   "rules": [s.to_dict(now) for s in self.service.stats()]})

    def latency(self, duration: str, who: str, **_: Any) -> Response:
        rule, deleted = self.service.latency(duration, who)
        if rule is None:
            return json_response(200, {"deleted": deleted})
        return json_response(200, rule.to_dict())


def _short(text: str, limit: int = 120) -> str:
    """A client's string quoted back in an error, cut short."""
    return text if len(text) <= limit else text[:limit] + "..."


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidInput("name", f"invalid name {name!r}", NAME_FORM)
    return name


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


class BadJson(InvalidInput):
    pass


def _json(body: bytes) -> Any:
    if not body.strip():
        raise BadJson("body", "is empty", "a JSON object")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadJson("body", f"not valid JSON: {exc}", "a JSON object") from None
    except RecursionError:
        raise BadJson("body", "nested too deeply", "a JSON object") from None
