"""PATCH /rules/{name}, the rule changes of PUT /rules?dry_run=1 and "did you mean" in API bodies."""

import json

import pytest

from shaper.http import openapi
from shaper.http.api import Api
from shaper.datapath.fake import FakeDatapath
from shaper.control.service import Service

TOKEN = "s3cret-token"
T0 = 1_000_000_000_000


@pytest.fixture
def env():
    now = [T0]
    fake = FakeDatapath()
    service = Service(fake, "eth0", clock=lambda: now[0])
    service.start()
    return fake, now, Api(service, token=TOKEN)


def call(api, method, path, body=None, token=TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = api.handle(method, path, headers, json.dumps(body).encode() if body is not None else b"", "10.0.0.9")
    return resp.status, resp.json()


DB = {"dst": ["10.0.0.5", "fd00::5"], "delay": "50ms", "jitter": "5ms", "loss": "1%", "ttl": "10m"}


def test_patch_changes_the_fields_given_and_keeps_the_others(env):
    fake, now, api = env
    assert call(api, "PUT", "/rules/db", DB)[0] == 200
    status, body = call(api, "PATCH", "/rules/db", {"delay": "20ms", "loss": None})
    assert status == 200
    assert body == {"name": "db", "dst": ["10.0.0.5/32", "fd00::5/128"], "delay": "20ms", "jitter": "5ms",
                    "ttl": "10m"}
    assert call(api, "GET", "/rules/db") == (200, body)
    rule = fake.observe().rules["db"].rule
    assert rule.delay_us == 20_000 and rule.loss_pct == 0 and rule.jitter_us == 5_000
    # The patched rule runs for its TTL from now, as after a PUT of it.
    now[0] += 60 * 10**9
    call(api, "PATCH", "/rules/db", {"rate": "5mbit"})
    assert fake.observe().rules["db"].expires_ns == now[0] + 600 * 10**9
    status, body = call(api, "PATCH", "/rules/db", {"dst": ["10.0.0.6"]})
    assert status == 200 and body["dst"] == ["10.0.0.6/32"] and body["rate"] == "5mbit"



def test_patch_names_the_peers_by_src_or_dst(env):
    fake, _, api = env
    assert call(api, "PUT", "/rules/cache", {"src": ["10.0.0.7"], "rate": "2mbit"})[0] == 200
    # The rule is read back with dst; a patch's src replaces it (and a dst would replace a src).
    status, body = call(api, "PATCH", "/rules/cache", {"src": ["10.0.0.8"]})
    assert status == 200, body
    assert body == {"name": "cache", "dst": ["10.0.0.8/32"], "direction": "ingress", "rate": "2mbit"}
    status, body = call(api, "PATCH", "/rules/cache", {"dst": ["10.0.0.9"], "rate": "3mbit"})
    assert status == 200 and body["dst"] == ["10.0.0.9/32"] and body["direction"] == "ingress", body
    assert fake.observe().rules["cache"].rule.rate_bits_per_s == 3_000_000
    status, body = call(api, "PATCH", "/rules/cache", {"src": ["10.0.0.1"], "dst": ["10.0.0.2"]})
    assert status == 422 and "given with dst" in body["error"]
    # src names an ingress rule's peers: on a rule of both directions it is refused, saying why.
    call(api, "PUT", "/rules/db", {**DB, "direction": "both"})
    status, body = call(api, "PATCH", "/rules/db", {"src": ["10.0.0.1"]})
    assert status == 422 and "names the peers of an ingress rule" in body["error"]

@pytest.mark.parametrize("patch,status,words", [
    ({}, 422, "nothing to change"),
    ({"dely": "20ms"}, 422, "did you mean 'delay'?"),
    ({"dst": None}, 422, "cannot be removed"),
    ({"name": None}, 422, "cannot be removed"),
    ({"name": "other"}, 422, "differs"),
    ({"delay": "20 parsecs"}, 422, "delay"),
    ({"delay": None}, 422, "jitter: needs delay"),  # what is left must still be a valid rule
    ([1, 2], 422, "expected an object"),
])
def test_patch_refuses_what_it_cannot_apply_and_changes_nothing(env, patch, status, words):
    fake, _, api = env
    call(api, "PUT", "/rules/db", DB)
    before = fake.observe()
    code, body = call(api, "PATCH", "/rules/db", patch)
    assert code == status and words in body["error"], body
    assert fake.observe() == before


def test_patch_needs_the_rule_and_the_token(env):
    fake, _, api = env
    assert call(api, "PATCH", "/rules/absent", {"delay": "5ms"})[0] == 404
    call(api, "PUT", "/rules/db", DB)
    assert call(api, "PATCH", "/rules/db", {"delay": "5ms"}, token=None)[0] == 401
    assert call(api, "PATCH", "/rules/db", {"delay": "5ms"}, token="wrong")[0] == 401
    assert fake.observe().rules["db"].rule.delay_us == 50_000


def test_patch_is_in_the_openapi_document():
    op = openapi.PATHS["/rules/{name}"]["patch"]
    assert op["security"] and set(op["responses"]) >= {"200", "401", "404", "422"}
    schema = openapi.document("x")["components"]["schemas"]["RulePatch"]
    assert schema["properties"]["loss"]["nullable"] and "nullable" not in schema["properties"]["dst"]
    assert set(schema["properties"]) == set(openapi.RULE_FIELDS)


def test_unknown_fields_in_bodies_name_the_closest_field(env):
    _, _, api = env
    status, body = call(api, "PUT", "/rules/db", {"dst": ["10.0.0.5"], "lose": "1%"})
    assert status == 422 and body["field"] == "lose" and "did you mean 'loss'?" in body["error"]
    status, body = call(api, "PUT", "/rules", {"rules": [{"name": "a", "dst": ["10.0.0.5"], "Delay": "5ms"}]})
    assert status == 422 and body["field"] == "rules[0].Delay" and "did you mean 'delay'?" in body["error"]
    status, body = call(api, "PUT", "/rules", {"rule": []})
    assert status == 422 and "did you mean 'rules'?" in body["error"]
    status, body = call(api, "PUT", "/rules/db", {"dst": ["10.0.0.5"], "zzz": 1})
    assert status == 422 and "did you mean" not in body["error"]


def test_dry_run_lists_rule_changes_beside_the_kernel_operations(env):
    fake, now, api = env
    call(api, "PUT", "/rules", {"rules": [
        {"name": "cache", "dst": ["10.0.0.6"], "rate": "2mbit", "ttl": "10m"},
        {"name": "old", "dst": ["10.0.0.9"], "delay": "5ms"},
        {"name": "same", "dst": ["10.0.0.7"], "delay": "5ms"},
        {"name": "short", "dst": ["10.0.0.8"], "delay": "5ms", "ttl": "1s"}]})
    now[0] += 2 * 10**9  # "short" has expired
    before = fake.observe()
    status, body = call(api, "PUT", "/rules?dry_run=1", {"rules": [
        {"name": "cache", "dst": ["10.0.0.6", "10.0.1.0/24"], "rate": "5mbit", "ttl": "10m"},
        {"name": "db", "dst": ["10.0.0.5"], "delay": "50ms"},
        {"name": "same", "dst": ["10.0.0.7"], "delay": "5ms"},
        {"name": "short", "dst": ["10.0.0.8"], "delay": "5ms", "ttl": "1s"}]})
    assert status == 200 and body["dry_run"] is True and fake.observe() == before
    assert body["changes"] and all(isinstance(c, str) for c in body["changes"])  # the existing field stays
    assert body["rule_changes"] == [
        {"name": "cache", "change": "updated", "fields": {"rate": {"old": "2mbit", "new": "5mbit"}},
         "restarts_ttl": True, "dst_added": ["10.0.1.0/24"], "dst_added_count": 1},
        {"name": "db", "change": "created", "fields": {"delay": "50ms"}, "dst_added": ["10.0.0.5/32"],
         "dst_added_count": 1},
        {"name": "old", "change": "deleted"},
        {"name": "short", "change": "created", "fields": {"delay": "5ms", "ttl": "1s"}, "expired": True,
         "dst_added": ["10.0.0.8/32"], "dst_added_count": 1},
    ]
    props = openapi.document("x")["components"]["schemas"]["Replaced"]["properties"]
    assert {"changes", "rule_changes", "dry_run"} <= set(props)
    change_props = openapi.document("x")["components"]["schemas"]["RuleChange"]["properties"]
    assert {k for c in body["rule_changes"] for k in c} <= set(change_props)


@pytest.mark.parametrize("body", [None, [], "rules", 3])
def test_a_rule_set_body_that_is_not_an_object_changes_nothing(env, body):
    fake, _, api = env
    call(api, "PUT", "/rules/db", DB)
    before = fake.observe()
    resp = api.handle("PUT", "/rules", {"Authorization": f"Bearer {TOKEN}"}, json.dumps(body).encode(), "x")
    assert resp.status == 422 and "expected an object" in resp.json()["error"]
    assert fake.observe() == before


def test_a_null_rule_list_is_documented_as_no_rules(env):
    _, _, api = env
    assert openapi.document("x")["components"]["schemas"]["RuleSet"]["properties"]["rules"]["nullable"] is True
    assert call(api, "PUT", "/rules/db", DB)[0] == 200
    assert call(api, "PUT", "/rules", {"rules": None}) == (200, {"rules": []})


@pytest.mark.parametrize("query", ["dry_run=", "dry_run=yes", "dry_run=1&dry_run=0"])
def test_a_dry_run_flag_that_is_not_true_or_false_is_refused_not_ignored(env, query):
    # Found by schemathesis: parse_qs dropped "dry_run=", and the rules were applied for real.
    fake, _, api = env
    call(api, "PUT", "/rules/db", DB)
    before = fake.observe()
    status, body = call(api, "PUT", f"/rules?{query}", {"rules": []})
    assert status == 422 and body["field"] == "dry_run"
    assert fake.observe() == before
