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

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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


@dataclass(frozen=True)
class RuleSample:
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


class KernelCollector:
    """Per-class and per-rule counters, read from the kernel when scraped."""

    def __init__(self, interface: str, read: Callable[[], Snapshot | None], instruments: Instruments | None = None):
        self.interface = interface
        self.read = read
        self.instruments = instruments

    def describe(self) -> list[Metric]:
        return []  # do not read the kernel when the collector is registered

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self.read()
        except ShaperError as exc:
            log.warning("scrape failed: %s", exc)
            if self.instruments:
                self.instruments.error("scrape")
            return
        if snap is None:  # not attached yet
            return
        iface = self.interface
        labels = ["interface", "rule", "classid", "direction"]

        def family(kind: type, name: str, doc: str) -> Metric:
            return kind(name, doc, labels=labels)

        cls = {
            "bytes": family(CounterMetricFamily, "shaper_class_bytes",
                            "Bytes sent through the rule's HTB class (ingress: the ifb's class)."),
            "packets": family(CounterMetricFamily, "shaper_class_packets",
                              "Packets sent through the rule's HTB class (ingress: the ifb's class)."),
            "drops": family(CounterMetricFamily, "shaper_class_drops",
                            "Packets dropped in the rule's class, netem loss included."),
            "overlimits": family(CounterMetricFamily, "shaper_class_overlimits",
                                 "Times the class was over its rate (packets delayed by HTB)."),
            "requeues": family(CounterMetricFamily, "shaper_class_requeues", "Packets requeued in the class."),
            "backlog_bytes": family(GaugeMetricFamily, "shaper_class_backlog_bytes",
                                    "Bytes queued in the class now (netem delay holds packets here)."),
            "backlog_packets": family(GaugeMetricFamily, "shaper_class_backlog_packets",
                                      "Packets queued in the class now."),
        }
        matched_packets = family(CounterMetricFamily, "shaper_rule_matched_packets",
                                 "Packets the classifier matched to the rule's peers (destinations on egress, "
                                 "sources on ingress).")
        matched_bytes = family(CounterMetricFamily, "shaper_rule_matched_bytes",
                               "Bytes the classifier matched to the rule's peers (destinations on egress, "
                               "sources on ingress).")
        # The configuration, for dashboards: a series only where the rule sets the field
        # (a rule with no rate has no rate series), which keeps a 1,000-rule scrape lean.
        config = [(family(GaugeMetricFamily, f.gauge.metric, f.gauge.help), f.gauge.value)
                  for f in FIELDS if f.gauge is not None]
        for rs in snap.rules:
            values = [iface, rs.rule, rs.classid, rs.direction]
            matched_packets.add_metric(values, rs.matched.packets)
            matched_bytes.add_metric(values, rs.matched.bytes)
            if rs.cls is not None:
                for attr, fam in cls.items():
                    fam.add_metric(values, getattr(rs.cls, attr))
            if rs.config is not None:
                for fam, value in config:
                    v = value(rs.config)
                    if v:
                        fam.add_metric(values, v)
        yield from cls.values()
        yield matched_packets
        yield matched_bytes
        for fam, _ in config:
            yield fam
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
