"""A real Prometheus (Debian's package) scrapes the daemon; PromQL sees the bytes the test sent.

Prometheus runs in the pod namespace next to the daemon, on that namespace's
loopback, with a temporary config and storage; the test queries its HTTP API.
"""

import json
import shutil
import subprocess
from urllib.parse import quote

import pytest

from lab import V4, V6, NetnsHTTPConnection, wait_until
from tests.support.tiers import require_tier

PROM_PORT = 9090
UDP_OVERHEAD_V4 = 14 + 20 + 8  # Ethernet, IPv4, UDP: what tc egress counts beyond the payload
UDP_OVERHEAD_V6 = 14 + 40 + 8


@pytest.fixture
def prometheus(lab, tmp_path):
    binary = shutil.which("prometheus")
    require_tier(None if binary else "prometheus is not installed (apt-get install prometheus; `make setup`)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: shaper\n"
        "    static_configs: [{targets: ['127.0.0.1:2332']}]\n"
    )
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{lab.pod}", binary, f"--config.file={config}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{PROM_PORT}",
         "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=log)
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                return get(lab, "/-/ready")[0] == 200
            except OSError:
                return False

        assert wait_until(ready, 60, 0.2), (tmp_path / "prometheus.log").read_text()
        yield lambda q: query(lab, q)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def get(lab, path):
    conn = NetnsHTTPConnection(lab.pod, "127.0.0.1", PROM_PORT, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def query(lab, promql: str) -> dict[str, float]:
    """Instant query -> {rule label: value}."""
    status, body = get(lab, "/api/v1/query?query=" + quote(promql))
    data = json.loads(body)
    assert status == 200 and data["status"] == "success", body
    return {r["metric"].get("rule", ""): float(r["value"][1]) for r in data["data"]["result"]}


def test_promql_sees_per_rule_bytes_grow_by_what_was_sent(lab, prometheus):
    d = lab.daemon()
    d.request("PUT", "/rules/a", {"dst": [V4["a"], V6["a"]], "rate": "50mbit"})
    d.request("PUT", "/rules/b", {"dst": [V4["b"]], "rate": "50mbit"})
    selector = 'shaper_rule_matched_bytes_total{job="shaper",interface="shp0"}'
    assert wait_until(lambda: set(prometheus(selector)) == {"a", "b"}, 30, 0.5), "no scrape reached Prometheus"
    before = prometheus(selector)
    before_class = prometheus('shaper_class_bytes_total{rule="a"}')["a"]

    lab.send_udp(V4["a"], 40, size=200)
    lab.send_udp(V6["a"], 10, size=300)
    lab.send_udp(V4["c"], 25)  # unmatched: in no rule's counters
    sent = 40 * (200 + UDP_OVERHEAD_V4) + 10 * (300 + UDP_OVERHEAD_V6)

    grown = lambda: prometheus(selector)["a"] - before["a"] == sent  # noqa: E731
    assert wait_until(grown, 30, 0.5), f"a grew by {prometheus(selector)['a'] - before['a']}, sent {sent}"
    after = prometheus(selector)
    assert after["b"] == before["b"]
    assert prometheus('shaper_class_bytes_total{rule="a"}')["a"] - before_class == sent
    assert prometheus('shaper_rule_matched_packets_total{rule="a"}')["a"] >= 50
    # Labels are interface/rule/classid (plus Prometheus' own job/instance), never an address.
    status, body = get(lab, "/api/v1/series?match[]=" + quote('{__name__=~"shaper_.*"}'))
    labels = {k for s in json.loads(body)["data"] for k in s}
    assert labels <= {"__name__", "job", "instance", "interface", "rule", "classid", "op", "change", "le"}
    rules = prometheus('shaper_rules{interface="shp0"}')
    assert list(rules.values()) == [2.0]
    d.stop()
