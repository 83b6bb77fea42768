"""plan(desired, observed) -> operations: the diff engine, with no I/O.

The kernel state shaper owns is described by `Observed` (rule records from
rule_meta, LPM entries, and which HTB classes exist with which leaf).  `plan`
returns the operations that turn it into the desired rule set, ordered so that
no packet is ever steered to a class that does not exist and no destination
that stays shaped is ever unshaped:

1. new rules: record, fresh counters, class, leaf;
2. changed rules: class and leaf changed in place, record rewritten;
3. LPM entries written (new destinations, moved ones: one atomic update each);
4. LPM entries removed;
5. classes of removed rules deleted, then their records.

Slots (class minor = leaf major = stats index) are kept for rules that stay
and allocated lowest-free for new ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from operator import itemgetter
from typing import Iterable, Mapping, Union

from . import layout
from .model import MAX_RULES, Prefix, Rule


@dataclass(frozen=True)
class ObservedRule:
    slot: int
    rule: Rule
    expires_ns: int = 0  # CLOCK_MONOTONIC; 0: never


@dataclass(frozen=True)
class Observed:
    rules: Mapping[str, ObservedRule] = field(default_factory=dict)
    entries: Mapping[Prefix, layout.LpmVal] = field(default_factory=dict)
    classes: Mapping[int, str] = field(default_factory=dict)  # slot -> leaf kind ("netem", "pfifo", ...)

    def expired(self, now_ns: int) -> set[str]:
        return {n for n, o in self.rules.items() if o.expires_ns and o.expires_ns <= now_ns}


@dataclass(frozen=True)
class WriteRecord:
    slot: int
    rule: Rule
    expires_ns: int


@dataclass(frozen=True)
class ResetStats:
    slot: int


@dataclass(frozen=True)
class CreateClass:
    slot: int
    rule: Rule


@dataclass(frozen=True)
class ChangeClass:
    slot: int
    rule: Rule


@dataclass(frozen=True)
class SetLeaf:
    """Make the class's leaf match the rule: netem created, changed or removed."""

    slot: int
    rule: Rule
    current: str | None  # the leaf kind there now, None if the class is new


@dataclass(frozen=True)
class UpsertEntries:
    entries: Mapping[Prefix, layout.LpmVal]


@dataclass(frozen=True)
class DeleteEntries:
    prefixes: tuple[Prefix, ...]


@dataclass(frozen=True)
class DeleteClass:
    slot: int


@dataclass(frozen=True)
class DeleteRecord:
    slot: int


Operation = Union[WriteRecord, ResetStats, CreateClass, ChangeClass, SetLeaf, UpsertEntries, DeleteEntries,
                  DeleteClass, DeleteRecord]


def allocate_slots(names: Iterable[str], used: Iterable[int]) -> dict[str, int]:
    """Lowest free slots (1..MAX_RULES) for `names`, in the order given."""
    taken = set(used)
    out: dict[str, int] = {}
    slot = 1
    for name in names:
        while slot in taken:
            slot += 1
        if slot > MAX_RULES:
            raise ValueError(f"no free rule slot: at most {MAX_RULES} rules")
        out[name] = slot
        taken.add(slot)
    return out


_RECORD_FIELDS = tuple(f.name for f in fields(Rule) if f.name != "dst")
_PREFIXLEN = itemgetter(1)  # Prefix.prefixlen, without an attribute lookup per destination


def _record_fields(rule: Rule) -> tuple:
    """What a rule's record holds: every field but dst (as replace(rule, dst=()) compares, without a copy)."""
    return tuple(getattr(rule, name) for name in _RECORD_FIELDS)


def _same_except_dst(a: Rule, b: Rule) -> bool:
    return a.class_params() == b.class_params() and a.leaf_params() == b.leaf_params() and a.ttl_us == b.ttl_us


def plan(desired: Iterable[Rule], observed: Observed, now_ns: int,
         renew: Iterable[str] = ()) -> list[Operation]:
    """The operations that make `observed` equal `desired` (see module doc for the order).

    A rule that stays unchanged keeps its TTL deadline, unless it is named in
    `renew` (an API PUT of one rule means "for TTL from now").
    """
    return plan_with_outcome(desired, observed, now_ns, renew)[0]


def plan_with_outcome(desired: Iterable[Rule], observed: Observed, now_ns: int,
                      renew: Iterable[str] = ()) -> tuple[list[Operation], Observed]:
    """plan(), and the state the datapath will hold once the operations are done:
    what observe() would then return, so a single writer need not read it back."""
    renew = set(renew)
    want = {r.name: r for r in desired}
    expired = observed.expired(now_ns)
    live = {n: o for n, o in observed.rules.items() if n not in expired}

    # A rule that expired is gone: applying it again starts it afresh, in a new slot
    # so its counters and class start from zero.
    keep = {n: live[n] for n in want if n in live}
    slots_in_use = {o.slot for o in observed.rules.values()} | set(observed.classes)
    new_names = sorted(n for n in want if n not in keep)
    fresh = allocate_slots(new_names, slots_in_use)

    ops: list[Operation] = []
    slot_of: dict[str, int] = {}
    expiry_of: dict[str, int] = {}

    for name in new_names:
        rule, slot = want[name], fresh[name]
        slot_of[name] = slot
        expiry_of[name] = now_ns + rule.ttl_us * 1000 if rule.ttl_us else 0
        ops += [WriteRecord(slot, rule, expiry_of[name]), ResetStats(slot), CreateClass(slot, rule),
                SetLeaf(slot, rule, None)]

    for name, old in sorted(keep.items()):
        rule, slot = want[name], old.slot
        slot_of[name] = slot
        # Most rules of a change are the very objects planned last time: skip comparing
        # their parameters (a daemon's PUT among 1,000 rules spent most of its time there).
        same = rule is old.rule or rule == old.rule
        changed = name in renew or (not same and not _same_except_dst(rule, old.rule))
        expiry_of[name] = (now_ns + rule.ttl_us * 1000 if rule.ttl_us else 0) if changed else old.expires_ns
        kind = observed.classes.get(slot)
        if kind is None:  # the class vanished under us: rebuild it
            ops += [CreateClass(slot, rule), SetLeaf(slot, rule, None)]
        else:
            if not same and rule.class_params() != old.rule.class_params():
                ops.append(ChangeClass(slot, rule))
            leaf_ok = (kind == "netem") == rule.has_netem and (same or rule.leaf_params() == old.rule.leaf_params())
            if not leaf_ok:
                ops.append(SetLeaf(slot, rule, kind))
        # The record holds everything but dst (that lives in the trie).
        if (not same and _record_fields(rule) != _record_fields(old.rule)) or expiry_of[name] != old.expires_ns:
            ops.append(WriteRecord(slot, rule, expiry_of[name]))

    wanted_entries: dict[Prefix, layout.LpmVal] = {}
    for name, rule in want.items():
        slot = slot_of[name]
        # A rule's entries differ only by prefix length: one value per length, shared, and
        # the dict filled by C-level iteration (a Python loop per destination was most of
        # the plan's time for 100,000 of them).
        lengths = list(map(_PREFIXLEN, rule.dst))
        values = {n: layout.LpmVal(layout.classid(slot), slot, expiry_of[name], n) for n in set(lengths)}
        wanted_entries.update(zip(rule.dst, map(values.__getitem__, lengths)))
    if observed.entries:
        upserts = {p: v for p, v in wanted_entries.items() if observed.entries.get(p) != v}
    else:
        upserts = wanted_entries
    if upserts:
        ops.append(UpsertEntries(dict(sorted(upserts.items()))))
    stale = tuple(sorted(p for p in observed.entries if p not in wanted_entries))
    if stale:
        ops.append(DeleteEntries(stale))

    kept_slots = set(slot_of.values())
    for slot in sorted(set(observed.classes) - kept_slots):
        ops.append(DeleteClass(slot))
    for slot in sorted({o.slot for o in observed.rules.values()} - kept_slots):
        ops.append(DeleteRecord(slot))
    outcome = Observed(
        rules={n: ObservedRule(slot_of[n], r, expiry_of[n]) for n, r in want.items()},
        entries=wanted_entries,
        classes={slot_of[n]: ("netem" if r.has_netem else "pfifo") for n, r in want.items()},
    )
    return ops, outcome


def describe(op: Operation) -> str:
    """One line per operation, for dry runs and logs."""
    if isinstance(op, UpsertEntries):
        return f"write {len(op.entries)} destination entr{'y' if len(op.entries) == 1 else 'ies'}"
    if isinstance(op, DeleteEntries):
        return f"remove {len(op.prefixes)} destination entr{'y' if len(op.prefixes) == 1 else 'ies'}"
    rule = getattr(op, "rule", None)
    what = {WriteRecord: "write the record of", ResetStats: "reset the counters of", CreateClass: "create class",
            ChangeClass: "change class", SetLeaf: "set the leaf of", DeleteClass: "delete class",
            DeleteRecord: "delete the record of"}[type(op)]
    return f"{what} slot {op.slot}" + (f" ({rule.name})" if rule else "")
