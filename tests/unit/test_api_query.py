"""Finding 6 and 13 of issue 12: the query string is checked like the body (an unknown parameter
is refused, never ignored), every changing route previews with ?dry_run=1 and changes nothing,
and a JSON object with a key twice is refused naming the key."""

import json

import pytest

from shaper.http.api import Api
from shaper.datapath.fake import FakeDatapath
from shaper.control.service import Service

AUTH = {"Authorization": "Bearer t0ken"}


@pytest.fixture
def api():
    service = Service(FakeDatapath(), "eth0", clock=lambda: 10**12)
    service.start()
    a = Api(service, "t0ken")
    for name, dst in (("a", "10.0.0.1"), ("b", "10.0.0.2")):
        assert a.handle("PUT", f"/rules/{name}", AUTH, json.dumps({"dst": [dst], "delay": "5ms"}).encode()).status == 200
    return a


def rules(api) -> dict:
    return {r["name"]: r for r in api.handle("GET", "/rules", {}, b"").json()["rules"]}


@pytest.mark.parametrize("method,target", [
    ("DELETE", "/rules?DRY_RUN=1"), ("DELETE", "/rules?dryrun=1"), ("DELETE", "/rules?force=1"),
    ("PUT", "/rules/a?dryrun=1"), ("DELETE", "/rules/a?DRY_RUN=1"), ("PATCH", "/rules/a?dry=1"),
    ("PUT", "/rules?Dry_Run=true"), ("GET", "/latency/0?dryrun=1"), ("GET", "/rules?dry_run=1"),
    ("GET", "/readyz?x=1"),
])
def test_an_unknown_query_parameter_is_refused_and_changes_nothing(api, method, target):
    before = rules(api)
    body = json.dumps({"rules": []} if target.startswith("/rules?") else {"dst": ["10.0.0.9"]}).encode()
    resp = api.handle(method, target, AUTH, body)
    key = target.split("?")[1].split("=")[0]
    assert resp.status == 422 and resp.json()["field"] == key and key in resp.json()["error"]
    assert rules(api) == before


def test_a_near_miss_is_told_the_right_name(api):
    resp = api.handle("DELETE", "/rules?dryrun=1", AUTH, b"")
    assert "did you mean 'dry_run'" in resp.json()["error"] and resp.json()["expected"] == "dry_run"


def test_delete_all_dry_run_lists_what_it_would_delete_and_deletes_nothing(api):
    resp = api.handle("DELETE", "/rules?dry_run=1", AUTH, b"")
    out = resp.json()
    assert resp.status == 200 and out["dry_run"] is True and out["deleted"] == ["a", "b"] and out["changes"]
    assert {c["name"] for c in out["rule_changes"]} == {"a", "b"}
    assert set(rules(api)) == {"a", "b"}


def test_every_changing_route_previews_without_applying(api):
    before = rules(api)
    cases = [
        ("PUT", "/rules/a?dry_run=1", {"dst": ["10.0.0.1"], "delay": "50ms"}),
        ("PUT", "/rules/new?dry_run=true", {"dst": ["10.0.0.7"], "rate": "1mbit"}),
        ("PATCH", "/rules/b?dry_run=1", {"delay": "9ms"}),
        ("DELETE", "/rules/a?dry_run=1", None),
        ("GET", "/latency/30ms?dry_run=1", None),
        ("GET", "/latency/0?dry_run=1", None),
        ("PUT", "/rules?dry_run=1", {"rules": []}),
    ]
    for method, target, body in cases:
        resp = api.handle(method, target, AUTH, json.dumps(body).encode() if body is not None else b"")
        assert resp.status == 200 and resp.json()["dry_run"] is True, (target, resp.json())
        assert rules(api) == before, target
    assert api.handle("PUT", "/rules/a?dry_run=1", AUTH, b'{"dst": ["10.0.0.1"], "delay": "50ms"}').json()[
        "delay"] == "50ms"
    assert api.handle("DELETE", "/rules/zz?dry_run=1", AUTH, b"").status == 404
    assert api.handle("DELETE", "/rules?dry_run=maybe", AUTH, b"").status == 422
    assert api.handle("DELETE", "/rules?dry_run=0", AUTH, b"").json()["deleted"] == ["a", "b"]  # 0: for real
    assert rules(api) == {}


def test_dry_run_still_needs_the_token(api):
    assert api.handle("DELETE", "/rules?dry_run=1", {}, b"").status == 401


@pytest.mark.parametrize("body,key", [
    (b'{"dst": ["10.0.0.9"], "delay": "5ms", "delay": "500ms"}', "delay"),
    (b'{"rules": [{"name": "x", "dst": ["10.0.0.9"], "dst": ["10.0.0.8"]}]}', "dst"),
    (b'{"rules": [], "rules": [{"name": "x", "dst": ["10.0.0.9"]}]}', "rules"),
])
def test_a_key_twice_in_one_object_is_refused_naming_it(api, body, key):
    target = "/rules" if body.startswith(b'{"rules"') else "/rules/x"
    before = rules(api)
    resp = api.handle("PUT", target, AUTH, body)
    assert resp.status == 400 and resp.json()["field"] == key and "twice" in resp.json()["error"]
    assert rules(api) == before
