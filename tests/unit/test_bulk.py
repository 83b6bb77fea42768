"""Bulk work without root: the fast paths that make a 100,000-prefix rules file quick give the
same results and the same errors as the general ones they stand in for (ipaddress, PyYAML's
SafeLoader, dataclass comparisons, one map update per entry)."""

import ipaddress
import random
import struct

import pytest
import yaml

from shaper.datapath import abi
from shaper.core import model, plan as P
from shaper.errors import InvalidInput
from shaper.datapath.fake import FakeDatapath
from shaper.control.controller import Controller
from shaper.datapath.kernel import _pack_entries
from shaper.core.model import Prefix, RulesLoader, _parse_fast, parse_rule, parse_ruleset, parse_ruleset_text


def _reference(text: str) -> tuple[bytes, int] | None:
    """What the ipaddress path makes of `text` (None: it refuses it)."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError:
        return None
    if net.version == 4:
        return (int(net.network_address) | 0xFFFF_0000_0000).to_bytes(16, "big"), 96 + net.prefixlen
    return net.network_address.packed, net.prefixlen


def _candidates(rng: random.Random, n: int) -> list[str]:
    """Valid, nearly valid and malformed destinations, both families."""
    out = []
    for _ in range(n):
        kind = rng.randrange(8)
        if kind == 0:
            out.append(".".join(str(rng.randrange(256)) for _ in range(4)) + f"/{rng.randrange(34)}")
        elif kind == 1:
            v = rng.getrandbits(32) & ~((1 << rng.randrange(33)) - 1)
            out.append(f"{ipaddress.IPv4Address(v)}/{rng.randrange(33)}")
        elif kind == 2:  # leading zeros, out-of-range octets, too few or many parts
            parts = [rng.choice(["0", "00", "01", "255", "256", "1", "999", ""]) for _ in range(rng.choice([3, 4, 5]))]
            out.append(".".join(parts) + rng.choice(["", "/8", "/08", "/32", "/33", "/-1", "/ 8", "/"]))
        elif kind == 3:
            bits = rng.randrange(129)
            v = rng.getrandbits(128) & ~((1 << (128 - bits)) - 1) if bits else 0
            out.append(f"{ipaddress.IPv6Address(v)}/{bits}")
        elif kind == 4:
            v = rng.getrandbits(128)
            out.append(ipaddress.IPv6Address(v).exploded + rng.choice(["", "/128", "/64", "/0128", "/129"]))
        elif kind == 5:  # random strings over the IPv6 alphabet: '::' in odd places, long groups
            out.append("".join(rng.choice("0123456789abcdefABCDEF::::") for _ in range(rng.randrange(1, 42))))
        elif kind == 6:
            out.append(rng.choice(["::", "::/0", "::1", "::ffff:10.0.0.1", "::ffff:a00:1/128", "1::", "1:2:3:4:5:6:7::",
                                   "::2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8:9", "1::2::3", ":1::",
                                   "12345::", "fe80::1%eth0", " 10.0.0.1", "10.0.0.1 ", "0.0.0.0/0", "10.0.0.1/32",
                                   "10.0.0.0/24", "10.0.0.1/24", "::/128", "fd00::/7", "fd00::/8", "٣.1.1.1"]))
        else:
            v = rng.getrandbits(32)
            out.append(f"{v >> 24}.{v >> 16 & 255}.{v >> 8 & 255}.{v & 255}")
    return out


def test_fast_destination_parse_agrees_with_ipaddress():
    rng = random.Random(11)
    fast_taken = 0
    for text in _candidates(rng, 40_000):
        key = _parse_fast(text)
        if key is None:
            continue  # the general path decides, errors included
        fast_taken += 1
        assert (key[:16], key[16]) == _reference(text), text
    assert fast_taken > 15_000  # the fast path is the common one, not a corner


@pytest.mark.parametrize("text", ["10.0.0.1/24", "010.0.0.1", "256.0.0.1", "10.0.0.0/33", "1::2::3", "12345::",
                                  "fe80::1%eth0", "::1/129", "10.0.0", "", "x"])
def test_refused_destinations_give_the_general_error(text):
    with pytest.raises(InvalidInput) as err:
        parse_rule({"name": "a", "dst": ["10.9.9.9", text]})
    assert err.value.field == "dst[1]"
    with pytest.raises(InvalidInput) as ref:
        Prefix.parse(text, "dst[1]")
    assert str(err.value) == str(ref.value)


def test_prefix_text_agrees_with_ipaddress():
    rng = random.Random(12)
    special = [0, 1, 0xFFFF << 32, (0xFFFF << 32) | 0x0A000001, 0x0A000001, 2**128 - 1, 0xFE80 << 112,
               (0x20010DB8 << 96) | 1, 0xFFFF << 80]
    for v in special + [rng.getrandbits(128) >> rng.randrange(129) for _ in range(5000)]:
        for bits in (0, 64, 95, 96, 120, 128):
            addr = v.to_bytes(16, "big")
            p = Prefix(addr, bits)
            if p.is_v4:
                expected = f"{ipaddress.IPv4Address(addr[12:])}/{bits - 96}"
            else:
                expected = f"{ipaddress.IPv6Address(addr)}/{bits}"
            assert str(p) == expected


def test_prefix_order_and_identity():
    a, b = Prefix.parse("10.0.0.0/8", "x"), Prefix.parse("10.0.0.0/16", "x")
    c = Prefix.parse("fd00::/8", "x")
    assert sorted([c, b, a]) == [a, b, c]  # address, then prefix length
    assert len({a, Prefix.parse("10.0.0.0/8", "y")}) == 1


def test_destinations_sorted_and_deduplicated():
    rule = parse_rule({"name": "a", "dst": ["10.0.0.2", "fd00::1", "10.0.0.1", "10.0.0.2/32", " 10.0.0.3 "]})
    assert [str(p) for p in rule.dst] == ["10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32", "fd00::1/128"]


def test_shared_destination_named_as_before():
    with pytest.raises(InvalidInput) as err:
        parse_ruleset({"rules": [{"name": "a", "dst": ["10.0.0.1", "10.0.0.2"]},
                                 {"name": "b", "dst": ["10.0.0.3", "10.0.0.2/32"]}]})
    assert err.value.field == "rules[b].dst"
    assert "10.0.0.2/32 is already a destination of rule 'a'" in str(err.value)


YAML_SCALARS = ["", "~", "null", "Null", "NULL", "yes", "No", "true", "TRUE", "on", "Off", "y", "n", "1", "-1",
                "+1", "0x1F", "0o17", "017", "0b101", "1_000", "1:30", "190:20:30", "1.5", "1e3", "1.0e+3", ".5",
                ".inf", "-.Inf", ".nan", "2020-01-01", "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10 -5",
                "<<", "=", "10.0.0.5", "10.0.0.0/24", "fd00::1", "::/0", "50ms", "1%", "abc", "-", "0.", "-0",
                "12:", "Yes", "yEs"]


def test_rules_loader_resolves_like_safe_loader():
    for value in YAML_SCALARS:
        for implicit in ((True, False), (False, True), (False, False)):
            assert RulesLoader("").resolve(yaml.ScalarNode, value, implicit) == \
                yaml.SafeLoader("").resolve(yaml.ScalarNode, value, implicit), (value, implicit)


def test_rules_loader_loads_like_safe_load():
    doc = "rules:\n" + "".join(f"  - {s!r}: {s}\n" for s in YAML_SCALARS if s not in ("", "-", "12:", "<<", "=")) + \
        "  - list: &l [10.0.0.1, 'x', !!str 5, 5, [1, 2], {k: v}, ~, 2020-01-01]\n    again: *l\n"
    assert yaml.load(doc, Loader=RulesLoader) == yaml.safe_load(doc)


@pytest.mark.parametrize("text, expected", [
    ("rules:\n  - name: a\n    dst: [10.0.0.1]\n  - name: a\n    dst: [10.0.0.2]\n", "duplicate rule name"),
    ("rules:\n  - name: a\n    dst: [10.0.0.1]\n    delay: 2020-01-01\n", "delay"),
    ("rules:\n  - name: a\n    dst: [10.0.0.1, 5]\n", "expected a string, got int"),
    ("rules:\n  - name: a\n    dst: [10.0.0.1]\n    gap: yes\n", "gap"),
    ('rules: !!seq "x"\n', "expected a sequence node, but found scalar"),
    ("rules:\n  - name: a\n    dst: !!seq {a: 1}\n", "expected a sequence node, but found mapping"),
])
def test_errors_unchanged_by_the_c_loader(text, expected, monkeypatch):
    with pytest.raises(InvalidInput) as fast:
        parse_ruleset_text(text, "-f", "r.yaml")
    # The same document through PyYAML's pure-Python SafeLoader gives the same error.
    monkeypatch.setattr(model, "RulesLoader", yaml.SafeLoader)
    with pytest.raises(InvalidInput) as slow:
        parse_ruleset_text(text, "-f", "r.yaml")
    assert expected in str(fast.value)
    assert str(fast.value) == str(slow.value)


def test_syntax_errors_keep_their_line(monkeypatch):
    text = "rules:\n  - name: a\n    dst: [10.0.0.1]\n  - name: b\n  dst: [10.0.0.2]\n"
    with pytest.raises(InvalidInput) as fast:
        parse_ruleset_text(text, "-f", "r.yaml")
    monkeypatch.setattr(model, "RulesLoader", yaml.SafeLoader)
    with pytest.raises(InvalidInput) as slow:
        parse_ruleset_text(text, "-f", "r.yaml")
    # libyaml words the problem its own way; where it is is the same.
    assert "r.yaml is not valid YAML: line 5, column 3:" in str(fast.value)
    assert "r.yaml is not valid YAML: line 5, column 3:" in str(slow.value)


def test_plan_shares_values_and_matches_a_per_entry_plan():
    rules = parse_ruleset({"rules": [{"name": f"r{i}", "dst": [f"10.{i}.{j}.0/{24 + j % 3}" for j in range(50)]
                                      + [f"fd00:{i}::{j}" for j in range(5)], "ttl": "1h"} for i in range(20)]})
    ops = P.plan(rules, P.Observed(), 1000)
    (upsert,) = [op for op in ops if isinstance(op, P.UpsertEntries)]
    slot = {op.rule.name: op.slot for op in ops if isinstance(op, P.CreateClass)}
    expected = {p: P.Entry(slot[r.name], 1000 + 3600 * 10**9, p.prefixlen)
                for r in rules for p in r.dst}
    assert upsert.entries == expected and list(upsert.entries) == sorted(expected)
    # Applied to the fake and planned again: nothing to do.
    dp = FakeDatapath()
    Controller(dp, clock=lambda: 1000).apply(rules)
    assert Controller(dp, clock=lambda: 1000).plan(rules) == []


def test_packed_entries_match_one_by_one_packing():
    rules = parse_ruleset({"rules": [{"name": "a", "dst": ["10.0.0.0/8", "10.1.0.0/16", "fd00::1"]},
                                     {"name": "b", "dst": ["192.168.0.1"]}]})
    (upsert,) = [op for op in P.plan(rules, P.Observed(), 0) if isinstance(op, P.UpsertEntries)]
    keys, values = _pack_entries(upsert.entries)
    assert keys == b"".join(abi.pack_key(p.prefixlen, p.addr) for p in upsert.entries)
    assert values == b"".join(abi.pack_entry(v) for v in upsert.entries.values())
    assert len(keys) == 4 * abi.LPM_KEY.size and struct.unpack_from("=I", keys)[0] == 104


# Lists of IPv4 hosts: checked and packed as one text (model._v4_hosts) when long enough.

def _host_lists(rng: random.Random) -> list[list]:
    def host() -> str:
        v = rng.getrandbits(32)
        return f"{v >> 24}.{v >> 16 & 255}.{v >> 8 & 255}.{v & 255}" + rng.choice(["", "/32"])

    spoilers = ["010.0.0.1", "256.0.0.1", "10.0.0", "10.0.0.1.2", "10.0.0.1/24", "10.0.0.1/", "/32", "",
                " 10.0.0.1", "10.0.0.1\n10.0.0.2", "10.0.0.1/32/32", "1.2.3.4/032", "٣.1.1.1", "::1", 5, None,
                "10..0.1", "10.0.0.1\n"]
    lists = []
    for spoiler in spoilers:
        hosts = [host() for _ in range(model._BULK_MIN + rng.randrange(50))]
        hosts.insert(rng.randrange(len(hosts)), spoiler)
        lists.append(hosts)
    lists.append([host() for _ in range(2000)] * 2)  # repeats
    lists.append([host() for _ in range(model._BULK_MIN)])
    return lists


def test_host_lists_parse_as_one_by_one():
    rng = random.Random(13)
    bulk_taken = 0
    for raw in _host_lists(rng):
        bulk_taken += model._v4_hosts(raw) is not None
        try:
            got = model._parse_dst(raw, "")
        except InvalidInput as exc:
            got = str(exc)
        expected: object
        try:
            keys = []
            for i, text in enumerate(raw):
                p = Prefix.parse(text, f"dst[{i}]")
                keys.append(p)
            expected = tuple(sorted(set(keys)))
        except InvalidInput as exc:
            expected = str(exc)
        assert got == expected, raw
        assert type(got) is str or all(type(p) is Prefix for p in got)
    assert bulk_taken == 2  # only the lists without a spoiler: the others went one by one


# Long runs of host lines in a YAML document: cut out before libyaml (model.load_rules_yaml).

def _hosts(n: int, start: int = 0) -> list[str]:
    return [f"10.{(start + i) >> 16 & 255}.{(start + i) >> 8 & 255}.{(start + i) & 255}" + ("/32" if i % 3 else "")
            for i in range(n)]


def _block(items: list[str], indent: int) -> str:
    return "".join(f"{' ' * indent}- {h}\n" for h in items)


N = model._RUN_MIN + 10
FAST_DOCS = {
    "rules": "rules:\n  - name: a\n    dst:\n" + _block(_hosts(N), 6) + "  - name: b\n    rate: 1mbit\n    dst:\n"
             + _block(_hosts(3 * N, 5000), 4) + "    delay: 5ms\n",
    "mixed items": "rules:\n- name: a\n  dst:\n  - fd00::1\n" + _block(_hosts(N), 2) + "  - '10.9.9.9'\n"
                   + _block(_hosts(N, 900), 2) + "  # a comment\n" + _block(_hosts(N, 1900), 2)
                   + "  - 10.0.0.0/24\n",
    "odd words stay strings": "x:\n" + _block(["999.1.1.1", "1.2.3.4/32", "1.2.3", "1.2.", "01.02.03.04",
                                                "1.2.3.4/99/", "1.2.3.4.5.6", "12345.6.7"] * N, 0),
    "at the end, no newline": "rules:\n- name: a\n  dst:\n" + _block(_hosts(N), 2) + "  - 10.200.0.1",
    "trailing spaces": "l:\n" + "".join(f"  - {h}   \n" for h in _hosts(N)),
    "alias": "a: &x\n" + _block(_hosts(N), 2) + "b: *x\n",
    "nested": "l:\n  -\n" + _block(_hosts(N), 4) + "  - except:\n" + _block(_hosts(N, 300), 6),
}
SLOW_DOCS = {
    "literal block": "text: |\n" + _block(_hosts(N), 2) + "other: 1\n",
    "plain continuation": "x: foo\n" + _block(_hosts(N), 2),
    "flow": "x: [\n" + _block(_hosts(N), 2) + "]\n",
    "forged tag": "x:\n" + _block(_hosts(N), 2) + "y:\n  - !<tag:shaper.io,2026:hosts> 0\n",
    "error after a run": "rules:\n- name: a\n  dst:\n" + _block(_hosts(N), 2) + " bad: [\n",
    "bad indentation": "rules:\n  - name: a\n    dst:\n" + _block(_hosts(N), 4) + "  dst: 1\n",
}


def _load(doc: str | bytes, loader) -> object:
    try:
        return yaml.load(doc, Loader=loader)
    except yaml.YAMLError as exc:
        return f"error: {exc}"


@pytest.mark.parametrize("name", sorted(FAST_DOCS))
def test_host_runs_load_as_yaml_does(name, monkeypatch):
    doc = FAST_DOCS[name]
    expected = _load(doc, yaml.SafeLoader)
    assert not str(expected).startswith("error"), expected

    def no_fallback(*args, **kwargs):
        raise AssertionError("loaded the original text again")

    monkeypatch.setattr(model.yaml, "load", no_fallback)
    for text in (doc, doc.encode()):
        assert model.load_rules_yaml(text) == expected


@pytest.mark.parametrize("name", sorted(SLOW_DOCS))
def test_misplaced_runs_load_the_original_text(name, monkeypatch):
    doc = SLOW_DOCS[name]
    assert _load(doc, yaml.SafeLoader) == _load(doc, RulesLoader) or str(_load(doc, RulesLoader)).startswith("error")
    fell_back = []
    load = yaml.load

    def spy(*args, **kwargs):
        fell_back.append(1)
        return load(*args, **kwargs)

    monkeypatch.setattr(model.yaml, "load", spy)
    for text in (doc, doc.encode()):
        expected = _load(text, RulesLoader)  # an error names the kind of text it read
        try:
            got = model.load_rules_yaml(text)
        except yaml.YAMLError as exc:
            got = f"error: {exc}"
        assert got == expected
    assert len(fell_back) == 4  # once for the expected result, once by load_rules_yaml


def test_a_big_rules_file_with_an_error_keeps_its_line():
    text = ("rules:\n  - name: a\n    dst:\n" + _block(_hosts(5 * N), 6)
            + "  - name: b\n    dst: [10.99.0.1]\n    delay: soon\n")
    with pytest.raises(InvalidInput) as err:
        parse_ruleset_text(text, "-f", "r.yaml")
    assert f"r.yaml:{6 + 5 * N}: rules[1].delay" in str(err.value)
    bad = text.replace("10.0.1.7/32", "10.0.1.07/32")
    with pytest.raises(InvalidInput) as err:
        parse_ruleset_text(bad, "-f", "r.yaml")
    assert "r.yaml:" + str(bad.splitlines().index("      - 10.0.1.07/32") + 1) + ":" in str(err.value)


def test_prefix_texts_as_str_writes_them():
    rng = random.Random(14)
    hosts = [Prefix.parse(h, "x") for h in _hosts(3 * N)]
    lists = [hosts, hosts[:N], hosts + [Prefix.parse("10.0.0.0/24", "x")], hosts + [Prefix.parse("fd00::1", "x")],
             hosts + [Prefix.parse("::ffff:0:0/128", "x")], hosts[:3],
             [Prefix.parse(str(ipaddress.IPv4Address(rng.getrandbits(32))), "x") for _ in range(2 * N)]]
    for prefixes in lists:
        assert model.prefix_texts(tuple(prefixes)) == [str(p) for p in prefixes]
    assert model.prefix_texts(tuple(hosts))[0] == "10.0.0.0/32"
