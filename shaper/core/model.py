"""The rule model: parsing, validation and the canonical form of rules.

A Rule is frozen and holds integers in base units (`delay_us`,
`rate_bits_per_s`, `loss_pct`).  `parse_rule` takes the field names users write
in YAML and JSON (the same for the rules file, the CLI and the HTTP API; each
field is described once, in shaper.core.fields) and refuses unknown fields; `parse_ruleset` also checks the set as a whole (unique names, no
destination in two rules, capacity).  No I/O here.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import math
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from itertools import repeat
from operator import itemgetter, methodcaller
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, TypeVar

import yaml

from shaper.errors import ApiError, InvalidInput
from shaper.core.fields import (
    ASSUMED_RATE_BITS_PER_S,
    DST_FORM,
    EXCEPT_FORM,
    FIELD_NAMES,
    MAX_EXCEPT,
    PORT_PROTOCOLS,
    PROTOCOL_NAMES,
    MAX_BURST_BYTES,
    MAX_NETEM_LIMIT,
    MIN_BURST_BYTES,
    MIN_NETEM_LIMIT,
    NAME,
    OPTIONAL_FIELDS,
    LossGE,
    unknown_field,
)
from shaper.core.units import format_bytes, format_rate_bits_per_s, format_size_bytes

# The kernel maps' sizes: bpf/shaper.h's SHAPER_MAX_RULES and SHAPER_MAX_PREFIXES, which
# shaper.datapath.abi checks against these at import (the pure core reads no C file).
MAX_RULES = 16383
DEFAULT_MAX_PREFIXES = 262144
# The tries' size: bpf/shaper.h's default, or $SHAPER_MAX_PREFIXES for every shaper process on
# a machine (plan.set_max_prefixes sets it at start; tries made with one size are adopted only by
# a process of that size). The kernel allocates an entry when it is written, not for the size.
MAX_PREFIXES = DEFAULT_MAX_PREFIXES
LARGEST_MAX_PREFIXES = 1 << 24
# bpf/shaper.h's SHAPER_META_LEN: a rule's record (every field but dst, as JSON) must fit it.
META_LEN = 1020
MTU_BYTES = 1500


def max_prefixes_from(environ: Mapping[str, str]) -> int:
    """$SHAPER_MAX_PREFIXES, checked; the default without it."""
    text = environ.get("SHAPER_MAX_PREFIXES", "").strip()
    if not text:
        return DEFAULT_MAX_PREFIXES
    form = f"a whole number of prefixes per trie, 1024 to {LARGEST_MAX_PREFIXES:,} (1048576 for a million)"
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise InvalidInput("SHAPER_MAX_PREFIXES", f"{text!r} is not a number", form) from None
    if not 1024 <= value <= LARGEST_MAX_PREFIXES:
        raise InvalidInput("SHAPER_MAX_PREFIXES", f"{value} is out of range", form)
    return value
# HTB takes a class's burst as the time it lasts at the rate, in the kernel's
# 64 ns scheduler ticks, in a u32: a burst longer than ~274.9 s at its rate
# does not fit (1gb at 1mbit would be 8,590 s) and must be refused here, not
# fail in the encoder.
PSCHED_TICK_NS = 64
MAX_BURST_NS = 0xFFFF_FFFF * PSCHED_TICK_NS


def max_burst_bytes(rate_bits_per_s: int) -> int:
    """The largest burst HTB can hold at a rate: MAX_BURST_NS of sending, and MAX_BURST_BYTES."""
    return min(MAX_BURST_BYTES, max(1, rate_bits_per_s // 8) * MAX_BURST_NS // 10**9)


# The destinations people write by the hundred thousand, parsed without building
# ipaddress objects (ten times faster): libc's inet_pton takes exactly the dotted quads
# ipaddress takes (four decimal octets, no leading zeros) and, over hex digits and
# colons only, the same IPv6 text.  tests/unit/test_bulk.py checks both against
# ipaddress; anything else, errors included, goes through ipaddress.
_V6_TEXT = re.compile(r"[0-9A-Fa-f:]{2,39}")
_V4_MAPPED_HEAD = (0xFFFF).to_bytes(12, "big")  # ::ffff:0:0/96
_PLEN = [bytes((n,)) for n in range(129)]


def _parse_fast(text: str) -> bytes | None:
    """The key of a plain IPv4 or IPv6 CIDR with its host bits zero (its 16-byte address, then
    its prefix length as one byte: `Prefix`'s order as a bytes order), else None."""
    addr, slash, length = text.partition("/")
    if slash and not (length.isascii() and length.isdigit() and len(length) <= 3):
        return None
    try:
        if "." in addr:
            packed = socket.inet_pton(socket.AF_INET, addr)
            bits, space, head = (int(length) if slash else 32), 32, _V4_MAPPED_HEAD
        elif _V6_TEXT.fullmatch(addr):
            packed = socket.inet_pton(socket.AF_INET6, addr)
            bits, space, head = (int(length) if slash else 128), 128, b""
        else:
            return None
    except (OSError, ValueError):  # ValueError: an embedded NUL, which libc cannot be given
        return None
    if bits > space or (bits < space and int.from_bytes(packed, "big") & ((1 << (space - bits)) - 1)):
        return None  # ipaddress says what is wrong
    return head + packed + _PLEN[bits + 128 - space]


class Prefix(NamedTuple):
    """A destination in the classifier's key space: IPv4 is IPv4-mapped.

    A NamedTuple rather than a frozen dataclass: hashing, comparing and sorting run in C,
    which for a rule of 100,000 destinations (parsed, validated, planned and compared with
    what the kernel holds) saves more than a second; the order is the same (addr, then
    prefixlen)."""

    addr: bytes  # 16 bytes, host bits zero
    prefixlen: int  # 0..128 in the IPv6 key space

    @classmethod
    def parse(cls, text: object, fld: str) -> "Prefix":
        key = _parse_fast(text) if type(text) is str else None
        if key is not None:
            return cls(key[:16], key[16])
        if not isinstance(text, str):
            raise InvalidInput(fld, f"expected a string, got {type(text).__name__}", DST_FORM)
        if "%" in text:
            raise InvalidInput(fld, f"{text!r} has a zone index; zones are not routable destinations", DST_FORM)
        try:
            net = ipaddress.ip_network(text.strip(), strict=True)
        except ValueError as exc:
            raise InvalidInput(fld, str(exc), DST_FORM) from None
        if net.version == 4:
            mapped = int(net.network_address) | 0xFFFF_0000_0000
            return cls(mapped.to_bytes(16, "big"), 96 + net.prefixlen)
        return cls(net.network_address.packed, net.prefixlen)

    @property
    def is_v4(self) -> bool:
        return self.prefixlen >= 96 and self.addr[:12] == _V4_MAPPED_HEAD

    def __str__(self) -> str:
        if self.is_v4:
            a, b, c, d = self.addr[12:]
            return f"{a}.{b}.{c}.{d}/{self.prefixlen - 96}"
        text = socket.inet_ntop(socket.AF_INET6, self.addr)
        if "." in text:  # libc writes some addresses with an IPv4 tail, ipaddress never does
            text = str(ipaddress.IPv6Address(self.addr))
        return f"{text}/{self.prefixlen}"

    def contains(self, addr16: bytes) -> bool:
        mask = ((1 << self.prefixlen) - 1) << (128 - self.prefixlen) if self.prefixlen else 0
        return int.from_bytes(addr16, "big") & mask == int.from_bytes(self.addr, "big")


@dataclass(frozen=True)
class Rule:
    name: str
    dst: tuple[Prefix, ...]  # the peers: destinations on egress, sources on ingress
    direction: str = "egress"  # egress, ingress or both
    protocol: int | None = None  # IP protocol number; None: any
    ports: tuple[tuple[int, int], ...] = ()  # the peer's ports, (first, last) ranges; (): any
    excepts: tuple[Prefix, ...] = ()  # carved out of dst
    delay_us: int = 0
    jitter_us: int = 0
    delay_corr_pct: float = 0.0
    distribution: str = "uniform"
    loss_pct: float = 0.0
    loss_corr_pct: float = 0.0
    loss_ge: LossGE | None = None
    duplicate_pct: float = 0.0
    duplicate_corr_pct: float = 0.0
    corrupt_pct: float = 0.0
    corrupt_corr_pct: float = 0.0
    reorder_pct: float = 0.0
    reorder_corr_pct: float = 0.0
    gap: int = 0
    rate_bits_per_s: int | None = None
    burst_bytes: int | None = None
    limit: int | None = None
    ttl_us: int | None = None

    @property
    def directions(self) -> tuple[str, ...]:
        """The tries and HTB trees the rule is in: ("egress",), ("ingress",) or both."""
        return ("egress", "ingress") if self.direction == "both" else (self.direction,)

    @property
    def selects_ports(self) -> bool:
        """True for a port or protocol rule (its packets are told apart beyond the address)."""
        return self.protocol is not None or bool(self.ports)

    def port_keys(self) -> list[tuple[int, int, int]]:
        """(protocol, first port of a block, block bits) of the port trie, for a port or protocol rule:
        each range cut into aligned power-of-two blocks; a protocol-only rule is (protocol, 0, 0)."""
        protocols = [self.protocol] if self.protocol is not None else list(PORT_PROTOCOLS)
        if not self.ports:
            return [(proto, 0, 0) for proto in protocols]
        blocks = []
        for first, last in self.ports:
            while first <= last:
                size = first & -first if first else 1 << 16
                while first + size - 1 > last:
                    size >>= 1
                blocks.append((first, 16 - size.bit_length() + 1))
                first += size
        return [(proto, port, plen) for proto in protocols for port, plen in blocks]

    def selector_text(self) -> str:
        """What the rule selects beyond its peers, for messages: "tcp port 5432", "udp", "any"."""
        proto = PROTOCOL_NAMES.get(self.protocol, str(self.protocol)) if self.protocol is not None else ""
        ports = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ports)
        return " ".join(x for x in (proto, f"port {ports}" if ports else "") if x) or "any protocol and port"

    @property
    def has_netem(self) -> bool:
        """True when the leaf must be netem (any impairment beyond a rate)."""
        return bool(
            self.delay_us
            or self.jitter_us
            or self.loss_pct
            or self.loss_ge
            or self.duplicate_pct
            or self.corrupt_pct
            or self.reorder_pct
        )

    def class_params(self) -> "ClassParams":
        if self.rate_bits_per_s is None:
            return ClassParams(rate_bytes=UNLIMITED_RATE_BYTES, burst_bytes=UNLIMITED_BURST_BYTES)
        rate_bytes = max(1, self.rate_bits_per_s // 8)
        burst = self.burst_bytes or default_burst_bytes(rate_bytes)
        return ClassParams(rate_bytes=rate_bytes, burst_bytes=burst)

    def netem_limit(self) -> int:
        """The netem queue limit: explicit, or sized so the delay never tail-drops."""
        if self.limit is not None:
            return self.limit
        rate_bytes = (self.rate_bits_per_s or ASSUMED_RATE_BITS_PER_S) / 8
        held_s = (self.delay_us + self.jitter_us) / 1e6
        need = math.ceil(rate_bytes * held_s / MTU_BYTES * 1.5)
        return min(MAX_NETEM_LIMIT, max(MIN_NETEM_LIMIT, need))

    def leaf_params(self) -> "Rule | None":
        """What the leaf depends on (None: HTB's default pfifo leaf)."""
        if not self.has_netem:
            return None
        return replace(self, name="", dst=(), rate_bits_per_s=None, burst_bytes=None, ttl_us=None,
                       limit=self.netem_limit(), direction="egress", protocol=None, ports=(), excepts=())

    def to_dict(self) -> dict[str, Any]:
        """The user-facing form: the fields people write, defaults left out."""
        out: dict[str, Any] = {"name": self.name, "dst": prefix_texts(self.dst)}
        for spec in OPTIONAL_FIELDS:
            value = getattr(self, spec.attr)
            if value != spec.default:
                out[spec.key] = spec.fmt(value)
        return out


@dataclass(frozen=True)
class ClassParams:
    rate_bytes: int
    burst_bytes: int


# A class with no rate: HTB needs one, so give it one no veth or NIC reaches.
# 4e9 B/s (32 Gbit/s) still fits HTB's 32-bit rate field (no rate64 needed).
UNLIMITED_RATE_BYTES = 4_000_000_000
UNLIMITED_BURST_BYTES = 4_000_000


def default_burst_bytes(rate_bytes: int) -> int:
    """2 ms at the rate, at least two full frames (tcconfig #118/#193)."""
    return max(2 * (MTU_BYTES + 100), rate_bytes // 500)


# The cross-field checks, in the order their errors were always reported: those with a
# reason first, then distribution's (jitter with it).
_NEEDING = tuple(sorted((f for f in OPTIONAL_FIELDS if f.needs), key=lambda f: not f.needs[1]))


def parse_rule(data: object, *, where: str = "", name: str | None = None) -> Rule:
    """Parse one rule from its user-facing mapping.

    `name`, when given (an API path), fills in or must equal the body's name.
    Field errors are prefixed with `where` (e.g. "rules[2]").
    """
    prefix = f"{where}." if where else ""
    if not isinstance(data, Mapping):
        raise InvalidInput(where or "rule", f"expected a mapping, got {type(data).__name__}",
                           "a mapping of rule fields")
    unknown = [str(k) for k in data if k not in FIELD_NAMES]
    if unknown:
        raise unknown_field(prefix + unknown[0], unknown[0], FIELD_NAMES)
    body_name = data.get("name", name)
    if name is not None and body_name != name:
        raise InvalidInput(prefix + "name", f"{body_name!r} differs from {name!r} in the path", "the same name")
    body_name = NAME.parse(body_name, prefix + "name")

    peers = "dst"
    if data.get("src") is not None:
        if data.get("dst") is not None:
            raise InvalidInput(prefix + "src", "given with dst; both name the rule's peers",
                               "dst (any direction) or src (an ingress rule), not both")
        if data.get("direction") not in (None, "ingress"):  # null: left out, as for every optional field
            raise InvalidInput(prefix + "src", f"names the peers of an ingress rule, not of a {data['direction']!r} "
                               "one", "dst with direction egress or both; src with direction ingress")
        peers = "src"
    raw_dst = data.get(peers)
    if isinstance(raw_dst, str):
        raw_dst = [raw_dst]
    if not isinstance(raw_dst, list) or not raw_dst:
        raise InvalidInput(prefix + peers, "at least one source is required" if peers == "src" else
                           "at least one destination is required (or src for an ingress rule)", DST_FORM)
    if len(raw_dst) > MAX_PREFIXES:
        raise InvalidInput(prefix + peers, f"{len(raw_dst)} destinations exceed {MAX_PREFIXES}", DST_FORM)
    dst = _parse_dst(raw_dst, prefix, peers)

    values: dict[str, Any] = {}
    for spec in OPTIONAL_FIELDS:
        if spec.key in data and data[spec.key] is not None:
            if spec.parse is None:  # except: prefixes, like dst
                values[spec.attr] = _parse_except(data[spec.key], prefix + spec.key)
            else:
                values[spec.attr] = spec.parse(data[spec.key], prefix + spec.key)
    if peers == "src":
        values["direction"] = "ingress"
    rule = Rule(name=body_name, dst=dst, **values)

    present = {spec.key for spec in OPTIONAL_FIELDS if getattr(rule, spec.attr) != spec.default}
    for spec in _NEEDING:
        needs, why = spec.needs
        if spec.key in present and needs not in present:
            raise InvalidInput(prefix + spec.key, f"needs {needs} to be set too" + (f" ({why})" if why else ""),
                               f"{needs} with {spec.key}")
    if rule.loss_pct and rule.loss_ge:
        raise InvalidInput(prefix + "loss_ge", "cannot be combined with loss", "either loss or loss_ge")
    if rule.ttl_us == 0:
        raise InvalidInput(prefix + "ttl", "must be longer than 0", "a positive duration")
    bits_per_s = rule.rate_bits_per_s
    if rule.burst_bytes is not None and bits_per_s and rule.burst_bytes > max_burst_bytes(bits_per_s):
        most, rate = max_burst_bytes(bits_per_s), format_rate_bits_per_s(bits_per_s)
        raise InvalidInput(
            prefix + "burst",
            f"{format_size_bytes(rule.burst_bytes)} lasts {rule.burst_bytes / (bits_per_s / 8):,.0f} s at "
            f"{rate}; HTB holds a burst of at most {MAX_BURST_NS / 1e9:.1f} s at its rate",
            f"a size from {MIN_BURST_BYTES} to {most} bytes ({format_bytes(most)}) at rate {rate}",
        )
    if rule.ports and rule.protocol is not None and rule.protocol not in PORT_PROTOCOLS:
        raise InvalidInput(prefix + "ports", f"protocol {PROTOCOL_NAMES.get(rule.protocol, rule.protocol)} has no "
                           "ports", "ports with protocol tcp, udp or sctp (or without a protocol: all three)")
    if rule.excepts:
        _check_except(rule, prefix)
    record = len(json.dumps({"rule": replace(rule, dst=()).to_dict(), "expires_ns": 2**63 - 1},
                            separators=(",", ":")))
    if record > META_LEN:
        raise InvalidInput(prefix + "except" if rule.excepts else prefix + "ports",
                           f"the rule's fields take {record} bytes written out; its kernel record holds {META_LEN}",
                           "fewer except prefixes or port ranges (split the rule in two)")
    if rule.reorder_pct and not rule.gap:
        # tc-netem: reorder without gap means gap 1 (any packet may be sent early).
        rule = replace(rule, gap=1)
    return rule


def _parse_except(raw: object, fld: str) -> tuple[Prefix, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or len(raw) > MAX_EXCEPT:
        raise InvalidInput(fld, f"expected 1 to {MAX_EXCEPT} prefixes", EXCEPT_FORM)
    return tuple(sorted({Prefix.parse(text, f"{fld}[{i}]") for i, text in enumerate(raw)}))


def _check_except(rule: Rule, prefix: str) -> None:
    """Each except strictly inside one of the rule's peers, none inside another, no peer inside one; and
    with except, the rule's peers do not nest (a peer inside another would be read back as a carved piece).

    One sweep over the prefixes sorted as address ranges: whatever is open when a prefix starts contains it."""
    tagged = sorted([(p, "peer") for p in rule.dst] + [(p, "except") for p in rule.excepts],
                    key=lambda t: (t[0].addr, t[0].prefixlen))
    open_: list[tuple[Prefix, str, int]] = []  # (prefix, tag, its last address), outermost first
    for p, tag in tagged:
        first = int.from_bytes(p.addr, "big")
        while open_ and open_[-1][2] < first:
            open_.pop()
        if open_:
            outer, outer_tag, _ = open_[-1]
            if tag == "except" and outer == p:
                raise InvalidInput(f"{prefix}except", f"{p} is also one of the rule's peers", EXCEPT_FORM)
            if tag == "except" and outer_tag == "except":
                raise InvalidInput(f"{prefix}except", f"{p} is inside except {outer} already", EXCEPT_FORM)
            if tag == "peer":
                raise InvalidInput(f"{prefix}dst", f"{p} is inside {outer_tag} {outer} of the same rule",
                                   "with except, peers that do not nest and are not inside an except")
        elif tag == "except":
            raise InvalidInput(f"{prefix}except", f"{p} is not inside any of the rule's peers", EXCEPT_FORM)
        open_.append((p, tag, first | ((1 << (128 - p.prefixlen)) - 1)))


def _supernets(p: Prefix) -> Iterator[Prefix]:
    """p and every shorter prefix containing it, longest first."""
    value = int.from_bytes(p.addr, "big")
    for length in range(p.prefixlen, -1, -1):
        mask = ((1 << length) - 1) << (128 - length) if length else 0
        yield Prefix((value & mask).to_bytes(16, "big"), length)


# The list people generate by the hundred thousand: IPv4 hosts, "a.b.c.d" or "a.b.c.d/32".
# Checked as one joined text (digits, dots and newlines once "/32" is gone) and packed by
# inet_pton from C, which refuses all but four decimal octets (see above); any other list
# (or any error, which Prefix.parse words) goes one by one.
_BULK_MIN = 64
_pton4 = partial(socket.inet_pton, socket.AF_INET)


def _v4_hosts(raw_dst: list) -> list[bytes] | None:
    """Each destination's 4 packed bytes if every one is an IPv4 host, else None."""
    try:
        joined = "\n".join(raw_dst) + "\n"
    except TypeError:  # not all strings
        return None
    joined = joined.replace("/32\n", "\n")
    if not joined.isascii() or joined.encode("ascii").translate(None, b"0123456789.\n"):
        return None
    hosts = joined.split("\n")[:-1]
    if len(hosts) != len(raw_dst):  # a newline inside one: not a list of hosts
        return None
    try:
        return list(map(_pton4, hosts))
    except OSError:  # not a dotted quad, an octet over 255 or with a leading zero
        return None


def prefix_texts(prefixes: tuple[Prefix, ...]) -> list[str]:
    """[str(p) for p in prefixes], written from C for a long list of IPv4 hosts."""
    if len(prefixes) >= _BULK_MIN and set(map(itemgetter(1), prefixes)) == {128}:
        addrs = list(map(itemgetter(0), prefixes))
        if all(map(methodcaller("startswith", _V4_MAPPED_HEAD), addrs)):
            return list(map("{}/32".format, map(socket.inet_ntoa, map(itemgetter(slice(12, 16)), addrs))))
    return [str(p) for p in prefixes]


def _parse_dst(raw_dst: list, prefix: str, peers: str = "dst") -> tuple[Prefix, ...]:
    """A rule's destinations, sorted, without repeats: deduplicated and sorted as 17-byte
    keys, so a Prefix is built once per distinct destination.  Repeats go by a dict, which
    keeps the order written: big lists are mostly written in order, and sorting a list in
    order is one pass (a set's hash order made it 1.7 million comparisons per 100,000)."""
    if len(raw_dst) >= _BULK_MIN:
        hosts = _v4_hosts(raw_dst)
        if hosts is not None:
            return tuple(map(Prefix, map(_V4_MAPPED_HEAD.__add__, sorted(dict.fromkeys(hosts))),
                             repeat(128, len(hosts))))
    keys = []
    for i, text in enumerate(raw_dst):
        key = _parse_fast(text) if type(text) is str else None
        if key is None:
            parsed = Prefix.parse(text, f"{prefix}{peers}[{i}]")
            key = parsed.addr + _PLEN[parsed.prefixlen]
        keys.append(key)
    return tuple([Prefix(key[:16], key[16]) for key in sorted(dict.fromkeys(keys))])


def parse_ruleset(data: object) -> tuple[Rule, ...]:
    """Parse a rules document ({"rules": [...]}) and validate it as a whole."""
    if data is None:
        data = {"rules": []}
    if not isinstance(data, Mapping):
        raise InvalidInput("rules file", f"expected a mapping, got {type(data).__name__}", "a mapping with 'rules'")
    unknown = [str(k) for k in data if k != "rules"]
    if unknown:
        raise unknown_field(unknown[0], unknown[0], ("rules",), "only 'rules'", what="unknown top-level field")
    if "rules" not in data:
        # An empty mapping is more likely a mistake than a request to remove every rule.
        raise InvalidInput("rules", "is missing", "a mapping with 'rules' (an empty list removes every rule)")
    items = data["rules"]
    if items is None:  # "rules:" with nothing after it in YAML
        items = []
    if not isinstance(items, list):
        raise InvalidInput("rules", f"expected a list, got {type(items).__name__}", "a list of rules")
    return validate_ruleset(parse_rule(item, where=f"rules[{i}]") for i, item in enumerate(items))


class RulesLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """yaml.safe_load's loader, through libyaml where PyYAML has it (a 100,000-prefix file:
    27 s in pure Python, under 1 s here), and resolving plain scalars with one regex each.

    The C parser still asks Python for each scalar's tag; SafeLoader's resolve() tries the
    implicit resolvers one by one (three regexes and a list copy for every address).  This
    one joins the resolvers of each first character into one alternation, in their order,
    so the first that matches wins: the same tags (tests/unit/test_bulk.py), one regex call.
    """

    _joined: dict[str | None, re.Pattern | None] = {}  # first character -> joined resolvers
    _tags: dict[str, str] = {}  # group name -> tag

    def resolve(self, kind, value, implicit):  # noqa: ANN001 (PyYAML's signature)
        if kind is not yaml.ScalarNode or not implicit[0] or self.yaml_path_resolvers:
            return super().resolve(kind, value, implicit)
        first = value[0] if value else ""
        try:
            joined = self._joined[first]
        except KeyError:
            joined = self._joined[first] = _join_resolvers(self.yaml_implicit_resolvers, first)
        if joined is None:
            return super().resolve(kind, value, implicit)
        m = joined.match(value)
        if m is None:
            return self.DEFAULT_SCALAR_TAG
        return self._tags[m.lastgroup]

    hosts_tag: str | None = None  # see load_rules_yaml
    hosts_runs: list[list[str]] = []
    hosts_used: list[bool] = []

    def construct_sequence(self, node, deep=False):  # noqa: ANN001 (PyYAML's signature)
        # A string scalar constructs to its own text: a list of 100,000 destinations need not
        # take four calls each through construct_object (nor be cached for aliases: an alias
        # to one constructs the same text again).
        if not isinstance(node, yaml.SequenceNode):  # "!!seq x": PyYAML's own error
            return super().construct_sequence(node, deep=deep)
        if self.hosts_tag is not None and any(child.tag == self.hosts_tag for child in node.value):
            return self._with_runs(node, deep)
        return [child.value if child.tag == _STR_TAG and type(child) is yaml.ScalarNode
                else self.construct_object(child, deep=deep) for child in node.value]

    def _with_runs(self, node, deep):  # noqa: ANN001
        out: list = []
        for child in node.value:
            if child.tag == self.hosts_tag and type(child) is yaml.ScalarNode and child.value.isdigit():
                i = int(child.value)
                if i >= len(self.hosts_runs) or self.hosts_used[i]:
                    raise _RunsMisplaced()
                self.hosts_used[i] = True
                out.extend(self.hosts_runs[i])
            elif child.tag == _STR_TAG and type(child) is yaml.ScalarNode:
                out.append(child.value)
            else:
                out.append(self.construct_object(child, deep=deep))
        return out


class _RunsMisplaced(Exception):
    """A placeholder of load_rules_yaml's was not where a list item of its own would be."""


# A run of at least _RUN_MIN block-sequence items, one per line at one indentation, each
# digits, a dot, digits, a dot and then digits, dots and slashes ("10.0.0.1", "10.0.0.1/32",
# and malformed ones, which _parse_dst refuses in its words): text YAML takes as a string
# (two dots make it neither a number nor a date), so the run's items are its words.
# Possessive quantifiers: nothing to backtrack into, five times quicker over a big file.
_RUN_ITEM = r"[0-9]++\.[0-9]++\.[0-9./]*+ *+\n"
_RUN_MIN = 64
_HOSTS_TAG = "tag:shaper.io,2026:hosts"
_RUN = re.compile(rf"^( *)- {_RUN_ITEM}(?:\1- {_RUN_ITEM}){{{_RUN_MIN - 1},}}", re.M)


def load_rules_yaml(text: str | bytes) -> object:
    """yaml.load(text, Loader=RulesLoader), quicker for long lists of IPv4 hosts.

    libyaml makes a node, and PyYAML resolves and constructs it, for every item: half the
    time `shaper apply -f` took for a file of 1,000,000 hosts.  Each long run of host lines
    (_RUN) is cut out and a one-item placeholder, with a tag the document does not contain,
    takes its place; the loader puts the run's items back where it meets the placeholder in
    a sequence.  If any placeholder is not met exactly once as an item of its own (a run
    inside a block scalar, a plain scalar's continuation line, a flow collection) or the
    changed text does not load, the original text is loaded as it is, so the result and
    its errors are yaml.load's.  Lists written in flow style ([a, b]) take libyaml's way."""
    runs: list[list[str]] = []
    source = _utf8(text) if len(text) >= _RUN_MIN * 10 else None
    if source is not None and _HOSTS_TAG not in source:  # a document cannot forge one

        def cut(m: re.Match) -> str:
            runs.append(m.group(0).split()[1::2])
            return f"{m.group(1)}- !<{_HOSTS_TAG}> {len(runs) - 1}\n"

        changed = _RUN.sub(cut, source)
    if runs:
        loader = RulesLoader(changed)
        loader.hosts_tag, loader.hosts_runs, loader.hosts_used = _HOSTS_TAG, runs, [False] * len(runs)
        try:
            data = loader.get_single_data()
            if all(loader.hosts_used):
                return data
        except (yaml.YAMLError, _RunsMisplaced):
            pass
        finally:
            loader.dispose()
    return yaml.load(text, Loader=RulesLoader)  # noqa: S506 (a safe loader)


def _utf8(text: str | bytes) -> str | None:
    """The text of a document libyaml reads as UTF-8 (no UTF-16 byte order mark), else None."""
    if isinstance(text, str):
        return text
    if text.startswith((b"\xff\xfe", b"\xfe\xff")):
        return None
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        return None


_STR_TAG = "tag:yaml.org,2002:str"


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic GC off for a bulk step: parsing and planning 100,000 destinations makes
    hundreds of thousands of small objects, none in a cycle, and the collections they set
    off were a third of the time.  Turned back on only if it was on (threads may nest)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _join_resolvers(resolvers: Mapping, first: str) -> re.Pattern | None:
    """One regex trying `first`'s implicit resolvers, then the wildcard ones, in order; each
    alternative a named group whose name says its tag. None: use PyYAML's own resolve()."""
    parts = []
    for tag, regexp in list(resolvers.get(first, [])) + list(resolvers.get(None, [])):
        if regexp.flags & ~(re.X | re.U):
            return None
        name = f"t{len(RulesLoader._tags)}"
        RulesLoader._tags[name] = tag
        parts.append(f"(?P<{name}>(?{'x' if regexp.flags & re.X else ''}:{regexp.pattern}))")
    return re.compile("|".join(parts)) if parts else re.compile(r"(?!)")


def parse_ruleset_text(text: str | bytes, field: str, source: str) -> tuple[Rule, ...]:
    """Parse a YAML (or JSON) rules document: a rules file, or the shaper.io/rules annotation."""
    return parse_loaded_ruleset(load_ruleset_text(text, field, source), text, source)


def load_ruleset_text(text: str | bytes, field: str, source: str) -> object:
    """A YAML (or JSON) rules document loaded, not yet validated (parse_loaded_ruleset does that)."""
    try:
        with gc_paused():
            return load_rules_yaml(text)
    except yaml.YAMLError as exc:
        raise InvalidInput(field, f"{source} is not valid YAML: {_yaml_problem(exc)}",
                           "a YAML rules document") from None


def parse_loaded_ruleset(data: object, text: str | bytes, source: str) -> tuple[Rule, ...]:
    """parse_ruleset of a document loaded from `text`; an error names the line of `source` it is on."""
    try:
        with gc_paused():
            return parse_ruleset(data)
    except InvalidInput as exc:
        raise with_line(exc, text, source) from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


_PATH_STEP = re.compile(r"([^.\[\]]+)|\[([^\]]*)\]")


def locate(text: str | bytes, fld: str) -> int | None:
    """The line (1-based) of a rules document where field path `fld` ("rules[2].dely",
    "rules[db].dst[1]") is, or of the closest enclosing part found; None if nothing is.

    Only called once a document has failed validation: composing the YAML again
    with positions costs about as much as loading it, which the loads that succeed
    should not pay."""
    try:
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return None
    line = None
    for m in _PATH_STEP.finditer(fld):
        key, index = m.group(1), m.group(2)
        if node is None:
            break
        if key is not None and isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
            if pair is None:
                break
            line = pair[0].start_mark.line + 1
            node = pair[1]
        elif index is not None and isinstance(node, yaml.SequenceNode):
            node = _item(node, index)
            if node is not None:
                line = node.start_mark.line + 1
        else:
            break
    return line


def _item(seq: yaml.SequenceNode, index: str) -> yaml.Node | None:
    if index.isdigit():
        return seq.value[int(index)] if int(index) < len(seq.value) else None
    # validate_ruleset names a rule by its name ("rules[db].dst").
    for item in seq.value:
        if isinstance(item, yaml.MappingNode) and any(getattr(k, "value", None) == "name" and
                                                      getattr(v, "value", None) == index for k, v in item.value):
            return item
    return None


E = TypeVar("E", InvalidInput, ApiError)


def with_line(exc: E, text: str | bytes, source: str) -> E:
    """`exc` (InvalidInput, or a daemon's refusal of the document: an ApiError naming its field), its
    message starting "SOURCE:LINE: " where the field is found in the document."""
    line = locate(text, exc.field) if exc.field else None
    if line is not None:
        exc.line = line  # type: ignore[attr-defined]
        exc.args = (f"{source}:{line}: {exc}",)
    return exc


def validate_ruleset(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    """Whole-set checks: unique names, each destination in one rule, capacity."""
    rules = tuple(rules)
    if len(rules) > MAX_RULES:
        raise InvalidInput("rules", f"{len(rules)} rules exceed the maximum {MAX_RULES}", f"at most {MAX_RULES}")
    if any(r.direction != "egress" or r.selects_ports or r.excepts or r.ttl_us for r in rules):
        # Directions, ports and excepts: the tables' own checks (shaper.core.tables), which know
        # which rules may share a prefix; TTLs too: how many expired prefixes a packet may have
        # to fall past.  Imported here: tables builds on this module.
        from shaper.core import tables  # noqa: PLC0415

        _check_names(rules)
        tables.check(rules)
        return tuple(sorted(rules, key=lambda r: r.name))
    names: set[str] = set()
    seen: set[Prefix] = set()
    for i, rule in enumerate(rules):
        if rule.name in names:
            raise InvalidInput(f"rules[{rule.name}].name", "duplicate rule name", "unique names")
        names.add(rule.name)
        # One set.update per rule: a Python loop per destination cost a quarter second per
        # 100,000.  Only when the count falls short is a destination shared, and then the
        # loop below finds which.
        before = len(seen)
        seen.update(rule.dst)
        if len(seen) != before + len(rule.dst):
            _check_shared_dst(rules[: i + 1])
    if len(seen) > MAX_PREFIXES:
        raise InvalidInput("rules", f"{len(seen)} destinations exceed the maximum {MAX_PREFIXES}",
                           f"at most {MAX_PREFIXES} prefixes")
    return tuple(sorted(rules, key=lambda r: r.name))


def _check_names(rules: tuple[Rule, ...]) -> None:
    names: set[str] = set()
    for rule in rules:
        if rule.name in names:
            raise InvalidInput(f"rules[{rule.name}].name", "duplicate rule name", "unique names")
        names.add(rule.name)


def _check_shared_dst(rules: tuple[Rule, ...]) -> None:
    """Raise for the first destination of a rule that an earlier rule already has."""
    owner: dict[Prefix, str] = {}
    for rule in rules:
        for prefix in rule.dst:
            other = owner.setdefault(prefix, rule.name)
            if other != rule.name:
                raise InvalidInput(
                    f"rules[{rule.name}].dst",
                    f"{prefix} is already a destination of rule {other!r}",
                    "each destination in one rule (overlapping prefixes are fine: the longest wins)",
                )


def rule_from_record(record: Mapping[str, Any], dst: tuple[Prefix, ...]) -> Rule:
    """Rebuild a rule from the JSON kept in rule_meta; its dst comes from the trie."""
    rule = parse_rule({**record, "dst": ["::/0"]}, where="rule_meta")
    return replace(rule, dst=tuple(sorted(dst)))

