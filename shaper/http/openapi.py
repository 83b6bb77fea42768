"""The OpenAPI 3.0 document of the daemon's HTTP API (served at /openapi.json).

Written by hand next to the routes in api.py; a unit test checks that the
two list the same endpoints and that the rule schema lists every field the
model accepts.
"""

from __future__ import annotations

from typing import Any

from shaper.core.model import NAME_FORM
from shaper.core.units import DURATION_FORM, PERCENT_FORM, RATE_FORM, SIZE_FORM

_NUM = r"([0-9]+(\.[0-9]+)?|\.[0-9]+)"
# Patterns say as much of the accepted forms as JSON Schema can; ranges inside strings
# (a rate's minimum) and cross-field needs (jitter needs delay) are checked by shaper.
_PCT = {"type": "string", "pattern": r"^(100(\.0+)?|[0-9]{1,2}(\.[0-9]+)?|\.[0-9]+) ?%$",
        "description": PERCENT_FORM}
_DURATION = {"type": "string", "pattern": "^(0|" + _NUM + " ?(us|usec|ms|msec|s|sec|m|min|h|d))$",
             "description": DURATION_FORM}
NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"

RULE_FIELDS: dict[str, dict[str, Any]] = {
    "name": {"type": "string", "pattern": NAME_PATTERN,
             "description": NAME_FORM + ". In /rules/{name} it comes from the path."},
    "dst": {"type": "array", "items": {"type": "string"}, "minItems": 1,
            "description": "Destinations: IPv4/IPv6 addresses or CIDRs. The longest matching prefix wins."},
    "delay": {**_DURATION, "description": "Added delay: " + DURATION_FORM + "."},
    "jitter": {**_DURATION, "description": "Delay variation (needs delay)."},
    "delay_corr": {**_PCT, "description": "Correlation of successive jitter values (needs jitter)."},
    "distribution": {"type": "string", "enum": ["uniform", "normal", "pareto", "paretonormal"],
                     "description": "Shape of the jitter (default uniform)."},
    "loss": {**_PCT, "description": "Random loss."},
    "loss_corr": {**_PCT, "description": "Correlation of successive losses."},
    "loss_ge": {"type": "object", "additionalProperties": False,
                "properties": {k: _PCT for k in ("p", "r", "loss_bad", "loss_good")}, "required": ["p"],
                "description": "Gilbert-Elliott bursty loss (instead of loss)."},
    "duplicate": {**_PCT, "description": "Packets sent twice."},
    "duplicate_corr": _PCT,
    "corrupt": {**_PCT, "description": "Packets with one flipped bit."},
    "corrupt_corr": _PCT,
    "reorder": {**_PCT, "description": "Packets sent at once, ahead of delayed ones (needs delay)."},
    "reorder_corr": _PCT,
    "gap": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1, "description": "Reorder every gap-th packet (default 1)."},
    "rate": {"type": "string", "pattern": "^" + _NUM + " ?(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps|kibit|mibit|"
                                                        "gibit|tibit|kibps|mibps|gibps|tibps)$",
             "description": "Rate limit (HTB): " + RATE_FORM + "."},
    "burst": {"type": "string", "pattern": "^" + _NUM + " ?(b|k|kb|m|mb|g|gb)$", "description": "HTB burst (needs rate; default 2 ms at the rate): " + SIZE_FORM + "."},
    "limit": {"type": "integer", "minimum": 1, "maximum": 1_000_000,
              "description": "netem queue limit in packets (default: sized from delay x rate)."},
    "ttl": {**_DURATION, "description": "Remove the rule after this long (restarted by each PUT of it)."},
}

_ERROR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_RULE = {"application/json": {"schema": {"$ref": "#/components/schemas/Rule"}}}
_RULES = {"application/json": {"schema": {"$ref": "#/components/schemas/RuleSet"}}}
_REPLACED = {"application/json": {"schema": {"$ref": "#/components/schemas/Replaced"}}}
_PREVIEW = {
    "dry_run": {"type": "boolean"},
    "changes": {"type": "array", "items": {"type": "string"},
                "description": "With dry_run: the kernel operations, one line each (slots, classes)."},
    "rule_changes": {"type": "array", "items": {"$ref": "#/components/schemas/RuleChange"},
                     "description": "With dry_run: what changes, per rule, in the rule's own fields; unchanged "
                                    "rules are left out."}}
_DELETED = {"application/json": {"schema": {"type": "object", "required": ["deleted"], "additionalProperties": False,
                                           "properties": {"deleted": {"type": "array", "items": {"type": "string"}},
                                                          **_PREVIEW}}}}
_RULE_OR_PREVIEW = {"application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/Rule"},
                                                              {"$ref": "#/components/schemas/RulePreview"}]}}}
_DRY_RUN = {"name": "dry_run", "in": "query", "schema": {"type": "boolean"}, "required": False,
            "description": "Validate and list the changes (changes, rule_changes), change nothing."}
# Any route: an unknown query parameter (422). Routes that take a body: malformed JSON or a key
# twice (400), a body above 32 MiB (413), one that takes longer than 60 s (408), or more body
# bytes in flight across all requests than the daemon holds (503, Retry-After).
_BODY_ERRORS = (400, 408, 413, 422, 503)
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": NAME_PATTERN}}
_AUTH = [{"bearer": []}]


def _op(summary: str, ok: dict | None = None, errors: tuple[int, ...] = (), *, body: dict | None = None,
        params: list | None = None, auth: bool = False, description: str | None = None) -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK", **({"content": ok} if ok else {})}}}
    errors = tuple(sorted({422, *errors, *(_BODY_ERRORS if body else ())}))
    if auth:
        params = [*(params or []), _DRY_RUN]
    for code in errors:
        op["responses"][str(code)] = _ERROR
    if auth:
        op["security"] = _AUTH
        op["responses"]["401"] = _ERROR
    if body:
        op["requestBody"] = {"required": True, "content": body}
    if params:
        op["parameters"] = params
    if description:
        op["description"] = description
    return op


PATHS: dict[str, dict[str, dict]] = {
    "/": {"get": _op("Service name, version, interface and endpoints")},
    "/healthz": {"get": _op("Liveness: the daemon answers")},
    "/readyz": {"get": _op("Readiness: the classifier is attached", errors=(503,))},
    "/openapi.json": {"get": _op("This document")},
    "/metrics": {"get": _op("Prometheus metrics (text exposition format)",
                            ok={"text/plain": {"schema": {"type": "string"}}})},
    "/rules": {
        "get": _op("List the rules in force", ok=_RULES, errors=(503,)),
        "put": _op("Replace the whole rule set atomically (all or nothing)", ok=_REPLACED,
                   errors=(400, 422, 500, 501, 503),
                   body=_RULES, auth=True),
        "delete": _op("Remove every rule (the classifier stays attached)", ok=_DELETED, errors=(500, 503), auth=True),
    },
    "/rules/{name}": {
        "get": _op("One rule", ok=_RULE, errors=(404, 422, 503), params=[_NAME]),
        "put": _op("Create or replace one rule (idempotent; restarts its TTL)", ok=_RULE_OR_PREVIEW,
                   errors=(400, 422, 500, 501, 503),
                   body=_RULE, params=[_NAME], auth=True),
        "patch": _op("Change some fields of one rule, keep the others (restarts its TTL)", ok=_RULE_OR_PREVIEW,
                     errors=(400, 404, 422, 500, 501, 503), params=[_NAME], auth=True,
                     body={"application/merge-patch+json": {"schema": {"$ref": "#/components/schemas/RulePatch"}},
                           "application/json": {"schema": {"$ref": "#/components/schemas/RulePatch"}}},
                     description="A JSON merge patch (RFC 7396): each field given replaces the rule's, a field "
                                 "given as null is removed (name and dst cannot be), fields left out stay. "
                                 "An empty patch or an unknown field is a 422. Merged and applied in one step."),
        "delete": _op("Remove one rule", ok=_DELETED, errors=(404, 422, 500, 503), params=[_NAME], auth=True),
    },
    "/stats": {"get": _op("Per-rule statistics: classifier matches and HTB class counters", errors=(503,),
                          ok={"application/json": {"schema": {"type": "object"}}})},
    "/latency/{duration}": {"get": _op(
        "Compatibility: a delay for every destination (rule 'latency'); 0 removes it",
        ok={"application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/Rule"},
                                                      {"$ref": "#/components/schemas/RulePreview"},
                                                      _DELETED["application/json"]["schema"]]}}},
        errors=(422, 500, 501, 503), auth=True,
        params=[{"name": "duration", "in": "path", "required": True, "schema": _DURATION}],
        description="A GET with side effects, kept only for compatibility with the agent that serves "
                    "`curl http://POD_IP:2332/latency/20ms`. It is PUT /rules/latency with "
                    "dst [0.0.0.0/0, ::/0] and the delay; prefer that.")},
}


def document(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "shaper", "version": version,
                 "description": "Per-destination network shaping of one interface: rules steer traffic towards "
                                "their destinations into an HTB class with a netem leaf."},
        "paths": PATHS,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Needed by requests that change state when the daemon "
                                                          "runs with --token-file."}},
            "schemas": {
                "Rule": {"type": "object", "additionalProperties": False, "required": ["dst"],
                         "properties": RULE_FIELDS},
                "RulePreview": {"type": "object", "additionalProperties": False, "required": ["dst", "dry_run"],
                                "properties": {**RULE_FIELDS, **_PREVIEW}},
                "RulePatch": {"type": "object", "additionalProperties": False, "minProperties": 1,
                              "properties": {k: ({**v, "nullable": True} if k not in ("name", "dst") else v)
                                             for k, v in RULE_FIELDS.items()}},
                "RuleSet": {"type": "object", "additionalProperties": False, "required": ["rules"],
                            "properties": {"rules": {
                                "type": "array", "items": {"$ref": "#/components/schemas/Rule"},
                                # A rules file's "rules:" with nothing after it is YAML's null; the API
                                # takes the same document, so null is accepted there too (no rules).
                                "nullable": True, "description": "The rules; null is the same as []."}}},
                "Replaced": {"type": "object", "additionalProperties": False, "required": ["rules"], "properties": {
                    "rules": {"type": "array", "items": {"$ref": "#/components/schemas/Rule"}}, **_PREVIEW}},
                "RuleChange": {
                    "type": "object", "additionalProperties": False, "required": ["name", "change"],
                    "properties": {
                        "name": {"type": "string"},
                        "change": {"type": "string", "enum": ["created", "updated", "deleted"]},
                        "expired": {"type": "boolean",
                                    "description": "Created again: the rule was there but its TTL had passed."},
                        "fields": {"type": "object", "description": "created: the rule's fields (as in Rule, "
                                   "without name and dst); updated: each changed field as {old, new}, null "
                                   "where the field is unset.",
                                   "additionalProperties": True},
                        "restarts_ttl": {"type": "boolean",
                                         "description": "updated: the rule runs for its TTL from now."},
                        "dst_added": {"type": "array", "items": {"type": "string"},
                                      "description": "Destinations added (the first ten)."},
                        "dst_added_count": {"type": "integer"},
                        "dst_removed": {"type": "array", "items": {"type": "string"},
                                        "description": "Destinations removed (the first ten)."},
                        "dst_removed_count": {"type": "integer"}}},
                "Error": {"type": "object", "required": ["error"], "properties": {
                    "error": {"type": "string"}, "field": {"type": "string"}, "expected": {"type": "string"}}},
            },
        },
    }
