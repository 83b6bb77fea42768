"""A real Prometheus (Debian's package) scrapes the daemon; PromQL sees the bytes the test sent.

Prometheus runs in the pod namespace next to the daemon, on that namespace's
loopback, with a temporary config and storage; the test queries its HTTP API.
"""

import json
import shutil
import subprocess
import sys
from urllib.parse import quote

import pytest

from lab import V4, V6, NetnsHTTPConnection, sh, wait_until
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


def query(lab, promql: str, by: str = "rule") -> dict[str, float]:
    """Instant query -> {value of the label `by`: value}."""
    status, body = get(lab, "/api/v1/query?query=" + quote(promql))
    data = json.loads(body)
    assert status == 200 and data["status"] == "success", body
    return {r["metric"].get(by, ""): float(r["value"][1]) for r in data["data"]["result"]}


# UDP datagrams from the dst namespace, from a given source address, to the pod: ingress on shp0.
_INCOMING = ("import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind((sys.argv[1],0));"
             "[s.sendto(b'x'*int(sys.argv[3]),(sys.argv[2],9)) for _ in range(int(sys.argv[4]))]")


def send_to_pod(lab, src: str, count: int, size: int) -> None:
    sh("ip", "netns", "exec", lab.dst, sys.executable, "-c", _INCOMING, src, V4["pod"], str(size), str(count))


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
    # Labels are interface/rule/classid/direction (plus Prometheus' own job/instance), never an address.
    status, body = get(lab, "/api/v1/series?match[]=" + quote('{__name__=~"shaper_.*"}'))
    labels = {k for s in json.loads(body)["data"] for k in s}
    assert labels <= {"__name__", "job", "instance", "interface", "rule", "classid", "direction", "op", "change", "le"}
    rules = prometheus('shaper_rules{interface="shp0"}')
    assert list(rules.values()) == [2.0]
    d.stop()


def test_promql_sees_each_direction_of_a_rule_apart(lab, prometheus):
    d = lab.daemon()
    # udp: the ICMP errors each side answers the other's datagrams with are not the rule's.
    d.request("PUT", "/rules/both", {"dst": [V4["a"]], "direction": "both", "protocol": "udp", "rate": "50mbit"})
    d.request("PUT", "/rules/in", {"src": [V4["b"]], "rate": "50mbit"})
    matched = 'shaper_rule_matched_packets_total{job="shaper",rule="%s"}'
    assert wait_until(lambda: set(query(lab, matched % "both", "direction")) == {"egress", "ingress"}, 30, 0.5), \
        "no scrape with both directions of rule 'both' reached Prometheus"
    before = {name: query(lab, matched % name, "direction") for name in ("both", "in")}
    assert set(before["in"]) == {"ingress"}

    lab.send_udp(V4["a"], 30, size=200)  # out to both's peer
    send_to_pod(lab, V4["a"], 12, 300)  # in from it
    send_to_pod(lab, V4["b"], 7, 300)  # in from in's peer

    def grown() -> dict:
        now = {name: query(lab, matched % name, "direction") for name in ("both", "in")}
        return {(name, d): now[name][d] - before[name][d] for name in now for d in now[name]}

    want = {("both", "egress"): 30, ("both", "ingress"): 12, ("in", "ingress"): 7}
    assert wait_until(lambda: grown() == want, 30, 0.5), f"grew by {grown()}, want {want}"
    # A rule in both directions has one slot: one classid, a class in each tree.
    classes = query(lab, 'shaper_class_packets_total{rule="both"}', "direction")
    assert set(classes) == {"egress", "ingress"}
    classids = set(query(lab, 'shaper_class_packets_total{rule="both"}', "classid"))
    assert len(classids) == 1
    entries = query(lab, 'shaper_map_entries{interface="shp0"}', "direction")
    assert entries == {"egress": 1.0, "ingress": 2.0}
    assert list(prometheus('shaper_rules{interface="shp0"}').values()) == [2.0]
    d.stop()
