"""KernelCollector.exposition writes what prometheus_client's generate_latest writes of the same
families, byte for byte (it only writes it faster); and the daemon's /metrics is both registries."""

from prometheus_client import CollectorRegistry, generate_latest

from shaper.control import metrics
from shaper.control.service import Service
from shaper.core.model import parse_rule
from shaper.core.stats import ClassStats, RuleCounters
from shaper.datapath.fake import FakeDatapath


def _snapshot() -> metrics.Snapshot:
    both = parse_rule({"name": "both", "dst": ["10.0.0.1"], "direction": "both", "delay": "50ms", "loss": "1%",
                       "rate": "8mbit"})
    plain = parse_rule({"name": "plain", "dst": ["10.0.0.2"], "rate": "1gbit"})
    big = ClassStats(classid=0x53480002, bytes=123_456_789_012, packets=999_999, drops=1_000_000, overlimits=0,
                     requeues=3, backlog_bytes=1500, backlog_packets=1, leaf="pfifo")
    return metrics.Snapshot([
        metrics.RuleSample("both", "5348:1", RuleCounters(7, 700), None, both, "egress"),
        metrics.RuleSample("both", "5348:1", RuleCounters(0, 0), None, both, "ingress"),
        metrics.RuleSample("plain", "5348:2", RuleCounters(2**40, 2**50), big, plain, "egress"),
        metrics.RuleSample('we"ird\\name', "5348:3", RuleCounters(1, 1), big, None, "egress"),  # no configuration
    ], {"egress": 3, "ingress": 1})


def test_exposition_is_generate_latest_byte_for_byte():
    snap = _snapshot()
    collector = metrics.KernelCollector("eth0", lambda: snap)
    registry = CollectorRegistry()
    registry.register(collector)
    expected = generate_latest(registry)
    assert collector.exposition() == expected
    assert collector.exposition() == expected  # and again from the label cache
    assert b'rule="we\\"ird\\\\name"' in expected and b"shaper_class_bytes_total" in expected


def test_nothing_before_the_datapath_is_attached():
    assert metrics.KernelCollector("eth0", lambda: None).exposition() == b""


def test_the_daemon_writes_both_registries_and_the_registry_still_has_everything():
    svc = Service(FakeDatapath(), "fake0")
    svc.start([parse_rule({"name": "a", "dst": ["10.0.0.1"], "rate": "1mbit"})])
    text = svc.metrics_text()
    assert text == generate_latest(svc.registry)  # the kernel's series first, then the daemon's own
    assert b'shaper_class_bytes_total{classid="5348:1",direction="egress",interface="fake0",rule="a"}' in text
    assert b'shaper_rule_changes_total{change="created",interface="fake0"} 1.0' in text
    assert svc.registry.get_sample_value("shaper_rule_changes_total", {"interface": "fake0", "change": "created"}) == 1
