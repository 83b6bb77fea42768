"""Hostile and malformed input through the API, the CLI and the rules file (kernel tier).

Every input must be refused with a 4xx or exit 2 and a message naming the
problem, and afterwards the rule set and the kernel state (tc objects with
their parameters, and the bytes of every BPF map entry) must be exactly as
before.
"""

import json
import re

import pytest

from shaper.datapath.kernel import KernelDatapath
from lab import POD_IF, V4, V6, sh

TOKEN = "hostile-input-token"
BIG_DST = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(262_145)]


def body(**fields) -> bytes:
    return json.dumps({"dst": ["10.77.9.1"], **fields}).encode()


# (description, method, path, raw body, expected status, words the error must contain)
API_CASES = [
    ("IPv4 octet out of range", "PUT", "/rules/h", body(dst=["10.0.0.256"]), 422, "dst[0]"),
    ("prefix length over 32", "PUT", "/rules/h", body(dst=["10.0.0.0/33"]), 422, "dst[0]"),
    ("host bits set", "PUT", "/rules/h", body(dst=["10.0.0.1/24"]), 422, "host bits"),
    ("IPv6 zone index", "PUT", "/rules/h", body(dst=["fe80::1%eth0"]), 422, "zone"),
    ("IPv6 prefix over 128", "PUT", "/rules/h", body(dst=["fd00::/129"]), 422, "dst[0]"),
    ("empty destination string", "PUT", "/rules/h", body(dst=[""]), 422, "dst[0]"),
    ("a 20 MB destination string", "PUT", "/rules/h", body(dst=["1" * 20_000_000]), 422, "dst[0]"),
    ("a 20 MB field name", "PUT", "/rules/h", json.dumps({"dst": ["10.77.9.1"], "x" * 20_000_000: 1}).encode(),
     422, "unknown field"),
    ("no destinations", "PUT", "/rules/h", body(dst=[]), 422, "dst"),
    ("destination of the wrong type", "PUT", "/rules/h", body(dst=42), 422, "dst"),
    ("null destination", "PUT", "/rules/h", body(dst=[None]), 422, "dst[0]"),
    ("a number among destinations", "PUT", "/rules/h", body(dst=["10.0.0.1", 5]), 422, "dst[1]"),
    ("hostname instead of address", "PUT", "/rules/h", body(dst=["db.example.com"]), 422, "dst[0]"),
    ("more destinations than the trie holds", "PUT", "/rules/h", json.dumps({"dst": BIG_DST}).encode(), 422,
     "exceed"),
    ("negative delay", "PUT", "/rules/h", body(delay="-5ms"), 422, "delay"),
    ("NaN delay", "PUT", "/rules/h", body(delay="nan ms"), 422, "delay"),
    ("exponent notation", "PUT", "/rules/h", body(delay="1e9ms"), 422, "delay"),
    ("unknown duration unit", "PUT", "/rules/h", body(delay="5 parsecs"), 422, "delay"),
    ("duration without unit", "PUT", "/rules/h", body(delay="5"), 422, "delay"),
    ("duration as a number", "PUT", "/rules/h", body(delay=5), 422, "delay"),
    ("delay over the maximum", "PUT", "/rules/h", body(delay="2h"), 422, "maximum"),
    ("huge delay", "PUT", "/rules/h", body(delay="99999999999999999999s"), 422, "maximum"),
    ("sub-microsecond delay", "PUT", "/rules/h", body(delay="0.1us"), 422, "resolution"),
    ("jitter without delay", "PUT", "/rules/h", body(jitter="5ms"), 422, "jitter"),
    ("loss over 100%", "PUT", "/rules/h", body(loss="101%"), 422, "loss"),
    ("negative loss", "PUT", "/rules/h", body(loss="-1%"), 422, "loss"),
    ("loss without %", "PUT", "/rules/h", body(loss="1"), 422, "%"),
    ("infinite loss", "PUT", "/rules/h", body(loss="Infinity%"), 422, "loss"),
    ("loss as a JSON number", "PUT", "/rules/h", body(loss=0.5), 422, "loss"),
    ("NaN literal in JSON", "PUT", "/rules/h", b'{"dst": ["10.77.9.1"], "loss": NaN}', 422, "loss"),
    ("rate below the minimum", "PUT", "/rules/h", body(rate="1bit"), 422, "rate"),
    ("rate above the maximum", "PUT", "/rules/h", body(rate="100tbit"), 422, "rate"),
    ("rate without a tc unit", "PUT", "/rules/h", body(rate="10mb"), 422, "rate"),
    ("rate as words", "PUT", "/rules/h", body(rate="fast"), 422, "rate"),
    ("burst without rate", "PUT", "/rules/h", body(burst="32kb"), 422, "burst"),
    ("netem limit zero", "PUT", "/rules/h", body(delay="5ms", limit=0), 422, "limit"),
    ("negative netem limit", "PUT", "/rules/h", body(delay="5ms", limit=-1), 422, "limit"),
    ("boolean netem limit", "PUT", "/rules/h", body(delay="5ms", limit=True), 422, "limit"),
    ("netem limit as a string", "PUT", "/rules/h", body(delay="5ms", limit="1000"), 422, "limit"),
    ("fractional gap", "PUT", "/rules/h", body(delay="5ms", reorder="1%", gap=1.5), 422, "gap"),
    ("gap beyond 32 bits", "PUT", "/rules/h", body(delay="5ms", reorder="1%", gap=2**40), 422, "gap"),
    ("huge JSON number", "PUT", "/rules/h", b'{"dst": ["10.77.9.1"], "limit": 1e400}', 422, "limit"),
    ("zero TTL", "PUT", "/rules/h", body(ttl="0s"), 422, "ttl"),
    ("TTL in days", "PUT", "/rules/h", body(ttl="400d"), 422, "ttl"),
    ("unknown distribution", "PUT", "/rules/h", body(delay="5ms", jitter="1ms", distribution="gaussian"), 422,
     "distribution"),
    ("loss_ge not a mapping", "PUT", "/rules/h", body(loss_ge="1%"), 422, "loss_ge"),
    ("loss_ge without p", "PUT", "/rules/h", body(loss_ge={"r": "1%"}), 422, "loss_ge.p"),
    ("loss_ge with an unknown key", "PUT", "/rules/h", body(loss_ge={"p": "1%", "q": "2%"}), 422, "loss_ge"),
    ("loss and loss_ge together", "PUT", "/rules/h", body(loss="1%", loss_ge={"p": "1%"}), 422, "loss_ge"),
    ("reorder without delay", "PUT", "/rules/h", body(reorder="5%"), 422, "reorder"),
    ("unknown field", "PUT", "/rules/h", body(colour="red"), 422, "colour"),
    ("field in the wrong case", "PUT", "/rules/h", body(Delay="5ms"), 422, "Delay"),
    ("name differs from the path", "PUT", "/rules/h", body(name="other"), 422, "name"),
    ("array body", "PUT", "/rules/h", b"[]", 422, "mapping"),
    ("null body", "PUT", "/rules/h", b"null", 422, "mapping"),
    ("invalid UTF-8", "PUT", "/rules/h", b'{"dst": ["\xff\xfe"]}', 400, "JSON"),
    ("truncated JSON", "PUT", "/rules/h", b'{"dst": ["10.77.9.1"', 400, "JSON"),
    ("empty body", "PUT", "/rules/h", b"", 400, "empty"),
    ("JSON nested 100,000 deep", "PUT", "/rules/h", b"[" * 100_000 + b"]" * 100_000, 400, "nested"),
    ("path traversal in a name", "PUT", "/rules/..%2F..%2Fetc%2Fpasswd", body(), 422, "name"),
    ("NUL in a name", "PUT", "/rules/a%00b", body(), 422, "name"),
    ("shell metacharacters in a name", "PUT", "/rules/a%3Brm%20-rf%20%2F", body(), 422, "name"),
    ("name of 64 characters", "PUT", "/rules/" + "n" * 64, body(), 422, "name"),
    ("name starting with a dash", "PUT", "/rules/-rf", body(), 422, "name"),
    ("unicode name", "PUT", "/rules/%C3%A9t%C3%A9", body(), 422, "name"),
    ("extra path segment", "PUT", "/rules/a/b", body(), 404, "endpoint"),
    ("dot segments", "GET", "/rules/../../etc/passwd", b"", 404, "endpoint"),
    ("duplicate names in a set", "PUT", "/rules", json.dumps({"rules": [
        {"name": "x", "dst": ["10.77.9.1"]}, {"name": "x", "dst": ["10.77.9.2"]}]}).encode(), 422, "duplicate"),
    ("a destination in two rules", "PUT", "/rules", json.dumps({"rules": [
        {"name": "x", "dst": ["10.77.9.1"]}, {"name": "y", "dst": ["10.77.9.1/32"]}]}).encode(), 422, "already"),
    ("rules of the wrong type", "PUT", "/rules", b'{"rules": {}}', 422, "list"),
    ("unknown top-level field", "PUT", "/rules", b'{"rules": [], "force": true}', 422, "force"),
    ("more rules than classes", "PUT", "/rules", json.dumps({"rules": [
        {"name": f"r{i}", "dst": [f"10.{i >> 8}.{i & 255}.1"]} for i in range(16_384)]}).encode(), 422, "maximum"),
    ("one bad rule in a set", "PUT", "/rules", json.dumps({"rules": [
        {"name": "x", "dst": ["10.77.9.1"], "rate": "1mbit"}, {"name": "y", "dst": ["10.77.9.2"], "rate": "x"}]}
    ).encode(), 422, "rules[1].rate"),
    ("latency that is not a duration", "GET", "/latency/soon", b"", 422, "delay"),
    ("negative latency", "GET", "/latency/-5ms", b"", 422, "delay"),
    ("delete with an invalid name", "DELETE", "/rules/%2e%2e", b"", 422, "name"),
    ("delete of an absent rule", "DELETE", "/rules/absent", b"", 404, "absent"),
    ("wrong method", "POST", "/rules", b"{}", 405, "POST"),
]


def kernel_snapshot(lab) -> str:
    """tc objects with every parameter, and every BPF map entry as bytes."""
    parts = []
    for what in ("qdisc", "class"):
        parts.append(sh("tc", "-d", "-n", lab.pod, what, "show", "dev", POD_IF).stdout)
    parts.append(sh("tc", "-d", "-n", lab.pod, "filter", "show", "dev", POD_IF, "egress").stdout)
    dp = KernelDatapath(POD_IF, lab.pod)
    try:
        dp.open_maps()
        for m in (dp.lpm, dp.meta):
            parts.append(repr(sorted(m.items())))
    finally:
        dp.close()
    # Unmatched packets (neighbour discovery) move the HTB direct-queue counter: not state.
    return re.sub(r"direct_packets_stat \d+", "", "\n".join(parts))


@pytest.fixture
def daemon(lab):
    d = lab.daemon()
    d.request("PUT", "/rules", {"rules": [
        {"name": "a", "dst": [V4["a"], V6["a"]], "rate": "10mbit", "ttl": "1h"},
        {"name": "b", "dst": ["10.77.0.0/24"], "rate": "2mbit"}]})
    return d


def test_api_refuses_every_hostile_input_and_changes_nothing(lab, daemon):
    assert len(API_CASES) >= 60
    before, rules = kernel_snapshot(lab), daemon.request("GET", "/rules")[1]
    for what, method, path, raw, status, words in API_CASES:
        got, answer = daemon.request(method, path, raw=raw, headers={"Content-Type": "application/json"})
        assert got == status, f"{what}: {got} {answer}"
        assert isinstance(answer, dict) and words in answer["error"], f"{what}: {answer}"
        assert len(answer["error"]) < 1000, what  # no echo of a huge input
    assert kernel_snapshot(lab) == before
    assert daemon.request("GET", "/rules")[1] == rules
    assert daemon.stop() == 0


def test_http_level_abuse(lab, daemon):
    before = kernel_snapshot(lab)
    too_big = daemon.request("PUT", "/rules", raw=b"", headers={"Content-Length": str(64 * 1024 * 1024)})
    assert too_big[0] == 413 and "exceeds" in too_big[1]["error"]
    assert daemon.request("PUT", "/rules", raw=b"", headers={"Content-Length": "-1"})[0] == 400
    assert daemon.request("PUT", "/rules", raw=b"", headers={"Content-Length": "many"})[0] == 400
    assert daemon.request("GET", "/healthz")[0] == 200  # still serving
    assert kernel_snapshot(lab) == before


def test_cli_and_rules_file_refuse_hostile_input(lab, daemon, tmp_path):
    before, rules = kernel_snapshot(lab), daemon.request("GET", "/rules")[1]
    files = {
        "invalid YAML": "rules: [\n",
        "a YAML object tag": "rules: !!python/object/apply:os.system ['true']\n",
        "a list at the top": "- name: a\n",
        "rules of the wrong type": "rules: 5\n",
        "duplicate names": "rules:\n  - {name: a, dst: [10.77.0.2]}\n  - {name: a, dst: [10.77.0.3]}\n",
        "a bad CIDR": "rules:\n  - {name: a, dst: [10.77.0.2/40]}\n",
        "an unknown field": "rules:\n  - {name: a, dst: [10.77.0.2], delya: 5ms}\n",
        "an alias bomb": "x: &x [a, a, a, a]\ny: &y [*x, *x, *x, *x]\nz: &z [*y, *y, *y, *y]\nrules: [*z, *z]\n",
        "invalid UTF-8": b"rules:\n  - {name: \xff, dst: [10.77.0.2]}\n",
        "a binary file": bytes(range(256)),
    }
    cases = []
    for what, content in files.items():
        path = tmp_path / f"{len(cases)}.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        cases.append((f"rules file with {what}", ["apply", "-f", str(path)]))
        cases.append((f"daemon start with {what}", ["run", "--iface", POD_IF, "--listen", "127.0.0.1:2399",
                                                    "--rules", str(path)]))
    cases += [
        ("absent rules file", ["apply", "-f", str(tmp_path / "absent.yaml")]),
        ("rules file that is a directory", ["apply", "-f", str(tmp_path)]),
        ("bad delay option", ["rule", "set", "h", "--dst", "10.77.9.1", "--delay", "5 parsecs"]),
        ("bad destination option", ["rule", "set", "h", "--dst", "10.77.9.1/99"]),
        ("zone in a destination", ["rule", "set", "h", "--dst", "fe80::1%shp0"]),
        ("non-integer gap", ["rule", "set", "h", "--dst", "10.77.9.1", "--delay", "5ms", "--reorder", "1%",
                             "--gap", "x"]),
        ("unknown distribution", ["rule", "set", "h", "--dst", "10.77.9.1", "--distribution", "gaussian"]),
        ("malformed loss_ge", ["rule", "set", "h", "--dst", "10.77.9.1", "--loss-ge", "p"]),
        ("invalid rule name", ["rule", "set", "../x", "--dst", "10.77.9.1"]),
        ("missing destination", ["rule", "set", "h", "--delay", "5ms"]),
        ("server URL that is not http", ["rule", "list", "--server", "file:///etc/passwd"]),
        ("listen address without a port", ["run", "--iface", POD_IF, "--listen", "127.0.0.1:"]),
        ("listen beyond loopback without token", ["run", "--iface", POD_IF, "--listen", "0.0.0.0:2399"]),
        ("empty token file", ["run", "--iface", POD_IF, "--listen", "127.0.0.1:2399", "--token-file",
                              str(tmp_path / "0.yaml.empty")]),
    ]
    (tmp_path / "0.yaml.empty").write_text("")
    for what, args in cases:
        proc = lab.cli(*args, check=False)
        assert proc.returncode == 2, f"{what}: exit {proc.returncode}: {proc.stderr}"
        assert proc.stderr.strip() and "Traceback" not in proc.stderr, what
    assert kernel_snapshot(lab) == before
    assert daemon.request("GET", "/rules")[1] == rules
    print(f"\nhostile inputs refused: {len(API_CASES)} through the API, {len(cases)} through the CLI and rules files")
