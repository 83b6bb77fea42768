"""Which rule a packet gets when rules overlap: the precedence table of README.md, cell by cell,
and a brute-force reading of the rules' meaning checked against what the tables make the
classifier do (shaper.core.tables.classify is classifier.c's algorithm, step for step)."""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shaper.control.controller import Controller
from shaper.core import plan as P
from shaper.core import tables
from shaper.core.model import Prefix, parse_rule, parse_ruleset
from shaper.datapath.fake import FakeDatapath
from shaper.errors import InvalidInput

TCP, UDP, ICMP = 6, 17, 1


def addr(text: str) -> bytes:
    return Prefix.parse(text, "a").addr


def classify(rules: list[dict], direction: str, peer: str, proto: int = TCP, port: int = 0, now: int = 0) -> str | None:
    """The name of the rule the classifier picks, through the planner and the fake kernel."""
    dp = FakeDatapath()
    Controller(dp, clock=lambda: now or 1).apply(parse_ruleset({"rules": rules}))
    classid = dp.steer(addr(peer), now or 1, direction, proto, port)
    if classid is None:
        return None
    names = dp.rule_names()
    return names[classid & 0xFFFF]


# The README's precedence table: (what is there, packet, expected winner).
ADDR_24 = {"name": "net", "dst": "10.0.0.0/24"}
ADDR_32 = {"name": "host", "dst": "10.0.0.5"}
PORT_24 = {"name": "net-pg", "dst": "10.0.0.0/24", "protocol": "tcp", "ports": [5432]}
PORT_32 = {"name": "host-pg", "dst": "10.0.0.5", "protocol": "tcp", "ports": [5432]}
PROTO_32 = {"name": "host-udp", "dst": "10.0.0.5", "protocol": "udp"}
RANGE_32 = {"name": "host-range", "dst": "10.0.0.5", "ports": ["5000-5999"]}
EXCEPT_24 = {"name": "net-but", "dst": "10.0.0.0/24", "except": ["10.0.0.0/29"]}
ALL = {"name": "all", "dst": "0.0.0.0/0"}

CELLS = [
    # 1. the longest matching prefix first
    ([ADDR_24, ADDR_32], ("10.0.0.5", TCP, 80), "host"),
    ([ADDR_24, ADDR_32], ("10.0.0.6", TCP, 80), "net"),
    ([PORT_24, ADDR_32], ("10.0.0.5", TCP, 5432), "host"),  # a longer address beats a port on a shorter one
    # 2. at one prefix: a port, then a protocol, then address-only
    ([ADDR_32, PORT_32], ("10.0.0.5", TCP, 5432), "host-pg"),
    ([ADDR_32, PORT_32], ("10.0.0.5", TCP, 22), "host"),
    ([ADDR_32, PORT_32], ("10.0.0.5", UDP, 5432), "host"),  # protocol differs
    ([ADDR_32, PROTO_32], ("10.0.0.5", UDP, 53), "host-udp"),
    ([ADDR_32, PROTO_32], ("10.0.0.5", TCP, 53), "host"),
    ([PROTO_32, {**PORT_32, "protocol": "udp", "ports": [53]}], ("10.0.0.5", UDP, 53), "host-pg"),
    ([PROTO_32, {**PORT_32, "protocol": "udp", "ports": [53]}], ("10.0.0.5", UDP, 54), "host-udp"),
    ([RANGE_32, ADDR_32], ("10.0.0.5", UDP, 5999), "host-range"),  # ports without protocol: tcp, udp, sctp
    ([RANGE_32, ADDR_32], ("10.0.0.5", 132, 5000), "host-range"),
    ([RANGE_32, ADDR_32], ("10.0.0.5", TCP, 6000), "host"),
    ([RANGE_32, ADDR_32], ("10.0.0.5", ICMP, 0), "host"),
    # 3. a prefix whose rules do not match hands the packet to the next shorter one
    ([PORT_32, ADDR_24], ("10.0.0.5", TCP, 22), "net"),
    ([PORT_32], ("10.0.0.5", TCP, 22), None),
    ([PORT_32, ALL], ("10.0.0.5", UDP, 5432), "all"),
    # 4. except: the rule does not exist for the carved-out prefix
    ([EXCEPT_24], ("10.0.0.3", TCP, 80), None),
    ([EXCEPT_24], ("10.0.0.9", TCP, 80), "net-but"),
    ([EXCEPT_24, ALL], ("10.0.0.3", TCP, 80), "all"),
    ([EXCEPT_24, ALL], ("10.0.0.9", TCP, 80), "net-but"),
    ([EXCEPT_24, ALL, {"name": "in", "dst": "10.0.0.2"}], ("10.0.0.2", TCP, 80), "in"),
    ([EXCEPT_24, {"name": "wide", "dst": "10.0.0.0/16"}], ("10.0.0.3", TCP, 80), "wide"),
    ([EXCEPT_24, {"name": "pg", "dst": "10.0.0.0/29", "protocol": "tcp", "ports": [5432]}, ALL],
     ("10.0.0.3", TCP, 5432), "pg"),  # a port rule on the except itself
    ([EXCEPT_24, {"name": "pg", "dst": "10.0.0.0/29", "protocol": "tcp", "ports": [5432]}, ALL],
     ("10.0.0.3", TCP, 80), "all"),
]


@pytest.mark.parametrize("rules, packet, winner", CELLS, ids=range(len(CELLS)))
def test_precedence_table(rules, packet, winner):
    peer, proto, port = packet
    assert classify(rules, "egress", peer, proto, port) == winner
    # The same rules on ingress, matched by source, decide the same way.
    ingress = [{**r, "direction": "ingress"} for r in rules]
    assert classify(ingress, "ingress", peer, proto, port) == winner
    assert classify(ingress, "egress", peer, proto, port) is None


def test_directions_are_separate_tables():
    rules = [{"name": "out", "dst": "10.0.0.5", "rate": "1mbit"},
             {"name": "in", "dst": "10.0.0.5", "direction": "ingress", "rate": "2mbit"},
             {"name": "both", "dst": "10.0.0.6", "direction": "both"},
             {"name": "src", "src": "10.0.0.7"}]
    assert classify(rules, "egress", "10.0.0.5") == "out"
    assert classify(rules, "ingress", "10.0.0.5") == "in"
    assert classify(rules, "egress", "10.0.0.6") == classify(rules, "ingress", "10.0.0.6") == "both"
    assert classify(rules, "ingress", "10.0.0.7") == "src" and classify(rules, "egress", "10.0.0.7") is None
    dp = FakeDatapath()
    Controller(dp, clock=lambda: 1).apply(parse_ruleset({"rules": rules}))
    slots = {name: slot for slot, name in dp.rule_names().items()}
    assert set(dp.classes) == {slots["out"], slots["both"]}
    assert set(dp.ingress_classes) == {slots["in"], slots["both"], slots["src"]}


def test_an_expired_port_rule_falls_to_the_address_rule():
    rules = [ADDR_32, {**PORT_32, "ttl": "1s"}]
    assert classify(rules, "egress", "10.0.0.5", TCP, 5432, now=1) == "host-pg"
    dp = FakeDatapath()
    Controller(dp, clock=lambda: 1).apply(parse_ruleset({"rules": rules}))
    slots = {name: slot for slot, name in dp.rule_names().items()}
    assert dp.steer(addr("10.0.0.5"), 2 * 10**9, "egress", TCP, 5432) & 0xFFFF == slots["host"]



def test_an_expired_port_rule_falls_to_the_protocol_rule_of_its_prefix():
    # As classifier.c: a port entry that expired is absent, so the group's protocol-only entry answers
    # before the address-only rule does (a port rule, then a protocol one, then the address: step 2).
    rules = [{"name": "host", "dst": "10.0.0.5"}, {"name": "tcp", "dst": "10.0.0.5", "protocol": "tcp"},
             {"name": "pg", "dst": "10.0.0.5", "protocol": "tcp", "ports": [5432], "ttl": "1s"}]
    assert classify(rules, "egress", "10.0.0.5", TCP, 5432, now=1) == "pg"
    dp = FakeDatapath()
    Controller(dp, clock=lambda: 1).apply(parse_ruleset({"rules": rules}))
    names = dp.rule_names()
    after = 2 * 10**9
    assert names[dp.steer(addr("10.0.0.5"), after, "egress", TCP, 5432) & 0xFFFF] == "tcp"
    assert names[dp.steer(addr("10.0.0.5"), after, "egress", TCP, 22) & 0xFFFF] == "tcp"
    assert names[dp.steer(addr("10.0.0.5"), after, "egress", UDP, 5432) & 0xFFFF] == "host"

@pytest.mark.parametrize("rules, field, words", [
    ([ADDR_32, {**ADDR_32, "name": "again"}], "rules[again].dst", "already a destination of rule 'host'"),
    ([PORT_32, {**PORT_32, "name": "again"}], "rules[again].ports", "already selected by rule 'host-pg'"),
    ([RANGE_32, {**PORT_32, "ports": [5500]}], "rules[host-pg].ports", "already selected by rule 'host-range'"),
    ([PROTO_32, {**PROTO_32, "name": "again"}], "rules[again].protocol", "already selected"),
    ([EXCEPT_24, {"name": "pg16", "dst": "10.0.0.0/16", "protocol": "tcp", "ports": [5432]}], "rules[pg16].dst",
     "port or protocol rule around another rule's except"),
])
def test_overlaps_are_refused(rules, field, words):
    with pytest.raises(InvalidInput) as err:
        parse_ruleset({"rules": rules})
    assert err.value.field == field and words in str(err.value)


def test_the_same_peer_in_two_directions_or_selectors_is_fine():
    parse_ruleset({"rules": [ADDR_32, {**ADDR_32, "name": "in", "direction": "ingress"}, PORT_32, PROTO_32,
                             {**PORT_32, "name": "ssh", "ports": [22]}]})


# -- the brute-force meaning ---------------------------------------------------------------------------------
def meaning(rules: list, direction: str, peer: bytes, proto: int, port: int) -> str | None:
    """The rule a packet belongs to, read straight from the README: among the rules of its direction whose
    peers contain it, whose excepts do not, and whose protocol and ports match it, the one with the longest
    matching peer prefix; at equal length a port match, then a protocol match, then address-only."""
    best = None
    for rule in rules:
        if direction not in rule.directions or any(e.contains(peer) for e in rule.excepts):
            continue
        if rule.protocol is not None and rule.protocol != proto:
            continue
        if rule.ports and (proto not in (6, 17, 132) or not any(a <= port <= b for a, b in rule.ports)):
            continue
        for p in rule.dst:
            if p.contains(peer):
                rank = (p.prefixlen, 2 if rule.ports else 1 if rule.protocol is not None else 0)
                if best is None or rank > best[0]:
                    best = (rank, rule.name)
    return best[1] if best else None


HOSTS = [f"10.0.0.{i}" for i in range(0, 16)]
PREFIXES = st.sampled_from(["10.0.0.0/28", "10.0.0.0/29", "10.0.0.8/29", "10.0.0.0/30", "10.0.0.4/30",
                            "10.0.0.12/30", "10.0.0.2/31", "10.0.0.5/32", "10.0.0.9/32", "0.0.0.0/0"])
PORTS = st.sampled_from([[22], [5432], ["5000-5003"], [22, 5432], ["1-1024"]])


@st.composite
def rule_dicts(draw, i):
    rule = {"name": f"r{i}", "dst": draw(st.lists(PREFIXES, min_size=1, max_size=2, unique=True)),
            "direction": draw(st.sampled_from(["egress", "ingress", "both"]))}
    kind = draw(st.sampled_from(["addr", "addr", "proto", "ports", "ports+proto"]))
    if kind in ("proto", "ports+proto"):
        rule["protocol"] = draw(st.sampled_from(["tcp", "udp"]))
    if kind.startswith("ports"):
        rule["ports"] = draw(PORTS)
    wide = [p for p in rule["dst"] if not p.endswith("/32") and p != "0.0.0.0/0"]
    if wide and len(rule["dst"]) == 1 and draw(st.booleans()):
        # A carve-out strictly inside the peer: one of its subnets, one to three bits longer.
        net = ipaddress.ip_network(wide[0])
        subnets = list(net.subnets(prefixlen_diff=draw(st.integers(1, min(3, 32 - net.prefixlen)))))
        rule["except"] = [str(draw(st.sampled_from(subnets)))]
    return rule


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.integers(1, 5).flatmap(lambda n: st.tuples(*[rule_dicts(i) for i in range(n)])))
def test_the_tables_mean_what_the_rules_say(drawn):
    try:
        rules = parse_ruleset({"rules": list(drawn)})
    except InvalidInput:
        return  # a set shaper refuses (overlaps, excepts outside the peers, ...): nothing to compare
    placed = [tables.Placed(r, i + 1) for i, r in enumerate(rules)]
    built = tables.compile(placed)
    name_of = {i + 1: r.name for i, r in enumerate(rules)}
    for direction in P.DIRECTIONS:
        for host in HOSTS + ["192.168.0.1"]:
            peer = addr(host)
            for proto, port in ((TCP, 22), (TCP, 5432), (UDP, 5001), (UDP, 80), (ICMP, 0)):
                got = tables.classify(built.tries, built.ports, direction, peer, proto, port)
                assert name_of.get(got) == meaning(rules, direction, peer, proto, port), (direction, host, proto, port)
    # And the peers read back from the tables are the rules' own (what observe() rebuilds).
    named = tables.named_prefixes(built.tries, built.ports)
    for i, rule in enumerate(rules):
        assert named.get(i + 1, set()) == set(rule.dst), rule.name


def test_every_port_range_becomes_exact_blocks():
    for first, last in [(1, 65535), (8000, 8100), (5432, 5432), (1023, 1025), (32768, 65535)]:
        rule = parse_rule({"name": "r", "dst": "10.0.0.1", "protocol": "tcp", "ports": [f"{first}-{last}"]})
        covered = set()
        for _, port, plen in rule.port_keys():
            size = 1 << (16 - plen)
            assert port % size == 0
            block = set(range(port, port + size))
            assert not covered & block
            covered |= block
        assert covered == set(range(first, last + 1))


def test_ipv6_and_ipv4_share_the_model():
    rules = [{"name": "v6", "dst": "fd00::/64", "protocol": "udp", "ports": [53]},
             {"name": "v6-all", "dst": "fd00::/48", "except": ["fd00:0:0:1::/64"]}]
    assert classify(rules, "egress", "fd00::1", UDP, 53) == "v6"
    assert classify(rules, "egress", "fd00::1", TCP, 53) == "v6-all"
    assert classify(rules, "egress", "fd00:0:0:1::1", TCP, 53) is None
    assert str(ipaddress.ip_network("fd00::/48"))  # the forms above are plain CIDRs


def test_dry_runs_and_tables_say_direction_ports_and_except_in_the_rules_words():
    from shaper import cli
    from shaper.core.changes import describe, rule_changes

    old = parse_rule({"name": "pg", "dst": "10.0.0.5", "protocol": "tcp", "ports": [5432], "direction": "both"})
    new = parse_rule({"name": "pg", "dst": "10.0.0.5", "protocol": "tcp", "ports": [5433]})
    (change,) = rule_changes([old], [new])
    # A field left out reads as its default when that is a word: the direction goes back to egress.
    assert describe(change) == "~ pg: direction both -> egress, ports 5432 -> 5433"
    # Lists read as the CLI takes them: comma-separated, ranges as first-last.
    wide = parse_rule({"name": "pg", "dst": "10.0.0.0/8", "ports": [5432, "8000-8100"], "except": ["10.9.0.0/16"]})
    narrow = parse_rule({"name": "pg", "dst": "10.0.0.0/8", "ports": [5432]})
    (change,) = rule_changes([narrow], [wide])
    assert describe(change) == "~ pg: ports 5432 -> 5432,8000-8100, except (unset) -> 10.9.0.0/16"
    (created,) = rule_changes([], [wide])
    assert describe(created) == "+ pg (created): dst 10.0.0.0/8, ports 5432,8000-8100, except 10.9.0.0/16"
    assert cli._match({"protocol": "tcp", "ports": [5432, "8000-8100"]}) == "tcp/5432,8000-8100"
    assert cli._match({"ports": [53]}) == "port 53"
    assert cli._match({"dst": ["10.0.0.0/8"], "except": ["10.9.0.0/16"]}) == "except 10.9.0.0/16"
    assert cli._match({"protocol": "udp", "except": ["10.9.0.0/16", "10.8.0.0/16"]}) == \
        "udp except 10.9.0.0/16,10.8.0.0/16"
    assert cli._match({}) == "-"


# -- how far the classifier falls back ------------------------------------------------------------------------
def nested(n: int, **fields) -> list[dict]:
    """n rules on 10.0.0.0/16, /17, ... each inside the one before."""
    return [{"name": f"p{k}", "dst": f"10.0.0.0/{16 + k}", **fields} for k in range(n)]


def port_rules(n: int) -> list[dict]:
    return [{**r, "protocol": "tcp", "ports": [5000 + k]} for k, r in enumerate(nested(n))]


def both_ways(rules: list, placed_at: int, now: int, peer: str, proto: int, port: int,
              monkeypatch: pytest.MonkeyPatch) -> tuple[str | None, str | None]:
    """The rule the classifier picks with its fallback limit, and the one it would with none."""
    placed = [tables.Placed(r, i + 1, placed_at + r.ttl_us * 1000 if r.ttl_us else 0) for i, r in enumerate(rules)]
    built = tables.compile(placed)
    name_of = {i + 1: r.name for i, r in enumerate(rules)}
    limited = tables.classify(built.tries, built.ports, "egress", addr(peer), proto, port, now)
    with monkeypatch.context() as m:
        m.setattr(tables, "MAX_FALLBACK", 10**6)
        unlimited = tables.classify(built.tries, built.ports, "egress", addr(peer), proto, port, now)
    return name_of.get(limited), name_of.get(unlimited)


@pytest.mark.parametrize("kind", ["ports", "ttl"])
def test_the_longest_run_the_classifier_walks_is_accepted_and_one_more_refused(kind, monkeypatch):
    # 7 prefixes that may let a packet through, then `all`: 8 lookups, the classifier's MAX_FALLBACK.
    run = tables.MAX_FALLBACK - 1
    make = port_rules if kind == "ports" else (lambda n: nested(n, ttl="1s"))
    rules = parse_ruleset({"rules": [ALL, *make(run)]})
    later = 5 * 10**9  # every ttl passed
    for k in range(run):
        peer = "10.0.0.1"
        if kind == "ports":
            assert both_ways(rules, 1, 1, peer, TCP, 5000 + k, monkeypatch) == (f"p{k}", f"p{k}")
        else:
            assert both_ways(rules, 1, 1, peer, TCP, 22, monkeypatch) == (f"p{run - 1}", f"p{run - 1}")
    assert both_ways(rules, 1, later, "10.0.0.1", TCP, 22, monkeypatch) == ("all", "all")
    assert both_ways(rules, 1, later, "10.0.0.1", UDP, 5000, monkeypatch) == ("all", "all")
    # One more and a packet the shorter prefix should decide would pass unclassified: refused, naming the run.
    with pytest.raises(InvalidInput) as err:
        parse_ruleset({"rules": [ALL, *make(run + 1)]})
    assert err.value.field == f"rules[p{run}].dst"
    assert f"at most {tables.MAX_FALLBACK}" in err.value.problem and "9 lookups" in err.value.problem
    assert all(f"({name})" in str(err.value) for name in ["all", *(f"p{k}" for k in range(run + 1))])
    placed = [tables.Placed(r, i + 1) for i, r in enumerate(parse_ruleset({"rules": [ALL, *make(run)]}))]
    extra = parse_rule({**make(run + 1)[-1]})
    with pytest.raises(InvalidInput):  # the planner's compile refuses it too
        tables.compile([*placed, tables.Placed(extra, len(placed) + 1, 10**9 if kind == "ttl" else 0)])


def test_a_run_with_nothing_shorter_counts_no_miss(monkeypatch):
    # 8 port-only prefixes and nothing shorter: the 8th is the 8th lookup; past it the packet passes either way.
    rules = parse_ruleset({"rules": port_rules(tables.MAX_FALLBACK)})
    assert both_ways(rules, 1, 1, "10.0.0.1", TCP, 5007, monkeypatch) == ("p7", "p7")
    assert both_ways(rules, 1, 1, "10.0.0.1", TCP, 22, monkeypatch) == (None, None)
    with pytest.raises(InvalidInput, match="9 lookups"):  # a 9th: its port would never be looked at
        parse_ruleset({"rules": port_rules(tables.MAX_FALLBACK + 1)})


def test_a_prefix_its_longer_ones_cover_starts_no_walk(monkeypatch):
    # 8 port-only prefixes over `all` would be 9 lookups from 10.0.0.0/23, but both halves of the /23 have an
    # address-only rule, so every walk through it starts there and stops there; the longest walk starts at
    # the /22 (7 port prefixes, then `all`).
    halves = [{"name": "h0", "dst": "10.0.0.0/24"}, {"name": "h1", "dst": "10.0.1.0/24"}]
    rules = parse_ruleset({"rules": [ALL, *halves, *port_rules(tables.MAX_FALLBACK)]})
    assert both_ways(rules, 1, 1, "10.0.2.1", TCP, 22, monkeypatch) == ("all", "all")
    assert both_ways(rules, 1, 1, "10.0.1.1", TCP, 5007, monkeypatch) == ("h1", "h1")
    with pytest.raises(InvalidInput, match=r"10\.0\.0\.0/23"):  # one half left open: a walk starts at the /23
        parse_ruleset({"rules": [ALL, halves[0], *port_rules(tables.MAX_FALLBACK)]})


def test_an_ingress_run_says_its_direction():
    with pytest.raises(InvalidInput, match=r"\(ingress\)"):
        parse_ruleset({"rules": [{**r, "direction": "ingress"} for r in [ALL, *port_rules(tables.MAX_FALLBACK)]]})


def test_an_except_ends_the_run(monkeypatch):
    # Port prefixes 10.0.0.0/16../23 over `all` are 9 lookups; an except on the /16 makes that key a barrier
    # (prefix length 0), which ends every walk with its own answer (`all`, as if `cut` did not exist).
    cut = {"name": "cut", "dst": "10.0.0.0/8", "except": ["10.0.0.0/16"]}
    rules = parse_ruleset({"rules": [ALL, cut, *port_rules(tables.MAX_FALLBACK)]})
    assert both_ways(rules, 1, 1, "10.0.0.1", TCP, 22, monkeypatch) == ("all", "all")
    assert both_ways(rules, 1, 1, "10.0.0.1", TCP, 5000, monkeypatch) == ("p0", "p0")


NESTED = st.sampled_from([f"10.0.0.0/{n}" for n in range(14, 30)] + ["10.0.0.128/25", "10.0.2.0/23", "0.0.0.0/0"])


@st.composite
def deep_rule(draw, i):
    rule = {"name": f"r{i}", "dst": [draw(NESTED)]}
    kind = draw(st.sampled_from(["addr", "port", "proto"]))
    if kind == "port":
        rule.update(protocol="tcp", ports=[draw(st.sampled_from([22, 80, 5432]))])
    elif kind == "proto":
        rule["protocol"] = draw(st.sampled_from(["tcp", "udp"]))
    if draw(st.booleans()):
        rule["ttl"] = draw(st.sampled_from(["1s", "2s", "3s"]))
    return rule


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(6, 14).flatmap(lambda n: st.tuples(*[deep_rule(i) for i in range(n)])))
def test_an_accepted_set_classifies_as_with_no_fallback_limit(drawn):
    """Whatever check() accepts, the classifier's MAX_FALLBACK never changes a packet's rule, at any time."""
    try:
        rules = parse_ruleset({"rules": list(drawn)})
    except InvalidInput:
        return
    placed = [tables.Placed(r, i + 1, r.ttl_us * 1000 if r.ttl_us else 0) for i, r in enumerate(rules)]
    built = tables.compile(placed)
    limit = tables.MAX_FALLBACK
    for now in (1, 1_500_000_000, 2_500_000_000, 3_500_000_000):
        for host in ("10.0.0.1", "10.0.0.129", "10.0.1.1", "10.0.2.1", "10.0.3.255", "10.2.0.1", "192.168.0.1"):
            for proto, port in ((TCP, 22), (TCP, 5432), (UDP, 80), (ICMP, 0)):
                packet = (built.tries, built.ports, "egress", addr(host), proto, port, now)
                got = tables.classify(*packet)
                try:
                    tables.MAX_FALLBACK = 10**6
                    want = tables.classify(*packet)
                finally:
                    tables.MAX_FALLBACK = limit
                assert got == want, (host, proto, port, now)


# -- port rules sharing a prefix ------------------------------------------------------------------------------
def test_many_port_rules_on_one_prefix_are_checked_in_one_sweep():
    # Pairwise comparison took 10 s for 2,000 of these; a sort per protocol takes milliseconds.
    many = [{"name": f"r{i}", "dst": "10.0.0.0/8", "protocol": "tcp", "ports": [1000 + i]} for i in range(2000)]
    started = time.perf_counter()
    parse_ruleset({"rules": many})
    assert time.perf_counter() - started < 2
    with pytest.raises(InvalidInput) as err:
        parse_ruleset({"rules": [*many, {"name": "z", "dst": "10.0.0.0/8", "ports": ["2990-3100"]}]})
    assert err.value.field == "rules[z].ports"
    assert err.value.problem == "10.0.0.0/8 protocol 6 port 2990 (egress) is already selected by rule 'r1990'"


SELECTORS = st.sampled_from([{"protocol": "tcp"}, {"protocol": "udp"}, {"ports": [53]}, {"ports": ["50-60"]},
                             {"protocol": "tcp", "ports": [22, "5000-5003"]}, {"protocol": "udp", "ports": [60]},
                             {"protocol": "tcp", "ports": ["5003-5010"]}, {"protocol": "sctp", "ports": [22]}])


@settings(max_examples=300, deadline=None)
@given(st.lists(SELECTORS, min_size=2, max_size=5))
def test_rules_on_one_prefix_clash_exactly_when_they_select_a_protocol_and_port_together(selectors):
    drawn = [{"name": f"r{i}", "dst": "10.0.0.5", **sel} for i, sel in enumerate(selectors)]
    rules = [parse_rule(r) for r in drawn]

    def selected(rule):  # (protocol, port) pairs; port 0: the protocol-only entry
        protocols = [rule.protocol] if rule.protocol is not None else [TCP, UDP, 132]
        return {(proto, port) for proto in protocols
                for port in ([p for a, b in rule.ports for p in range(a, b + 1)] if rule.ports else [0])}

    both = {(i, j): selected(rules[i]) & selected(rules[j]) for j in range(len(rules)) for i in range(j)}
    try:
        parse_ruleset({"rules": drawn})
    except InvalidInput as err:
        # "10.0.0.5/32 protocol 6 port 22 (egress) is already selected by rule 'r0'", on rules[rN].ports
        later = int(err.field.split("]")[0].removeprefix("rules[r"))
        earlier = int(err.problem.rsplit("'", 2)[1].removeprefix("r"))
        words = err.problem.split(" (egress)")[0].split()
        proto, port = int(words[2]), int(words[4]) if len(words) > 3 else 0
        assert earlier < later and (proto, port) in both[(earlier, later)]  # the later rule's field is named
    else:
        assert not any(both.values())


def test_port_entries_past_the_map_are_refused_by_validation_as_by_the_planner():
    # 32 ranges of 11 aligned blocks each, for tcp, udp and sctp: 1,056 port entries per rule, each rule its own group.
    ports = [f"{a * 2048 + 1}-{a * 2048 + 2047}" for a in range(32)]
    fits = tables.MAX_PORT_ENTRIES // 1056
    many = [{"name": f"r{i}", "dst": f"10.0.{i >> 8}.{i & 255}", "ports": ports} for i in range(fits + 1)]
    rules = parse_ruleset({"rules": many[:fits]})
    assert len(tables.compile([tables.Placed(r, i + 1) for i, r in enumerate(rules)]).ports) == fits * 1056
    words = f"{(fits + 1) * 1056} port entries exceed the maximum {tables.MAX_PORT_ENTRIES}"
    with pytest.raises(InvalidInput, match=words):
        parse_ruleset({"rules": many})
    with pytest.raises(InvalidInput, match=words):
        tables.compile([tables.Placed(parse_rule(r), i + 1) for i, r in enumerate(many)])
