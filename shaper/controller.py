"""The controller: validate a desired rule set, diff it against the kernel, apply.

It drives a datapath (KernelDatapath, or the in-memory fake in tests) through
`observe` and `execute`, so its logic is tested without root.  A rule set is
validated whole before anything changes; if the kernel refuses an operation
half-way, the controller puts back the rules that were there before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from . import plan as P
from .layout import classid_text
from .model import Rule, validate_ruleset
from .stats import ClassStats, RuleCounters, RuleStats

log = logging.getLogger("shaper")


class Datapath(Protocol):
    def observe(self) -> P.Observed: ...

    def execute(self, ops: list[P.Operation]) -> None: ...

    def counters(self, slots: list[int]) -> dict[int, RuleCounters]: ...

    def class_stats(self) -> dict[int, ClassStats]: ...


@dataclass(frozen=True)
class RuleStatus:
    rule: Rule
    slot: int
    expires_ns: int
    expired: bool

    @property
    def classid(self) -> str:
        return classid_text(self.slot)


class Controller:
    def __init__(self, datapath: Datapath, clock: Callable[[], int] = time.monotonic_ns):
        # CLOCK_MONOTONIC is what bpf_ktime_get_ns() reads in the classifier.
        self.datapath = datapath
        self.clock = clock
        self.outcome: P.Observed | None = None  # the state after the last successful apply

    def status(self, observed: P.Observed | None = None) -> list[RuleStatus]:
        if observed is None:
            observed = self.datapath.observe()
        now = self.clock()
        return sorted(
            (RuleStatus(o.rule, o.slot, o.expires_ns, bool(o.expires_ns and o.expires_ns <= now))
             for o in observed.rules.values()),
            key=lambda s: s.rule.name,
        )

    def live_rules(self, observed: P.Observed) -> dict[str, Rule]:
        """The rules in force: what a change to one rule keeps of the others."""
        gone = observed.expired(self.clock())
        return {n: o.rule for n, o in observed.rules.items() if n not in gone}

    def stats(self, observed: P.Observed | None = None) -> list[RuleStats]:
        """Every rule with its classifier and class counters (one class dump)."""
        statuses = self.status(observed)
        counters = self.datapath.counters([s.slot for s in statuses])
        classes = self.datapath.class_stats()
        return [RuleStats(s.rule, s.slot, s.classid, s.expires_ns, counters.get(s.slot, RuleCounters()),
                          classes.get(s.slot)) for s in statuses]

    def plan(self, rules: Iterable[Rule]) -> list[P.Operation]:
        desired = validate_ruleset(rules)
        return P.plan(desired, self.datapath.observe(), self.clock())

    def apply(self, rules: Iterable[Rule], *, renew: Iterable[str] = (),
              observed: P.Observed | None = None) -> list[P.Operation]:
        """Make the kernel hold exactly `rules`; returns the operations done.

        `observed` may be passed when the caller has just read it (under the
        same lock); `renew` names rules whose TTL restarts even if unchanged.
        """
        desired = validate_ruleset(rules)
        if observed is None:
            observed = self.datapath.observe()
        self.outcome = None
        ops, outcome = P.plan_with_outcome(desired, observed, self.clock(), renew)
        if ops:
            try:
                self.datapath.execute(ops)
            except Exception:
                self._roll_back(observed)
                raise
        self.outcome = outcome  # what observe() would now return
        return ops

    def _roll_back(self, before: P.Observed) -> None:
        previous = [o.rule for o in before.rules.values()]
        try:
            ops = P.plan(previous, self.datapath.observe(), self.clock())
            self.datapath.execute(ops)
            log.warning("apply failed; rolled back to the previous %d rule(s)", len(previous))
        except Exception as exc:  # the original error is the one to report
            log.error("apply failed and so did the roll-back (%s); run `shaper show` and apply again", exc)

    def expire(self) -> list[P.Operation]:
        """Remove rules whose TTL has passed (the classifier already ignores them)."""
        observed = self.datapath.observe()
        gone = observed.expired(self.clock())
        if not gone:
            return []
        keep = [o.rule for n, o in observed.rules.items() if n not in gone]
        return self.apply(keep)
