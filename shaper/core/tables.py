"""Rules -> what the classifier's maps hold, and the classifier itself, with no I/O.

Each direction has an LPM trie keyed by the peer's prefix (egress: the destination,
ingress: the source).  The value at a key says, for the packets whose longest
matching key it is:

- `slot`: the address-only rule there (0: none);
- `group`: the port group of the port and protocol rules there (0: none), looked up in
  the port trie by (group, protocol, port): a port beats a protocol-only entry (its
  block is longer), and either beats the address-only rule;
- `prefixlen`: where to go on when nothing there matched or lived (the classifier tries
  the key's length minus one); 0 stops: the packet passes unclassified.

That is the precedence (README, **Precedence**): the longest matching prefix first;
at one prefix a matching port, then a matching protocol, then the address-only rule;
a prefix whose rules do not match the packet hands it to the next shorter one.

`except` prefixes of a rule are keys too, barriers: their value is worked out here
for the addresses inside them as if the excepting rules did not exist (the
address-only rule of the longest other peer prefix containing it, `derived` when
that rule does not name the key), and they stop the classifier (prefixlen 0), so it
never falls back into the rule that carved them out.  A port or protocol rule whose
prefix contains an except of another rule, and is more specific than that barrier's
answer, would have to be merged into the barrier: refused (InvalidInput) instead.

The classifier looks up at most MAX_FALLBACK keys per packet: a set in which a packet may
fall through more keys in a row before the one that decides is refused (`_check_fallback`).

`check` validates a rule set as the planner will compile it (no slots needed); `compile`
builds the tables; `classify` is classifier.c in Python, for tests.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from operator import itemgetter
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

from shaper.core.fields import PORT_PROTOCOLS
from shaper.core.model import Prefix, Rule
from shaper.errors import InvalidInput

@dataclass(frozen=True, slots=True)
class Entry:
    """What a trie entry says, as plain values (shaper.datapath.abi encodes it): the slot whose
    class and counters the destination goes to, the deadline (CLOCK_MONOTONIC ns, 0: never), and
    the entry's own prefix length, which the classifier falls back from past an expired entry."""

    slot: int  # the address-only rule at this key (0: none; the classifier goes on past it)
    expires_ns: int
    prefixlen: int  # where the classifier falls back from (0: nowhere: it stops here)
    group: int = 0  # the port group of the port and protocol rules at this key (0: none)
    derived: bool = False  # written for an `except`: the slot's rule does not name this prefix
    inline: Inline | None = None  # the one port rule of this key, held here instead of in a group


class Inline(NamedTuple):
    """A key's port or protocol rules when they are one rule with one protocol and one port block
    ("tcp port 5432", "udp"), the common case: held in the trie value itself, so classifying by it
    costs a comparison instead of a port trie lookup."""

    slot: int
    expires_ns: int
    proto: int
    port: int  # the block's first port
    plen: int  # 0: any port (protocol-only), 16: one port


# Which trie a table belongs to: egress packets are looked up by destination, ingress ones by source.
DIRECTIONS = ("egress", "ingress")


class PortKey(NamedTuple):
    """A port trie key: in port group `group`, protocol `proto` and the ports whose top `plen`
    bits equal `port`'s (plen 0: any port, a protocol-only rule; 16: one port)."""

    group: int
    proto: int
    port: int
    plen: int


@dataclass(frozen=True, slots=True)
class PortEntry:
    """What a port trie entry says: the rule's slot and its deadline (CLOCK_MONOTONIC ns, 0: never)."""

    slot: int
    expires_ns: int




MAX_FALLBACK = 8  # bpf/shaper.h's SHAPER_MAX_FALLBACK
MAX_GROUPS = 0xFFFF  # the value's group is a u16; 0 is "none"
MAX_PORT_ENTRIES = 65536  # bpf/shaper.h's SHAPER_MAX_PORT_ENTRIES

_PREFIXLEN = itemgetter(1)
_ADDR = itemgetter(0)
_SIZES = [1 << (128 - n) for n in range(129)]  # addresses in a prefix of each length
_ACCEPTED = "each peer, protocol and port in one rule per direction (overlapping prefixes are fine: the longest wins)"


@dataclass(frozen=True)
class Placed:
    """A rule with where the tables point: its slot and deadline (0: never)."""

    rule: Rule
    slot: int
    expires_ns: int = 0


@dataclass
class Tables:
    """One rule set's maps: a trie per direction and the port entries of every group."""

    tries: dict[str, dict[Prefix, Entry]]
    ports: dict[PortKey, PortEntry]
    groups: dict[tuple[int, ...], int]  # member slots -> group id


def _supernets(p: Prefix) -> Iterator[Prefix]:
    """Every prefix strictly containing p, longest first."""
    value = int.from_bytes(p.addr, "big")
    for length in range(p.prefixlen - 1, -1, -1):
        mask = ((1 << length) - 1) << (128 - length) if length else 0
        yield Prefix((value & mask).to_bytes(16, "big"), length)


class _Direction:
    """One direction's keys, built from the rules in it."""

    def __init__(self, placed: Sequence[Placed], direction: str):
        self.direction = direction
        # The address-only rules' keys, built here: one value per (rule, prefix length), shared, and the
        # dict filled by C-level iteration (a Python loop per destination was most of a plan's time).
        self.trie: dict[Prefix, Entry] = {}
        self.by_slot: dict[int, Placed] = {}
        self.port_rules: dict[Prefix, list[Placed]] = defaultdict(list)
        self.excepts: dict[Prefix, list[Placed]] = defaultdict(list)
        shared: dict[Prefix, None] = {}  # prefixes with several port or protocol rules, in the order they became so
        for item in placed:
            rule = item.rule
            if rule.selects_ports:
                for p in rule.dst:
                    others = self.port_rules[p]
                    if others:
                        shared[p] = None
                    others.append(item)
            else:
                self.by_slot[item.slot] = item
                lengths = list(map(_PREFIXLEN, rule.dst))
                values = {n: Entry(item.slot, item.expires_ns, n) for n in set(lengths)}
                before = len(self.trie)
                self.trie.update(zip(rule.dst, map(values.__getitem__, lengths)))
                if len(self.trie) != before + len(rule.dst):
                    self._find_shared(placed, item)
            for e in rule.excepts:
                self.excepts[e].append(item)
        for p in shared:
            self._check_clash(p)

    def _check_clash(self, p: Prefix) -> None:
        """Refuse two rules at prefix p selecting one protocol and port: per protocol, a second
        protocol-only rule, or port ranges that overlap (one sort and sweep; a rule's own ranges
        are merged, so an overlap is always with another rule's).  A protocol-only rule and port
        rules of its protocol coexist: the port wins.  The error names the later rule of a pair that
        clashes, and the lowest port of that protocol where two of the ranges overlap."""
        items = self.port_rules[p]
        only: dict[int, int] = {}  # protocol -> the index in items of its protocol-only rule
        spans: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # protocol -> (first, last, index)
        for i, item in enumerate(items):
            rule = item.rule
            for proto in (rule.protocol,) if rule.protocol is not None else PORT_PROTOCOLS:
                if rule.ports:
                    spans[proto] += [(first, last, i) for first, last in rule.ports]
                elif proto in only:
                    raise _clash(rule, items[only[proto]].rule, p, self.direction, (proto, 0))
                else:
                    only[proto] = i
        found: tuple[int, int, int, int] | None = None  # (later index, port, protocol, earlier index)
        for proto, ranges in spans.items():
            ranges.sort()
            end, owner = -1, -1  # the furthest last port so far, and its rule
            for first, last, i in ranges:
                if first <= end:
                    here = (max(i, owner), first, proto, min(i, owner))
                    found = here if found is None else min(found, here)
                    break
                if last > end:
                    end, owner = last, i
        if found is not None:
            later, port, proto, earlier = found
            raise _clash(items[later].rule, items[earlier].rule, p, self.direction, (proto, port))

    def _find_shared(self, placed: Sequence[Placed], upto: Placed) -> None:
        owner: dict[Prefix, Placed] = {}
        for item in placed:
            if item.rule.selects_ports:
                continue
            for p in item.rule.dst:
                other = owner.setdefault(p, item)
                if other is not item:
                    raise InvalidInput(
                        f"rules[{item.rule.name}].dst",
                        f"{p} is already a destination of rule {other.rule.name!r}" + (
                            f" ({self.direction})" if self.direction != "egress" else ""),
                        f"{_ACCEPTED}; an address-only rule per prefix")
            if item is upto:
                return

    def barrier(self, node: Prefix) -> tuple[Placed | None, bool]:
        """The answer at an except node: the address-only rule of the longest peer prefix containing
        it whose rule does not except it (derived: it does not name the node), or None."""
        excluded = {id(item) for e in [node, *_supernets(node)] for item in self.excepts.get(e, ())}
        for p in [node, *_supernets(node)]:
            for item in self.port_rules.get(p, ()):
                if p != node and id(item) not in excluded:
                    raise InvalidInput(
                        f"rules[{item.rule.name}].dst",
                        f"{p} ({item.rule.selector_text()}) contains {node}, which "
                        f"{self._excepters(node)} carves out; a port or protocol rule around another rule's "
                        f"except is not supported",
                        f"give rule {item.rule.name!r} the same except, or a prefix that does not contain it")
            value = self.trie.get(p)
            item = self.by_slot.get(value.slot) if value is not None and value.slot else None
            if item is not None and id(item) not in excluded:
                return item, p != node
        return None, False

    def _excepters(self, node: Prefix) -> str:
        names = sorted({item.rule.name for e in [node, *_supernets(node)] for item in self.excepts.get(e, ())})
        return "rule " + ", ".join(repr(n) for n in names)


def _clash(rule: Rule, other: Rule, p: Prefix, direction: str, both: tuple[int, int]) -> InvalidInput:
    proto, port = both
    what = f"protocol {proto}" + (f" port {port}" if port else "")
    return InvalidInput(f"rules[{rule.name}].ports" if rule.ports else f"rules[{rule.name}].protocol",
                        f"{p} {what} ({direction}) is already selected by rule {other.name!r}",
                        f"{_ACCEPTED}; port ranges of rules on one prefix that do not overlap")


def _directions(placed: Iterable[Placed]) -> dict[str, list[Placed]]:
    out: dict[str, list[Placed]] = {d: [] for d in DIRECTIONS}
    for item in placed:
        for d in item.rule.directions:
            out[d].append(item)
    return out


def check(rules: Sequence[Rule]) -> None:
    """Raise InvalidInput for a rule set the tables cannot hold: two rules selecting the same peer,
    protocol and port in one direction, a port rule around another's except, or too many keys."""
    built = compile([Placed(r, i + 1) for i, r in enumerate(rules)], check_only=True)
    for d, trie in built.tries.items():
        if len(trie) > _max_prefixes():
            raise InvalidInput("rules", f"{len(trie)} {d} trie keys (peers and except prefixes) exceed the maximum "
                               f"{_max_prefixes()}", f"at most {_max_prefixes()} prefixes per direction")


def _max_prefixes() -> int:
    from shaper.core.model import MAX_PREFIXES  # noqa: PLC0415 - one name, read late for tests that shrink it

    return MAX_PREFIXES


def compile(placed: Sequence[Placed], groups: Mapping[tuple[int, ...], int] | None = None,
            taken_groups: Iterable[int] = (), *, check_only: bool = False) -> Tables:
    """The tables of `placed`.  `groups`: member slots -> id of groups that exist now, kept
    for the same members; new member sets get the lowest ids not in `taken_groups` nor kept.

    A key whose port and protocol rules are one rule with one port block holds it inline
    (Entry.inline) and needs no group; the others share a group per set of rules."""
    by_direction = _directions(placed)
    expirable = {item.slot for item in placed if item.expires_ns or item.rule.ttl_us}
    sides = {d: _Direction(items, d) for d, items in by_direction.items()}
    # Port groups: the slots of the port and protocol rules at a key, each set one group.
    members: dict[str, dict[Prefix, tuple[int, ...]]] = {}
    wanted: dict[tuple[int, ...], list[Placed]] = {}
    inline: dict[tuple[int, ...], Inline] = {}
    for d, side in sides.items():
        members[d] = {}
        for p, items in side.port_rules.items():
            key = tuple(sorted(i.slot for i in items)) if not check_only else tuple(sorted(id(i) for i in items))
            members[d][p] = key
            if key in wanted or key in inline:
                continue
            keys = items[0].rule.port_keys() if len(items) == 1 else ()
            if len(keys) == 1:
                (proto, port, plen), = keys
                inline[key] = Inline(items[0].slot, items[0].expires_ns, proto, port, plen)
            else:
                wanted[key] = items
    ids = _group_ids(list(wanted), groups or {}, taken_groups)
    ports: dict[PortKey, PortEntry] = {}
    if check_only:  # the entries are not built, only counted: a group's rules never share a key (_check_clash)
        count = sum(len(item.rule.port_keys()) for items in wanted.values() for item in items)
    else:
        for key, items in wanted.items():
            g = ids[key]
            for item in items:
                value = PortEntry(item.slot, item.expires_ns)
                for proto, port, plen in item.rule.port_keys():
                    ports[PortKey(g, proto, port, plen)] = value
        count = len(ports)
    if count > MAX_PORT_ENTRIES:
        raise InvalidInput("rules", f"{count} port entries exceed the maximum {MAX_PORT_ENTRIES}",
                           "fewer port ranges, or fewer distinct sets of port rules sharing peers")

    def port_part(key: tuple[int, ...] | None) -> tuple[int, Inline | None]:
        if key is None:
            return 0, None
        return (0, inline[key]) if key in inline else (ids[key], None)

    tries: dict[str, dict[Prefix, Entry]] = {}
    for d, side in sides.items():
        trie = side.trie
        for p, key in members[d].items():
            base = trie.get(p)
            g, one = port_part(key)
            trie[p] = Entry(base.slot if base else 0, base.expires_ns if base else 0, p.prefixlen, g, False, one)
        barriers = {}  # worked out on the peers' keys alone, then written
        for node in side.excepts:
            answer, derived = side.barrier(node)
            g, one = port_part(members[d].get(node))
            if answer is None:
                barriers[node] = Entry(0, 0, 0, g, False, one)
            else:
                barriers[node] = Entry(answer.slot, answer.expires_ns, 0, g, derived, one)
        trie.update(barriers)
        _check_fallback(trie, side, expirable)
        tries[d] = trie
    return Tables(tries, ports, {key: ids[key] for key in wanted})


def _check_fallback(trie: Mapping[Prefix, Entry], side: _Direction, expirable: set[int]) -> None:
    """Refuse a trie in which some packet needs more than MAX_FALLBACK lookups to be decided.

    The classifier walks a packet's keys longest first, going on past a key that may decide
    nothing for it (no address-only rule, or one with a TTL) and stopping at the first that always
    decides or has prefix length 0.  A walk starting at key S looks up the run of such
    fall-through keys from S up, then the key that ends the run (if there is one that decides
    anything).  Only keys some address starts at count: a key its longer keys cover entirely never
    begins a walk.  One sweep over the keys sorted as address ranges: the open ones contain the next."""
    # A walk past the limit needs MAX_FALLBACK nested fall-through keys, so as many prefix lengths
    # among the keys that may fall through: most sets (no TTL, or none nesting) end here.
    lengths = set(map(_PREFIXLEN, side.port_rules))
    for slot in expirable:
        item = side.by_slot.get(slot)
        if item is not None:
            lengths.update(map(_PREFIXLEN, item.rule.dst))
    if len(lengths) < MAX_FALLBACK:
        return
    # Each open key: [last address, its run of fall-through keys, the key ending the run (None: none),
    # addresses its longer keys cover, its size, prefix, the open key containing it].
    stack: list[list] = []

    def close(node: list) -> None:
        end = node[2]
        value = trie[end] if end is not None else None
        needed = node[1] + (value is not None and bool(value.slot or value.group or value.inline))
        if needed > MAX_FALLBACK:
            raise _too_deep(trie, side, node, needed)

    keys = sorted(trie)
    for p, first, value in zip(keys, map(int.from_bytes, map(_ADDR, keys)), map(trie.__getitem__, keys)):
        while stack and stack[-1][0] < first:
            node = stack.pop()
            if node[3] < node[4]:  # some address starts its walk here
                close(node)
        parent = stack[-1] if stack else None
        size = _SIZES[p.prefixlen]
        if value.prefixlen and (not value.slot or value.slot in expirable):
            run, end = (parent[1] + 1, parent[2]) if parent else (1, None)
        else:
            run, end = 0, p
        if parent:
            parent[3] += size
        stack.append([first + size - 1, run, end, 0, size, p, parent])
    while stack:
        node = stack.pop()
        if node[3] < node[4]:
            close(node)


def _too_deep(trie: Mapping[Prefix, Entry], side: _Direction, node: list, needed: int) -> InvalidInput:
    chain = []
    while node is not None and len(chain) <= MAX_FALLBACK:
        chain.append(node[5])
        if node[5] == node[2]:
            break
        node = node[6]

    def names(p: Prefix) -> list[str]:
        v = trie[p]
        out = [i.rule.name for i in side.port_rules.get(p, ())]
        if v.slot and not v.derived:
            out.append(side.by_slot[v.slot].rule.name)
        return out or [i.rule.name for i in side.excepts.get(p, ())]

    start = names(chain[0])[0]
    where = ", ".join(f"{p} ({'+'.join(names(p))})" for p in chain)
    return InvalidInput(
        f"rules[{start}].dst",
        f"a packet to {chain[0]} may take {needed} lookups, the classifier makes at most {MAX_FALLBACK}"
        f"{f' ({side.direction})' if side.direction != 'egress' else ''}: {where}",
        f"at most {MAX_FALLBACK - 1} nested prefixes in a row that may let a packet on to a shorter one (only port "
        f"or protocol rules, or a ttl) before one that decides; an address-only rule without ttl ends the run")


def _group_ids(keys: list[tuple[int, ...]], existing: Mapping[tuple[int, ...], int],
               taken: Iterable[int]) -> dict[tuple[int, ...], int]:
    out = {key: existing[key] for key in keys if key in existing}
    used = set(taken) | set(existing.values())
    g = 1
    for key in sorted(k for k in keys if k not in out):
        while g in used:
            g += 1
        if g > MAX_GROUPS:
            raise InvalidInput("rules", f"more than {MAX_GROUPS} distinct sets of port rules share peers",
                               "fewer port rules on shared peers")
        out[key] = g
        used.add(g)
    return out


def group_members(ports: Mapping[PortKey, PortEntry]) -> dict[int, tuple[int, ...]]:
    """group id -> the slots its port entries point at (a group's identity)."""
    out: dict[int, set[int]] = defaultdict(set)
    for key, value in ports.items():
        out[key.group].add(value.slot)
    return {g: tuple(sorted(slots)) for g, slots in out.items()}


def named_prefixes(tries: Mapping[str, Mapping[Prefix, Entry]],
                   ports: Mapping[PortKey, PortEntry]) -> dict[int, set[Prefix]]:
    """slot -> the prefixes its rule names (its dst), read back from tables: keys whose address-only
    slot it is (not a derived barrier answer) and keys whose port group it is in."""
    members = group_members(ports)
    out: dict[int, set[Prefix]] = defaultdict(set)
    for trie in tries.values():
        by_value: dict[int, list[Prefix]] = defaultdict(list)
        values: dict[int, Entry] = {}
        for p, v in trie.items():
            by_value[id(v)].append(p)
            values[id(v)] = v
        for vid, prefixes in by_value.items():
            v = values[vid]
            if v.slot and not v.derived:
                out[v.slot].update(prefixes)
            if v.inline is not None:
                out[v.inline.slot].update(prefixes)
            for slot in members.get(v.group, ()) if v.group else ():
                out[slot].update(prefixes)
    return out


def classify(tries: Mapping[str, Mapping[Prefix, Entry]], ports: Mapping[PortKey, PortEntry], direction: str,
             addr16: bytes, proto: int, port: int, now_ns: int = 0) -> int:
    """The slot classifier.c chooses for a packet (0: unclassified): the peer address (16 bytes,
    IPv4-mapped), the IP protocol and the peer's port (0 without one)."""
    trie = tries[direction]
    limit = 128
    for _ in range(MAX_FALLBACK):
        best = max((p for p in _containing(trie, addr16, limit)), key=lambda p: p.prefixlen, default=None)
        if best is None:
            return 0
        v = trie[best]
        one = v.inline
        if one is not None and one.proto == proto and (not one.plen or port >> (16 - one.plen) == one.port >> (16 - one.plen)) \
                and (one.expires_ns == 0 or now_ns < one.expires_ns):
            return one.slot
        if v.group:
            hit = _port_lookup(ports, v.group, proto, port)
            if hit is not None and not (hit.expires_ns == 0 or now_ns < hit.expires_ns):
                hit = ports.get(PortKey(v.group, proto, 0, 0))  # expired: the protocol-only rule, as classifier.c
            if hit is not None and (hit.expires_ns == 0 or now_ns < hit.expires_ns):
                return hit.slot
        if v.slot and (v.expires_ns == 0 or now_ns < v.expires_ns):
            return v.slot
        if v.prefixlen == 0:
            return 0
        limit = v.prefixlen - 1
    return 0


def _containing(trie: Mapping[Prefix, Entry], addr16: bytes, limit: int) -> Iterator[Prefix]:
    value = int.from_bytes(addr16, "big")
    for length in range(limit, -1, -1):
        mask = ((1 << length) - 1) << (128 - length) if length else 0
        p = Prefix((value & mask).to_bytes(16, "big"), length)
        if p in trie:
            yield p
            return


def _port_lookup(ports: Mapping[PortKey, PortEntry], group: int, proto: int, port: int) -> PortEntry | None:
    for plen in range(16, -1, -1):
        block = port & ~((1 << (16 - plen)) - 1) & 0xFFFF if plen else 0
        hit = ports.get(PortKey(group, proto, block, plen))
        if hit is not None:
            return hit
    return None
