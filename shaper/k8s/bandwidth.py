"""The pod bandwidth annotations kubelet defines, read the way kubelet reads them.

`kubernetes.io/egress-bandwidth` and `kubernetes.io/ingress-bandwidth` hold a
Kubernetes quantity (resource.Quantity: `10M`, `1.5G`, `512Ki`, `1e6`) meaning
bits per second: kubelet and the container runtimes hand the quantity's integer
value (rounded up) to the CNI bandwidth plugin as its rate in bits/s, and refuse
a value below 1k (1 kbit/s) or above 1P (1 Pbit/s).  So `1M` is 1,000,000
bit/s, and `10Mi` is 10 x 2^20 = 10,485,760 bit/s.

Each annotation becomes one whole-pod rule: `k8s-egress-bandwidth` on every
destination (`::/0`, egress) or `k8s-ingress-bandwidth` on every source (ingress),
with the rate and nothing else.  `combine` puts them next to the pod's
shaper.io/rules, which win a clash.  Everything here is pure: the sidecar reads
the values from its downward API files and the webhook from the pod it admits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from shaper.core.fields import MAX_RATE_BITS_PER_S, MIN_RATE_BITS_PER_S
from shaper.core.model import Prefix, Rule, parse_rule, validate_ruleset
from shaper.core.units import format_rate_bits_per_s
from shaper.errors import InvalidInput

EGRESS_ANNOTATION = "kubernetes.io/egress-bandwidth"
INGRESS_ANNOTATION = "kubernetes.io/ingress-bandwidth"
DIRECTIONS = ("egress", "ingress")
ANNOTATIONS = {"egress": EGRESS_ANNOTATION, "ingress": INGRESS_ANNOTATION}
RULE_NAMES = {"egress": "k8s-egress-bandwidth", "ingress": "k8s-ingress-bandwidth"}
# The files of the sidecar's downward API volume (next to `rules`): an absent
# annotation is an empty file.
FILES = {"egress": "egress-bandwidth", "ingress": "ingress-bandwidth"}
# The peer side each direction's rule is written with (`src` spells an ingress rule's peers).
PEER_FIELDS = {"egress": "dst", "ingress": "src"}
EVERYWHERE = "::/0"

# kubelet's bounds (pkg/util/bandwidth: resource.MustParse("1k") and ("1P")), compared with
# the quantity's value rounded up to an integer.
MIN_BITS_PER_S = 1_000
MAX_BITS_PER_S = 10**15

# Short enough for an admission warning (suffixes: k M G T P E are powers of 1000, Ki .. Ei of 1024).
QUANTITY_FORM = "a quantity of bits/s from 1k to 1P: 10M, 1.5G, 512Ki, 1e6"

# resource.Quantity's grammar: a signed decimal number, then one suffix, with kubelet's
# scanner accepting the same characters (its error quotes the regular expression below).
_QUANTITY = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?([eEinumkKMGTP]*[+-]?[0-9]*)")
_SPLIT_RE = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_DECIMAL_SUFFIXES = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY_SUFFIXES = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_EXPONENT = re.compile(r"[eE]([+-]?[0-9]+)")
MAX_QUANTITY_CHARS = 100  # longer is no bandwidth anyone means (and int() refuses 4300 digits)
# Beyond these powers of ten the bounds decide without exact arithmetic (a hostile
# "1e999999999" must not become a billion-digit integer).
_HUGE_EXPONENT = 20


def parse_quantity(text: str, field: str) -> Fraction:
    """A resource.Quantity's exact value ('1.5M' -> 1500000, '10Mi' -> 10485760, '1e3' -> 1000).

    Raises InvalidInput naming `field`, in apimachinery's words, for what it refuses."""
    if len(text) > MAX_QUANTITY_CHARS:
        raise InvalidInput(field, f"{len(text)} characters: longer than {MAX_QUANTITY_CHARS}", QUANTITY_FORM)
    m = _QUANTITY.fullmatch(text)
    if not text or m is None:
        raise InvalidInput(field, f"{text!r} is not a quantity: quantities must match the regular expression "
                                  f"'{_SPLIT_RE}'", QUANTITY_FORM)
    sign, whole, fraction, suffix = m.group(1), m.group(2), m.group(3) or "", m.group(4)
    if suffix in _BINARY_SUFFIXES:
        base, power = 2, _BINARY_SUFFIXES[suffix]
    elif suffix in _DECIMAL_SUFFIXES:
        base, power = 10, _DECIMAL_SUFFIXES[suffix]
    elif (e := _EXPONENT.fullmatch(suffix)) is not None:
        base, power = 10, int(e.group(1))
    else:
        raise InvalidInput(field, f"{text!r}: unable to parse quantity's suffix {suffix!r}", QUANTITY_FORM)
    digits = int(whole or "0") * 10 ** len(fraction) + int(fraction or "0")
    if digits == 0:
        return Fraction(0)
    power10 = (power if base == 10 else 0) - len(fraction)
    if power10 > _HUGE_EXPONENT:
        value = Fraction(10**_HUGE_EXPONENT)  # already beyond every bound: more digits say nothing
    elif power10 < -(len(str(digits)) + _HUGE_EXPONENT):
        value = Fraction(1, 10**_HUGE_EXPONENT)  # below a tenth: rounds up to 1, below every bound
    else:
        value = Fraction(digits) * Fraction(10) ** power10
        if base == 2:
            value *= 2**power
    return -value if sign == "-" else value


def parse_bandwidth_bits_per_s(text: str, annotation: str) -> int:
    """A bandwidth annotation's value in bits/s, as kubelet takes it: the quantity rounded up
    to an integer, refused below 1 kbit/s or above 1 Pbit/s."""
    bits_per_s = math.ceil(parse_quantity(text, annotation))
    if bits_per_s < MIN_BITS_PER_S:
        raise InvalidInput(annotation, f"{text!r} is {bits_per_s} bit/s: resource is unreasonably small (< 1kbit)",
                           QUANTITY_FORM)
    if bits_per_s > MAX_BITS_PER_S:
        value = f" is {bits_per_s:.3g} bit/s" if bits_per_s < 10**_HUGE_EXPONENT else ""
        raise InvalidInput(annotation, f"{text!r}{value}: resource is unreasonably large (> 1Pbit)", QUANTITY_FORM)
    return bits_per_s


def bandwidth_rule(direction: str, text: str) -> Rule:
    """The whole-pod rule of one annotation: every peer of `direction`, at the annotation's rate.

    Values kubelet takes but shaper's rates do not reach (below 8 kbit/s: one frame a
    second and more; above 10 Tbit/s) are refused too, naming the annotation."""
    annotation = ANNOTATIONS[direction]
    bits_per_s = parse_bandwidth_bits_per_s(text, annotation)
    if not MIN_RATE_BITS_PER_S <= bits_per_s <= MAX_RATE_BITS_PER_S:
        low, high = format_rate_bits_per_s(MIN_RATE_BITS_PER_S), format_rate_bits_per_s(MAX_RATE_BITS_PER_S)
        raise InvalidInput(annotation, f"{text!r} is {format_rate_bits_per_s(bits_per_s)}/s: kubelet takes it, but "
                                       f"shaper's rates go from {low} to {high}",
                           f"a quantity from {MIN_RATE_BITS_PER_S // 1000}k to {MAX_RATE_BITS_PER_S // 10**12}T")
    data = {"name": RULE_NAMES[direction], PEER_FIELDS[direction]: [EVERYWHERE], "direction": direction,
            "rate": f"{bits_per_s}bit"}
    return parse_rule(data, where=RULE_NAMES[direction])


@dataclass(frozen=True)
class Bandwidth:
    """What the two annotations give: the rules of the valid ones, the errors of the others."""

    rules: tuple[Rule, ...] = ()
    errors: tuple[InvalidInput, ...] = ()


def bandwidth_rules(values: Mapping[str, str | None]) -> Bandwidth:
    """The rules of the annotation values by direction ("egress", "ingress"); a value that is
    None or empty is no annotation (the downward API writes an absent one as an empty file)."""
    rules, errors = [], []
    for direction in DIRECTIONS:
        text = values.get(direction)
        if not text:
            continue
        try:
            rules.append(bandwidth_rule(direction, text))
        except InvalidInput as exc:
            errors.append(exc)
    return Bandwidth(tuple(rules), tuple(errors))


def from_annotations(annotations: Mapping[str, object]) -> Bandwidth:
    """bandwidth_rules of a pod's annotations (the webhook's view)."""
    return bandwidth_rules({d: None if annotations.get(a) is None else str(annotations.get(a))
                            for d, a in ANNOTATIONS.items()})


def combine(rules: Sequence[Rule], extra: Sequence[Rule], source: str = "shaper.io/rules"
            ) -> tuple[tuple[Rule, ...], list[str]]:
    """`rules` (the pod's shaper.io/rules) with the bandwidth rules `extra` added, and what
    was left out and why.  A bandwidth rule is left out when a rule of `rules` already has
    its name, or already holds every peer (::/0) of its direction for every protocol and
    port: the rule written for shaper is the one kept.  If the whole set is still refused (capacity), only `rules`."""
    everywhere = Prefix.parse(EVERYWHERE, "dst")
    kept, problems = list(rules), []
    for b in extra:
        annotation = ANNOTATIONS[b.direction]
        same_name = next((r for r in rules if r.name == b.name), None)
        holder = next((r for r in rules if b.direction in r.directions and everywhere in r.dst
                       and not r.selects_ports), None)
        if same_name is not None:
            problems.append(f"{annotation} ignored: {source} already has a rule named {b.name!r}")
        elif holder is not None:
            problems.append(f"{annotation} ignored: {source} rule {holder.name!r} already shapes every peer "
                            f"({EVERYWHERE}) on {b.direction}")
        else:
            kept.append(b)
    if len(kept) == len(rules):
        return tuple(rules), problems
    try:
        return validate_ruleset(kept), problems
    except InvalidInput as exc:
        names = ", ".join(ANNOTATIONS[b.direction] for b in kept[len(rules):])
        return tuple(rules), problems + [f"{names} ignored: with {source}: {exc}"]
