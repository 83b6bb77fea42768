"""The daemon's core: one interface's rules behind a lock, with metrics and an
audit log.

`Service` turns requests ("put this rule", "replace the set", "delete all")
into whole rule sets for the controller, serialises every datapath access
(netlink sockets and the maps are not shared between threads), counts changes
and failures for /metrics and logs one structured line per change.  It takes
any Datapath (shaper.datapath.interface: KernelDatapath, or the fake in tests)
and does no HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest

from shaper.datapath import abi
from shaper.core import plan as P
from shaper.control.controller import Applied, Controller
from shaper.datapath.interface import Datapath
from shaper.errors import InvalidInput, NotFound, NotReady
from shaper.control.metrics import Instruments, KernelCollector, Registered, RuleSample, Snapshot
from shaper.core.model import Rule, gc_paused, parse_rule
from shaper.core.stats import RuleStats

log = logging.getLogger("shaper")

# The rule GET /latency/{duration} manages (compatibility with the agent people
# already call): every destination, IPv4 and IPv6.
LATENCY_RULE = "latency"
LATENCY_DST = ("0.0.0.0/0", "::/0")
REREAD_S = 30.0


def audit(event: str, **fields: object) -> None:
    """One structured log line per change: who, what, result (never a secret)."""
    log.info(event, extra={"fields": fields})


class Service:
    def __init__(self, datapath: Datapath, interface: str, *, clock: Callable[[], int] = time.monotonic_ns,
                 registry: CollectorRegistry | None = None):
        self.datapath = datapath
        self.interface = interface
        self.clock = clock
        self.controller = Controller(datapath, clock)
        self.lock = threading.RLock()
        self.ready = False
        self.next_expiry_ns: int | None = None
        # Added to every change's log line: the node agent's target (one agent, many services).
        self.log_fields: dict[str, object] = {}
        # The kernel state as of the last change. This process is the only writer (the
        # interface claim), so a change need not read back the whole trie and every
        # record first; the cache is re-read from the kernel every REREAD_S anyway, in
        # case someone changed shaper's objects by hand.
        self._observed: P.Observed | None = None
        self._observed_at = 0.0
        self._scrape_of: P.Observed | None = None  # the state _scrape is of
        self._scrape: tuple[list[tuple], dict[str, list[int]]] = ([], {})
        self.registry = registry or CollectorRegistry()
        # The kernel collector is registered first: a scrape that fails counts itself
        # in shaper_errors_total{op="scrape"} before that counter is collected.
        self.collector = KernelCollector(interface, self.snapshot)
        self.registry.register(self.collector)
        # The daemon's own counters, in a registry of their own (metrics_text writes them after the
        # kernel's series), and through it in self.registry, which has everything.
        self._own = CollectorRegistry()
        self.registry.register(Registered(self._own))
        self.instruments = self.collector.instruments = Instruments(self._own, interface)

    # -- state ------------------------------------------------------------------
    def swap_datapath(self, datapath: Datapath) -> None:
        """Drive a new datapath (the interface came back with a new ifindex); not ready until start()."""
        with self.lock:
            self.ready = False
            self.datapath = datapath
            self.controller = Controller(datapath, self.clock)
            self._observed = None

    def observe(self) -> P.Observed:
        """The datapath's state: cached after our own changes, re-read when older than REREAD_S."""
        with self.lock:
            if self._observed is None or time.monotonic() - self._observed_at > REREAD_S:
                self._observed = self.datapath.observe()
                self._observed_at = time.monotonic()
            return self._observed

    def rules_to_restore(self) -> list[Rule]:
        """The live rules, each with the TTL it has left: what to re-apply on a new interface."""
        with self.lock:
            observed = self.datapath.observe()  # what the pinned maps hold
        now = self.clock()
        out = []
        for name, o in sorted(observed.rules.items()):
            if not o.expires_ns:
                out.append(o.rule)
            elif o.expires_ns > now:
                out.append(replace(o.rule, ttl_us=max(1, (o.expires_ns - now) // 1000)))
        return out

    def start(self, rules: Iterable[Rule] | None = None, who: str = "startup") -> None:
        """Apply the initial rules (None: keep what an adopted datapath holds), then be ready.

        A change a crashed controller left unfinished is rolled back first, and logged."""
        with self.lock:
            recovered = self.controller.recover()
            if recovered is not None:
                self._observed = None
                log.warning("rules.recovered", extra={"fields": {
                    "interface": self.interface, "action": "rolled back an interrupted change",
                    "rules": recovered.rules_before, "interrupted_to": recovered.rules_after,
                    "changes": recovered.operations}})
            if rules is not None:
                rules = list(rules)
                self._change("rules.replace", who, lambda current: rules, detail={"rules": len(rules)},
                             require_ready=False)
            else:
                self._remember_expiry(self.observe())
            self.ready = True

    def is_ready(self) -> bool:
        """Ready, and the classifier is still attached (someone may have removed it)."""
        if not self.ready:
            return False
        # A long apply holds the lock; a readiness probe must not time out behind it.
        if not self.lock.acquire(timeout=0.2):
            return True
        try:
            return self.datapath.is_attached()
        finally:
            self.lock.release()

    def _require_ready(self) -> None:
        if not self.ready:
            raise NotReady("not ready: the classifier is not attached yet")

    # -- reads ------------------------------------------------------------------
    def rules(self) -> list[Rule]:
        self._require_ready()
        with self.lock:
            return sorted(self.controller.live_rules(self.observe()).values(), key=lambda r: r.name)

    def rule(self, name: str) -> Rule:
        """One rule in force, found by its name: 3 us, where sorting every rule to find it took 1.7 ms at 10,000."""
        self._require_ready()
        with self.lock:
            o = self.observe().rules.get(name)
        if o is None or o.expired(self.clock()):
            raise NotFound(f"no rule named {name!r}")
        return o.rule

    def stats(self) -> list[RuleStats]:
        self._require_ready()
        with self.lock:
            return self.controller.stats(self.observe())

    def snapshot(self) -> Snapshot | None:
        """What /metrics reports; None before the datapath is attached.

        One sample per rule and direction it shapes, from the state this process keeps (it is the only
        writer; reading 10,000 records back was a fifth of a scrape), and so are the tries' sizes; the
        kernel is read for counters alone: the classifier's, and a class dump without its leaves' kinds.
        A scrape never triggers observe()'s periodic re-read of the whole trie."""
        if not self.ready:
            return None
        with self.lock:
            observed = self._observed if self._observed is not None else self.observe()
            samples, slots = self._scrape_order(observed)
            read = {direction: (self.datapath.counters(wanted, direction),
                                self.datapath.class_stats(direction, leaves=False))
                    for direction, wanted in slots.items()}
            entries = {direction: len(observed.trie(direction)) for direction in P.DIRECTIONS}
        return Snapshot([RuleSample(name, classid, read[d][0][slot], read[d][1].get(slot), rule, d)
                         for name, classid, slot, rule, d in samples], entries)

    def _scrape_order(self, observed: P.Observed) -> tuple[list[tuple], dict[str, list[int]]]:
        """(name, classid, slot, rule, direction) of every sample, by name, and each direction's slots
        (none for a direction no rule shapes: the ifb's classes are then not dumped).  Kept while the
        state is the same object (every change makes a new one): a scrape of an unchanged set of
        10,000 rules then sorts nothing."""
        if self._scrape_of is not observed:
            samples = [(name, abi.classid_text(o.slot), o.slot, o.rule, d)
                       for name, o in sorted(observed.rules.items()) for d in o.rule.directions]
            slots = {direction: [s[2] for s in samples if s[4] == direction] for direction in P.DIRECTIONS}
            self._scrape = (samples, {d: wanted for d, wanted in slots.items() if wanted})
            self._scrape_of = observed
        return self._scrape

    def metrics_text(self) -> bytes:
        """GET /metrics: what generate_latest(self.registry) writes, with the per-rule series written by
        KernelCollector.exposition (10,000 rules are 100,000 series)."""
        return self.collector.exposition() + generate_latest(self._own)

    # -- changes ----------------------------------------------------------------
    def put(self, rule: Rule, who: str, event: str = "rule.put") -> Rule:
        """Create or replace one rule; putting it unchanged restarts its TTL."""

        self._change_one(event, who, rule.name, rule)
        return rule

    def delete(self, name: str, who: str) -> None:
        self._change_one("rule.delete", who, name, None)

    def replace(self, rules: Iterable[Rule], who: str) -> list[Rule]:
        """Replace the whole set, atomically: validated whole, rolled back on failure."""
        rules = list(rules)
        self._change("rules.replace", who, lambda current: rules, detail={"rules": len(rules)})
        return sorted(rules, key=lambda r: r.name)

    def plan(self, rules: Iterable[Rule]) -> list[P.Operation]:
        self._require_ready()
        with self.lock:
            return self.controller.plan(rules)

    def clear(self, who: str) -> list[str]:
        names: list[str] = []

        def edit(current: dict[str, Rule]) -> list[Rule]:
            names.extend(sorted(current))
            return []

        self._change("rules.delete", who, edit)
        return names

    def latency(self, delay: str, who: str) -> tuple[Rule | None, list[str]]:
        """The compatibility endpoint: a catch-all delay; "0" deletes it.

        Returns the rule set (or None) and the names deleted."""
        rule = parse_rule({"dst": list(LATENCY_DST), "delay": delay}, where="path", name=LATENCY_RULE)
        if rule.delay_us:
            return self.put(rule, who, "latency.set"), []
        deleted: list[str] = []

        def edit(current: dict[str, Rule]) -> list[Rule]:
            if current.pop(LATENCY_RULE, None) is not None:
                deleted.append(LATENCY_RULE)
            return list(current.values())

        self._change("latency.delete", who, edit, detail={"rule": LATENCY_RULE})
        return None, deleted

    def expire(self) -> list[str]:
        """Remove rules whose TTL passed (the classifier already ignores them)."""
        if not self.ready or self.next_expiry_ns is None or self.next_expiry_ns > self.clock():
            return []
        with self.lock:
            observed = self.observe()
            gone = sorted(observed.expired(self.clock()))
            if not gone:
                self._remember_expiry(observed)
                return []
            self._change("rules.expire", "ttl", lambda current: list(current.values()),
                         detail={"rules": gone}, observed=observed, op="expire")
            return gone

    def repair(self) -> list[str]:
        """Put back what someone removed of the datapath (the ingress ifb or filter) and re-plan,
        which recreates the classes that went with it.  Returns what was put back."""
        if not self.ready:
            return []
        with self.lock:
            fixed = self.datapath.repair()
            if not fixed:
                return []
            log.warning("datapath.repaired", extra={"fields": {"interface": self.datapath.ifname,
                                                               "put_back": fixed}})
            self._observed = None  # the ifb's classes went with it: read what is there
            self._change("rules.repair", "daemon", lambda current: list(current.values()),
                         detail={"put_back": fixed})
            return fixed

    def _change(self, event: str, who: str, edit: Callable[[dict[str, Rule]], list[Rule]], *,
                renew: Iterable[str] = (), detail: dict | None = None, observed: P.Observed | None = None,
                op: str = "apply", require_ready: bool = True) -> None:
        """A change of the whole set: `edit` turns the live rules into the rules wanted."""

        def attempt(observed: P.Observed) -> tuple[Applied, Callable[[], dict[str, int]]]:
            current = self.controller.live_rules(observed)
            before = dict(current)
            desired = edit(current)
            applied = self.controller.apply(desired, renew=renew, observed=observed)
            return applied, lambda: self._count_changes(before, desired, observed, set(renew))

        self._run(event, who, attempt, detail=detail, observed=observed, op=op, require_ready=require_ready)

    def _change_one(self, event: str, who: str, name: str, rule: Rule | None) -> None:
        """A change of one rule, put or deleted (None): planned alone where it can be (Controller.change),
        and counted without walking the whole set, so that its time does not grow with the rules beside it."""

        def attempt(observed: P.Observed) -> tuple[Applied, Callable[[], dict[str, int]]]:
            now = self.clock()
            soonest = observed.next_expiry_ns
            expired = observed.expired(now) if soonest is not None and soonest <= now else set()
            old = observed.rules.get(name) if name not in expired else None
            applied = self.controller.change(name, rule, observed)
            return applied, lambda: {
                "created": int(rule is not None and old is None),
                "updated": int(rule is not None and old is not None and (rule != old.rule or bool(rule.ttl_us))),
                "deleted": int(rule is None), "expired": len(expired)}

        self._run(event, who, attempt, detail={"rule": name})

    def _run(self, event: str, who: str, attempt: Callable[[P.Observed], tuple[Applied, Callable[[], dict[str, int]]]],
             *, detail: dict | None = None, observed: P.Observed | None = None, op: str = "apply",
             require_ready: bool = True) -> None:
        """Make a change (`attempt`: the state now -> what was applied, and how to count it) under the
        lock, keep the state it left, count it for /metrics and log it."""
        if require_ready:
            self._require_ready()
        detail = {**self.log_fields, **(detail or {})}
        with self.lock, gc_paused():  # a bulk change makes many small objects: see model.gc_paused
            started = time.perf_counter()
            try:
                if observed is None:
                    observed = self.observe()
                applied, count = attempt(observed)
            except (InvalidInput, NotFound) as exc:
                audit(event, who=who, result="rejected", error=str(exc), **detail)
                raise
            except Exception as exc:
                self._observed = None  # rolled back, maybe not all the way: read the kernel next time
                self.instruments.error(op)
                audit(event, who=who, result="failed", error=str(exc), **detail)
                raise
            self._observed = applied.observed
            seconds = time.perf_counter() - started
            if applied.ops:
                self.instruments.apply_seconds.observe(seconds)
            counts = count()
            for kind, n in counts.items():
                self.instruments.changed(kind, n)
            self._remember_expiry(self._observed)
            # planned: "patch" (one rule planned alone) or "whole" (the set re-planned): which a slow change took
            audit(event, who=who, result="ok", changes=len(applied.ops), seconds=round(seconds, 4),
                  planned=applied.planned, **{k: v for k, v in counts.items() if v}, **detail)

    def _count_changes(self, before: dict[str, Rule], desired: list[Rule], observed: P.Observed,
                       renew: set[str]) -> dict[str, int]:
        want = {r.name: r for r in desired}
        return {
            "created": sum(1 for n in want if n not in before),
            "updated": sum(1 for n, r in want.items()
                           if n in before and (r != before[n] or (n in renew and r.ttl_us))),
            "deleted": sum(1 for n in before if n not in want),
            "expired": len(observed.expired(self.clock())),
        }

    def _remember_expiry(self, observed: P.Observed) -> None:
        """The next TTL deadline in a state just read or just predicted (no extra map walk)."""
        self.next_expiry_ns = observed.next_expiry_ns
