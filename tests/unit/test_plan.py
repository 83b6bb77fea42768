import random

import pytest

from shaper.datapath import abi
from shaper.core import plan as P
from shaper.control.controller import Controller
from shaper.errors import InvalidInput, KernelError
from shaper.datapath.fake import FakeDatapath
from shaper.core.model import Prefix, parse_rule, parse_ruleset
from tests.support.rule_sets import random_rule_set

NOW = 10**12


def rules(*specs):
    return parse_ruleset({"rules": list(specs)})


def ctl(dp=None, now=NOW):
    dp = dp or FakeDatapath()
    clock = {"now": now}
    return Controller(dp, clock=lambda: clock["now"]), dp, clock


def kinds(ops):
    return [type(o).__name__ for o in ops]


def desired_state_reached(dp, want):
    obs = dp.observe()
    assert {n: o.rule for n, o in obs.rules.items()} == {r.name: r for r in want}
    for r in want:
        slot = obs.rules[r.name].slot
        for d in P.DIRECTIONS:
            trie, classes, leaves = dp._side(d)
            if d not in r.directions:
                assert slot not in classes
                continue
            assert classes[slot] == r.class_params()
            assert leaves[slot] == r.leaf_params()
            for p in r.dst:
                if r.selects_ports and trie[p].inline is not None:  # its one port block, in the entry
                    assert trie[p].inline.slot == slot and len(r.port_keys()) == 1
                elif r.selects_ports:  # through its port group: every key of its ports points at it
                    group = trie[p].group
                    assert {dp.ports[P.PortKey(group, *k)].slot for k in r.port_keys()} == {slot}
                else:
                    assert trie[p].slot == slot


def test_allocate_slots_lowest_free():
    assert P.allocate_slots(["a", "b", "c"], {1, 3}) == {"a": 2, "b": 4, "c": 5}


def test_new_rules_order_class_before_entries():
    c, dp, _ = ctl()
    want = rules({"name": "db", "dst": ["10.0.0.5", "fd00::5"], "delay": "50ms"},
                 {"name": "cache", "dst": "10.0.1.0/24", "rate": "2mbit", "loss": "1%"})
    ops = c.apply(want).ops
    assert kinds(ops) == ["WriteRecord", "ResetStats", "CreateClass", "SetLeaf"] * 2 + ["UpsertEntries"]
    desired_state_reached(dp, want)
    assert c.apply(want).ops == []  # idempotent


def test_change_delay_touches_only_that_leaf():
    c, dp, _ = ctl()
    c.apply(rules({"name": "a", "dst": "10.0.0.1", "delay": "50ms"}, {"name": "b", "dst": "10.0.0.2", "delay": "5ms"}))
    slot_a = dp.observe().rules["a"].slot
    ops = c.apply(rules({"name": "a", "dst": "10.0.0.1", "delay": "10ms"}, {"name": "b", "dst": "10.0.0.2", "delay": "5ms"})).ops
    assert kinds(ops) == ["WriteRecord", "SetLeaf"]  # the record first: see plan's module doc
    assert ops[1].slot == slot_a and ops[1].current == "netem"


def test_change_rate_only_changes_class():
    c, dp, _ = ctl()
    c.apply(rules({"name": "a", "dst": "10.0.0.1", "rate": "10mbit"}))
    ops = c.apply(rules({"name": "a", "dst": "10.0.0.1", "rate": "20mbit"})).ops
    assert kinds(ops) == ["WriteRecord", "ChangeClass"]


def test_rate_change_resizes_netem_limit_leaf_too():
    c, dp, _ = ctl()
    c.apply(rules({"name": "a", "dst": "10.0.0.1", "rate": "10mbit", "delay": "1s"}))
    ops = c.apply(rules({"name": "a", "dst": "10.0.0.1", "rate": "100mbit", "delay": "1s"})).ops
    assert kinds(ops) == ["WriteRecord", "ChangeClass", "SetLeaf"]


def test_moving_a_destination_is_one_update_and_never_unshaped():
    c, dp, _ = ctl()
    c.apply(rules({"name": "a", "dst": ["10.0.0.1", "10.0.0.2"], "delay": "5ms"},
                  {"name": "b", "dst": "10.0.0.3", "delay": "9ms"}))
    probe = Prefix.parse("10.0.0.2", "x").addr
    seen = []
    dp.after_op = lambda d, op: seen.append(d.steer(probe, NOW))
    ops = c.apply(rules({"name": "a", "dst": ["10.0.0.1"], "delay": "5ms"},
                        {"name": "b", "dst": ["10.0.0.3", "10.0.0.2"], "delay": "9ms"})).ops
    assert kinds(ops) == ["UpsertEntries"]
    assert None not in seen and seen[-1] == abi.classid(dp.observe().rules["b"].slot)


def test_removing_a_rule_removes_entries_before_class():
    c, dp, _ = ctl()
    c.apply(rules({"name": "a", "dst": "10.0.0.1", "delay": "5ms"}, {"name": "b", "dst": "10.0.0.2"}))
    ops = c.apply(rules({"name": "b", "dst": "10.0.0.2"})).ops
    assert kinds(ops) == ["DeleteEntries", "DeleteClass", "DeleteRecord"]
    assert list(dp.observe().rules) == ["b"]


def test_ttl_kept_on_reapply_refreshed_on_change_and_restarted_after_expiry():
    c, dp, clock = ctl()
    spec = {"name": "a", "dst": "10.0.0.1", "delay": "5ms", "ttl": "10s"}
    c.apply(rules(spec))
    first = dp.observe().rules["a"]
    assert first.expires_ns == NOW + 10 * 10**9
    assert dp.entries[Prefix.parse("10.0.0.1", "x")].expires_ns == first.expires_ns
    clock["now"] += 5 * 10**9
    assert c.apply(rules(spec)).ops == []
    c.apply(rules({**spec, "delay": "6ms"}))
    assert dp.observe().rules["a"].expires_ns == clock["now"] + 10 * 10**9
    clock["now"] += 11 * 10**9
    assert dp.steer(Prefix.parse("10.0.0.1", "x").addr, clock["now"]) is None
    assert [s.expired for s in c.status()] == [True]
    c.apply(rules({**spec, "delay": "6ms"}))
    again = dp.observe().rules["a"]
    assert again.expires_ns == clock["now"] + 10 * 10**9 and again.slot != first.slot
    assert len(dp.classes) == 1  # the expired rule's class is gone



@pytest.mark.parametrize("change", [{"direction": "both"}, {"protocol": "udp"}, {"ports": [5433]},
                                    {"except": ["10.0.0.0/25"]}, {"dst": "10.0.0.0/24", "rate": "2mbit"}])
def test_changing_what_a_rule_matches_restarts_its_ttl_as_the_dry_run_says(change):
    from shaper.core.changes import rule_changes

    c, dp, clock = ctl()
    spec = {"name": "a", "dst": "10.0.0.0/24", "protocol": "tcp", "ports": [5432], "rate": "1mbit", "ttl": "10s"}
    if "except" in change:
        spec = {"name": "a", "dst": "10.0.0.0/24", "rate": "1mbit", "ttl": "10s"}
    c.apply(rules(spec))
    clock["now"] += 5 * 10**9
    (said,) = rule_changes(rules(spec), rules({**spec, **change}))
    c.apply(rules({**spec, **change}))
    assert said.get("restarts_ttl") is True
    assert dp.observe().rules["a"].expires_ns == clock["now"] + 10 * 10**9


def test_new_destinations_alone_keep_the_ttl():
    c, dp, clock = ctl()
    spec = {"name": "a", "dst": "10.0.0.1", "rate": "1mbit", "ttl": "10s"}
    c.apply(rules(spec))
    clock["now"] += 5 * 10**9
    c.apply(rules({**spec, "dst": ["10.0.0.1", "10.0.0.2"]}))
    assert dp.observe().rules["a"].expires_ns == NOW + 10 * 10**9

def test_expired_entry_falls_back_to_shorter_prefix():
    c, dp, clock = ctl()
    c.apply(rules({"name": "all", "dst": "::/0", "delay": "1ms"},
                  {"name": "one", "dst": "10.0.0.1", "delay": "50ms", "ttl": "1s"}))
    addr = Prefix.parse("10.0.0.1", "x").addr
    one, alls = (abi.classid(dp.observe().rules[n].slot) for n in ("one", "all"))
    assert dp.steer(addr, clock["now"]) == one
    assert dp.steer(addr, clock["now"] + 2 * 10**9) == alls
    c.clock = lambda: NOW + 2 * 10**9
    ops = c.apply(c.live_rules(dp.observe()).values()).ops  # what the service's expiry applies
    assert "one" not in dp.observe().rules and kinds(ops)[-1] == "DeleteRecord"


def test_longest_prefix_wins():
    c, dp, _ = ctl()
    c.apply(rules({"name": "net", "dst": "10.0.0.0/24", "delay": "20ms"}, {"name": "host", "dst": "10.0.0.5"}))
    obs = dp.observe().rules
    assert dp.steer(Prefix.parse("10.0.0.5", "x").addr, NOW) == abi.classid(obs["host"].slot)
    assert dp.steer(Prefix.parse("10.0.0.6", "x").addr, NOW) == abi.classid(obs["net"].slot)
    assert dp.steer(Prefix.parse("10.0.1.6", "x").addr, NOW) is None


def test_invalid_set_changes_nothing():
    c, dp, _ = ctl()
    c.apply(rules({"name": "a", "dst": "10.0.0.1", "delay": "5ms"}))
    before = dp.observe()
    bad = [parse_rule({"name": "a", "dst": "10.0.0.1"}), parse_rule({"name": "a", "dst": "10.0.0.2"})]
    with pytest.raises(InvalidInput):
        c.apply(bad)
    assert dp.observe() == before


def test_kernel_failure_rolls_back():
    c, dp, _ = ctl()
    first = rules({"name": "a", "dst": "10.0.0.1", "delay": "5ms"})
    c.apply(first)
    before = dp.observe()

    def refuse_netem_for_c(op):
        if isinstance(op, P.SetLeaf) and op.rule.name == "c":
            raise KernelError("set netem leaf of", "5348:3", 2)

    dp.before_op = refuse_netem_for_c
    with pytest.raises(KernelError):
        c.apply(rules({"name": "a", "dst": "10.0.0.1", "delay": "7ms"}, {"name": "b", "dst": "10.0.0.2", "delay": "1ms"},
                      {"name": "c", "dst": "10.0.0.3", "delay": "1ms"}))
    dp.before_op = None
    assert {n: o.rule for n, o in dp.observe().rules.items()} == {n: o.rule for n, o in before.rules.items()}
    assert set(dp.classes) == {before.rules["a"].slot}


def test_vanished_class_is_rebuilt():
    c, dp, _ = ctl()
    want = rules({"name": "a", "dst": "10.0.0.1", "delay": "5ms"})
    c.apply(want)
    slot = dp.observe().rules["a"].slot
    del dp.classes[slot], dp.leaves[slot]
    dp.entries.clear()
    assert kinds(c.apply(want).ops) == ["CreateClass", "SetLeaf", "UpsertEntries"]
    desired_state_reached(dp, want)


def test_random_sequences_reach_desired_state_and_keep_invariants():
    rnd = random.Random(1234)
    c, dp, clock = ctl()
    names = [f"r{i}" for i in range(12)]
    addrs = [f"10.{i}.0.0/16" for i in range(6)] + [f"10.0.0.{i}" for i in range(20)] + ["fd00::/64", "fd00::1", "::/0"]
    for _ in range(200):
        want = random_rule_set(rnd, names, addrs, max_dst=3, ttl_s=(1, 30))  # TTLs short enough to expire here
        c.apply(want)
        desired_state_reached(dp, want)
        assert c.apply(want).ops == []
        clock["now"] += rnd.randint(0, 3) * 10**9
    assert len(dp.classes) == len(dp.records)
