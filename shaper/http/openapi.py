"""The OpenAPI 3.0 document of the daemon's HTTP API (served at /openapi.json).

The paths are written by hand next to the routes in api.py (a unit test checks
that the two list the same endpoints); the rule schema is made from the field
descriptions in shaper.core.fields, as the model's parsing is.
"""

from __future__ import annotations

from typing import Any

from shaper.core.fields import FIELDS, NAME, OPTIONAL_FIELDS, Field
from shaper.core.units import DURATION_FORM, DURATION_PATTERN

# Patterns say as much of the accepted forms as JSON Schema can; ranges inside strings
# (a rate's minimum) and cross-field needs (jitter needs delay) are checked by shaper.
_DURATION = {"type": "string", "pattern": DURATION_PATTERN, "description": DURATION_FORM}
NAME_PATTERN = NAME.schema["pattern"]



def rule_fields(fields: tuple[Field, ...] = FIELDS) -> dict[str, dict[str, Any]]:
    """The Rule schema's properties: each field's schema, with its description."""
    return {f.key: {**f.schema, "description": f.api_description()} for f in fields}


RULE_FIELDS = rule_fields()
_REQUIRED = [f.key for f in FIELDS if f.required]
# A body names its peers with dst, or with src (an ingress rule): not required as such, one of the two is.
_PEERS = {"anyOf": [{"required": ["dst"]}, {"required": ["src"]}]}
_CLEARABLE = {f.key for f in OPTIONAL_FIELDS}  # a merge patch's null removes them

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
_PREFER = {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"},
           "description": "return=minimal (RFC 7240): answer with the rules' names, not the rules written back "
                          "(a million destinations); the response then says Preference-Applied: return=minimal."}
# Any route: an unknown query parameter (422). Routes that take a body: malformed JSON or a key
# twice (400), a body above 32 MiB (413), one that takes longer than 60 s (408), or more body
# bytes in flight across all requests than the daemon holds (503, Retry-After).
_BODY_ERRORS = (400, 408, 413, 422, 503)
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": NAME_PATTERN}}
_AUTH = [{"bearer": []}]
_COUNT = {"type": "integer", "minimum": 0}
# GET /stats: the rows' other keys are the rule's fields and the class's counters (the path's description).
_STATS = {"type": "object", "required": ["interface", "rules"], "properties": {
    "interface": {"type": "string"},
    "rules": {"type": "array", "items": {
        "type": "object", "required": ["name", "dst", "direction", "classid", "matched_packets", "matched_bytes"],
        "properties": {"direction": {"type": "string", "enum": ["egress", "ingress"],
                                     "description": "The direction of this row's counters (never both)."},
                       "classid": {"type": "string"}, "matched_packets": _COUNT, "matched_bytes": _COUNT}}}}}


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
                   body=_RULES, auth=True, params=[_PREFER]),
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
                          ok={"application/json": {"schema": _STATS}},
                          description="One row per rule and direction it shapes, by name, egress first: a rule "
                                      "with direction both has an egress row (the interface's HTB class) and an "
                                      "ingress row (the ifb's), each with its own counters. A row has the rule's "
                                      "fields with direction set to the row's, then classid, expires_in (a rule "
                                      "with a TTL), matched_packets and matched_bytes (the classifier), and the "
                                      "class's counters (class_bytes, class_packets, drops, overlimits, requeues, "
                                      "backlog_bytes, backlog_packets, leaf) unless its class is missing.")},
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
                "Rule": {"type": "object", "additionalProperties": False, **_PEERS,
                         "properties": RULE_FIELDS},
                "RulePreview": {"type": "object", "additionalProperties": False, "required": ["dry_run"], **_PEERS,
                                "properties": {**RULE_FIELDS, **_PREVIEW}},
                "RulePatch": {"type": "object", "additionalProperties": False, "minProperties": 1,
                              "properties": {k: ({**v, "nullable": True} if k in _CLEARABLE else v)
                                             for k, v in RULE_FIELDS.items()}},
                "RuleSet": {"type": "object", "additionalProperties": False, "required": ["rules"],
                            "properties": {"rules": {
                                "type": "array", "items": {"$ref": "#/components/schemas/Rule"},
                                # A rules file's "rules:" with nothing after it is YAML's null; the API
                                # takes the same document, so null is accepted there too (no rules).
                                "nullable": True, "description": "The rules; null is the same as []."}}},
                "Replaced": {"type": "object", "additionalProperties": False,
                             "anyOf": [{"required": ["rules"]}, {"required": ["names"]}], "properties": {
                    "rules": {"type": "array", "items": {"$ref": "#/components/schemas/Rule"}},
                    "names": {"type": "array", "items": {"type": "string"},
                              "description": "With Prefer: return=minimal, in place of rules: the rules' names."},
                    **_PREVIEW}},
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
