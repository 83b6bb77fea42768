"""Prometheus metrics: a collector that reads the kernel at scrape time, and the
daemon's own counters.

`KernelCollector` builds its families from a `Snapshot` taken by a reader it
is given (the service's, which holds the datapath lock), so it is tested with
a fake reader.  There is no polling thread: a scrape costs one class dump, one
per-CPU lookup per rule and a walk of the rule records (not of the trie); the ifb's
classes are dumped only while a rule shapes ingress.  Per-rule and per-class series are
labelled `interface`, `rule`, `classid` and `direction` ("egress": the interface's HTB
and the classifier's destination lookup; "ingress": the ifb's HTB and the source
lookup), so a rule with direction "both" has two of each; never a label per address.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from shaper.errors import ShaperError
from shaper.core.fields import FIELDS
from shaper.core.model import Rule
from shaper.core.stats import ClassStats, RuleCounters

log = logging.getLogger("shaper")

# Operations counted in shaper_errors_total{op}.
ERROR_OPS = ("apply", "expire", "scrape", "attach", "reset")
CHANGE_KINDS = ("created", "updated", "deleted", "expired")
# An apply is 1 ms for one rule and about a second for 100,000 prefixes.
APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RuleSample(NamedTuple):
    """One rule in one direction, as a scrape sees it (a tuple, made 10,000 times a scrape)."""

    rule: str
    classid: str
    matched: RuleCounters
    cls: ClassStats | None
    config: Rule | None = None  # its configuration, for the gauges of shaper.core.fields (delay, loss, ...)
    direction: str = "egress"  # the direction these counters are of (a "both" rule has a sample of each)


@dataclass(frozen=True)
class Snapshot:
    rules: list[RuleSample] = field(default_factory=list)  # one per rule and direction
    map_entries: dict[str, int] = field(default_factory=dict)  # direction -> prefixes in its trie


class Instruments:
    """The daemon's own metrics (changes, errors, apply latency)."""

    def __init__(self, registry: CollectorRegistry, interface: str):
        self.interface = interface
        self.apply_seconds = Histogram(
            "shaper_apply_seconds", "Time to apply a rule change to the kernel (plan and execute).",
            ["interface"], registry=registry, buckets=APPLY_BUCKETS,
        ).labels(interface)
        self._changes = Counter(
            "shaper_rule_changes", "Rules created, updated, deleted or expired by this daemon.",
            ["interface", "change"], registry=registry,
        )
        self._errors = Counter(
            "shaper_errors", "Operations that failed in the kernel or in shaper (bad input is not counted).",
            ["interface", "op"], registry=registry,
        )
        # Every series exists from the start, at 0, so rate() and alerts work at once.
        for kind in CHANGE_KINDS:
            self._changes.labels(interface, kind)
        for op in ERROR_OPS:
            self._errors.labels(interface, op)

    def changed(self, kind: str, n: int = 1) -> None:
        if n:
            self._changes.labels(self.interface, kind).inc(n)

    def error(self, op: str) -> None:
        self._errors.labels(self.interface, op).inc()


Column = Callable[[list[RuleSample]], list]  # the value of each sample, None for no series


def _class_column(index: int) -> Column:
    return lambda samples: [None if rs.cls is None else rs.cls[index] for rs in samples]


def _config_column(value: Callable[[Rule], float]) -> Column:
    # A series only where the rule sets the field (a rule with no rate has no rate series).
    return lambda samples: [None if rs.config is None else (value(rs.config) or None) for rs in samples]


def _matched_column(index: int) -> Column:
    return lambda samples: [rs.matched[index] for rs in samples]


_CLASS = ClassStats._fields.index
# The per-rule families, in the order they are exposed: (name, type, help, the values of a list of
# samples: a column, one comprehension a family, not a call a series).  Both KernelCollector.collect
# and KernelCollector.exposition are made from this list.
COUNTERS: list[tuple[str, str, str, Column]] = [
    ("shaper_class_bytes", "counter", "Bytes sent through the rule's HTB class (ingress: the ifb's class).",
     _class_column(_CLASS("bytes"))),
    ("shaper_class_packets", "counter", "Packets sent through the rule's HTB class (ingress: the ifb's class).",
     _class_column(_CLASS("packets"))),
    ("shaper_class_drops", "counter", "Packets dropped in the rule's class, netem loss included.",
     _class_column(_CLASS("drops"))),
    ("shaper_class_overlimits", "counter", "Times the class was over its rate (packets delayed by HTB).",
     _class_column(_CLASS("overlimits"))),
    ("shaper_class_requeues", "counter", "Packets requeued in the class.", _class_column(_CLASS("requeues"))),
    ("shaper_class_backlog_bytes", "gauge", "Bytes queued in the class now (netem delay holds packets here).",
     _class_column(_CLASS("backlog_bytes"))),
    ("shaper_class_backlog_packets", "gauge", "Packets queued in the class now.",
     _class_column(_CLASS("backlog_packets"))),
    ("shaper_rule_matched_packets", "counter", "Packets the classifier matched to the rule's peers (destinations "
     "on egress, sources on ingress).", _matched_column(RuleCounters._fields.index("packets"))),
    ("shaper_rule_matched_bytes", "counter", "Bytes the classifier matched to the rule's peers (destinations on "
     "egress, sources on ingress).", _matched_column(RuleCounters._fields.index("bytes"))),
]


def per_rule() -> list[tuple[str, str, str, Column]]:
    """COUNTERS, then the configuration gauges, for dashboards (shaper.core.fields, read now)."""
    return COUNTERS + [(f.gauge.metric, "gauge", f.gauge.help, _config_column(f.gauge.value))
                       for f in FIELDS if f.gauge is not None]


LABELS = ("interface", "rule", "classid", "direction")


def _escape(value: str) -> str:
    """A label value as the text format writes it (prometheus_client's escaping)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


@functools.lru_cache(maxsize=4096)
def _number(value: float) -> str:
    """A sample value as prometheus_client writes it (floatToGoString), without its cost for small integers,
    and remembered: configuration gauges repeat a few values over thousands of rules (floatToGoString
    of a rate is 1 us, a tenth of a 10,000-rule scrape)."""
    if type(value) is int and 0 <= value < 1_000_000:
        return f"{value}.0"
    return floatToGoString(value)


class KernelCollector:
    """Per-class and per-rule counters, read from the kernel when scraped.

    `collect` gives them as prometheus_client families, for a registry (the node agent merges
    every target's); `exposition` writes the same text generate_latest would write of them,
    ten times faster: with 10,000 rules a scrape is 100,000 series, and building a Sample object
    and escaping every label of each took a second."""

    def __init__(self, interface: str, read: Callable[[], Snapshot | None], instruments: Instruments | None = None):
        self.interface = interface
        self.read = read
        self.instruments = instruments
        self._labels: dict[tuple[str, str, str], str] = {}  # (rule, classid, direction) -> its label text

    def describe(self) -> list[Metric]:
        return []  # do not read the kernel when the collector is registered

    def _snapshot(self) -> Snapshot | None:
        try:
            return self.read()
        except ShaperError as exc:
            log.warning("scrape failed: %s", exc)
            if self.instruments:
                self.instruments.error("scrape")
            return None

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        if snap is None:  # not attached yet, or the read failed (counted)
            return
        iface = self.interface
        for name, kind, doc, column in per_rule():
            fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=list(LABELS))
            for rs, v in zip(snap.rules, column(snap.rules)):
                if v is not None:
                    fam.add_metric([iface, rs.rule, rs.classid, rs.direction], v)
            yield fam
        yield from self._totals(snap)

    def _totals(self, snap: Snapshot) -> Iterator[Metric]:
        iface = self.interface
        rules = GaugeMetricFamily("shaper_rules", "Rules installed (expired ones until they are removed).",
                                  labels=["interface"])
        rules.add_metric([iface], len({rs.rule for rs in snap.rules}))  # a "both" rule is one rule
        yield rules
        # Both directions always, 0 for an empty trie: a dashboard's ingress series exists
        # before the first ingress rule, as the daemon's counters exist before their first event.
        entries = GaugeMetricFamily("shaper_map_entries", "Prefixes in the classifier's LPM trie of the direction "
                                    "(egress: destinations; ingress: sources).", labels=["interface", "direction"])
        for direction, count in sorted(snap.map_entries.items()):
            entries.add_metric([iface, direction], count)
        yield entries

    def exposition(self) -> bytes:
        """What generate_latest writes of this collector's families (text format 0.0.4), byte for byte."""
        snap = self._snapshot()
        if snap is None:
            return b""
        cache = self._labels
        if len(cache) > 4 * len(snap.rules) + 64:  # rules come and go: keep the labels of those there now
            cache.clear()
        iface = _escape(self.interface)
        labels = []
        for rs in snap.rules:
            key = (rs.rule, rs.classid, rs.direction)
            text = cache.get(key)
            if text is None:
                text = cache[key] = (f'{{classid="{_escape(rs.classid)}",direction="{_escape(rs.direction)}",'
                                     f'interface="{iface}",rule="{_escape(rs.rule)}"}} ')  # names sorted, as there
            labels.append(text)
        out: list[str] = []
        for name, kind, doc, column in per_rule():
            full = name + "_total" if kind == "counter" else name
            help_text = doc.replace("\\", r"\\").replace("\n", r"\n")  # quotes stay, in help
            out.append(f"# HELP {full} {help_text}\n# TYPE {full} {kind}\n")
            # _number inline for the common case (a counter below a million), not a call per series
            out += [f"{full}{label}{v}.0\n" if type(v) is int and 0 <= v < 1_000_000 else f"{full}{label}{_number(v)}\n"
                    for label, v in zip(labels, column(snap.rules)) if v is not None]
        return "".join(out).encode() + generate_latest(_Families(list(self._totals(snap))))


class Registered:
    """A registry's metrics as one collector of another registry."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        return self.registry.collect()


class _Families:
    """Metric families already made, as generate_latest takes a registry."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)
