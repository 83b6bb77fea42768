import pytest

from shaper.errors import InvalidInput
from shaper.core.model import (MAX_NETEM_LIMIT, MIN_NETEM_LIMIT, Prefix, parse_rule, parse_ruleset, rule_from_record,
                          validate_ruleset)


def rule(**kw):
    return parse_rule({"name": "r", "dst": ["10.0.0.1"], **kw})


def test_prefix_v4_is_mapped_and_prints_back():
    p = Prefix.parse("10.0.0.0/24", "dst")
    assert p.prefixlen == 96 + 24 and p.addr[10:12] == b"\xff\xff" and p.is_v4
    assert str(p) == "10.0.0.0/24"
    assert Prefix.parse("::ffff:10.0.0.5", "dst") == Prefix.parse("10.0.0.5", "dst")
    assert str(Prefix.parse("fd00::5", "dst")) == "fd00::5/128"
    assert Prefix.parse("::/0", "dst").prefixlen == 0
    assert Prefix.parse("0.0.0.0/0", "dst").prefixlen == 96


def test_prefix_contains():
    p = Prefix.parse("10.0.0.0/24", "dst")
    assert p.contains(Prefix.parse("10.0.0.77", "d").addr)
    assert not p.contains(Prefix.parse("10.0.1.1", "d").addr)
    assert Prefix.parse("::/0", "d").contains(Prefix.parse("10.1.1.1", "d").addr)


@pytest.mark.parametrize("dst,msg", [("fe80::1%eth0", "zone"), ("10.0.0.5/24", "host bits"), ("10.0.0.256", "does not appear"),
                                     ("example.com", "does not appear"), ("10.0.0.0/33", "does not appear"), ("", "does not appear"), (5, "expected a string")])
def test_prefix_rejects(dst, msg):
    with pytest.raises(InvalidInput, match=msg) as err:
        parse_rule({"name": "r", "dst": [dst]})
    assert err.value.field.startswith("dst")


def test_full_rule_and_round_trip():
    data = {"name": "db", "dst": ["10.0.0.5/32", "fd00::5"], "delay": "50ms", "jitter": "5ms",
            "delay_corr": "25%", "distribution": "normal", "loss": "1%", "loss_corr": "10%", "duplicate": "0.5%",
            "duplicate_corr": "5%", "corrupt": "0.1%", "corrupt_corr": "1%", "reorder": "25%",
            "reorder_corr": "50%", "gap": 5, "rate": "10mbit", "burst": "32kb", "limit": 5000, "ttl": "10m"}
    r = parse_rule(data)
    assert (r.delay_us, r.jitter_us, r.loss_pct, r.rate_bits_per_s, r.ttl_us) == (50_000, 5_000, 1.0, 10**7, 600_000_000)
    assert r.has_netem
    out = r.to_dict()
    assert out["dst"] == ["10.0.0.5/32", "fd00::5/128"]
    assert parse_rule(out) == r
    assert rule_from_record({k: v for k, v in out.items() if k != "dst"}, r.dst) == r


def test_loss_ge_defaults_and_round_trip():
    r = rule(loss_ge={"p": "1%"})
    assert (r.loss_ge.r_pct, r.loss_ge.loss_bad_pct, r.loss_ge.loss_good_pct) == (99.0, 100.0, 0.0)
    assert parse_rule(r.to_dict()) == r
    with pytest.raises(InvalidInput, match="either loss"):
        rule(loss="1%", loss_ge={"p": "1%"})
    with pytest.raises(InvalidInput, match="required"):
        rule(loss_ge={"r": "1%"})
    with pytest.raises(InvalidInput, match="unknown"):
        rule(loss_ge={"p": "1%", "q": "2%"})


@pytest.mark.parametrize("fields,field", [
    ({"jitter": "5ms"}, "jitter"), ({"delay": "5ms", "delay_corr": "5%"}, "delay_corr"),
    ({"loss_corr": "5%"}, "loss_corr"), ({"duplicate_corr": "5%"}, "duplicate_corr"),
    ({"corrupt_corr": "1%"}, "corrupt_corr"), ({"reorder": "5%"}, "reorder"),
    ({"delay": "5ms", "reorder_corr": "5%"}, "reorder_corr"), ({"delay": "5ms", "gap": 3}, "gap"),
    ({"burst": "32kb"}, "burst"), ({"delay": "5ms", "distribution": "normal"}, "distribution"),
])
def test_cross_field_requirements(fields, field):
    with pytest.raises(InvalidInput) as err:
        rule(**fields)
    assert err.value.field == field and "needs" in err.value.problem


def test_reorder_defaults_gap_1():
    assert rule(delay="10ms", reorder="25%").gap == 1


@pytest.mark.parametrize("data,field", [
    ({"name": "r", "dst": ["10.0.0.1"], "delya": "5ms"}, "delya"),
    ({"name": "../etc", "dst": ["10.0.0.1"]}, "name"),
    ({"name": "a" * 64, "dst": ["10.0.0.1"]}, "name"),
    ({"name": "ok", "dst": []}, "dst"),
    ({"name": "ok"}, "dst"),
    ({"name": "ok", "dst": ["10.0.0.1"], "distribution": "gaussian", "delay": "1ms", "jitter": "1ms"},
     "distribution"),
    ({"name": "ok", "dst": ["10.0.0.1"], "ttl": "0"}, "ttl"),
    ({"name": "ok", "dst": ["10.0.0.1"], "rate": "1bit"}, "rate"),
    ({"name": "ok", "dst": ["10.0.0.1"], "limit": 0}, "limit"),
    ({"name": "ok", "dst": ["10.0.0.1"], "limit": "1000"}, "limit"),
    ({"name": "ok", "dst": ["10.0.0.1"], "delay": "2h"}, "delay"),
])
def test_rule_rejects_naming_the_field(data, field):
    with pytest.raises(InvalidInput) as err:
        parse_rule(data)
    assert err.value.field == field


def test_path_name_must_match_body():
    assert parse_rule({"dst": ["10.0.0.1"]}, name="a").name == "a"
    with pytest.raises(InvalidInput, match="differs"):
        parse_rule({"name": "b", "dst": ["10.0.0.1"]}, name="a")


def test_ruleset_whole_set_checks():
    ok = parse_ruleset({"rules": [{"name": "b", "dst": "10.0.0.0/24"}, {"name": "a", "dst": "10.0.0.5"}]})
    assert [r.name for r in ok] == ["a", "b"]  # overlaps are fine: the longest prefix wins
    with pytest.raises(InvalidInput, match="duplicate rule name"):
        parse_ruleset({"rules": [{"name": "a", "dst": "10.0.0.1"}, {"name": "a", "dst": "10.0.0.2"}]})
    with pytest.raises(InvalidInput, match="already a destination") as err:
        parse_ruleset({"rules": [{"name": "a", "dst": "10.0.0.1"}, {"name": "b", "dst": "::ffff:10.0.0.1"}]})
    assert err.value.field == "rules[b].dst"
    with pytest.raises(InvalidInput) as err:
        parse_ruleset({"rules": [{"name": "a", "dst": "10.0.0.1"}, {"name": "b", "dst": "10.0.0.2", "loss": "x"}]})
    assert err.value.field == "rules[1].loss"
    with pytest.raises(InvalidInput, match="unknown top-level"):
        parse_ruleset({"rulez": []})
    with pytest.raises(InvalidInput):
        parse_ruleset(["a"])
    assert parse_ruleset(None) == ()
    assert parse_ruleset({"rules": None}) == ()


def test_ruleset_capacity():
    from shaper.core.model import MAX_RULES
    too_many = [parse_rule({"name": f"r{i}", "dst": [f"10.{i >> 8 & 255}.{i & 255}.1"]}) for i in range(MAX_RULES + 1)]
    with pytest.raises(InvalidInput, match="exceed"):
        validate_ruleset(too_many)


def test_netem_limit_sized_from_delay_and_rate():
    assert rule(delay="1ms").netem_limit() == MIN_NETEM_LIMIT
    # 1 s at 100 Mbit/s = 12.5 MB = 8334 MTUs, x1.5
    assert rule(delay="1s", rate="100mbit").netem_limit() == 12500
    assert rule(delay="1h", rate="10gbit").netem_limit() == MAX_NETEM_LIMIT
    assert rule(delay="1s", limit=77).netem_limit() == 77


def test_class_params():
    unlimited = rule()
    assert unlimited.class_params().rate_bytes >= 4 * 10**9 // 1
    r = rule(rate="20mbit")
    assert r.class_params().rate_bytes == 2_500_000 and r.class_params().burst_bytes >= 3000
    assert rule(rate="20mbit", burst="64kb").class_params().burst_bytes == 65536
    assert not rule(rate="20mbit").has_netem and rule(rate="20mbit").leaf_params() is None


def test_an_empty_or_mistyped_set_is_not_a_request_to_delete_everything():
    assert parse_ruleset(None) == () and parse_ruleset({"rules": None}) == () and parse_ruleset({"rules": []}) == ()
    for bad in ({}, {"rules": {}}, {"rules": 0}, {"rules": ""}, {"rules": False}):
        with pytest.raises(InvalidInput) as exc:
            parse_ruleset(bad)
        assert exc.value.field == "rules"


@pytest.mark.parametrize("key,close", [("dely", "delay"), ("Delay", "delay"), ("loss-corr", "loss_corr"),
                                       ("ttls", "ttl"), ("dest", "dst"), ("jiter", "jitter"), ("zzz", None)])
def test_an_unknown_field_names_the_closest_one(key, close):
    with pytest.raises(InvalidInput) as err:
        parse_rule({"name": "a", "dst": ["10.0.0.1"], key: "5ms"})
    assert err.value.field == key
    assert (f"did you mean {close!r}?" in str(err.value)) == (close is not None), str(err.value)
    with pytest.raises(InvalidInput, match="loss_ge.R: unknown field; did you mean 'r'"):
        parse_rule({"name": "a", "dst": ["10.0.0.1"], "loss_ge": {"p": "1%", "R": "2%"}})


LOCATED = """\
rules:
  - name: db
    dst: [10.0.0.5]
    delay: 50ms
  - name: cache
    dst:
      - 10.0.0.6
      - 10.0.0.7
    rate: 2mbit
"""


@pytest.mark.parametrize("path,line", [("rules", 1), ("rules[0]", 2), ("rules[0].delay", 4), ("rules[1].rate", 9),
                                       ("rules[1].dst[1]", 8), ("rules[cache].dst", 6), ("rules[1].absent", 5),
                                       ("rules[7].delay", 1), ("other", None)])
def test_locate_finds_the_line_of_a_field_path(path, line):
    from shaper.core.model import locate

    assert locate(LOCATED, path) == line
    assert locate("rules: [", "rules") is None  # not YAML: no line to give


def test_rules_text_errors_carry_the_line():
    from shaper.core.model import parse_ruleset_text

    with pytest.raises(InvalidInput) as err:
        parse_ruleset_text(LOCATED.replace("rate: 2mbit", "rate: fast"), "-f", "r.yaml")
    assert str(err.value).startswith("r.yaml:9: rules[1].rate: ") and err.value.line == 9
    assert err.value.field == "rules[1].rate"  # the field itself is unchanged (the API reports it)
    with pytest.raises(InvalidInput, match=r"r.yaml is not valid YAML: line 2, column 1"):
        parse_ruleset_text("rules: [\n", "-f", "r.yaml")


@pytest.mark.parametrize("text", [".l\x00x", "10.0.0.1\x00", "10.0\x00.0.1/32", "fd00::\x00"])
def test_a_destination_with_a_nul_is_bad_input_not_a_crash(text):
    # Found by schemathesis through PUT /rules: inet_pton raises ValueError on an embedded NUL.
    with pytest.raises(InvalidInput) as err:
        Prefix.parse(text, "dst[0]")
    assert err.value.field == "dst[0]"


# -- every rule the validator accepts fits the kernel's fields (finding 9) ------------------------------------
import json  # noqa: E402
import struct  # noqa: E402
from dataclasses import replace  # noqa: E402

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from shaper.core.plan import Entry  # noqa: E402
from shaper.datapath import abi, netem  # noqa: E402
from shaper.core.fields import (DISTRIBUTIONS, MAX_BURST_BYTES, MAX_DELAY_US, MAX_RATE_BITS_PER_S,  # noqa: E402
                               MAX_TTL_US, MIN_BURST_BYTES, MIN_RATE_BITS_PER_S)
from shaper.core.model import MAX_BURST_NS, MAX_RULES, max_burst_bytes  # noqa: E402
from shaper.datapath.tc import _htb_class_options  # noqa: E402
from shaper.core.units import format_duration_us, format_percent, format_rate_bits_per_s  # noqa: E402
from tests.support.netem_decode import decode_options  # noqa: E402

_PCT = st.integers(0, 100_000_000).map(lambda micro: format_percent(micro / 1_000_000))
_US = st.integers(1, MAX_DELAY_US).map(format_duration_us)


@st.composite
def _user_rules(draw) -> dict:
    """Rule bodies over each field's whole accepted range (hypothesis favours the ends),
    with the fields a field needs present, so most are accepted."""
    body: dict = {"name": "r", "dst": ["10.0.0.0/8", "fd00::/64"]}
    if draw(st.booleans()):
        body["rate"] = format_rate_bits_per_s(draw(st.integers(MIN_RATE_BITS_PER_S, MAX_RATE_BITS_PER_S)))
        if draw(st.booleans()):
            body["burst"] = draw(st.integers(MIN_BURST_BYTES, MAX_BURST_BYTES))
    if draw(st.booleans()):
        body["delay"] = draw(_US)
        if draw(st.booleans()):
            body["jitter"] = draw(_US)
            body["distribution"] = draw(st.sampled_from(DISTRIBUTIONS))
            body["delay_corr"] = draw(_PCT)
        if draw(st.booleans()):
            body["reorder"], body["reorder_corr"] = draw(_PCT), draw(_PCT)
            body["gap"] = draw(st.integers(1, 2**31 - 1))
    if draw(st.booleans()):
        body["loss"], body["loss_corr"] = draw(_PCT), draw(_PCT)
    elif draw(st.booleans()):
        body["loss_ge"] = {"p": draw(_PCT), "r": draw(_PCT), "loss_bad": draw(_PCT), "loss_good": draw(_PCT)}
    for fld in ("duplicate", "corrupt"):
        if draw(st.booleans()):
            body[fld], body[fld + "_corr"] = draw(_PCT), draw(_PCT)
    if draw(st.booleans()):
        body["limit"] = draw(st.integers(1, MAX_NETEM_LIMIT))
    if draw(st.booleans()):
        body["ttl"] = format_duration_us(draw(st.integers(1, MAX_TTL_US)))
    body["name"] = draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", fullmatch=True))
    return body


def _htb_buffer_ticks(options: bytes) -> tuple[int, int]:
    """buffer and cbuffer of an encoded HTB class (TCA_HTB_PARMS: rate and ceil ratespecs, then them)."""
    off = 0
    while off + 4 <= len(options):
        length, kind = struct.unpack_from("=HH", options, off)
        if kind & 0x3FFF == 1:  # TCA_HTB_PARMS
            return struct.unpack_from("=II", options, off + 4 + 24)
        off += (length + 3) & ~3
    raise AssertionError("no TCA_HTB_PARMS")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_user_rules())
@example({"name": "r", "dst": ["10.0.0.1"], "rate": "1mbit", "burst": 2**30})  # the red team's 1gb at 1mbit
@example({"name": "r", "dst": ["10.0.0.1"], "rate": "8kbit", "burst": MAX_BURST_BYTES})
def test_every_rule_the_validator_accepts_encodes(body):
    try:
        rule = parse_rule(body)
    except InvalidInput as exc:
        # Refused: then it names the field and the accepted form, never a bare failure.
        assert exc.field and exc.accepted
        return
    # The HTB class: rate/ceil (rate64 beyond 32 bits), burst as u32 ticks that must not wrap.
    params = rule.class_params()
    options = _htb_class_options(params)
    buffer, cbuffer = _htb_buffer_ticks(options)
    expected = params.burst_bytes * 10**9 / params.rate_bytes / 64
    assert buffer == cbuffer and abs(buffer - expected) < 17  # pyroute2 (as tc) truncates to whole microseconds
    # The netem leaf: every field packs (struct raises on overflow).
    if rule.has_netem:
        decoded = decode_options(netem.encode_options(rule))
        assert decoded["latency_ns"] == rule.delay_us * 1000 and decoded["limit"] == rule.netem_limit()
    # The record kept in rule_meta, and a trie value at the last slot with the longest TTL.
    record = replace(rule, dst=()).to_dict()
    del record["dst"]
    abi.pack_meta(json.dumps({"rule": record, "expires_ns": 2**63 - 1}, separators=(",", ":"),
                                sort_keys=True).encode())
    abi.pack_entry(Entry(MAX_RULES, (MAX_TTL_US + 10**9) * 1000, 128))


def test_burst_beyond_what_htb_holds_at_the_rate_is_refused_naming_the_range():
    with pytest.raises(InvalidInput) as exc:
        rule(rate="1mbit", burst="1gb")
    assert exc.value.field == "burst" and "274.9 s" in str(exc.value)
    assert f"to {max_burst_bytes(1_000_000)} bytes" in exc.value.accepted
    assert max_burst_bytes(1_000_000) == 125_000 * MAX_BURST_NS // 10**9
    assert rule(rate="1mbit", burst=max_burst_bytes(1_000_000)).burst_bytes == max_burst_bytes(1_000_000)
    assert rule(rate="10gbit", burst="1gb").burst_bytes == 2**30  # 0.86 s at 10gbit


def test_a_ttl_of_thirty_days_is_accepted_and_echoed():
    assert rule(ttl="30d").ttl_us == 30 * 86_400_000_000 and rule(ttl="30d").to_dict()["ttl"] == "30d"
    with pytest.raises(InvalidInput) as exc:
        rule(ttl="31d")
    assert exc.value.field == "ttl" and "maximum 30d" in str(exc.value)


@pytest.mark.parametrize("mapped,v4", [("::ffff:0:0/96", "0.0.0.0/0"), ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
                                       ("::ffff:10.0.0.5", "10.0.0.5/32"), ("::FFFF:a00:5/128", "10.0.0.5/32")])
def test_ipv4_mapped_prefixes_are_their_ipv4_form_everywhere(mapped, v4):
    # One key space: an IPv4-mapped IPv6 prefix is the same destinations as its IPv4 form
    # (README, dst), so it is stored, echoed and listed in that form ...
    assert rule(dst=[mapped]).to_dict()["dst"] == [v4]
    assert rule(dst=[mapped, v4]).dst == rule(dst=[v4]).dst  # ... one destination, not two ...
    with pytest.raises(InvalidInput) as exc:  # ... and in two rules it is the same destination twice.
        parse_ruleset({"rules": [{"name": "a", "dst": [mapped]}, {"name": "b", "dst": [v4]}]})
    assert f"{v4} is already a destination of rule 'a'" in str(exc.value)


@pytest.mark.parametrize("body, field, words", [
    ({"src": [], "name": "a"}, "src", "at least one source"),
    ({"src": {"x": 1}, "name": "a"}, "src", "at least one source"),
    ({"src": ["10.0.0.1", ["10.0.0.2"]], "name": "a"}, "src[1]", "expected a string"),
    ({"src": "10.0.0.1", "direction": "egress", "name": "a"}, "src", "not of a 'egress' one"),
    ({"src": "10.0.0.1", "dst": "10.0.0.2", "name": "a"}, "src", "given with dst"),
    ({"dst": [], "name": "a"}, "dst", "at least one destination"),
])
def test_an_error_in_a_rules_peers_names_the_field_written(body, field, words):
    with pytest.raises(InvalidInput) as err:
        parse_rule(body)
    assert err.value.field == field and words in str(err.value)


def test_src_with_direction_null_is_an_ingress_rule_like_src_alone():
    # null means "left out" for every optional field; it must not read as a direction.
    assert parse_rule({"name": "a", "src": "10.0.0.1", "direction": None}).direction == "ingress"
    assert parse_rule({"name": "a", "src": "10.0.0.1", "direction": None}) == parse_rule({"name": "a", "src": "10.0.0.1"})
