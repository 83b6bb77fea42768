import pytest

from shaper.errors import InvalidInput
from shaper.model import (MAX_NETEM_LIMIT, MIN_NETEM_LIMIT, Prefix, parse_rule, parse_ruleset, rule_from_record,
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
    assert (r.delay_us, r.jitter_us, r.loss_pct, r.rate_bits, r.ttl_us) == (50_000, 5_000, 1.0, 10**7, 600_000_000)
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
    from shaper.model import MAX_RULES
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
    from shaper.model import locate

    assert locate(LOCATED, path) == line
    assert locate("rules: [", "rules") is None  # not YAML: no line to give


def test_rules_text_errors_carry_the_line():
    from shaper.model import parse_ruleset_text

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
