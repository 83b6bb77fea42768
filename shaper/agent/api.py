"""The node agent's HTTP API: the daemon's rule API per target, and the targets themselves.

  GET    /targets                          the targets shaped, with what the agent knows of each
  GET    /targets/{target}                 one of them (404 if it is not shaped)
  DELETE /targets/{target}                 remove its shaping and let go of it (token)
  *      /targets/{target}/rules[/{name}]  as /rules[/{name}] of `shaper run`, dry runs included
  GET    /targets/{target}/stats           as /stats
  GET    /metrics, /healthz, /readyz, /    every target's series, labelled target (pod, namespace, container)

{target} is a spec of shaper.agent.targets, percent-encoded where it holds a "/"
(netns:%2Fproc%2F4242%2Fns%2Fnet).  Only PUT /targets/{target}/rules[/{name}] starts
shaping a target; a read, a dry run or a delete of one that is not shaped yet answers
from an empty rule set and touches nothing (404 if no such target exists, 409 if the
name is ambiguous).  Routing, the token, dry runs and errors are shaper.http.api's.
"""

from __future__ import annotations

import re
from typing import Any, Mapping
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shaper import __version__
from shaper.agent.agent import Agent
from shaper.control.service import Service
from shaper.datapath.fake import FakeDatapath
from shaper.errors import NotFound, NotReady
from shaper.http.api import Api, Call, Response, Route, _flag, error, json_response

# Routes of the per-target API: (method, path under the target, Api method, changes state, may start shaping).
PER_TARGET = (
    ("GET", "/rules", "list_rules", False, False),
    ("PUT", "/rules", "replace_rules", True, True),
    ("DELETE", "/rules", "delete_rules", True, False),
    ("GET", "/rules/{name}", "get_rule", False, False),
    ("PUT", "/rules/{name}", "put_rule", True, True),
    ("PATCH", "/rules/{name}", "patch_rule", True, False),
    ("DELETE", "/rules/{name}", "delete_rule", True, False),
    ("GET", "/stats", "stats", False, False),
)


class AgentApi(Api):
    def __init__(self, agent: Agent, token: str | None = None):
        self.agent = agent
        self.service = None  # type: ignore[assignment]  (each target has its own)
        self.token = token
        self.routes: list[Route] = []
        no_kernel = {self.index, self.healthz}
        table: list[tuple[str, str, Any, bool]] = [
            ("GET", "/", self.index, False),
            ("GET", "/healthz", self.healthz, False),
            ("GET", "/readyz", self.readyz, False),
            ("GET", "/metrics", self.metrics, False),
            ("GET", "/targets", self.list_targets, False),
            ("GET", "/targets/{target}", self.get_target, False),
            ("DELETE", "/targets/{target}", self.delete_target, True),
        ]
        for method, path, name, mutates, starts in PER_TARGET:
            table.append((method, "/targets/{target}" + path, self._per_target(name, starts), mutates))
        for method, path, handler, mutates in table:
            regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")
            self.routes.append(Route(method, path, regex, handler, mutates, handler not in no_kernel))

    def prepare(self, method: str, target: str, headers: Mapping[str, str], client: str = "-") -> Call | Response:
        """As Api.prepare; a route naming a target also learns whether the token came with it (looking
        for a target not shaped yet is for token holders), and an unknown route is no daemon's."""
        call = super().prepare(method, target, headers, client)
        if isinstance(call, Response):
            if call.status == 404:
                return error(404, f"no such endpoint on the agent: {urlsplit(target).path[:120]} (the agent serves "
                             "/targets, /targets/{target}, /targets/{target}/rules[/{name}], /targets/{target}/stats, "
                             "/metrics, /healthz, /readyz)")
            return call
        if "target" in call.params:
            call.params["authed"] = "1" if self._authorised(headers) else ""
        return call

    def _per_target(self, name: str, starts: bool):
        def handler(target: str, authed: str = "", **kw: Any) -> Response:
            self._require_ready()
            create = starts and not _flag(kw.get("query", {}), "dry_run")
            shaped, found = self.agent.lookup(target, create, authed=bool(authed))
            if shaped is not None:
                return getattr(shaped.api, name)(**kw)
            # Not shaped (and this request does not start it): an empty rule set, nothing touched.
            empty = Service(FakeDatapath(ifname=self.agent.iface), self.agent.iface)
            empty.start(None)
            return getattr(Api(empty), name)(**kw)
        handler.__name__ = name
        return handler

    # -- endpoints --------------------------------------------------------------------------------------
    def index(self, **_: Any) -> Response:
        return json_response(200, {"service": "shaper agent", "version": __version__, "interface": self.agent.iface,
                                   "endpoints": [f"{r.method} {r.path}" for r in self.routes]})

    def readyz(self, **_: Any) -> Response:
        return self.readyz_unchecked()

    def readyz_unchecked(self) -> Response:
        if self.agent.ready:
            return json_response(200, {"status": "ready", "targets": len(self.agent.targets)})
        return error(503, "not ready: the agent is still adopting the targets of an earlier run")

    def metrics(self, **_: Any) -> Response:
        return Response(200, generate_latest(self.agent.registry), CONTENT_TYPE_LATEST)

    def _require_ready(self) -> None:
        if not self.agent.ready:  # the targets of an earlier run are being adopted
            raise NotReady("not ready: the agent is still adopting the targets of an earlier run")

    def list_targets(self, **_: Any) -> Response:
        self._require_ready()
        return json_response(200, {"interface": self.agent.iface, "targets": self.agent.list()})

    def get_target(self, target: str, authed: str = "", **_: Any) -> Response:
        self._require_ready()
        shaped, _found = self.agent.lookup(target, create=False, authed=bool(authed))
        if shaped is None:
            raise NotFound(f"{target} is not shaped by this agent (PUT /targets/{target}/rules/NAME starts it)")
        return json_response(200, shaped.describe())

    def delete_target(self, target: str, query: dict, who: str, authed: str = "", **_: Any) -> Response:
        self._require_ready()
        if _flag(query, "dry_run"):
            shaped, _found = self.agent.lookup(target, create=False, authed=bool(authed))
            if shaped is None:
                raise NotFound(f"{target} is not shaped by this agent")
            return json_response(200, {"deleted": shaped.name, "dry_run": True})
        return json_response(200, self.agent.remove(target, who))
