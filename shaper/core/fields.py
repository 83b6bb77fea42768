"""The rule fields, each described once: what every other description of a field is made from.

A `Field` holds what users write (its key, its accepted form), how it is parsed and
formatted, its JSON schema (built from the patterns and limits its parser uses), what it
needs beside it, its `shaper rule set/patch` option, its README row and, for some, its
Prometheus gauge.  From `FIELDS` come the model's parsing and `to_dict`
(shaper.core.model), the OpenAPI rule schema (shaper.http.openapi), the CLI's field
options (shaper.cli), the configuration gauges (shaper.control.metrics) and the README's
table (`readme_table`, written by scripts/readme_fields.py).  Options and gauges are plain
data here: the core imports neither click nor prometheus_client.  No I/O.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from shaper.errors import InvalidInput
from shaper.core.units import (
    DURATION_FORM,
    DURATION_PATTERN,
    PERCENT_FORM,
    PERCENT_PATTERN,
    RATE_FORM,
    RATE_PATTERN,
    SIZE_FORM,
    SIZE_PATTERN,
    format_bits_per_s,
    format_duration_us,
    format_percent,
    format_rate_bits_per_s,
    format_size_bytes,
    parse_duration_us,
    parse_int,
    parse_percent,
    parse_rate_bits_per_s,
    parse_size_bytes,
)

NAME_MAX_LEN = 63
NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{NAME_MAX_LEN - 1}}}")
NAME_FORM = f"1-{NAME_MAX_LEN} characters: letters, digits, '_', '.', '-', starting with a letter or digit"
DST_FORM = "IPv4 or IPv6 addresses or CIDRs, e.g. 10.0.0.5, 10.0.0.0/24, fd00::/64"
MAX_DELAY_US = 3_600_000_000  # 1h: longer is a partition, not a delay
MAX_TTL_US = 30 * 86_400_000_000
MIN_RATE_BITS_PER_S = 8_000  # 1 kB/s: below it one MTU takes over a second
MAX_RATE_BITS_PER_S = 10**13  # 10 tbit
DISTRIBUTIONS = ("uniform", "normal", "pareto", "paretonormal")
MAX_GAP = 2**31 - 1  # tc_netem_qopt.gap is a u32; the range stays within a signed 32-bit int
MIN_BURST_BYTES = 1600
MAX_BURST_BYTES = 2**30
# Queue sizing (PEERS: netem's default 1000-packet limit silently tail-drops at
# high delay x rate).  Rules without a rate are sized for this rate.
ASSUMED_RATE_BITS_PER_S = 1_000_000_000
MIN_NETEM_LIMIT = 1000
MAX_NETEM_LIMIT = 1_000_000
LOSS_GE_KEYS = ("p", "r", "loss_bad", "loss_good")
LOSS_GE_FORM = "a mapping with p and optionally r, loss_bad, loss_good, each a percentage"
LOSS_GE_OPTION_FORM = "p=1%,r=20%[,loss_bad=100%,loss_good=0%]"
DIRECTIONS = ("egress", "ingress", "both")
# IANA protocol numbers of the names a rule may use (the number itself is accepted too).
PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
PORT_PROTOCOLS = (6, 17, 132)  # the protocols with ports: what `ports` without `protocol` matches
PROTOCOL_FORM = "one of " + ", ".join(PROTOCOLS) + ", or a protocol number from 0 to 255"
MAX_PORT_ITEMS = 32
PORTS_FORM = f"up to {MAX_PORT_ITEMS} ports (1-65535) and ranges (8000-8100), as a list or one comma-separated string"
_PORT_ITEM = re.compile(r"\s*([0-9]{1,5})\s*(?:-\s*([0-9]{1,5})\s*)?")
MAX_EXCEPT = 64
EXCEPT_FORM = "prefixes inside the rule's peers, e.g. 10.1.0.0/16 (up to 64)"


@dataclass(frozen=True)
class LossGE:
    """Gilbert-Elliott loss: p (good->bad), r (bad->good), loss in each state."""

    p_pct: float
    r_pct: float
    loss_bad_pct: float = 100.0
    loss_good_pct: float = 0.0


@dataclass(frozen=True)
class Option:
    """A field's option of `shaper rule set/patch` (--KEY): what cli.py makes a click option of.

    Its type follows the schema (an integer, a choice of the enum, else text)."""

    metavar: str | None  # None: click lists the schema's choices
    note: str = ""  # --help says it after the field's description
    to_json: Callable[[str], Any] | None = None  # the option's text -> the API's value (None: the text)
    aliases: tuple[str, ...] = ()  # more flags for the same option ("--port" for --ports)
    multiple: bool = False  # may be repeated; the values are joined with "," before to_json


@dataclass(frozen=True)
class Gauge:
    """A field's configuration gauge (labels interface, rule, classid, direction): what metrics.py makes a family of."""

    metric: str
    help: str
    value: Callable[[Any], float]  # of a Rule; 0 (the field unset) exports no series


@dataclass(frozen=True)
class Field:
    key: str  # as written in YAML and JSON, and --KEY (with '-') on the command line
    attr: str  # the model.Rule attribute, in base units
    parse: Callable[[object, str], Any] | None  # (value, field path) -> attr value; None: model parses it
    fmt: Callable[[Any], Any] | None  # attr value -> the user-facing value (parses back to the same)
    schema: dict[str, Any]  # JSON schema (OpenAPI 3.0) of the value, without its description
    summary: str  # what it does, for the API document, --help and the README
    form: str  # the accepted form, for the API document (a sentence of units' *_FORM)
    readme_form: str  # the accepted form, short, for the README's form column
    default: Any = None  # the attr's value when the field is left out
    required: bool = False  # in every body (a rule's name may come from the API's path)
    needs: tuple[str, str] | None = None  # (field, why): only set with that field
    readme: str = ""  # what the README says beyond the summary
    option: Option | None = None
    gauge: Gauge | None = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def description(self) -> str:
        """The summary with what the field needs: "Delay variation (needs delay)."."""
        return self.summary + (f" (needs {self.needs[0]})" if self.needs else "") + "."

    def api_description(self) -> str:
        return f"{self.description()} {self.form[0].upper()}{self.form[1:]}."

    def help(self) -> str:
        return self.description() + (f" {self.option.note}" if self.option and self.option.note else "")


def unknown_field(fld: str, key: str, known: Iterable[str], accepted: str | None = None, *,
                  what: str = "unknown field") -> InvalidInput:
    """The error for a field name shaper does not know, with the closest known one (a typo, "dely")."""
    known = tuple(known)
    norm = key.strip().lower().replace("-", "_")
    close = [norm] if norm in known else difflib.get_close_matches(norm, known, n=1, cutoff=0.6)
    problem = f"{what}; did you mean {close[0]!r}?" if close else what
    return InvalidInput(fld, problem, accepted or "one of " + ", ".join(known))


def _parse_name(value: object, fld: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise InvalidInput(fld, f"invalid name {value!r}", NAME_FORM)
    return value


def _parse_direction(value: object, fld: str) -> str:
    if value not in DIRECTIONS:
        raise InvalidInput(fld, f"unknown direction {value!r}", "one of " + ", ".join(DIRECTIONS))
    return value  # type: ignore[return-value]


def parse_protocol(value: object, fld: str) -> int:
    """tcp, udp, icmp, icmpv6, sctp (any case), or a number 0-255 (an integer or its digits) -> the number."""
    if isinstance(value, str) and value.strip().lower() in PROTOCOLS:
        return PROTOCOLS[value.strip().lower()]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return value
    raise InvalidInput(fld, f"unknown protocol {value!r}", PROTOCOL_FORM)


def format_protocol(number: int) -> str | int:
    return PROTOCOL_NAMES.get(number, number)


def parse_ports(value: object, fld: str) -> tuple[tuple[int, int], ...]:
    """Ports and ranges -> sorted, merged (first, last) pairs: [5432, "8000-8100"], 5432, "22,80,8000-8100"."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        items: list = str(value).split(",") if isinstance(value, str) else [value]
    elif isinstance(value, list):
        items = value
    else:
        raise InvalidInput(fld, f"expected a list of ports, got {type(value).__name__}", PORTS_FORM)
    if not items or len(items) > MAX_PORT_ITEMS:
        raise InvalidInput(fld, f"{len(items)} items; at least 1 and at most {MAX_PORT_ITEMS}", PORTS_FORM)
    ranges = []
    for i, item in enumerate(items):
        where = f"{fld}[{i}]" if isinstance(value, list) else fld
        m = _PORT_ITEM.fullmatch(str(item)) if isinstance(item, (int, str)) and not isinstance(item, bool) else None
        first, last = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
        if not m or not 1 <= first <= last <= 65535:
            raise InvalidInput(where, f"{item!r} is not a port (1-65535) or a range first-last", PORTS_FORM)
        ranges.append((first, last))
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return tuple(merged)


def format_ports(ranges: tuple[tuple[int, int], ...]) -> list[int | str]:
    return [first if first == last else f"{first}-{last}" for first, last in ranges]


def _protocol_option(text: str) -> str | int:
    return int(text) if text.strip().isdigit() else text


def _ports_option(text: str) -> list[str]:
    return [part.strip() for part in text.split(",")]


def _parse_distribution(value: object, fld: str) -> str:
    if value not in DISTRIBUTIONS:
        raise InvalidInput(fld, f"unknown distribution {value!r}", "one of " + ", ".join(DISTRIBUTIONS))
    return value  # type: ignore[return-value]


def _parse_loss_ge(value: object, fld: str) -> LossGE:
    if not isinstance(value, Mapping):
        raise InvalidInput(fld, f"expected a mapping, got {type(value).__name__}", LOSS_GE_FORM)
    unknown = sorted(map(str, set(value) - set(LOSS_GE_KEYS)))
    if unknown:
        raise unknown_field(f"{fld}.{unknown[0]}", unknown[0], LOSS_GE_KEYS, LOSS_GE_FORM)
    if "p" not in value:
        raise InvalidInput(fld + ".p", "is required", LOSS_GE_FORM)
    p = parse_percent(value["p"], fld + ".p")
    # tc-netem(8)'s defaults: r = 1 - p, all loss in the bad state.
    r = parse_percent(value["r"], fld + ".r") if "r" in value else 100.0 - p
    bad = parse_percent(value["loss_bad"], fld + ".loss_bad") if "loss_bad" in value else 100.0
    good = parse_percent(value["loss_good"], fld + ".loss_good") if "loss_good" in value else 0.0
    return LossGE(p, r, bad, good)


def _format_loss_ge(ge: LossGE) -> dict[str, str]:
    return {
        "p": format_percent(ge.p_pct),
        "r": format_percent(ge.r_pct),
        "loss_bad": format_percent(ge.loss_bad_pct),
        "loss_good": format_percent(ge.loss_good_pct),
    }


def _loss_ge_option(text: str) -> dict[str, str]:
    """--loss-ge p=1%,r=20% -> {"p": "1%", "r": "20%"} (the parser checks the keys and values)."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise InvalidInput("--loss-ge", f"cannot parse {text!r}", LOSS_GE_OPTION_FORM)
        out[key.strip()] = value.strip()
    return out


_PERCENT_SCHEMA = {"type": "string", "pattern": PERCENT_PATTERN}
_DURATION_SCHEMA = {"type": "string", "pattern": DURATION_PATTERN}
_PCT = Option("PCT")
_DURATION = Option("DURATION")


def _duration(key: str, summary: str, *, max_us: int, readme_form: str, default: Any = 0, **more: Any) -> Field:
    return Field(key, key + "_us", lambda v, f: parse_duration_us(v, f, max_us=max_us), format_duration_us,
                 _DURATION_SCHEMA, summary, DURATION_FORM, readme_form, default, **more)


def _percent(key: str, summary: str, **more: Any) -> Field:
    return Field(key, key + "_pct", parse_percent, format_percent, _PERCENT_SCHEMA, summary, PERCENT_FORM,
                 "percent", 0.0, option=_PCT, **more)


def _correlation(key: str, of: str, values: str) -> Field:
    return _percent(key, f"Correlation of successive {values}", needs=(of, _CORRELATES[of]))


_CORRELATES = {  # why each correlation needs its field
    "jitter": "correlation applies to the jitter",
    "loss": "correlation applies to random loss",
    "duplicate": "correlation applies to duplication",
    "corrupt": "correlation applies to corruption",
    "reorder": "correlation applies to reordering",
}
_SHORT_DURATION = "duration (`us`, `ms`, `s`, `m`, `h`; max {})".format(format_duration_us(MAX_DELAY_US))

NAME = Field(
    "name", "name", _parse_name, str, {"type": "string", "pattern": f"^{NAME_RE.pattern}$"},
    "Unique rule name; in /rules/{name} it comes from the path", NAME_FORM,
    f"1-{NAME_MAX_LEN} of `[A-Za-z0-9_.-]`, starting with a letter or digit")
# dst is parsed by model.parse_rule itself: a list of up to MAX_PREFIXES, in bulk, into Prefix keys.
DST = Field(
    "dst", "dst", None, None, {"type": "array", "items": {"type": "string"}, "minItems": 1},
    "Destinations; the longest matching prefix wins", DST_FORM,
    "list (or one) of addresses/CIDRs", required=True,
    readme="The peers: matched against the destination of egress packets and the source of ingress ones. "
           "`::/0` matches every IPv4 and IPv6 destination, `0.0.0.0/0` every IPv4 one. IPv4 lives in IPv6's "
           "IPv4-mapped range, so `::ffff:0:0/96` *is* `0.0.0.0/0` (and `::ffff:10.0.0.0/104` is `10.0.0.0/8`): "
           "stored, echoed and listed in the IPv4 form, and one destination with it.")

# src is dst under the name that reads right for an ingress rule: the model parses it into dst.
SRC = Field(
    "src", "dst", None, None, {"type": "array", "items": {"type": "string"}, "minItems": 1},
    "The peers of an ingress rule, matched by source address: dst under the name that reads right there",
    DST_FORM,
    "as `dst`", readme="Give `dst` or `src`, not both; `src` makes the direction `ingress` (the only one it "
    "allows). Rules are listed with `dst`.")
# except is parsed by model.parse_rule itself (into Prefix keys, checked against dst).
EXCEPT = Field(
    "except", "excepts", None, lambda prefixes: [str(p) for p in prefixes], {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                       "maxItems": MAX_EXCEPT},
    "Prefixes carved out of the rule's peers: their traffic is classified as if the rule did not exist "
    "(a less specific rule, or none)", EXCEPT_FORM, f"list (or one) of CIDRs inside `dst` (max {MAX_EXCEPT})",
    default=(), option=Option("CIDR[,CIDR...]", "Comma-separated or repeated.",
                              lambda t: [p.strip() for p in t.split(",")], multiple=True))

# The fields a rule may leave out, in the order they are parsed, checked, listed and offered.
OPTIONAL_FIELDS: tuple[Field, ...] = (
    Field("direction", "direction", _parse_direction, str, {"type": "string", "enum": list(DIRECTIONS)},
          "Which packets: egress (to the peers, default), ingress (from the peers, shaped on an ifb shaper "
          "creates) or both", "one of " + ", ".join(DIRECTIONS), ", ".join(f"`{d}`" for d in DIRECTIONS),
          "egress", option=Option(None)),
    Field("protocol", "protocol", parse_protocol, format_protocol,
          {"oneOf": [{"type": "string", "enum": list(PROTOCOLS)}, {"type": "integer", "minimum": 0, "maximum": 255}]},
          "Only packets of this IP protocol (IPv6: the first next header)", PROTOCOL_FORM,
          ", ".join(f"`{p}`" for p in PROTOCOLS) + " or 0-255", option=Option("PROTO", "A name or a number.",
                                                                          _protocol_option)),
    Field("ports", "ports", parse_ports, format_ports,
          {"type": "array", "minItems": 1, "maxItems": MAX_PORT_ITEMS,
           "items": {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 65535},
                               {"type": "string", "pattern": r"^[0-9]{1,5}(-[0-9]{1,5})?$"}]}},
          "The peer's ports: the destination port on egress, the source port on ingress. Without a protocol: "
          "TCP, UDP and SCTP", PORTS_FORM, f"ports and ranges, e.g. `[5432, 8000-8100]` (max {MAX_PORT_ITEMS})",
          (), readme="See **Precedence** below.",
          option=Option("PORT[,FIRST-LAST...]", "Comma-separated or repeated; --port is the same option.",
                        _ports_option, ("--port",), multiple=True)),
    EXCEPT,
    _duration("delay", "Added delay (netem)", max_us=MAX_DELAY_US, readme_form=_SHORT_DURATION,
              option=Option("DURATION", f"A DURATION is {DURATION_FORM}."),
              gauge=Gauge("shaper_rule_delay_seconds", "The rule's configured delay.", lambda r: r.delay_us / 1e6)),
    _duration("jitter", "Delay variation", max_us=MAX_DELAY_US, readme_form=_SHORT_DURATION,
              needs=("delay", "jitter varies a delay"), option=_DURATION,
              gauge=Gauge("shaper_rule_jitter_seconds", "The rule's configured jitter.",
                          lambda r: r.jitter_us / 1e6)),
    _correlation("delay_corr", "jitter", "jitter values"),
    Field("distribution", "distribution", _parse_distribution, str, {"type": "string", "enum": list(DISTRIBUTIONS)},
          f"Shape of the jitter, default {DISTRIBUTIONS[0]}", "one of " + ", ".join(DISTRIBUTIONS),
          ", ".join(f"`{d}`" for d in DISTRIBUTIONS), DISTRIBUTIONS[0], needs=("jitter", ""),
          readme="Tables from iproute2.", option=Option(None)),
    _percent("loss", "Random loss",
             gauge=Gauge("shaper_rule_loss_ratio", "The rule's configured random loss, 0 to 1.",
                         lambda r: r.loss_pct / 100)),
    _correlation("loss_corr", "loss", "loss decisions"),
    Field("loss_ge", "loss_ge", _parse_loss_ge, _format_loss_ge,
          {"type": "object", "additionalProperties": False,
           "properties": {k: {**_PERCENT_SCHEMA, "description": PERCENT_FORM} for k in LOSS_GE_KEYS},
           "required": ["p"]},
          "Gilbert-Elliott bursty loss, instead of loss", LOSS_GE_FORM,
          "`{" + ", ".join(LOSS_GE_KEYS) + "}` percents",
          readme="Defaults as tc-netem: `r = 100% - p`, `loss_bad = 100%`, `loss_good = 0%`.",
          option=Option("P=PCT,...", f"Written {LOSS_GE_OPTION_FORM}.", _loss_ge_option)),
    _percent("duplicate", "Packets sent twice", readme="See **duplicate** below."),
    _correlation("duplicate_corr", "duplicate", "duplicate decisions"),
    _percent("corrupt", "Packets with one flipped bit (single-bit corruption)"),
    _correlation("corrupt_corr", "corrupt", "corrupt decisions"),
    _percent("reorder", "Packets sent at once, ahead of delayed ones",
             needs=("delay", "netem reorders by sending some packets without the delay")),
    _correlation("reorder_corr", "reorder", "reorder decisions"),
    Field("gap", "gap", lambda v, f: parse_int(v, f, lo=1, hi=MAX_GAP), int,
          {"type": "integer", "minimum": 1, "maximum": MAX_GAP},
          "Reorder every gap-th packet, default 1", f"an integer from 1 to {MAX_GAP}", "integer", 0,
          needs=("reorder", "gap spaces reordered packets"), option=Option("N")),
    Field("rate", "rate_bits_per_s",
          lambda v, f: parse_rate_bits_per_s(v, f, min_bits_per_s=MIN_RATE_BITS_PER_S,
                                             max_bits_per_s=MAX_RATE_BITS_PER_S),
          format_rate_bits_per_s, {"type": "string", "pattern": RATE_PATTERN},
          "Rate limit: the HTB rate and ceil of the rule's destinations", RATE_FORM,
          f"tc rate (min {format_rate_bits_per_s(MIN_RATE_BITS_PER_S)})",
          option=Option("RATE", f"{RATE_FORM[0].upper()}{RATE_FORM[1:]}. As in tc, 10mbps is 10 megaBYTES/s "
                                "(80 Mbit/s): write 10mbit for megabits."),
          gauge=Gauge("shaper_rule_rate_bytes_per_second", "The rule's configured rate (HTB ceiling).",
                      lambda r: (r.rate_bits_per_s or 0) / 8)),
    Field("burst", "burst_bytes",
          lambda v, f: parse_size_bytes(v, f, min_bytes=MIN_BURST_BYTES, max_bytes=MAX_BURST_BYTES),
          format_size_bytes, {"type": "string", "pattern": SIZE_PATTERN},
          "HTB burst, default 2 ms at the rate and at least two frames", SIZE_FORM, "size (`32kb`, bytes)",
          needs=("rate", "burst shapes a rate"), option=Option("SIZE", f"{SIZE_FORM[0].upper()}{SIZE_FORM[1:]}.")),
    Field("limit", "limit", lambda v, f: parse_int(v, f, lo=1, hi=MAX_NETEM_LIMIT), int,
          {"type": "integer", "minimum": 1, "maximum": MAX_NETEM_LIMIT},
          "netem queue limit in packets; default sized from (delay + jitter) x rate / MTU x 1.5 "
          f"({format_bits_per_s(ASSUMED_RATE_BITS_PER_S)} assumed without a rate), at least {MIN_NETEM_LIMIT}",
          f"an integer from 1 to {MAX_NETEM_LIMIT}", "packets", option=Option("N")),
    _duration("ttl", "Remove the rule after this long; each PUT of the rule restarts it", max_us=MAX_TTL_US,
              readme_form=f"duration (`d` for days too; max `{format_duration_us(MAX_TTL_US)}`)", default=None,
              readme="The rule stops matching in the kernel, even with no controller running.",
              option=_DURATION),
)
FIELDS: tuple[Field, ...] = (NAME, DST, SRC, *OPTIONAL_FIELDS)
FIELD_NAMES = tuple(f.key for f in FIELDS)
BY_KEY = {f.key: f for f in FIELDS}

README_BEGIN = "<!-- rule fields: generated from shaper/core/fields.py (make readme) -->"
README_END = "<!-- end rule fields -->"


def readme_table(fields: tuple[Field, ...] = FIELDS) -> str:
    """The README's table of rule fields (markdown), one row per field."""
    rows = ["| field | form | meaning |", "|---|---|---|"]
    for f in fields:
        meaning = f.description() + (f" {f.readme}" if f.readme else "")
        rows.append(f"| `{f.key}` | {f.readme_form} | {meaning.replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"


def readme_block(fields: tuple[Field, ...] = FIELDS) -> str:
    """The table between its markers: what README.md holds, made again by scripts/readme_fields.py."""
    return f"{README_BEGIN}\n{readme_table(fields)}{README_END}"


def splice_readme(text: str, fields: tuple[Field, ...] = FIELDS) -> str:
    """README.md's text with its rule-field table made again (between the markers, which it must have)."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"README.md has no {README_BEGIN} ... {README_END} block")
    return text[:begin] + readme_block(fields) + text[end + len(README_END):]
