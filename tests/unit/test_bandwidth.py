"""kubelet's pod bandwidth annotations (shaper.k8s.bandwidth): the quantity read as kubelet reads it,
the whole-pod rules built from it, their place next to the shaper.io/rules ones, and the sidecar's
reading of the downward API files (shaper.daemon.initial_rules)."""

import logging
import math
from fractions import Fraction

import pytest

from shaper import daemon
from shaper.core import model
from shaper.core.model import Prefix, parse_rule
from shaper.errors import InvalidInput
from shaper.k8s import bandwidth as B

EVERYWHERE = Prefix.parse("::/0", "dst")


@pytest.mark.parametrize("text, bits_per_s", [
    ("1M", 10**6),  # decimal SI: 1M is 1,000,000 bit/s
    ("10Mi", 10 * 2**20),  # binary SI: 10Mi is 10,485,760 bit/s
    ("512Ki", 512 * 1024),
    ("1.5G", 1_500_000_000),
    ("1.G", 10**9),  # apimachinery accepts a point with no digits after it
    ("+.5M", 500_000),
    ("0.001G", 10**6),
    ("000010k", 10_000),
    ("1e6", 10**6),
    ("1E3", 1000),  # E followed by digits is an exponent; E alone is exa
    ("1e+3", 1000),
    ("25e-1", 3),  # 2.5, rounded up (then too small for kubelet: below)
    ("1000", 1000),
    ("1k", 1000),  # kubelet's smallest
    ("1P", 10**15),  # and its largest
    ("999.5", 1000),  # rounded up to an integer (Quantity.Value()) before the bounds
    ("1000500m", 1001),
    ("1000000000u", 1000),
    ("1000000000000n", 1000),
    ("0.9Ti", 989_560_464_999),  # 0.9 x 2^40 = 989560464998.4, rounded up
])
def test_quantities(text, bits_per_s):
    assert math.ceil(B.parse_quantity(text, "x")) == bits_per_s
    if bits_per_s >= B.MIN_BITS_PER_S:
        assert B.parse_bandwidth_bits_per_s(text, "x") == bits_per_s


@pytest.mark.parametrize("text, problem", [
    ("", "is not a quantity"),
    ("10Mbit", "is not a quantity"),  # a tc unit is not a quantity suffix
    ("10 M", "is not a quantity"),
    (" 1M", "is not a quantity"),  # no spaces, as ParseQuantity
    ("1M\n", "is not a quantity"),
    ("1.2.3", "is not a quantity"),
    ("1e3.5", "is not a quantity"),
    ("25e-1k", "is not a quantity"),  # an exponent ends the quantity
    ("ten", "is not a quantity"),
    ("10K", "unable to parse quantity's suffix 'K'"),  # k is kilo; K is no suffix
    ("10mi", "suffix 'mi'"),
    ("1e", "suffix 'e'"),
    ("1Ki3", "suffix 'Ki3'"),
    ("0", "unreasonably small (< 1kbit)"),
    ("999", "'999' is 999 bit/s: resource is unreasonably small (< 1kbit)"),
    ("0.5k", "is 500 bit/s"),
    ("-5M", "unreasonably small"),
    ("1e-999999", "unreasonably small"),
    ("1001T", "unreasonably large (> 1Pbit)"),
    ("1Pi", "unreasonably large"),  # 2^50 > 10^15
    ("2P", "is 2e+15 bit/s: resource is unreasonably large"),
    ("1E", "unreasonably large"),
    ("1e999999999", "unreasonably large"),  # decided without a billion-digit integer
    ("9" * 101, "longer than 100"),
])
def test_quantities_kubelet_refuses(text, problem):
    with pytest.raises(InvalidInput) as exc:
        B.parse_bandwidth_bits_per_s(text, B.EGRESS_ANNOTATION)
    assert exc.value.field == B.EGRESS_ANNOTATION and problem in exc.value.problem
    assert exc.value.accepted == B.QUANTITY_FORM


def test_parse_quantity_is_exact():
    assert B.parse_quantity("1.5Mi", "x") == Fraction(3 * 2**19)
    assert B.parse_quantity("1m", "x") == Fraction(1, 1000)
    assert B.parse_quantity("-0.25k", "x") == -250
    assert B.parse_quantity("k", "x") == 0  # apimachinery's scanner reads no digits as 0


@pytest.mark.parametrize("direction", B.DIRECTIONS)
def test_the_whole_pod_rule_of_each_annotation(direction):
    rule = B.bandwidth_rule(direction, "10M")
    assert rule.name == B.RULE_NAMES[direction] == f"k8s-{direction}-bandwidth"
    assert rule.direction == direction and rule.dst == (EVERYWHERE,)
    assert rule.rate_bits_per_s == 10**7 and not rule.has_netem and not rule.selects_ports
    # The same rule as written by hand in the rules-file form.
    peers = "src" if direction == "ingress" else "dst"
    assert rule == parse_rule({"name": rule.name, peers: ["::/0"], "direction": direction, "rate": "10mbit"})


@pytest.mark.parametrize("text, shown", [("5k", "'5k' is 5kbit/s"), ("20T", "'20T' is 20tbit/s"),
                                         ("1000500m", "'1000500m' is 1.001kbit/s")])
def test_values_kubelet_takes_but_shaper_cannot_shape(text, shown):
    with pytest.raises(InvalidInput) as exc:
        B.bandwidth_rule("ingress", text)
    assert exc.value.field == B.INGRESS_ANNOTATION
    assert exc.value.problem == f"{shown}: kubelet takes it, but shaper's rates go from 8kbit to 10tbit"
    assert B.bandwidth_rule("ingress", "8k").rate_bits_per_s == 8000
    assert B.bandwidth_rule("ingress", "10T").rate_bits_per_s == 10**13


def test_bandwidth_rules_keeps_the_valid_one_and_the_error_of_the_other():
    found = B.bandwidth_rules({"egress": "1Gi", "ingress": "fast"})
    assert [r.name for r in found.rules] == ["k8s-egress-bandwidth"]
    assert [e.field for e in found.errors] == [B.INGRESS_ANNOTATION]
    assert B.bandwidth_rules({"egress": None, "ingress": ""}) == B.Bandwidth()  # no annotations
    assert B.from_annotations({B.INGRESS_ANNOTATION: "2M", "other": "x"}).rules[0].rate_bits_per_s == 2 * 10**6


def rules(*items) -> tuple:
    return tuple(parse_rule(i) for i in items)


def test_combine_adds_both_directions():
    own = rules({"name": "db", "dst": "10.0.0.0/8", "delay": "5ms"})
    extra = B.bandwidth_rules({"egress": "10M", "ingress": "20M"}).rules
    combined, problems = B.combine(own, extra)
    assert problems == [] and [r.name for r in combined] == ["db", "k8s-egress-bandwidth", "k8s-ingress-bandwidth"]


def test_combine_a_clash_keeps_the_shaper_io_rules_rule():
    extra = B.bandwidth_rules({"egress": "10M", "ingress": "20M"}).rules
    # An egress rule on every destination: the egress limit clashes, the ingress one does not.
    own = rules({"name": "all", "dst": ["::/0"], "rate": "5mbit"})
    combined, problems = B.combine(own, extra)
    assert [r.name for r in combined] == ["all", "k8s-ingress-bandwidth"]
    assert problems == [("kubernetes.io/egress-bandwidth ignored: shaper.io/rules rule 'all' already shapes every "
                         "peer (::/0) on egress")]
    # A rule in both directions clashes with both.
    own = rules({"name": "all", "dst": ["::/0"], "direction": "both", "rate": "5mbit"})
    combined, problems = B.combine(own, extra, source="--initial-rules /etc/shaper/pod/rules")
    assert combined == own and len(problems) == 2
    assert problems[1].startswith("kubernetes.io/ingress-bandwidth ignored: --initial-rules /etc/shaper/pod/rules "
                                  "rule 'all' already shapes every peer (::/0) on ingress")
    # A rule already named like a bandwidth rule.
    own = rules({"name": "k8s-ingress-bandwidth", "src": ["10.0.0.0/8"], "rate": "5mbit"})
    combined, problems = B.combine(own, extra)
    assert [r.name for r in combined] == ["k8s-egress-bandwidth", "k8s-ingress-bandwidth"]
    assert combined[1] == own[0]
    assert problems == [("kubernetes.io/ingress-bandwidth ignored: shaper.io/rules already has a rule named "
                         "'k8s-ingress-bandwidth'")]


def test_combine_0_0_0_0_is_no_clash_the_longer_prefix_wins():
    own = rules({"name": "v4", "dst": ["0.0.0.0/0"], "delay": "20ms"})
    combined, problems = B.combine(own, B.bandwidth_rules({"egress": "10M"}).rules)
    assert problems == [] and len(combined) == 2


def test_combine_a_set_still_refused_keeps_only_the_shaper_io_rules(monkeypatch):
    own = rules({"name": "db", "dst": "10.0.0.0/8", "delay": "5ms"})
    monkeypatch.setattr(model, "MAX_RULES", 1)
    combined, problems = B.combine(own, B.bandwidth_rules({"egress": "10M"}).rules)
    assert combined == own
    assert problems[0].startswith("kubernetes.io/egress-bandwidth ignored: with shaper.io/rules: rules: 2 rules "
                                  "exceed the maximum 1")


# -- the sidecar's side: the downward API files --------------------------------------------------------------
def write(tmp_path, **files: str):
    for name, text in files.items():
        (tmp_path / name.replace("_", "-")).write_text(text)
    return str(tmp_path)


def events(caplog, name: str) -> list[dict]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == name]


def test_pod_bandwidth_files(tmp_path):
    d = write(tmp_path, egress_bandwidth="10M", ingress_bandwidth="")  # the downward API's absent annotation
    assert [(r.name, r.rate_bits_per_s) for r in daemon.load_pod_bandwidth(d)] == [("k8s-egress-bandwidth", 10**7)]
    assert daemon.load_pod_bandwidth(str(tmp_path / "none")) == ()  # no directory: no annotations
    assert daemon.initial_rules(None, None) is None


def test_a_bad_value_is_logged_never_fatal(tmp_path, caplog):
    d = write(tmp_path, egress_bandwidth="10 Mbit/s", ingress_bandwidth="1Gi")
    with caplog.at_level(logging.WARNING, logger="shaper"):
        found = daemon.initial_rules(None, d)
    assert [r.name for r in found] == ["k8s-ingress-bandwidth"]
    [invalid] = events(caplog, "rules.invalid")
    assert invalid["error"].startswith("kubernetes.io/egress-bandwidth: '10 Mbit/s' is not a quantity")
    assert invalid["source"] == d and invalid["action"] == "starting without this limit"


def test_initial_rules_and_bandwidth_together_and_a_clash_reported(tmp_path, caplog):
    d = write(tmp_path, egress_bandwidth="10M", ingress_bandwidth="20M",
              rules="rules:\n  - {name: all, dst: ['::/0'], delay: 10ms}\n")
    with caplog.at_level(logging.WARNING, logger="shaper"):
        found = daemon.initial_rules(f"{d}/rules", d)
    assert [(r.name, r.direction) for r in found] == [("all", "egress"), ("k8s-ingress-bandwidth", "ingress")]
    [conflict] = events(caplog, "rules.conflict")
    assert conflict["error"] == (f"kubernetes.io/egress-bandwidth ignored: --initial-rules {d}/rules rule 'all' "
                                 "already shapes every peer (::/0) on egress")


def test_bad_initial_rules_do_not_drop_the_bandwidth_rules(tmp_path, caplog):
    d = write(tmp_path, egress_bandwidth="10M", rules="rules:\n  - {name: x, dst: [nowhere]}\n")
    with caplog.at_level(logging.WARNING, logger="shaper"):
        found = daemon.initial_rules(f"{d}/rules", d)
    assert [r.name for r in found] == ["k8s-egress-bandwidth"]
    assert events(caplog, "rules.invalid")[0]["source"] == f"{d}/rules"
