"""The controller: validate a desired rule set, diff it against the kernel, apply.

It drives a Datapath (shaper.datapath.interface: KernelDatapath, or the
in-memory fake in tests) through `observe` and `execute`, so its logic is
tested without root.  A rule set is validated whole before anything changes;
if the kernel refuses an operation half-way, the controller puts back the
rules that were there before.

Across a crash (kill -9, OOM, power to the node's netns gone mid-change) the
same holds, through an intent record kept in the kernel beside the state:

1. before the first operation of a change, the datapath stores its Undo (plan.py:
   the old record of every slot and the old slot of every prefix it will write);
2. the operations run;
3. the intent is cleared: that is the change's commit point.

Any controller that finds an intent (`recover()`, run before a daemon is ready
and before any apply) rebuilds the rules before the change from the kernel's
state and the Undo, re-plans to them with their old slots and deadlines, runs
that plan, then clears the intent, and logs what it did.  An interrupted change
is thus rolled back: the kernel ends with exactly the old set.  A crash during
the roll-back leaves the intent in place and the next controller rolls back
again (the Undo rebuilds the same old set from any state either leaves).
Rolling back rather than forward: the old set is known to fit the kernel, and
a change that was not answered 200 has not happened.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from shaper.core import plan as P
from shaper.datapath.abi import classid_text
from shaper.datapath.interface import Datapath
from shaper.errors import NotFound
from shaper.core.model import Rule, validate_ruleset
from shaper.core.stats import RuleCounters, RuleStats

log = logging.getLogger("shaper")


@dataclass(frozen=True)
class RuleStatus:
    rule: Rule
    slot: int
    expires_ns: int
    expired: bool

    @property
    def classid(self) -> str:
        return classid_text(self.slot)


@dataclass(frozen=True)
class Applied:
    """What apply() did."""

    ops: list[P.Operation]  # the operations run (none: the kernel already held the rules)
    observed: P.Observed  # the state they left: what observe() would now return
    planned: str = "whole"  # "patch": the change of one rule was planned alone (plan.patch); "whole": the set


@dataclass(frozen=True)
class Recovery:
    """An interrupted change found and rolled back."""

    rules_before: int  # the rules before it: what the kernel holds again
    rules_after: int  # the rules it was changing to
    operations: int  # what the roll-back did


class Controller:
    def __init__(self, datapath: Datapath, clock: Callable[[], int] = time.monotonic_ns):
        # CLOCK_MONOTONIC is what bpf_ktime_get_ns() reads in the classifier.
        self.datapath = datapath
        self.clock = clock
        self._intent_checked = False  # recover() has run for this datapath

    def status(self, observed: P.Observed | None = None) -> list[RuleStatus]:
        if observed is None:
            observed = self.datapath.observe()
        now = self.clock()
        return sorted(
            (RuleStatus(o.rule, o.slot, o.expires_ns, o.expired(now))
             for o in observed.rules.values()),
            key=lambda s: s.rule.name,
        )

    def live_rules(self, observed: P.Observed) -> dict[str, Rule]:
        """The rules in force: what a change to one rule keeps of the others."""
        gone = observed.expired(self.clock())
        return {n: o.rule for n, o in observed.rules.items() if n not in gone}

    def stats(self, observed: P.Observed | None = None) -> list[RuleStats]:
        """Every rule with its classifier and class counters, once per direction it shapes (by name,
        egress first).  One class dump per direction in use: none of the ifb's without an ingress rule."""
        statuses = self.status(observed)
        read = {}
        for direction in P.DIRECTIONS:
            slots = [s.slot for s in statuses if direction in s.rule.directions]
            if slots:
                read[direction] = (self.datapath.counters(slots, direction), self.datapath.class_stats(direction))
        return [RuleStats(s.rule, s.slot, s.classid, s.expires_ns, read[d][0].get(s.slot, RuleCounters()),
                          read[d][1].get(s.slot), d)
                for s in statuses for d in P.DIRECTIONS if d in s.rule.directions]

    def plan(self, rules: Iterable[Rule]) -> list[P.Operation]:
        desired = validate_ruleset(rules)
        return P.plan(desired, self.datapath.observe(), self.clock())

    def apply(self, rules: Iterable[Rule], *, renew: Iterable[str] = (),
              observed: P.Observed | None = None) -> Applied:
        """Make the kernel hold exactly `rules`; returns the operations done and the state they left.

        `observed` may be passed when the caller has just read it (under the
        same lock); `renew` names rules whose TTL restarts even if unchanged.
        """
        desired = validate_ruleset(rules)
        observed = self._current(observed)
        ops, outcome = P.plan_with_outcome(desired, observed, self.clock(), renew)
        return self._run(ops, observed, outcome)

    def change(self, name: str, rule: Rule | None, observed: P.Observed | None = None) -> Applied:
        """Put rule `name`, valid on its own (model.parse_rule), renewing its TTL; or remove it (None:
        NotFound if it is not there).  Planned for that rule alone where plan.patch can, which is the
        common case and costs the same among 10,000 rules as among 10; else the live set with the
        change is applied whole, which also refuses what must be refused."""
        observed = self._current(observed)
        planned = P.patch(observed, name, rule, self.clock())
        if planned is not None:
            return self._run(planned[0], observed, planned[1], "patch")
        live = self.live_rules(observed)
        if rule is not None:
            live[name] = rule
        elif live.pop(name, None) is None:
            raise NotFound(f"no rule named {name!r}")
        return self.apply(live.values(), renew=[name] if rule is not None else (), observed=observed)

    def _current(self, observed: P.Observed | None) -> P.Observed:
        if not self._intent_checked and self.recover() is not None:
            observed = None  # the state the caller read is the one just rolled back
        return self.datapath.observe() if observed is None else observed

    def _run(self, ops: list[P.Operation], observed: P.Observed, outcome: P.Observed,
             planned: str = "whole") -> Applied:
        if ops:
            undo = P.undo_of(ops, observed, len(outcome.rules))
            self.datapath.write_intent(undo.pack())
            try:
                self.datapath.execute(ops)
            except Exception:
                self._roll_back(undo)
                raise
            self.datapath.clear_intent()
        return Applied(ops, outcome, planned)

    def recover(self) -> "Recovery | None":
        """Roll back a change a crashed controller left unfinished (module doc); None if there was none.

        Logs what it did.  Raises if the roll-back fails (the intent stays for the next try)."""
        self._intent_checked = True
        data = self.datapath.read_intent()
        if data is None:
            return None
        undo = P.Undo.unpack(data)
        ops = self._restore(undo)
        self.datapath.clear_intent()
        done = Recovery(undo.before, undo.after, len(ops))
        log.warning("an interrupted change (%d rule(s) -> %d) was found and rolled back: %d rule(s) restored with "
                    "%d operation(s)", done.rules_before, done.rules_after, done.rules_before, done.operations)
        return done

    def _restore(self, undo: P.Undo) -> list[P.Operation]:
        """Put back the rules `undo` was taken before, in their slots, with their deadlines."""
        state = self.datapath.observe()
        now = self.clock()
        old = {n: o for n, o in P.restore(undo, state).items() if not o.expired(now)}
        ops, _ = P.plan_with_outcome([o.rule for o in old.values()], state, now,
                                     slots={n: o.slot for n, o in old.items()},
                                     deadlines={n: o.expires_ns for n, o in old.items()},
                                     resend=[n for n, o in old.items() if o.slot in undo.rules])
        self.datapath.execute(ops)
        return ops

    def _roll_back(self, undo: P.Undo) -> None:
        try:
            self._restore(undo)
            self.datapath.clear_intent()
            log.warning("apply failed; rolled back to the previous %d rule(s)", undo.before)
        except Exception as exc:  # the original error is the one to report
            log.error("apply failed and so did the roll-back (%s); the next apply or daemon start rolls back "
                      "again, or run `shaper show` and apply again", exc)
