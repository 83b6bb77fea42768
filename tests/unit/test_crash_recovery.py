"""Crash safety of a change, against the fake datapath: kill the controller after
every kernel operation of a change (and of its roll-back), and check that the next
controller finds the interrupted change, rolls it back and says so."""

import logging
import random

import pytest

from shaper.core import plan as P
from shaper.control.controller import Controller
from shaper.errors import InvalidInput, ShaperError
from shaper.datapath.fake import Crashed, FakeDatapath
from shaper.core.model import MAX_RULES, parse_rule, parse_ruleset
from tests.support.rule_sets import random_rule_set

NOW = 10**12


def rules(*specs):
    return parse_ruleset({"rules": list(specs)})


def state(dp):
    """Everything of shaper's the kernel would hold: records (slot, rule, deadline), entries, classes, leaves."""
    return dp.observe(), dict(dp.classes), dict(dp.leaves)


NAMES = [f"r{i}" for i in range(10)]
ADDRS = [f"10.{i}.0.0/16" for i in range(6)] + [f"10.0.0.{i}" for i in range(16)] + ["fd00::/64", "fd00::1", "::/0"]


def random_set(rnd):
    return random_rule_set(rnd, NAMES, ADDRS, max_dst=4, ttl_s=(100, 300))


def crash_matrix(old, new, *, second_crash=None):
    """Apply `old`, then `new` dying after N kernel operations, for every N; after each
    crash a fresh controller must leave exactly the old state (or the new one when the
    change had committed).  Returns how many crash points were exercised."""
    base = FakeDatapath()
    Controller(base, clock=lambda: NOW).apply(old)
    clean = FakeDatapath()
    Controller(clean, clock=lambda: NOW).apply(old)
    Controller(clean, clock=lambda: NOW).apply(new)
    old_state, new_state = state(base), state(clean)
    n = 0
    while True:
        dp = FakeDatapath()
        Controller(dp, clock=lambda: NOW).apply(old)
        dp.crash_after = n
        dp.ops_done = 0
        try:
            Controller(dp, clock=lambda: NOW).apply(new)
        except Crashed:
            pass
        else:  # no crash point left: the change ran to its end
            assert state(dp) == new_state and dp.intent is None
            return n
        if second_crash is not None:  # the controller that rolls back dies too
            dp.crash_after, dp.ops_done = second_crash, 0
            try:
                Controller(dp, clock=lambda: NOW).recover()
            except Crashed:
                pass
        dp.crash_after = None
        recovered = Controller(dp, clock=lambda: NOW).recover()
        if dp.intent is None and recovered is None and state(dp) == new_state:
            pass  # killed after the commit point: the change is whole
        else:
            assert state(dp) == old_state, f"crash after {n} operation(s)"
            assert dp.intent is None
        dp.check()
        n += 1


def test_every_crash_point_of_random_changes_leaves_old_or_new():
    rnd = random.Random(7)
    points = 0
    for _ in range(60):
        old, new = random_set(rnd), random_set(rnd)
        points += crash_matrix(old, new)
    assert points > 300  # the matrix really ran through many crash points


@pytest.mark.parametrize("second", [0, 1, 2, 3, 5])
def test_a_crash_during_the_roll_back_is_rolled_back_by_the_next_controller(second):
    rnd = random.Random(second)
    for _ in range(15):
        crash_matrix(random_set(rnd), random_set(rnd), second_crash=second)


def test_full_replace_with_other_names_crash_points():
    old = rules(*({"name": f"old{i}", "dst": [f"10.1.{i}.{j}" for j in range(5)], "rate": "1mbit"} for i in range(6)))
    new = rules(*({"name": f"new{i}", "dst": [f"10.2.{i}.{j}" for j in range(5)] + ["10.1.0.1"][: i == 0],
                   "delay": "5ms"} for i in range(6)))
    assert crash_matrix(old, new) > 20


def test_recovery_is_logged_and_a_clean_start_says_nothing(caplog):
    old = rules({"name": "a", "dst": "10.0.0.1", "rate": "1mbit"})
    dp = FakeDatapath()
    Controller(dp, clock=lambda: NOW).apply(old)
    assert Controller(dp, clock=lambda: NOW).recover() is None
    dp.crash_after, dp.ops_done = 3, 0
    with pytest.raises(Crashed):
        Controller(dp, clock=lambda: NOW).apply(rules({"name": "b", "dst": "10.0.0.2", "delay": "1ms"}))
    dp.crash_after = None
    with caplog.at_level(logging.WARNING, logger="shaper"):
        done = Controller(dp, clock=lambda: NOW).recover()
    assert (done.rules_before, done.rules_after) == (1, 1) and done.operations > 0
    assert "interrupted change (1 rule(s) -> 1) was found and rolled back" in caplog.text
    assert list(dp.observe().rules) == ["a"]


def test_apply_recovers_first_so_a_local_apply_after_a_crash_starts_from_the_old_set():
    dp = FakeDatapath()
    Controller(dp, clock=lambda: NOW).apply(rules({"name": "a", "dst": "10.0.0.1", "rate": "1mbit"}))
    dp.crash_after, dp.ops_done = 2, 0
    with pytest.raises(Crashed):
        Controller(dp, clock=lambda: NOW).apply(rules({"name": "b", "dst": "10.0.0.2", "delay": "1ms"}))
    dp.crash_after = None
    assert dp.intent is not None
    stale = dp.observe()  # a caller's read of the half-done state
    want = rules({"name": "c", "dst": "10.0.0.3"})
    Controller(dp, clock=lambda: NOW).apply(want, observed=stale)
    assert {n: o.rule for n, o in dp.observe().rules.items()} == {"c": want[0]}
    assert set(dp.classes) == {dp.observe().rules["c"].slot} and dp.intent is None


def test_the_adopted_set_after_recovery_can_be_put_back():
    dp = FakeDatapath()
    old = rules(*({"name": f"r{i}", "dst": [f"10.0.{i}.0/24", f"fd00::{i}"], "delay": "2ms"} for i in range(5)))
    Controller(dp, clock=lambda: NOW).apply(old)
    for n in range(4, 12):
        dp.crash_after, dp.ops_done = n, 0
        with pytest.raises(Crashed):
            Controller(dp, clock=lambda: NOW).apply(rules({"name": "x", "dst": "10.9.0.0/16", "rate": "1mbit"}))
        dp.crash_after = None
        c = Controller(dp, clock=lambda: NOW)
        c.recover()
        # What GET /rules returns, parsed again as PUT /rules would, applies as no change.
        again = parse_ruleset({"rules": [o.rule.to_dict() for o in dp.observe().rules.values()]})
        assert again == sorted(old, key=lambda r: r.name) or set(again) == set(old)
        assert c.apply(again).ops == []


def test_undo_record_round_trips():
    dp = FakeDatapath()
    c = Controller(dp, clock=lambda: NOW)
    c.apply(rules({"name": "a", "dst": ["10.0.0.1", "fd00::/64"], "delay": "5ms", "ttl": "1h"},
                  {"name": "b", "dst": "10.0.0.2", "rate": "1mbit"}))
    observed = dp.observe()
    ops, _ = P.plan_with_outcome(rules({"name": "a", "dst": "10.0.0.9", "loss": "1%"}), observed, NOW)
    undo = P.undo_of(ops, observed, 1)
    assert P.Undo.unpack(undo.pack()) == undo
    assert undo.before == 2 and undo.after == 1
    assert undo.entries["egress"][parse_rule({"name": "z", "dst": "10.0.0.9"}).dst[0]] is None  # new: absent before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "version", "rule"])
def test_an_intent_record_this_shaper_cannot_read_is_a_shaper_error_naming_reset(damage):
    """Recovery runs at every start and apply: a damaged record, or another version's, must be a
    ShaperError that says the way out (a daemon start printed a bare ValueError)."""
    import json
    import struct
    import zlib

    good = zlib.decompress(P.Undo({1: None}).pack())
    (n,) = struct.unpack_from("=I", good)
    head = json.loads(good[4:4 + n])
    if damage == "version":
        head["version"] = P.UNDO_VERSION + 1
    elif damage == "rule":
        head["rules"] = [[1, {"rule": {"name": "a", "delay": "forever"}}]]
    encoded = json.dumps(head).encode()
    data = {"garbage": b"not a record", "truncated": zlib.compress(good[:2])}.get(
        damage, zlib.compress(struct.pack("=I", len(encoded)) + encoded))
    with pytest.raises(ShaperError, match="shaper reset") as err:
        P.Undo.unpack(data)
    assert type(err.value) is ShaperError
    if damage == "version":
        assert f"version {P.UNDO_VERSION + 1}" in str(err.value)


def test_roll_back_after_a_kernel_refusal_uses_the_intent_and_clears_it():
    dp = FakeDatapath()
    c = Controller(dp, clock=lambda: NOW)
    c.apply(rules({"name": "a", "dst": "10.0.0.1", "delay": "5ms"}))
    before = state(dp)

    def refuse(op):
        if isinstance(op, P.UpsertEntries):
            raise InvalidInput("x", "refused")

    dp.before_op = refuse
    with pytest.raises(InvalidInput):
        c.apply(rules({"name": "a", "dst": "10.0.0.1", "delay": "7ms"}, {"name": "b", "dst": "10.0.0.2"}))
    dp.before_op = None
    assert state(dp) == before and dp.intent is None


# -- capacity (finding 8) -----------------------------------------------------------------------------------
def test_allocate_slots_says_the_limit_and_the_way_round():
    with pytest.raises(InvalidInput) as exc:
        P.allocate_slots(["x", "y"], set(range(1, MAX_RULES)))
    text = str(exc.value)
    assert str(MAX_RULES) in text and "two changes" in text
    assert (exc.value.http_status, exc.value.exit_code) == (422, 2)  # the caller's to fix, not a 500


def test_a_replace_by_other_names_beyond_the_slots_is_refused_before_any_change(monkeypatch):
    monkeypatch.setattr(P, "MAX_RULES", 6)
    dp = FakeDatapath()
    c = Controller(dp, clock=lambda: NOW)
    c.apply(rules(*({"name": f"a{i}", "dst": f"10.0.0.{i}"} for i in range(4))))
    before = state(dp)
    with pytest.raises(InvalidInput, match="at most 6 rules side by side"):
        c.apply(rules(*({"name": f"b{i}", "dst": f"10.0.1.{i}"} for i in range(4))))
    assert state(dp) == before and dp.intent is None
    # The way round the message gives: two changes.
    c.apply([])
    c.apply(rules(*({"name": f"b{i}", "dst": f"10.0.1.{i}"} for i in range(4))))


def test_a_replace_of_prefixes_that_do_not_fit_side_by_side_deletes_first(monkeypatch):
    monkeypatch.setattr(P, "MAX_PREFIXES", 10)
    dp = FakeDatapath()
    c = Controller(dp, clock=lambda: NOW)
    c.apply(rules({"name": "a", "dst": [f"10.0.0.{i}" for i in range(8)]}))
    new = rules({"name": "a", "dst": [f"10.0.1.{i}" for i in range(8)]})
    ops = c.apply(new).ops
    assert [type(o).__name__ for o in ops] == ["DeleteEntries", "UpsertEntries"]
    assert {n: o.rule for n, o in dp.observe().rules.items()} == {"a": new[0]}
    # Side by side when they fit: new entries first, nothing unshaped meanwhile.
    ops = c.apply(rules({"name": "a", "dst": ["10.0.1.0", "10.0.2.1"]})).ops
    assert [type(o).__name__ for o in ops] == ["UpsertEntries", "DeleteEntries"]


def test_crash_points_of_a_delete_first_replace(monkeypatch):
    monkeypatch.setattr(P, "MAX_PREFIXES", 12)
    old = rules({"name": "a", "dst": [f"10.0.0.{i}" for i in range(8)]}, {"name": "b", "dst": "10.0.9.9"})
    new = rules({"name": "a", "dst": [f"10.0.1.{i}" for i in range(6)]}, {"name": "c", "dst": ["10.0.0.1", "10.0.7.7"]})
    assert crash_matrix(old, new) > 5
