"""The HTTP API as a function (Api.handle) over the in-memory datapath: no sockets, no root."""

import json
import logging
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shaper.http import openapi
from shaper.http.api import MAX_BODY_BYTES, Api
from shaper.errors import KernelError
from shaper.datapath.fake import FakeDatapath
from shaper.core.model import FIELD_NAMES, Prefix
from shaper.control.service import Service

TOKEN = "s3cret-token"
T0 = 1_000_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def env():
    fake, clock = FakeDatapath(), Clock()
    service = Service(fake, "eth0", clock=clock)
    service.start()
    return fake, clock, service


def call(api, method, path, body=None, token=None, raw=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    resp = api.handle(method, path, headers, data, "10.0.0.9")
    return resp.status, (resp.json() if resp.content_type == "application/json" else resp.body.decode())


@pytest.fixture
def api(env):
    return Api(env[2])


A = {"dst": ["10.0.0.0/24", "fd00::1"], "delay": "50ms", "jitter": "5ms", "loss": "1%", "rate": "10mbit",
     "ttl": "60s"}


def test_put_get_list_delete_one_rule(api, env):
    fake = env[0]
    status, body = call(api, "PUT", "/rules/a", A)
    assert status == 200
    assert body == {"name": "a", "dst": ["10.0.0.0/24", "fd00::1/128"], "delay": "50ms", "jitter": "5ms",
                    "loss": "1%", "rate": "10mbit", "ttl": "1m"}
    assert call(api, "GET", "/rules/a") == (200, body)
    assert call(api, "GET", "/rules") == (200, {"rules": [body]})
    assert len(fake.entries) == 2 and len(fake.classes) == 1
    # The stored rule can be PUT back as it is (idempotent: nothing but the TTL restarts).
    executed = len(fake.executed)
    assert call(api, "PUT", "/rules/a", body)[0] == 200
    assert all(type(op).__name__ in ("WriteRecord", "UpsertEntries") for op in fake.executed[executed:])
    assert call(api, "DELETE", "/rules/a") == (200, {"deleted": ["a"]})
    assert call(api, "GET", "/rules") == (200, {"rules": []})
    assert not fake.entries and not fake.classes and not fake.records
    assert call(api, "DELETE", "/rules/a")[0] == 404
    assert call(api, "GET", "/rules/a")[0] == 404


def test_put_changes_one_rule_and_leaves_the_others(api, env):
    fake = env[0]
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "50ms"})
    call(api, "PUT", "/rules/b", {"dst": ["10.0.0.2"], "rate": "1mbit"})
    slot_b = fake.observe().rules["b"].slot
    before = len(fake.executed)
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1", "10.0.0.3"], "delay": "10ms"})
    touched = {getattr(op, "slot", None) for op in fake.executed[before:]}
    assert slot_b not in touched
    assert fake.observe().rules["a"].rule.delay_us == 10_000


def test_bad_input_names_the_field_and_changes_nothing(api, env):
    fake = env[0]
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "50ms"})
    before = (dict(fake.records), dict(fake.entries), len(fake.executed))
    cases = [
        ({"dst": ["10.0.0.1"], "delay": "50 parsecs"}, "delay"),
        ({"dst": ["10.0.0.1"], "delay": "5ms", "colour": "red"}, "colour"),
        ({"dst": ["10.0.0.300"]}, "dst[0]"),
        ({"dst": []}, "dst"),
        ({"dst": ["10.0.0.1"], "loss": "150%"}, "loss"),
        ({"dst": ["10.0.0.1"], "jitter": "5ms"}, "jitter"),
        ({"name": "other", "dst": ["10.0.0.1"]}, "name"),
        (["10.0.0.1"], "rule"),
    ]
    for body, field in cases:
        status, err = call(api, "PUT", "/rules/a", body)
        assert status == 422, body
        assert err["field"] == field and err["expected"] and field in err["error"]
    status, err = call(api, "PUT", "/rules/a", raw=b"{not json")
    assert status == 400 and err["field"] == "body" and "JSON" in err["error"]
    assert call(api, "PUT", "/rules/a", raw=b"")[0] == 400
    assert call(api, "PUT", "/rules/bad name!", {"dst": ["10.0.0.1"]})[0] == 422
    assert (dict(fake.records), dict(fake.entries), len(fake.executed)) == before


def test_a_destination_owned_by_another_rule_is_refused(api):
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "50ms"})
    status, err = call(api, "PUT", "/rules/b", {"dst": ["10.0.0.1"], "delay": "5ms"})
    assert status == 422 and "'a'" in err["error"]


def test_replace_is_atomic(api, env):
    fake = env[0]
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "50ms"})
    before = (dict(fake.records), dict(fake.entries), len(fake.executed))
    doc = {"rules": [{"name": "x", "dst": ["10.1.0.0/16"], "rate": "5mbit"},
                     {"name": "y", "dst": ["10.2.0.1"], "loss": "2%"},
                     {"name": "z", "dst": ["10.3.0.1"], "rate": "fast"}]}
    status, err = call(api, "PUT", "/rules", doc)
    assert status == 422 and err["field"] == "rules[2].rate"
    assert (dict(fake.records), dict(fake.entries), len(fake.executed)) == before
    doc["rules"][2]["rate"] = "1mbit"
    status, body = call(api, "PUT", "/rules", doc, )
    assert status == 200 and [r["name"] for r in body["rules"]] == ["x", "y", "z"]
    assert sorted(fake.observe().rules) == ["x", "y", "z"]
    assert call(api, "PUT", "/rules", {"rules": [], "extra": 1})[0] == 422


@pytest.mark.parametrize("prefer, minimal", [
    ("return=minimal", True), ('RETURN="Minimal"; x=1', True), ("respond-async, return=minimal", True),
    ("return=representation", False), ("return", False), ("minimal", False), ("", False), (None, False)])
def test_replace_answers_with_names_when_the_client_prefers_minimal(api, env, prefer, minimal):
    """Prefer: return=minimal (RFC 7240) on PUT /rules: the names, not a million destinations written
    back; the same with ?dry_run=1, and anything else is the full answer (a preference, never an error)."""
    doc = {"rules": [{"name": "x", "dst": ["10.1.0.0/16"], "rate": "5mbit"}, {"name": "y", "dst": ["10.2.0.1"]}]}
    headers = {} if prefer is None else {"prefer": prefer}
    for path in ("/rules?dry_run=1", "/rules"):
        resp = api.handle("PUT", path, headers, json.dumps(doc).encode(), "10.0.0.9")
        body = resp.json()
        assert resp.status == 200 and ("names" in body) is minimal and ("rules" in body) is not minimal
        assert (resp.headers.get("Preference-Applied") == "return=minimal") is minimal
        assert body.get("names", [r["name"] for r in body.get("rules", ())]) == ["x", "y"]
        assert body.get("dry_run") is (True if "dry_run" in path else None)
        schema = openapi.document("x")["components"]["schemas"]["Replaced"]
        assert set(body) <= set(schema["properties"]) and any(set(r["required"]) <= set(body) for r in schema["anyOf"])
    assert sorted(r.name for r in env[2].rules()) == ["x", "y"]


def test_replace_rolls_back_when_the_kernel_refuses(api, env):
    fake, _, service = env
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "50ms"})
    before = fake.observe()

    def refuse(op):
        if type(op).__name__ == "SetLeaf" and op.rule.name == "y":
            raise KernelError("create the leaf of", "class 5348:3", 2)

    fake.before_op = refuse
    doc = {"rules": [{"name": "x", "dst": ["10.1.0.1"], "delay": "1ms"}, {"name": "y", "dst": ["10.2.0.1"],
                                                                         "delay": "2ms"}]}
    status, err = call(api, "PUT", "/rules", doc)
    assert status == 500 and "leaf" in err["error"]
    assert fake.observe().rules.keys() == before.rules.keys() and fake.entries == before.entries
    metrics = scrape(api)
    assert metrics["shaper_errors_total"][(("interface", "eth0"), ("op", "apply"))] == 1


def test_dry_run_plans_and_changes_nothing(api, env):
    fake = env[0]
    status, body = call(api, "PUT", "/rules?dry_run=1", {"rules": [{"name": "x", "dst": ["10.1.0.1"],
                                                                    "delay": "1ms"}]})
    assert status == 200 and body["dry_run"] is True
    assert "create class slot 1 (x)" in body["changes"] and "write 1 destination entry" in body["changes"]
    assert not fake.executed


def test_delete_all(api, env):
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "50ms"})
    call(api, "PUT", "/rules/b", {"dst": ["10.0.0.2"], "rate": "1mbit"})
    assert call(api, "DELETE", "/rules") == (200, {"deleted": ["a", "b"]})
    assert call(api, "DELETE", "/rules") == (200, {"deleted": []})
    assert not env[0].classes


def test_latency_compatibility_endpoint(api, env):
    fake = env[0]
    status, body = call(api, "GET", "/latency/20ms")
    assert status == 200 and body == {"name": "latency", "dst": ["::/0", "0.0.0.0/0"], "delay": "20ms"}
    # Every destination, v4 and v6, goes to the latency rule's class.
    slot = fake.observe().rules["latency"].slot
    for addr in ("10.9.8.7", "fd00::5"):
        assert fake.steer(Prefix.parse(addr, "x").addr, T0) & 0xFFFF == slot
    # A more specific rule still wins for its destinations.
    call(api, "PUT", "/rules/db", {"dst": ["10.0.0.5"], "delay": "50ms"})
    assert fake.steer(Prefix.parse("10.0.0.5", "x").addr, T0) & 0xFFFF == fake.observe().rules["db"].slot
    assert call(api, "GET", "/latency/35ms")[1]["delay"] == "35ms"
    assert call(api, "GET", "/latency/0ms") == (200, {"deleted": ["latency"]})
    assert call(api, "GET", "/latency/0") == (200, {"deleted": []})  # nothing left to delete
    assert sorted(fake.observe().rules) == ["db"]
    status, err = call(api, "GET", "/latency/fast")
    assert status == 422 and err["field"] == "path.delay"


def test_stats_report_both_counters(api, env):
    fake, clock, _ = env
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.0/24"], "delay": "50ms", "ttl": "90s"})
    for _ in range(3):
        fake.count(Prefix.parse("10.0.0.7", "x").addr, clock.now, nbytes=100)
    clock.now += 30 * 10**9
    status, body = call(api, "GET", "/stats")
    assert status == 200 and body["interface"] == "eth0"
    (row,) = body["rules"]
    assert row["matched_packets"] == 3 and row["matched_bytes"] == 300
    assert row["classid"] == "5348:1" and row["expires_in"] == "1m0s" and row["leaf"] == "netem"
    for key in ("class_bytes", "class_packets", "drops", "overlimits", "requeues", "backlog_bytes",
                "backlog_packets"):
        assert key in row


def _peer(text):
    return Prefix.parse(text, "x").addr


@pytest.fixture
def directions(api, env):
    """pg shapes both directions (tcp 5432 and 8000-8100), in only ingress (from its sources), out only egress;
    each counted where its traffic goes, with traffic no rule takes beside it."""
    fake, clock, _ = env
    for name, body in (("pg", {"dst": ["10.0.0.0/24"], "direction": "both", "protocol": "tcp",
                               "ports": [5432, "8000-8100"], "delay": "50ms"}),
                       ("in", {"src": ["10.0.1.0/24"], "rate": "1mbit"}),
                       ("out", {"dst": ["10.0.2.1"], "rate": "1mbit"})):
        assert call(api, "PUT", f"/rules/{name}", body)[0] == 200
    for _ in range(3):
        fake.count(_peer("10.0.0.7"), clock.now, 100, "egress", 6, 5432)
    fake.count(_peer("10.0.0.7"), clock.now, 200, "ingress", 6, 8080)
    fake.count(_peer("10.0.0.7"), clock.now, 200, "ingress", 17, 8080)  # udp: not pg's
    for _ in range(2):
        fake.count(_peer("10.0.1.9"), clock.now, 300, "ingress")
    fake.count(_peer("10.0.1.9"), clock.now, 300, "egress")  # to in's peer: no egress rule has it
    return fake


def test_stats_have_a_row_per_rule_and_direction(api, directions):
    status, body = call(api, "GET", "/stats")
    assert status == 200
    rows = {(r["name"], r["direction"]): r for r in body["rules"]}
    assert list(rows) == [("in", "ingress"), ("out", "egress"), ("pg", "egress"), ("pg", "ingress")]
    counts = {k: (r["matched_packets"], r["matched_bytes"]) for k, r in rows.items()}
    assert counts == {("in", "ingress"): (2, 600), ("out", "egress"): (0, 0), ("pg", "egress"): (3, 300),
                      ("pg", "ingress"): (1, 200)}
    # Each row is the rule's to_dict with the row's direction; one slot, one classid, both trees.
    for d in ("egress", "ingress"):
        assert rows["pg", d] | {"direction": "both"} == {
            "name": "pg", "dst": ["10.0.0.0/24"], "direction": "both", "protocol": "tcp",
            "ports": [5432, "8000-8100"], "delay": "50ms", "classid": "5348:1", "matched_packets": counts["pg", d][0],
            "matched_bytes": counts["pg", d][1], "class_bytes": 0, "class_packets": 0, "drops": 0, "overlimits": 0,
            "requeues": 0, "backlog_bytes": 0, "backlog_packets": 0, "leaf": "netem"}
    assert rows["in", "ingress"]["dst"] == ["10.0.1.0/24"] and rows["in", "ingress"]["leaf"] == "pfifo"
    # What the OpenAPI document promises of a row.
    schema = openapi.document("x")["paths"]["/stats"]["get"]["responses"]["200"]["content"]["application/json"]
    row_schema = schema["schema"]["properties"]["rules"]["items"]
    for row in body["rules"]:
        assert set(row_schema["required"]) <= set(row)
        assert row["direction"] in row_schema["properties"]["direction"]["enum"]


def test_a_rule_without_its_ingress_class_still_has_its_ingress_row(api, directions):
    del directions.ingress_classes[1]  # pg's class in the ifb's tree, gone (a rule being repaired)
    rows = {(r["name"], r["direction"]): r for r in call(api, "GET", "/stats")[1]["rules"]}
    assert "drops" not in rows["pg", "ingress"] and rows["pg", "ingress"]["matched_packets"] == 1
    assert rows["pg", "egress"]["drops"] == 0


def test_metrics_have_a_series_per_rule_and_direction(api, directions):
    m = scrape(api)

    def by(name):
        return {(dict(k)["rule"], dict(k)["direction"]): v for k, v in m[name].items()}

    assert by("shaper_rule_matched_packets_total") == {("in", "ingress"): 2, ("out", "egress"): 0,
                                                       ("pg", "egress"): 3, ("pg", "ingress"): 1}
    assert by("shaper_rule_matched_bytes_total")[("in", "ingress")] == 600
    for name in ("shaper_class_bytes_total", "shaper_class_drops_total", "shaper_class_backlog_bytes"):
        assert set(by(name)) == {("in", "ingress"), ("out", "egress"), ("pg", "egress"), ("pg", "ingress")}, name
    assert by("shaper_rule_delay_seconds") == {("pg", "egress"): 0.05, ("pg", "ingress"): 0.05}
    assert by("shaper_rule_rate_bytes_per_second") == {("in", "ingress"): 125_000.0, ("out", "egress"): 125_000.0}
    assert m["shaper_rules"] == {(("interface", "eth0"),): 3}  # a rule in both directions is one rule
    entries = {dict(k)["direction"]: v for k, v in m["shaper_map_entries"].items()}
    assert entries == {"egress": len(directions.entries), "ingress": len(directions.ingress_entries)}
    assert entries["ingress"] > 0


def test_an_egress_only_rule_set_does_not_read_the_ingress_side(api, env):
    fake = env[0]
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "5ms"})
    read = []
    counters, class_stats = fake.counters, fake.class_stats

    def counters_spy(slots, direction="egress"):
        read.append(("counters", direction))
        return counters(slots, direction)

    def class_stats_spy(direction="egress", leaves=True):
        read.append(("class_stats", direction, leaves))
        return class_stats(direction, leaves)

    fake.counters, fake.class_stats = counters_spy, class_stats_spy
    call(api, "GET", "/stats")
    assert sorted(set(read)) == [("class_stats", "egress", True), ("counters", "egress")]
    read.clear()
    scrape(api)  # a scrape's counters need no leaf kinds: the class dump alone
    assert sorted(set(read)) == [("class_stats", "egress", False), ("counters", "egress")]


def test_ttl_restarts_on_put_and_expired_rules_are_removed(api, env):
    fake, clock, service = env
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "5ms", "ttl": "10s"})
    call(api, "PUT", "/rules/b", {"dst": ["10.0.0.2"], "delay": "5ms"})
    assert service.next_expiry_ns == T0 + 10 * 10**9
    clock.now += 6 * 10**9
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "5ms", "ttl": "10s"})
    assert service.next_expiry_ns == clock.now + 10 * 10**9
    clock.now += 6 * 10**9
    assert service.expire() == []  # 12 s after the first PUT, 6 s after the renewal
    clock.now += 5 * 10**9
    assert service.expire() == ["a"]
    assert sorted(fake.observe().rules) == ["b"] and service.next_expiry_ns is None
    changes = scrape(api)["shaper_rule_changes_total"]
    assert changes[(("change", "expired"), ("interface", "eth0"))] == 1
    assert changes[(("change", "created"), ("interface", "eth0"))] == 2
    assert changes[(("change", "updated"), ("interface", "eth0"))] == 1


def test_an_expired_rule_is_not_listed(api, env):
    clock = env[1]
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "5ms", "ttl": "1s"})
    clock.now += 10**9 - 1
    assert call(api, "GET", "/rules/a")[0] == 200  # a nanosecond left
    clock.now += 1
    assert call(api, "GET", "/rules/a")[0] == 404  # its deadline: expired, as the list says
    assert call(api, "GET", "/rules") == (200, {"rules": []})
    clock.now += 10**9
    assert call(api, "GET", "/rules") == (200, {"rules": []})
    assert call(api, "GET", "/rules/a")[0] == 404


def test_auth_guards_changes_only(env):
    service = env[2]
    api = Api(service, token=TOKEN)
    for method, path, body in (("PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "5ms"}),
                               ("PUT", "/rules", {"rules": []}), ("DELETE", "/rules", None),
                               ("DELETE", "/rules/a", None), ("GET", "/latency/20ms", None)):
        for token in (None, "wrong", TOKEN[:-1], TOKEN + "x"):
            resp = api.handle(method, path, {"Authorization": f"Bearer {token}"} if token else {},
                              json.dumps(body).encode() if body else b"")
            assert resp.status == 401, (method, path, token)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert api.handle(method, path, {"Authorization": f"Basic {TOKEN}"}, b"").status == 401
    assert not env[0].executed
    for path in ("/rules", "/stats", "/metrics", "/healthz", "/readyz", "/openapi.json", "/"):
        assert call(api, "GET", path)[0] == 200, path
    assert call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "5ms"}, token=TOKEN)[0] == 200
    assert api.handle("DELETE", "/rules/a", {"authorization": f"bearer {TOKEN}"}, b"").status == 200


def test_routes_methods_and_readiness(env):
    fake, clock, _ = env
    api = Api(Service(fake, "eth0", clock=clock))  # not started: not attached yet
    assert call(api, "GET", "/healthz") == (200, {"status": "ok"})
    assert call(api, "GET", "/readyz")[0] == 503
    assert call(api, "GET", "/rules")[0] == 503
    assert call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"]})[0] == 503
    assert call(api, "GET", "/metrics")[0] == 200
    api.service.start()
    assert call(api, "GET", "/readyz")[0] == 200
    assert call(api, "GET", "/rules/")[0] == 200  # a trailing slash is the same resource
    assert call(api, "GET", "/nope")[0] == 404
    resp = api.handle("POST", "/rules", {}, b"")
    assert resp.status == 405 and resp.headers["Allow"] == "DELETE, GET, PUT"
    assert call(api, "POST", "/rules/a")[0] == 405  # PATCH /rules/{name} exists: another method


def test_openapi_document_matches_the_routes_and_the_model(api):
    status, doc = call(api, "GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = {(r.method, r.path) for r in api.routes}
    assert documented == served
    assert set(openapi.RULE_FIELDS) == set(FIELD_NAMES)
    for route in api.routes:
        op = doc["paths"][route.path][route.method.lower()]
        assert ("security" in op) == route.mutates, route.path
    assert set(call(api, "GET", "/")[1]["endpoints"]) == {f"{m} {p}" for m, p in served}


def test_body_limit_is_generous_enough_for_the_largest_rule_set():
    per_prefix = len(json.dumps("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128")) + 2
    assert 262_144 * per_prefix < MAX_BODY_BYTES


def scrape(api) -> dict:
    status, text = call(api, "GET", "/metrics")
    assert status == 200
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_expose_every_rule_and_the_daemon_counters(api, env):
    fake, clock, _ = env
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.0/24", "fd00::/64"], "delay": "50ms"})
    call(api, "PUT", "/rules/b", {"dst": ["10.0.1.1"], "rate": "1mbit"})
    fake.count(Prefix.parse("10.0.0.7", "x").addr, clock.now, nbytes=1500)
    m = scrape(api)
    a = (("classid", "5348:1"), ("direction", "egress"), ("interface", "eth0"), ("rule", "a"))
    assert m["shaper_rule_matched_packets_total"][a] == 1 and m["shaper_rule_matched_bytes_total"][a] == 1500
    for name in ("shaper_class_bytes_total", "shaper_class_packets_total", "shaper_class_drops_total",
                 "shaper_class_overlimits_total", "shaper_class_requeues_total", "shaper_class_backlog_bytes",
                 "shaper_class_backlog_packets", "shaper_rule_matched_packets_total",
                 "shaper_rule_matched_bytes_total"):
        assert len(m[name]) == 2, name
        # Never a label per destination address.
        assert all(dict(k).keys() == {"interface", "rule", "classid", "direction"} for k in m[name]), name
    assert m["shaper_rules"][(("interface", "eth0"),)] == 2
    assert m["shaper_map_entries"] == {(("direction", "egress"), ("interface", "eth0")): 3,
                                       (("direction", "ingress"), ("interface", "eth0")): 0}
    assert m["shaper_apply_seconds_count"][(("interface", "eth0"),)] == 2
    assert m["shaper_errors_total"][(("interface", "eth0"), ("op", "apply"))] == 0
    assert not any(re.search(r"\d+\.\d+\.\d+\.\d+|::", str(k)) for fam in m.values() for k in fam)


def test_each_change_logs_whether_it_was_planned_alone_or_with_the_whole_set(api, caplog):
    # The log line of a slow change says which path it took (the tail of change latency is read from it).
    def planned(event: str) -> str:
        return [r.fields for r in caplog.records if r.getMessage() == event][-1]["planned"]

    with caplog.at_level(logging.INFO, logger="shaper"):
        assert call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "5ms"})[0] == 200
        assert planned("rule.put") == "whole"  # the first change: the state was read back, not planned
        assert call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "6ms"})[0] == 200
        assert planned("rule.put") == "patch"  # address-only, after a plan: plan.patch
        assert call(api, "PUT", "/rules/b", {"dst": ["10.0.0.2"], "ports": 53, "protocol": "udp",
                                             "delay": "5ms"})[0] == 200
        assert planned("rule.put") == "whole"  # a port rule re-plans the set
        assert call(api, "PUT", "/rules", {"rules": [{"name": "c", "dst": ["10.0.0.3"], "rate": "1mbit"}]})[0] == 200
        assert planned("rules.replace") == "whole"


def test_metrics_follow_every_change_between_scrapes(api, env):
    # A scrape keeps its order of samples while the state is unchanged: each change must show at once.
    def rules_of(m) -> dict[str, set]:
        return {dict(k)["rule"]: {dict(k2)["direction"] for k2 in m["shaper_class_bytes_total"]
                                  if dict(k2)["rule"] == dict(k)["rule"]} for k in m["shaper_class_bytes_total"]}

    call(api, "PUT", "/rules/b", {"dst": ["10.0.1.1"], "rate": "1mbit"})
    assert rules_of(scrape(api)) == rules_of(scrape(api)) == {"b": {"egress"}}
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "5ms", "direction": "both"})
    m = scrape(api)
    assert rules_of(m) == {"a": {"egress", "ingress"}, "b": {"egress"}}
    assert list(dict.fromkeys(dict(k)["rule"] for k in m["shaper_class_bytes_total"])) == ["a", "b"]  # by name
    call(api, "PUT", "/rules/b", {"dst": ["10.0.1.1"], "rate": "1mbit", "direction": "ingress"})
    assert rules_of(scrape(api)) == {"a": {"egress", "ingress"}, "b": {"ingress"}}
    call(api, "DELETE", "/rules/a")
    assert rules_of(scrape(api)) == {"b": {"ingress"}}


def test_a_failed_scrape_is_counted_and_still_answers(api, env):
    fake = env[0]
    call(api, "PUT", "/rules/a", {"dst": ["10.0.0.1"], "delay": "5ms"})

    def broken(slots, direction="egress"):
        raise KernelError("read the counters of", "rule_stats", 13)

    fake.counters = broken
    m = scrape(api)
    assert "shaper_rule_matched_bytes_total" not in m
    assert m["shaper_errors_total"][(("interface", "eth0"), ("op", "scrape"))] == 1
    assert call(api, "GET", "/stats")[0] == 500


def test_openapi_patterns_accept_what_the_parser_accepts():
    import re as _re

    from shaper.core.model import parse_rule

    samples = {"delay": ["20ms", "1.5s", "500us", "0", "2m"], "ttl": ["60s", "1h"], "loss": ["1%", "0.5%", "100%"],
               "rate": ["10mbit", "1.5gbit", "100kbps"], "burst": ["32kb", "2mb"]}
    for field, values in samples.items():
        for value in values:
            assert _re.match(openapi.RULE_FIELDS[field]["pattern"], value), (field, value)
            extra = {"rate": "1mbit"} if field == "burst" else {}
            parse_rule({"name": "x", "dst": ["10.0.0.1"], field: value, **extra})
    for value in ("20", "fast", "1e3ms", "-1ms", ""):
        assert not _re.match(openapi.RULE_FIELDS["delay"]["pattern"], value), value
    assert _re.match(openapi.NAME_PATTERN, "db-1.a_b") and not _re.match(openapi.NAME_PATTERN, "-x")


def test_dry_run_flag_is_strict(api):
    assert call(api, "PUT", "/rules?dry_run=false", {"rules": []})[1] == {"rules": []}
    status, err = call(api, "PUT", "/rules?dry_run=null", {"rules": []})
    assert status == 422 and err["field"] == "dry_run"
    assert call(api, "PUT", "/rules?dry_run=1&dry_run=1", {"rules": []})[0] == 422


def test_the_readme_metrics_table_lists_every_family_with_its_labels(api, directions):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("\n## Metrics\n"):]
    section = section[:section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `shaper_") and len(cells) == 4:
            for name in re.findall(r"`(shaper_[a-z_]+)`", cells[0]):
                rows[name] = cells[1]
    families = {}
    for fam in text_string_to_metric_families(call(api, "GET", "/metrics")[1]):
        if fam.name.startswith("shaper_") and not fam.name.endswith("_created"):  # prometheus_client's own
            families[fam.name] = {k for s in fam.samples for k in s.labels} - {"interface", "le"}
    for name, keys in families.items():
        shown = next((rows[n] for n in (name, name + "_total") if n in rows), None)
        assert shown is not None, f"README's Metrics table does not list {name}"
        if keys == {"rule", "classid", "direction"}:
            assert shown == "*rule*", name
        else:
            assert set(re.findall(r"`(\w+)`", shown)) == keys, name
