"""plan(desired, observed) -> operations: the diff engine, with no I/O.

The kernel state shaper owns is described by `Observed` (rule records from
rule_meta, LPM entries, and which HTB classes exist with which leaf).  `plan`
returns the operations that turn it into the desired rule set, ordered so that
no packet is ever steered to a class that does not exist and no destination
that stays shaped is ever unshaped:

1. new rules: record, fresh counters, class, leaf;
2. changed rules: record rewritten, then class and leaf changed in place;
3. LPM entries written (new destinations, moved ones: one atomic update each);
4. LPM entries removed;
5. classes of removed rules deleted, then their records.

A record is always written before its class or leaf changes: whatever a crash
leaves, a slot whose class may differ from what the record says has a record
that differs from the rules before the change, so re-planning those rules
puts the class back (see `Undo`).

Capacity: old and new sets need not fit side by side in the trie.  When the
union of the old and new prefixes exceeds SHAPER_MAX_PREFIXES, step 4 comes
before step 3 (a destination whose prefix changes may then pass unshaped for
the moment between).  Slots are not reused within one change: a change that
needs more than SHAPER_MAX_RULES slots at its peak (old and new rules of
different names side by side) is refused up front (InvalidInput) with the way
round: two steps.

Slots (class minor = leaf major = stats index) are kept for rules that stay
and allocated lowest-free for new ones.

Crash safety: `undo_of(ops, observed)` is what the operations are about to
overwrite (the old record of every slot they write, the old slot of every
prefix they write), and `restore(undo, state)` rebuilds the rules before the
change from *any* state a prefix of those operations (or of a roll-back)
leaves: keys the operations do not touch are the same in both.  The
controller writes the undo record to the kernel before the first operation
and removes it after the last (controller.py).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from itertools import starmap
from operator import attrgetter, itemgetter
from typing import Iterable, Mapping, Union

from shaper.errors import InvalidInput, ShaperError
from shaper.core.model import MAX_PREFIXES, MAX_RULES, Prefix, Rule, rule_from_record
from shaper.core import tables
from shaper.core.tables import DIRECTIONS, MAX_FALLBACK, Entry, Inline, PortEntry, PortKey

__all__ = ["DIRECTIONS", "Entry", "Inline", "PortEntry", "PortKey"]  # defined with the tables, used by every datapath


@dataclass(frozen=True)
class ObservedRule:
    slot: int
    rule: Rule
    expires_ns: int = 0  # CLOCK_MONOTONIC; 0: never

    def expired(self, now_ns: int) -> bool:
        return bool(self.expires_ns) and self.expires_ns <= now_ns


@dataclass(frozen=True)
class Observed:
    rules: Mapping[str, ObservedRule] = field(default_factory=dict)
    entries: Mapping[Prefix, Entry] = field(default_factory=dict)  # the egress trie (by destination)
    classes: Mapping[int, str] = field(default_factory=dict)  # egress: slot -> leaf kind ("netem", "pfifo", ...)
    ingress_entries: Mapping[Prefix, Entry] = field(default_factory=dict)  # the ingress trie (by source)
    ingress_classes: Mapping[int, str] = field(default_factory=dict)  # the ifb's classes
    ports: Mapping[PortKey, PortEntry] = field(default_factory=dict)  # both directions' port groups
    # A plan's outcome: the tables and classes are exactly what its rules compile to, with nothing
    # else beside them (`patch` may then change one rule without looking at the others).  What the
    # kernel holds, read back, is not: someone may have changed it by hand.
    planned: bool = field(default=False, compare=False)

    def trie(self, direction: str) -> Mapping[Prefix, Entry]:
        return self.entries if direction == "egress" else self.ingress_entries

    def tree(self, direction: str) -> Mapping[int, str]:
        return self.classes if direction == "egress" else self.ingress_classes

    def expired(self, now_ns: int) -> set[str]:
        return {n for n, o in self.rules.items() if o.expired(now_ns)}

    # Facts about the whole set, worked out once per state (a change to one rule carries them over).
    @cached_property
    def next_expiry_ns(self) -> int | None:
        """The earliest TTL deadline of any rule; None: no rule has one."""
        return min((o.expires_ns for o in self.rules.values() if o.expires_ns), default=None)

    @cached_property
    def address_only(self) -> bool:
        """Every rule selects by address alone: no ports, no protocol, no except."""
        return not any(o.rule.selects_ports or o.rule.excepts for o in self.rules.values())

    @cached_property
    def ttl_lengths(self) -> frozenset[int]:
        """The prefix lengths of the rules with a TTL (or more: `patch` carries a superset over)."""
        return frozenset(p.prefixlen for o in self.rules.values() if o.expires_ns or o.rule.ttl_us for p in o.rule.dst)

    @cached_property
    def slots_in_use(self) -> frozenset[int]:
        """Every slot a record or a class holds."""
        return frozenset({o.slot for o in self.rules.values()} | set(self.classes) | set(self.ingress_classes))


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
    direction: str = "egress"  # egress: the interface's HTB; ingress: its ifb's


@dataclass(frozen=True)
class ChangeClass:
    slot: int
    rule: Rule
    direction: str = "egress"  # egress: the interface's HTB; ingress: its ifb's


@dataclass(frozen=True)
class SetLeaf:
    """Make the class's leaf match the rule: netem created, changed or removed."""

    slot: int
    rule: Rule
    current: str | None  # the leaf kind there now, None if the class is new
    direction: str = "egress"


@dataclass(frozen=True)
class UpsertEntries:
    entries: Mapping[Prefix, Entry]
    direction: str = "egress"  # egress: the destination trie; ingress: the source trie


@dataclass(frozen=True)
class DeleteEntries:
    prefixes: tuple[Prefix, ...]
    direction: str = "egress"


@dataclass(frozen=True)
class UpsertPorts:
    entries: Mapping[PortKey, PortEntry]


@dataclass(frozen=True)
class DeletePorts:
    keys: tuple[PortKey, ...]


@dataclass(frozen=True)
class DeleteClass:
    slot: int
    direction: str = "egress"


@dataclass(frozen=True)
class DeleteRecord:
    slot: int
    name: str = field(default="", compare=False)  # the rule whose record it is, where the planner knows it cheaply


Operation = Union[WriteRecord, ResetStats, CreateClass, ChangeClass, SetLeaf, UpsertEntries, DeleteEntries,
                  UpsertPorts, DeletePorts, DeleteClass, DeleteRecord]


def allocate_slots(names: Iterable[str], used: Iterable[int],
                   preferred: Mapping[str, int] | None = None) -> dict[str, int]:
    """Lowest free slots (1..MAX_RULES) for `names`, in the order given; a name's
    `preferred` slot where that is free (a roll-back puts rules back where they were).

    Raises InvalidInput saying the limit when the slots in use and the new names
    do not fit side by side."""
    names = list(names)
    taken = set(used)
    out: dict[str, int] = {}
    for name, slot in (preferred or {}).items():
        if name in names and 0 < slot <= MAX_RULES and slot not in taken:
            out[name] = slot
            taken.add(slot)
    slot = 1
    for name in names:
        if name in out:
            continue
        while slot in taken:
            slot += 1
        if slot > MAX_RULES:
            kept = len(taken) - len(out)
            raise InvalidInput(
                "rules", f"this change needs {kept + len(names)} rule slots at once ({kept} in use while "
                f"{len(names)} new rule(s) are created beside them), more than the {MAX_RULES} there are",
                f"at most {MAX_RULES} rules side by side: make it two changes, first without the rules being "
                f"replaced (or DELETE /rules), then with the new ones")
        out[name] = slot
        taken.add(slot)
    return {name: out[name] for name in names}


_RECORD_FIELDS = tuple(f.name for f in fields(Rule) if f.name != "dst")
_PREFIXLEN = itemgetter(1)  # Prefix.prefixlen, without an attribute lookup per destination
_ADDR = itemgetter(0)
_SLOT = attrgetter("slot")


def _record_fields(rule: Rule) -> tuple:
    """What a rule's record holds: every field but dst (as replace(rule, dst=()) compares, without a copy)."""
    return tuple(getattr(rule, name) for name in _RECORD_FIELDS)


def _same_except_dst(a: Rule, b: Rule) -> bool:
    """True when the rules differ at most in their peers (and in how a default is written): a change
    of anything else restarts the TTL (README, **TTL**; changes.rule_changes says so in a dry run)."""
    return (a.class_params() == b.class_params() and a.leaf_params() == b.leaf_params() and a.ttl_us == b.ttl_us
            and a.direction == b.direction and a.protocol == b.protocol and a.ports == b.ports
            and a.excepts == b.excepts)


def plan(desired: Iterable[Rule], observed: Observed, now_ns: int,
         renew: Iterable[str] = ()) -> list[Operation]:
    """The operations that make `observed` equal `desired` (see module doc for the order).

    A rule that stays unchanged keeps its TTL deadline, unless it is named in
    `renew` (an API PUT of one rule means "for TTL from now").
    """
    return plan_with_outcome(desired, observed, now_ns, renew)[0]


def plan_with_outcome(desired: Iterable[Rule], observed: Observed, now_ns: int,
                      renew: Iterable[str] = (), *, slots: Mapping[str, int] | None = None,
                      deadlines: Mapping[str, int] | None = None,
                      resend: Iterable[str] = ()) -> tuple[list[Operation], Observed]:
    """plan(), and the state the datapath will hold once the operations are done:
    what observe() would then return, so a single writer need not read it back.

    A roll-back's arguments: `slots` and `deadlines` put new rules in the slots
    they had and give new or changed rules the TTL deadline they had, instead
    of now+TTL; the class and leaf of rules named in `resend` are set again even
    where the record says they are right (a cut-short change or roll-back may
    have left a record that matches and a class that does not)."""
    renew = set(renew)
    resend = set(resend)
    deadlines = deadlines or {}
    want = {r.name: r for r in desired}
    expired = observed.expired(now_ns)
    live = {n: o for n, o in observed.rules.items() if n not in expired}

    # A rule that expired is gone: applying it again starts it afresh, in a new slot
    # so its counters and class start from zero.
    keep = {n: live[n] for n in want if n in live}
    new_names = sorted(n for n in want if n not in keep)
    fresh = allocate_slots(new_names, observed.slots_in_use, slots)

    ops: list[Operation] = []
    slot_of: dict[str, int] = {}
    expiry_of: dict[str, int] = {}

    for name in new_names:
        rule, slot = want[name], fresh[name]
        slot_of[name] = slot
        expiry_of[name] = deadlines.get(name, _deadline(rule, now_ns))
        ops += _created(slot, rule, expiry_of[name])

    dropped: list[Operation] = []  # classes of kept rules in a direction they left
    for name, old in sorted(keep.items()):
        rule, slot = want[name], old.slot
        slot_of[name] = slot
        # Most rules of a change are the very objects planned last time: skip comparing
        # their parameters (a daemon's PUT among 1,000 rules spent most of its time there).
        same = rule is old.rule or rule == old.rule
        changed = name in renew or (not same and not _same_except_dst(rule, old.rule))
        if name in deadlines:
            expiry_of[name] = deadlines[name]
        else:
            expiry_of[name] = _deadline(rule, now_ns) if changed else old.expires_ns
        kept_ops, left = _kept(old, rule, same, expiry_of[name], observed, name in resend)
        ops += kept_ops
        dropped += left

    placed = [tables.Placed(rule, slot_of[name], expiry_of[name]) for name, rule in want.items()]
    old_groups = tables.group_members(observed.ports)
    built = tables.compile(placed, {members: g for g, members in old_groups.items()}, old_groups)

    port_upserts = {k: v for k, v in built.ports.items() if observed.ports.get(k) != v}
    port_stale = tuple(sorted(k for k in observed.ports if k not in built.ports))
    if port_upserts:  # groups before the trie entries that point at them
        ops.append(UpsertPorts(dict(sorted(port_upserts.items()))))
    for d in DIRECTIONS:
        wanted_entries, old = built.tries[d], observed.trie(d)
        upserts = {p: v for p, v in wanted_entries.items() if old.get(p) != v} if old else wanted_entries
        stale = tuple(sorted(p for p in old if p not in wanted_entries))
        ops += _entry_ops(upserts, stale, d, len(old) + len(wanted_entries) - len(old.keys() & wanted_entries.keys()))
    if port_stale:  # after no trie entry points at them any more
        ops.append(DeletePorts(port_stale))

    kept_slots = set(slot_of.values())
    ops += dropped
    for d in DIRECTIONS:
        for slot in sorted(set(observed.tree(d)) - kept_slots):
            ops.append(DeleteClass(slot, d))
    for slot in sorted({o.slot for o in observed.rules.values()} - kept_slots):
        ops.append(DeleteRecord(slot))
    trees = {d: {slot_of[n]: ("netem" if r.has_netem else "pfifo") for n, r in want.items() if d in r.directions}
             for d in DIRECTIONS}
    outcome = Observed(
        rules={n: ObservedRule(slot_of[n], r, expiry_of[n]) for n, r in want.items()},
        entries=built.tries["egress"], classes=trees["egress"],
        ingress_entries=built.tries["ingress"], ingress_classes=trees["ingress"], ports=built.ports, planned=True,
    )
    return ops, outcome


def _deadline(rule: Rule, now_ns: int) -> int:
    """A rule's TTL deadline counted from now (0: it has none)."""
    return now_ns + rule.ttl_us * 1000 if rule.ttl_us else 0


def _created(slot: int, rule: Rule, expiry: int) -> list[Operation]:
    """The operations of a new rule: record, fresh counters, and a class and leaf in each direction."""
    ops: list[Operation] = [WriteRecord(slot, rule, expiry), ResetStats(slot)]
    for d in rule.directions:
        ops += [CreateClass(slot, rule, d), SetLeaf(slot, rule, None, d)]
    return ops


def _kept(old: ObservedRule, rule: Rule, same: bool, expiry: int, observed: Observed,
          resend: bool) -> tuple[list[Operation], list[Operation]]:
    """The operations of a rule that stays in its slot (`same`: it equals the one there), and the deletes
    of its classes in directions it left (run after the trie's entries): record first (module doc), then
    class and leaf per direction, changed in place; `resend`: class and leaf set again anyway."""
    slot = old.slot
    ops: list[Operation] = []
    # The record holds everything but dst (that lives in the trie); it goes first (module doc).
    if (not same and _record_fields(rule) != _record_fields(old.rule)) or expiry != old.expires_ns:
        ops.append(WriteRecord(slot, rule, expiry))
    for d in rule.directions:
        kind = observed.tree(d).get(slot)
        if kind is None:  # the class vanished under us, or the rule gained this direction: build it
            ops += [CreateClass(slot, rule, d), SetLeaf(slot, rule, None, d)]
            continue
        if resend or (not same and rule.class_params() != old.rule.class_params()):
            ops.append(ChangeClass(slot, rule, d))
        leaf_ok = (kind == "netem") == rule.has_netem and (same or rule.leaf_params() == old.rule.leaf_params())
        if not leaf_ok or (resend and rule.has_netem):
            ops.append(SetLeaf(slot, rule, kind, d))
    return ops, [DeleteClass(slot, d) for d in DIRECTIONS if d not in rule.directions and slot in observed.tree(d)]


def set_max_prefixes(value: int) -> None:
    """The tries' size for this process (model.max_prefixes_from): what plans and checks count against."""
    from shaper.core import model

    global MAX_PREFIXES
    MAX_PREFIXES = model.MAX_PREFIXES = value


def _entry_ops(upserts: Mapping[Prefix, Entry], stale: tuple[Prefix, ...], direction: str,
               union: int) -> list[Operation]:
    """A trie's writes, then its removals; the other way round when the old and new keys side by side
    (`union` of them) do not fit the trie (module doc)."""
    ops: list[Operation] = []
    if upserts:
        ops.append(UpsertEntries(dict(sorted(upserts.items())), direction))
    if stale:
        ops.append(DeleteEntries(stale, direction))
    if union > MAX_PREFIXES:
        ops.reverse()
    return ops


def patch(observed: Observed, name: str, rule: Rule | None, now_ns: int) -> tuple[list[Operation], Observed] | None:
    """plan_with_outcome(the rules of `observed` with rule `name` put (`rule`) or removed (None), observed,
    now_ns, renew=[name]): the same operations and outcome, in time proportional to the one rule instead of
    the whole set.  A change to one rule among 10,000 spent almost all its time re-planning the others.

    For the common case only, where one rule's keys and class cannot change anything of another rule's:
    a state a plan left (`Observed.planned`), rules that select by address alone, nothing expired, and no
    TTL nesting deep enough for the classifier's fall-back limit to matter.  None elsewhere, and for any
    change the whole-set plan would refuse or word differently (a peer another rule has, too many rules or
    prefixes, removing a rule that is not there): the caller plans the whole set, which says why."""
    if not observed.planned or not observed.address_only:
        return None
    if rule is not None and (rule.selects_ports or rule.excepts):
        return None
    soonest = observed.next_expiry_ns
    if soonest is not None and soonest <= now_ns:  # an expired rule: the whole plan removes it
        return None
    lengths = observed.ttl_lengths
    if rule is not None and rule.ttl_us:
        lengths = lengths | {p.prefixlen for p in rule.dst}
    if len(lengths) >= MAX_FALLBACK:  # tables._check_fallback would look at the whole trie
        return None
    old = observed.rules.get(name)
    if rule is None and old is None:
        return None
    if rule is not None and old is None and len(observed.rules) >= MAX_RULES:
        return None

    ops: list[Operation] = []
    dropped: list[Operation] = []
    if rule is None:
        slot, expiry = old.slot, 0
    elif old is None:
        slot = allocate_slots([name], observed.slots_in_use)[name]
        expiry = _deadline(rule, now_ns)
        ops += _created(slot, rule, expiry)
    else:  # as plan_with_outcome does for a kept rule named in `renew`
        slot, expiry = old.slot, _deadline(rule, now_ns)
        ops, dropped = _kept(old, rule, rule is old.rule or rule == old.rule, expiry, observed, False)

    tries: dict[str, Mapping[Prefix, Entry]] = {}
    trees: dict[str, Mapping[int, str]] = {}
    for d in DIRECTIONS:
        trie = observed.trie(d)
        had = old.rule.dst if old is not None and d in old.rule.directions else ()
        if rule is not None and d in rule.directions:
            values = {n: Entry(slot, expiry, n) for n in set(map(_PREFIXLEN, rule.dst))}
            want = dict(zip(rule.dst, map(values.__getitem__, map(_PREFIXLEN, rule.dst))))
        else:
            want = {}
        upserts = {}
        for p, v in want.items():
            there = trie.get(p)
            if there is not None and (old is None or there.slot != slot):
                return None  # another rule's peer: the whole plan refuses it, naming that rule
            if there != v:
                upserts[p] = v
        stale = tuple(sorted(p for p in had if p not in want))
        union = len(trie) + sum(1 for p in upserts if p not in trie)
        if union - len(stale) > MAX_PREFIXES:
            return None  # too many: the whole plan says so
        ops += _entry_ops(upserts, stale, d, union)
        if upserts or stale:
            new_trie = dict(trie)
            new_trie.update(upserts)
            for p in stale:
                del new_trie[p]
            tries[d] = new_trie
        else:
            tries[d] = trie
        tree = observed.tree(d)
        if rule is not None and d in rule.directions:
            kind = "netem" if rule.has_netem else "pfifo"
            trees[d] = tree if tree.get(slot) == kind else {**tree, slot: kind}
        elif slot in tree:
            trees[d] = {s: k for s, k in tree.items() if s != slot}
        else:
            trees[d] = tree
    ops += dropped
    rules = dict(observed.rules)
    if rule is None:
        ops += [DeleteClass(slot, d) for d in DIRECTIONS if slot in observed.tree(d)]
        ops.append(DeleteRecord(slot, name))
        del rules[name]
    else:
        rules[name] = ObservedRule(slot, rule, expiry)
    outcome = Observed(rules=rules, entries=tries["egress"], classes=trees["egress"],
                       ingress_entries=tries["ingress"], ingress_classes=trees["ingress"], ports=observed.ports,
                       planned=True)
    # What is known of the whole set carries over without another pass over it.
    facts = outcome.__dict__
    facts["address_only"] = True
    facts["ttl_lengths"] = lengths
    if old is None or not old.expires_ns or old.expires_ns != soonest:
        facts["next_expiry_ns"] = min(filter(None, (soonest, expiry)), default=None)
    return ops, outcome


_UNDO_KEY = struct.Struct("=B16s")  # prefixlen, addr
# present, slot, expires_ns, fallback prefixlen, group, derived; the inline port rule (slot 0: none): slot,
# expires_ns, protocol, port, port bits
_UNDO_VAL = struct.Struct("=BIQBHBIQBHB")
_UNDO_PORT = struct.Struct("=IBHBBIQ")  # group, proto, port, plen, present, slot, expires_ns
_COUNT = struct.Struct("=I")
UNDO_VERSION = 2


def _pack_value(v: Entry | None) -> bytes:
    if v is None:
        return _UNDO_VAL.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    one = v.inline or Inline(0, 0, 0, 0, 0)
    return _UNDO_VAL.pack(1, v.slot, v.expires_ns, v.prefixlen, v.group, v.derived, *one)


@dataclass(frozen=True)
class Undo:
    """What a change is about to overwrite: with it, the rules before the change can be
    rebuilt from whatever state the change (or a roll-back of it) was cut short in."""

    rules: Mapping[int, ObservedRule | None]  # slot -> its rule before (dst unused); None: no rule there
    # direction -> prefix -> the trie value before (None: absent)
    entries: Mapping[str, Mapping[Prefix, Entry | None]] = field(default_factory=dict)
    ports: Mapping[PortKey, PortEntry | None] = field(default_factory=dict)  # the port entries before
    before: int = 0  # rule counts before and after, for the log
    after: int = 0

    def pack(self) -> bytes:
        records = []
        for slot, o in sorted(self.rules.items()):
            if o is None:
                records.append([slot, None])
            else:
                rule = replace(o.rule, dst=()).to_dict()
                del rule["dst"]
                records.append([slot, {"rule": rule, "expires_ns": o.expires_ns}])
        head = json.dumps({"version": UNDO_VERSION, "before": self.before, "after": self.after,
                           "rules": records}, separators=(",", ":")).encode()
        parts = [_COUNT.pack(len(head)), head]
        for d in DIRECTIONS:
            entries = self.entries.get(d, {})
            prefixes = list(entries)
            values = list(entries.values())
            # Each distinct value packed once (a rule's entries share theirs; a new prefix's is None): the
            # distinct ones picked in C first, not a _pack_value call per entry.
            packed = {i: _pack_value(v) for i, v in dict(zip(map(id, values), values)).items()}
            parts += [_COUNT.pack(len(prefixes)),
                      b"".join(starmap(_UNDO_KEY.pack, zip(map(_PREFIXLEN, prefixes), map(_ADDR, prefixes)))),
                      b"".join(map(packed.__getitem__, map(id, values)))]
        parts.append(_COUNT.pack(len(self.ports)))
        for k, v in self.ports.items():
            parts.append(_UNDO_PORT.pack(*k, v is not None, v.slot if v else 0, v.expires_ns if v else 0))
        return zlib.compress(b"".join(parts), 1)

    @classmethod
    def unpack(cls, data: bytes) -> "Undo":
        """The record `pack` wrote; a ShaperError for one this shaper cannot read (damaged, or
        another version's), so a start or an apply says so instead of failing with a bare error."""
        try:
            raw = zlib.decompress(data)
            (n,) = _COUNT.unpack_from(raw)
            head = json.loads(raw[4:4 + n])
            version = head.get("version")
            if version == UNDO_VERSION:
                rules = {slot: None if rec is None else ObservedRule(slot, rule_from_record(rec["rule"], ()),
                                                                     rec.get("expires_ns", 0))
                         for slot, rec in head["rules"]}
                at = 4 + n
                entries: dict[str, dict[Prefix, Entry | None]] = {}
                for d in DIRECTIONS:
                    (count,) = _COUNT.unpack_from(raw, at)
                    at += 4
                    keys = raw[at:at + count * _UNDO_KEY.size]
                    at += len(keys)
                    vals = raw[at:at + count * _UNDO_VAL.size]
                    at += len(vals)
                    if len(keys) != count * _UNDO_KEY.size or len(vals) != count * _UNDO_VAL.size:
                        raise ValueError("truncated")
                    decoded: dict[bytes, Entry | None] = {}
                    out = entries[d] = {}
                    for (plen, addr), i in zip(_UNDO_KEY.iter_unpack(keys), range(0, len(vals), _UNDO_VAL.size)):
                        chunk = vals[i:i + _UNDO_VAL.size]
                        value = decoded.get(chunk, False)
                        if value is False:
                            present, slot, expires, fallback, group, derived, *one = _UNDO_VAL.unpack(chunk)
                            value = decoded[chunk] = Entry(slot, expires, fallback, group, bool(derived),
                                                           Inline(*one) if one[0] else None) if present else None
                        out[Prefix(addr, plen)] = value
                (count,) = _COUNT.unpack_from(raw, at)
                at += 4
                ports: dict[PortKey, PortEntry | None] = {}
                for g, proto, port, plen, present, slot, expires in _UNDO_PORT.iter_unpack(
                        raw[at:at + count * _UNDO_PORT.size]):
                    ports[PortKey(g, proto, port, plen)] = PortEntry(slot, expires) if present else None
                if len(ports) != count:
                    raise ValueError("truncated")
        except (zlib.error, struct.error, ValueError, KeyError, TypeError, AttributeError, InvalidInput) as exc:
            raise ShaperError(f"the intent record of an interrupted change cannot be read ({exc}); "
                              "`shaper reset` removes shaper's state from the interface") from None
        if version != UNDO_VERSION:
            raise ShaperError(f"the intent record of an interrupted change is version {version!r}, this shaper "
                              f"reads {UNDO_VERSION}: finish with the shaper that wrote it, or `shaper reset`")
        return cls(rules, entries, ports, head.get("before", 0), head.get("after", 0))


def undo_of(ops: Iterable[Operation], observed: Observed, after: int = 0) -> Undo:
    """The Undo of `ops` planned against `observed`: the old record of every slot they
    write or delete, and the old value of every trie and port entry they write or delete."""
    by_slot: dict[int, ObservedRule] | None = None  # built only when an operation does not name its rule

    def at(slot: int, name: str) -> ObservedRule | None:
        nonlocal by_slot
        o = observed.rules.get(name)
        if o is not None and o.slot == slot:
            return o
        if by_slot is None:
            by_slot = {o.slot: o for o in observed.rules.values()}
        return by_slot.get(slot)

    rules: dict[int, ObservedRule | None] = {}
    entries: dict[str, dict[Prefix, Entry | None]] = {d: {} for d in DIRECTIONS}
    ports: dict[PortKey, PortEntry | None] = {}
    for op in ops:
        if isinstance(op, (WriteRecord, DeleteRecord)) and op.slot not in rules:
            o = at(op.slot, op.rule.name if isinstance(op, WriteRecord) else op.name)
            rules[op.slot] = None if o is None else replace(o, rule=replace(o.rule, dst=()))
        elif isinstance(op, (UpsertEntries, DeleteEntries)):
            # A plan writes each prefix once; iterated in C, as plan() does (100,000s of them).
            old, out = observed.trie(op.direction), entries[op.direction]
            touched = op.entries.keys() if isinstance(op, UpsertEntries) else op.prefixes
            out.update(dict.fromkeys(touched))
            present = old.keys() & touched
            out.update(zip(present, map(old.__getitem__, present)))
        elif isinstance(op, (UpsertPorts, DeletePorts)):
            for key in (op.entries if isinstance(op, UpsertPorts) else op.keys):
                ports.setdefault(key, observed.ports.get(key))
    return Undo(rules, entries, ports, len(observed.rules), after)


def named_dst(observed: Observed) -> dict[int, tuple[Prefix, ...]]:
    """slot -> its rule's peers (dst), read back from the tables (shaper.core.tables.named_prefixes)."""
    named = tables.named_prefixes({"egress": observed.entries, "ingress": observed.ingress_entries}, observed.ports)
    return {slot: tuple(sorted(prefixes)) for slot, prefixes in named.items()}


def attach_rules(observed: Observed, records: Iterable[tuple[int, Mapping]]) -> Observed:
    """`observed` (tables and classes) with its rules: each record ({"rule": ..., "expires_ns": ...}, by
    slot; what WriteRecord writes) with the peers the tables give its slot."""
    dst_of = named_dst(observed)
    rules = {}
    for slot, record in records:
        rule = rule_from_record(record["rule"], dst_of.get(slot, ()))
        rules[rule.name] = ObservedRule(slot, rule, record.get("expires_ns", 0))
    return replace(observed, rules=rules)


def restore(undo: Undo, state: Observed) -> dict[str, ObservedRule]:
    """The rules before the change `undo` belongs to (with dst, slot and deadline),
    rebuilt from `state`: what it holds at keys the change does not touch, `undo` elsewhere."""
    by_slot = {o.slot: o for o in state.rules.values()}
    for slot, o in undo.rules.items():
        if o is None:
            by_slot.pop(slot, None)
        else:
            by_slot[slot] = o
    tries = {}
    for d in DIRECTIONS:
        trie = dict(state.trie(d))
        for p, v in undo.entries.get(d, {}).items():
            if v is None:
                trie.pop(p, None)
            else:
                trie[p] = v
        tries[d] = trie
    ports = dict(state.ports)
    for k, pv in undo.ports.items():
        if pv is None:
            ports.pop(k, None)
        else:
            ports[k] = pv
    dst_of = named_dst(Observed(entries=tries["egress"], ingress_entries=tries["ingress"], ports=ports))
    return {o.rule.name: ObservedRule(slot, replace(o.rule, dst=dst_of.get(slot, ())), o.expires_ns)
            for slot, o in sorted(by_slot.items())}


def describe(op: Operation) -> str:
    """One line per operation, for dry runs and logs."""
    ingress = getattr(op, "direction", "egress") == "ingress"
    peer = "ingress source" if ingress else "destination"
    if isinstance(op, UpsertEntries):
        return f"write {len(op.entries)} {peer} entr{'y' if len(op.entries) == 1 else 'ies'}"
    if isinstance(op, DeleteEntries):
        return f"remove {len(op.prefixes)} {peer} entr{'y' if len(op.prefixes) == 1 else 'ies'}"
    if isinstance(op, UpsertPorts):
        return f"write {len(op.entries)} port entr{'y' if len(op.entries) == 1 else 'ies'}"
    if isinstance(op, DeletePorts):
        return f"remove {len(op.keys)} port entr{'y' if len(op.keys) == 1 else 'ies'}"
    rule = getattr(op, "rule", None)
    what = {WriteRecord: "write the record of", ResetStats: "reset the counters of", CreateClass: "create class",
            ChangeClass: "change class", SetLeaf: "set the leaf of", DeleteClass: "delete class",
            DeleteRecord: "delete the record of"}[type(op)]
    if ingress:
        what = what.replace("class", "ingress class")
    return f"{what} slot {op.slot}" + (f" ({rule.name})" if rule else "")
