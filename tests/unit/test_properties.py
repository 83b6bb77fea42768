"""Property tests (hypothesis): parsers are total and round-trip; plan() reaches the desired state."""

import ipaddress
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shaper.datapath import tcdump
from shaper.control.controller import Controller
from shaper.errors import InvalidInput
from shaper.datapath.fake import FakeDatapath
from shaper.core.fields import MAX_DELAY_US, MAX_RATE_BITS_PER_S, MIN_RATE_BITS_PER_S
from shaper.core.model import FIELD_NAMES, Prefix, parse_rule
from shaper.core.units import (format_duration_us, format_percent, format_rate_bits_per_s, parse_duration_us,
                          parse_percent, parse_rate_bits_per_s)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.integers(0, MAX_DELAY_US))
def test_durations_round_trip(us):
    assert parse_duration_us(format_duration_us(us), "d", max_us=MAX_DELAY_US) == us


@SETTINGS
@given(st.integers(MIN_RATE_BITS_PER_S, MAX_RATE_BITS_PER_S))
def test_rates_round_trip(bits):
    assert parse_rate_bits_per_s(format_rate_bits_per_s(bits), "r", min_bits_per_s=MIN_RATE_BITS_PER_S,
                                 max_bits_per_s=MAX_RATE_BITS_PER_S) == bits


@SETTINGS
@given(st.integers(0, 100_000_000))
def test_percentages_round_trip(micro):
    pct = micro / 1_000_000
    assert math.isclose(parse_percent(format_percent(pct), "p"), pct, abs_tol=1e-9)


@SETTINGS
@given(st.one_of(
    st.builds(lambda a, n: ipaddress.ip_network((a, n), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.builds(lambda a, n: ipaddress.ip_network((a, n), strict=False), st.integers(0, 2**128 - 1),
              st.integers(0, 128))),
    st.integers(0, 2**128 - 1))
def test_prefixes_round_trip_and_contain_what_ipaddress_says(net, probe):
    prefix = Prefix.parse(str(net), "dst")
    assert Prefix.parse(str(prefix), "dst") == prefix
    if net.version == 4:
        assert str(prefix) == str(net)
        addr = ipaddress.IPv4Address(probe & 0xFFFFFFFF)
        key = (0xFFFF_0000_0000 | int(addr)).to_bytes(16, "big")
    else:
        addr = ipaddress.IPv6Address(probe)
        key = addr.packed
    assert prefix.contains(key) == (addr in net)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
FIELD_VALUES = st.dictionaries(
    st.sampled_from(FIELD_NAMES + ("colour",)),
    JSON | st.sampled_from(["10.0.0.0/8", "fd00::1", "5ms", "1%", "10mbit", "uniform", "32kb", "1h"]) |
    st.lists(st.sampled_from(["10.0.0.1", "10.1.0.0/16", "fd00::/64", "::/0", "bad"]), max_size=3),
    max_size=8)


@SETTINGS
@given(FIELD_VALUES)
def test_parse_rule_is_total_and_canonical(data):
    try:
        rule = parse_rule(data, name=None if "name" in data else "x")
    except InvalidInput as exc:
        assert exc.field and str(exc)
        return
    again = parse_rule(rule.to_dict())
    assert again == rule


RULE_POOL = [
    {"dst": ["10.0.0.0/8"], "rate": "10mbit"},
    {"dst": ["10.1.0.0/16", "fd00::/64"], "delay": "5ms"},
    {"dst": ["10.1.2.3"], "delay": "20ms", "jitter": "2ms", "loss": "1%"},
    {"dst": ["::/0"], "rate": "1mbit"},
    {"dst": ["10.1.2.0/24"], "rate": "2mbit", "ttl": "1h"},
    {"dst": ["fd00::5", "10.9.9.9"], "loss": "5%"},
]
NAMES = ["a", "b", "c", "d"]
RULE_SETS = st.lists(
    st.dictionaries(st.sampled_from(NAMES), st.sampled_from(range(len(RULE_POOL))), max_size=4), min_size=1,
    max_size=6)


@SETTINGS
@given(RULE_SETS)
def test_plan_applied_reaches_the_desired_state(sequence):
    fake = FakeDatapath()  # checks after every operation that no entry points at a missing class
    ctl = Controller(fake, clock=lambda: 10**12)
    for choice in sequence:
        used: set[str] = set()
        desired = []
        for name, idx in sorted(choice.items()):
            spec = RULE_POOL[idx]
            if used & set(spec["dst"]):
                continue  # a destination belongs to one rule
            used |= set(spec["dst"])
            desired.append(parse_rule({"name": name, **spec}))
        outcome = ctl.apply(desired).observed
        observed = fake.observe()
        assert outcome == observed  # the predicted state is the state (what the daemon caches)
        assert {n: o.rule for n, o in observed.rules.items()} == {r.name: r for r in desired}
        assert set(observed.classes) == {o.slot for o in observed.rules.values()}
        assert ctl.plan(desired) == []  # applying again changes nothing
        owners = [(p, r.name) for r in desired for p in r.dst]
        for prefix, _ in owners:  # the longest live prefix containing an address wins
            best = max((q for q in owners if q[0].contains(prefix.addr)), key=lambda q: q[0].prefixlen)
            assert fake.steer(prefix.addr, 10**12) & 0xFFFF == observed.rules[best[1]].slot


@SETTINGS
@given(st.binary(max_size=400), st.integers(0, 5))
def test_dump_parser_never_crashes_on_garbage(raw, seq):
    try:
        objects, _ = tcdump.parse(raw, seq)
    except tcdump.DumpError:
        return
    assert all(isinstance(o, tcdump.TcObject) for o in objects)
