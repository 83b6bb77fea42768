"""plan.patch (one rule changed without re-planning the others) against the whole-set plan.

patch must give exactly what plan_with_outcome gives for the same change (operations, in order,
and outcome), or None; and it must not answer None for the change it exists for (an address-only
rule put or deleted among address-only rules)."""

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shaper.control.controller import Controller
from shaper.core import plan as P
from shaper.core import model
from shaper.core.model import parse_rule, validate_ruleset
from shaper.datapath.fake import FakeDatapath
from shaper.errors import InvalidInput, NotFound

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

POOL = [
    {"dst": ["10.0.0.0/8"], "rate": "10mbit"},
    {"dst": ["10.1.0.0/16", "fd00::/64"], "delay": "5ms"},
    {"dst": ["10.1.2.3"], "delay": "20ms", "jitter": "2ms", "loss": "1%"},
    {"dst": ["10.1.2.3"], "rate": "20mbit"},  # the same peer as the one above: refused beside it
    {"dst": ["::/0"], "rate": "1mbit"},
    {"dst": ["10.1.2.0/24"], "rate": "2mbit", "ttl": "1h"},
    {"dst": ["10.1.2.0/24"], "rate": "2mbit", "ttl": "1ms"},  # expires between steps
    {"dst": ["fd00::5", "10.9.9.9"], "loss": "5%"},
    {"dst": ["10.9.9.9"], "direction": "ingress", "rate": "3mbit"},
    {"dst": ["10.7.0.0/16", "10.7.1.0/24"], "direction": "both", "delay": "1ms"},
    {"dst": ["10.8.0.1"], "protocol": "tcp", "ports": [5432], "rate": "4mbit"},  # not address-only: no patch
    {"dst": ["10.6.0.0/16"], "except": ["10.6.1.0/24"], "rate": "5mbit"},  # an except: no patch
    {"dst": ["10.1.2.3", "10.5.5.5"], "rate": "7mbit"},
]
NAMES = ["a", "b", "c", "d"]
STEPS = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from([None, *range(len(POOL))])), min_size=1,
                 max_size=12)


def _whole(observed, name, rule, now):
    """What the controller plans without patch: the live rules with `name` edited, validated whole."""
    live = {n: o.rule for n, o in observed.rules.items() if n not in observed.expired(now)}
    if rule is None:
        if name not in live:
            raise NotFound(name)
        del live[name]
    else:
        live[name] = rule
    return P.plan_with_outcome(validate_ruleset(live.values()), observed, now, [name])


@SETTINGS
@given(STEPS)
def test_patch_plans_what_the_whole_plan_plans(steps):
    fake = FakeDatapath()
    now = 10**12
    ctl = Controller(fake, clock=lambda: now)
    observed = ctl.apply([]).observed
    for name, pick in steps:
        now += 10**7  # 10 ms a step: the 1 ms TTL expires before the next
        rule = None if pick is None else parse_rule({"name": name, **POOL[pick]})
        fast = P.patch(observed, name, rule, now)
        try:
            ops, outcome = _whole(observed, name, rule, now)
        except (InvalidInput, NotFound):
            assert fast is None  # refusals are the whole plan's, with its words
            continue
        expired = bool(observed.expired(now))
        if observed.address_only and not expired and (rule is None or not (rule.selects_ports or rule.excepts)):
            assert fast is not None  # the change patch is for
        if fast is not None:
            assert fast[0] == ops
            assert fast[1] == outcome
            assert fast[1].next_expiry_ns == replace(outcome).next_expiry_ns
            assert fast[1].slots_in_use == replace(outcome).slots_in_use
            assert fast[1].ttl_lengths >= replace(outcome).ttl_lengths
        fake.execute(ops)
        assert outcome == fake.observe()
        observed = outcome
        simple = all(not (r.rule.selects_ports or r.rule.excepts) for r in observed.rules.values())
        if simple and (rule is None or not (rule.selects_ports or rule.excepts)):
            assert observed.address_only


def _rules(n):
    return [parse_rule({"name": f"r{i}", "dst": [f"10.{i >> 8}.{i & 255}.1"], "rate": "10mbit"}) for i in range(n)]


def test_one_rule_among_many_is_patched_not_replanned():
    now = 10**12
    observed = P.plan_with_outcome(_rules(50), P.Observed(), now)[1]
    put = parse_rule({"name": "r7", "dst": ["10.0.7.1", "10.200.0.1"], "rate": "20mbit"})
    ops, outcome = P.patch(observed, "r7", put, now)
    slot = observed.rules["r7"].slot
    assert [type(op).__name__ for op in ops] == ["WriteRecord", "ChangeClass", "UpsertEntries"]
    assert list(ops[-1].entries) == [put.dst[1]] and ops[-1].entries[put.dst[1]].slot == slot
    assert outcome.rules["r7"].rule is put and outcome.planned
    ops, gone = P.patch(outcome, "r7", None, now)
    assert [type(op).__name__ for op in ops] == ["DeleteEntries", "DeleteClass", "DeleteRecord"]
    assert "r7" not in gone.rules and slot not in gone.classes and put.dst[1] not in gone.entries
    ops, back = P.patch(gone, "new", put, now)  # created in the lowest free slot
    assert back.rules["new"].slot == slot


@pytest.mark.parametrize("why", ["read back", "ports", "except", "expired", "taken", "absent", "full"])
def test_patch_leaves_to_the_whole_plan(why, monkeypatch):
    now = 10**12
    rules = _rules(3)
    planned = P.plan_with_outcome(rules, P.Observed(), now)[1]
    rule = parse_rule({"name": "x", "dst": ["10.99.0.1"], "rate": "1mbit"})
    observed = planned
    if why == "read back":
        observed = replace(planned, planned=False)  # what the kernel holds may have been changed by hand
    elif why == "ports":
        rule = parse_rule({"name": "x", "dst": ["10.99.0.1"], "protocol": "udp", "rate": "1mbit"})
    elif why == "except":
        rule = parse_rule({"name": "x", "dst": ["10.99.0.0/16"], "except": ["10.99.1.0/24"], "rate": "1mbit"})
    elif why == "expired":
        short = parse_rule({"name": "t", "dst": ["10.98.0.1"], "rate": "1mbit", "ttl": "1s"})
        observed = P.plan_with_outcome([*rules, short], P.Observed(), now)[1]
        now += 2 * 10**9
    elif why == "taken":
        rule = replace(rule, dst=rules[1].dst)
    elif why == "absent":
        rule, observed = None, planned
    elif why == "full":
        monkeypatch.setattr(P, "MAX_RULES", 3)
    assert P.patch(observed, "x", rule, now) is None


def test_a_change_through_the_controller_uses_patch_and_reaches_the_kernel_state(monkeypatch):
    fake = FakeDatapath()
    ctl = Controller(fake, clock=lambda: 10**12)
    observed = ctl.apply(_rules(20)).observed
    whole = []
    monkeypatch.setattr(P, "plan_with_outcome", lambda *a, **k: whole.append(1))  # must not be called
    rule = parse_rule({"name": "r3", "dst": ["10.0.3.1", "10.50.0.1"], "delay": "5ms"})
    applied = ctl.change("r3", rule, observed)
    assert not whole
    assert applied.observed == fake.observe()
    assert fake.steer(rule.dst[1].addr, 10**12) & 0xFFFF == applied.observed.rules["r3"].slot
    with pytest.raises(NotFound):
        ctl.change("nothing", None, applied.observed)
    monkeypatch.undo()
    port = parse_rule({"name": "p", "dst": ["10.0.3.1"], "protocol": "tcp", "ports": [80], "rate": "1mbit"})
    after = ctl.change("p", port, applied.observed)  # planned whole, beside the address-only rule r3
    assert after.observed == fake.observe() and set(after.observed.rules) == {f"r{i}" for i in range(20)} | {"p"}


def test_a_refusal_is_worded_by_the_whole_plan():
    now = 10**12
    rules = _rules(3)
    observed = P.plan_with_outcome(rules, P.Observed(), now)[1]
    taken = parse_rule({"name": "x", "dst": [str(rules[1].dst[0])], "rate": "1mbit"})
    assert P.patch(observed, "x", taken, now) is None
    with pytest.raises(InvalidInput, match="already a destination of rule 'r1'"):
        _whole(observed, "x", taken, now)


def test_prefix_capacity_is_checked(monkeypatch):
    monkeypatch.setattr(P, "MAX_PREFIXES", 4)
    monkeypatch.setattr(model, "MAX_PREFIXES", 4)
    now = 10**12
    observed = P.plan_with_outcome(_rules(3), P.Observed(), now)[1]
    two = parse_rule({"name": "x", "dst": ["10.99.0.1", "10.99.0.2"], "rate": "1mbit"})
    assert P.patch(observed, "x", two, now) is None  # 5 > 4: the whole plan refuses it
    one = replace(two, dst=two.dst[:1])
    assert P.patch(observed, "x", one, now) is not None
