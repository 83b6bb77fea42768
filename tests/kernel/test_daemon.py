"""`shaper run` inside a test network namespace, driven over HTTP and with the CLI.

Rates only: this kernel has no sch_netem, so the delay paths are in the VM tier;
here a netem rule is the way to make the kernel refuse part of a change.
"""

import os
import re
import signal
import socket

from lab import POD_IF, V4, V6, netem_available, sh, wait_until

TOKEN = "kernel-tier-token-0123456789"


def classes(lab) -> dict[str, str]:
    """classid -> rate, as tc shows them."""
    out = sh("tc", "-n", lab.pod, "class", "show", "dev", POD_IF).stdout
    return dict(re.findall(r"class htb (\S+) .*?rate (\S+)", out))


def test_every_endpoint_against_the_kernel(lab):
    d = lab.daemon()
    assert d.request("GET", "/healthz") == (200, {"status": "ok"})
    assert d.request("GET", "/readyz") == (200, {"status": "ready", "interface": POD_IF})
    status, doc = d.request("GET", "/openapi.json")
    assert status == 200 and "/rules/{name}" in doc["paths"]

    status, a = d.request("PUT", "/rules/a", {"dst": [V4["a"], V6["a"]], "rate": "10mbit"})
    assert status == 200 and a == {"name": "a", "dst": [f"{V4['a']}/32", f"{V6['a']}/128"], "rate": "10mbit"}
    assert d.request("PUT", "/rules/b", {"dst": [V4["b"]], "rate": "5mbit", "ttl": "1h"})[0] == 200
    assert classes(lab) == {"5348:1": "10Mbit", "5348:2": "5Mbit"}
    assert d.request("GET", "/rules/a") == (200, a)
    status, body = d.request("GET", "/rules")
    assert [r["name"] for r in body["rules"]] == ["a", "b"]

    lab.send_udp(V4["a"], 20, size=100)
    lab.send_udp(V6["a"], 10, size=100)
    lab.send_udp(V4["c"], 7)  # no rule: counted nowhere
    stats = {r["name"]: r for r in d.request("GET", "/stats")[1]["rules"]}
    assert stats["a"]["matched_packets"] == 30 == stats["a"]["class_packets"]
    assert stats["a"]["matched_bytes"] == 20 * 142 + 10 * 162 == stats["a"]["class_bytes"]
    assert stats["b"]["matched_packets"] == 0 and stats["b"]["expires_in"] in ("1h0m0s", "59m59s")

    handles = lab.handles()
    assert d.request("PUT", "/rules/a", {"dst": [V4["a"]], "rate": "20mbit"})[0] == 200
    assert classes(lab)["5348:1"] == "20Mbit" and lab.handles() == handles  # changed in place

    assert d.request("DELETE", "/rules/b") == (200, {"deleted": ["b"]})
    assert d.request("DELETE", "/rules/b")[0] == 404
    assert list(classes(lab)) == ["5348:1"]

    before = lab.tc_state()
    status, err = d.request("PUT", "/rules/a", {"dst": [V4["a"]], "rate": "20 furlongs"})
    assert status == 422 and err["field"] == "rate"
    status, err = d.request("PUT", "/rules/a", raw=b"{", headers={"Content-Type": "application/json"})
    assert status == 400
    assert d.request("POST", "/rules")[0] == 405
    assert lab.tc_state() == before

    # The compatibility endpoint: a catch-all delay needs netem, which this kernel lacks.
    if not netem_available():
        status, err = d.request("GET", "/latency/20ms")
        assert status == 501 and "sch_netem" in err["error"]
        assert lab.tc_state() == before
    assert d.request("GET", "/latency/0") == (200, {"deleted": []})

    status, text = d.request("GET", "/metrics")
    assert status == 200 and 'shaper_rules{interface="shp0"} 1.0' in text
    assert 'shaper_rule_matched_packets_total{classid="5348:1",direction="egress",interface="shp0",rule="a"} 30.0' in text

    assert d.request("DELETE", "/rules") == (200, {"deleted": ["a"]})
    assert classes(lab) == {}
    assert d.request("GET", "/readyz")[0] == 200  # still attached, shaping nothing
    assert "shaper" in sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "egress").stdout

    assert d.stop() == 0
    events = [line["event"] for line in d.logs()]
    assert events[:2] == ["daemon.listen", "daemon.ready"] and events[-2:] == ["daemon.stop", "daemon.exit"]
    changes = [line for line in d.logs() if line["event"].startswith(("rule", "latency"))]
    assert all({"who", "result"} <= line.keys() for line in changes)
    assert {line["result"] for line in changes} == {"ok", "rejected", "failed"} - (
        {"failed"} if netem_available() else set())


def test_a_set_the_kernel_refuses_in_part_changes_nothing(lab):
    d = lab.daemon()
    first = {"rules": [{"name": "x", "dst": ["10.77.0.0/24"], "rate": "10mbit"},
                       {"name": "y", "dst": [V4["b"]], "rate": "1mbit"}]}
    assert d.request("PUT", "/rules", first)[0] == 200
    before, rules = lab.tc_state(), d.request("GET", "/rules")[1]
    # Validation failure in the last rule: 422, nothing sent to the kernel.
    bad = {"rules": first["rules"][:1] + [{"name": "n", "dst": [V4["c"]], "rate": "2mbit"},
                                          {"name": "z", "dst": [V4["d"]], "loss": "200%"}]}
    status, err = d.request("PUT", "/rules", bad)
    assert status == 422 and err["field"] == "rules[2].loss"
    assert lab.tc_state() == before and d.request("GET", "/rules")[1] == rules
    if netem_available():
        return
    # Kernel failure part-way (no sch_netem): classes were created, then rolled back.
    refused = {"rules": [{"name": "n1", "dst": [V4["c"]], "rate": "2mbit"},
                         {"name": "n2", "dst": [V6["b"]], "rate": "3mbit"},
                         {"name": "x", "dst": ["10.77.0.0/24"], "rate": "7mbit"},
                         {"name": "zz", "dst": [V4["d"]], "delay": "10ms"}]}
    status, err = d.request("PUT", "/rules", refused)
    assert status == 501 and "sch_netem" in err["error"]
    assert lab.tc_state() == before and d.request("GET", "/rules")[1] == rules
    assert 'shaper_errors_total{interface="shp0",op="apply"} 1.0' in d.request("GET", "/metrics")[1]


def test_token_guards_changes(lab, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    d = lab.daemon("--token-file", str(token_file))
    rule = {"dst": [V4["a"]], "rate": "10mbit"}
    assert d.request("PUT", "/rules/a", rule)[0] == 401
    assert d.request("PUT", "/rules/a", rule, token="nope")[0] == 401
    assert d.request("GET", "/latency/0")[0] == 401
    assert d.request("PUT", "/rules/a", rule, token=TOKEN)[0] == 200
    assert d.request("GET", "/rules")[0] == 200 and d.request("GET", "/metrics")[0] == 200
    assert lab.cli("rule", "del", "a", check=False).returncode == 1
    lab.cli("rule", "del", "a", env={"SHAPER_TOKEN_FILE": str(token_file)})
    assert TOKEN not in d.log_text()
    assert d.stop() == 0


def test_restart_adopts_the_shaping_through_the_api(lab):
    d = lab.daemon("--keep-on-exit")
    d.request("PUT", "/rules/a", {"dst": [V4["a"], V6["a"]], "rate": "10mbit"})
    d.request("PUT", "/rules/b", {"dst": ["10.77.0.0/16"], "rate": "50mbit", "ttl": "1h"})
    lab.send_udp(V4["a"], 12)
    rules = d.request("GET", "/rules")[1]
    handles, filters = lab.handles(), lab.tc_state()
    assert d.stop() == 0
    # Left in place, pinned: traffic is still shaped while no daemon runs.
    assert lab.handles() == handles and lab.tc_state() == filters
    lab.send_udp(V4["a"], 3)

    d2 = lab.daemon()
    assert d2.request("GET", "/rules")[1] == rules
    assert lab.handles() == handles and lab.tc_state() == filters  # adopted, not rebuilt
    stats = {r["name"]: r for r in d2.request("GET", "/stats")[1]["rules"]}
    assert stats["a"]["matched_packets"] == 15 and stats["b"]["expires_in"] != "expired"
    assert [line for line in d2.logs() if line["event"] == "daemon.ready"][0]["datapath"] == "adopted"
    assert d2.stop(signal.SIGINT) == 0
    assert "htb" not in lab.tc_state() and "clsact" not in lab.tc_state()
    pins = [p for p in os.listdir("/sys/fs/bpf/shaper")] if os.path.isdir("/sys/fs/bpf/shaper") else []
    assert not [p for p in pins if p.endswith(f"-{POD_IF}") and str(lab_netns_inode(lab)) in p]


def lab_netns_inode(lab) -> int:
    return os.stat(f"/run/netns/{lab.pod}").st_ino


def test_ttl_expiry_and_startup_rules(lab, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"rules:\n  - {{name: keep, dst: [{V4['b']}], rate: 5mbit}}\n"
                     f"  - {{name: brief, dst: [{V4['a']}], rate: 1mbit, ttl: 2s}}\n")
    d = lab.daemon("--rules", str(rules))
    assert [r["name"] for r in d.request("GET", "/rules")[1]["rules"]] == ["brief", "keep"]
    assert wait_until(lambda: [r["name"] for r in d.request("GET", "/rules")[1]["rules"]] == ["keep"], 10)
    # The daemon removes what expired (the classifier already ignored it).
    assert wait_until(lambda: list(classes(lab)) == ["5348:2"], 5)
    assert any(line["event"] == "rules.expire" and line["rules"] == ["brief"] for line in d.logs())
    assert 'shaper_rule_changes_total{change="expired",interface="shp0"} 1.0' in d.request("GET", "/metrics")[1]
    assert d.stop() == 0


def test_bad_startup_touches_nothing(lab, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {name: a, dst: [10.77.0.2], delay: soon}\n")
    d = lab.daemon("--rules", str(bad), wait=False)
    assert d.proc.wait(60) == 2 and "delay" in d.log_text()
    assert lab.tc_state().split() == ["qdisc", "noqueue", "0:", "root", "refcnt", "2"]
    # Every address, no token: refused before anything is touched.
    open_api = lab.cli("run", "--iface", POD_IF, check=False)
    assert open_api.returncode == 2 and "--insecure" in open_api.stderr
    assert lab.tc_state().split() == ["qdisc", "noqueue", "0:", "root", "refcnt", "2"]
    # The port is taken (by something else in the namespace): exit 1, nothing touched.
    from shaper.datapath.tc import in_netns

    squatter = in_netns(lab.pod, lambda: socket.create_server(("127.0.0.1", 2332)))
    try:
        busy = lab.daemon(wait=False)
        assert busy.proc.wait(60) == 1 and "cannot listen on 127.0.0.1:2332" in busy.log_text()
        assert lab.tc_state().split() == ["qdisc", "noqueue", "0:", "root", "refcnt", "2"]
    finally:
        squatter.close()
    assert lab.daemon().stop() == 0  # and the interface was not left claimed


def test_cli_against_the_daemon(lab, tmp_path):
    lab.daemon()
    out = lab.cli("rule", "set", "a", "--dst", V4["a"], "--dst", V6["a"], "--rate", "10mbit").stdout
    assert out.split("\n")[1].split() == ["a", f"{V4['a']}/32,{V6['a']}/128", "rate=10mbit", "-"]
    assert '"rate": "10mbit"' in lab.cli("rule", "get", "a", "-o", "json").stdout
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"rules:\n  - {{name: a, dst: [{V4['a']}], rate: 10mbit}}\n"
                     f"  - {{name: b, dst: [{V4['b']}], rate: 2mbit}}\n")
    assert lab.cli("apply", "-f", str(rules)).stdout.strip() == "http://127.0.0.1:2332: 2 rule(s) applied"
    lab.send_udp(V4["b"], 5)
    status = lab.cli("status").stdout.split("\n")
    assert status[0].split()[:2] == ["NAME", "DST"] and status[0].split()[-1] == "CLASSID" and "5p/" in status[2]
    assert lab.cli("rule", "list").stdout.count("\n") == 3
    bad = lab.cli("rule", "set", "c", "--dst", "10.77.0.999", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("shaper: dst[0]:") and bad.stderr.count("\n") == 1
    missing = lab.cli("rule", "del", "nope", check=False)
    assert missing.returncode == 1 and missing.stderr == "shaper: no rule named 'nope'\n"
    away = lab.cli("rule", "list", "--server", "http://127.0.0.1:2399", check=False)
    assert away.returncode == 1 and "cannot reach the shaper daemon" in away.stderr
    assert lab.cli("reset").stdout.strip() == "http://127.0.0.1:2332: deleted 2 rule(s)"
    assert classes(lab) == {}


def test_initial_rules_apply_to_a_fresh_datapath_only_and_never_stop_the_daemon(lab, tmp_path):
    """--initial-rules, the sidecar's form (the pod's shaper.io/rules annotation)."""
    initial = tmp_path / "rules"
    initial.write_text(f"rules:\n  - {{name: a, dst: [{V4['a']}], rate: 5mbit}}\n")
    d = lab.daemon("--initial-rules", str(initial), "--keep-on-exit")
    assert [r["name"] for r in d.request("GET", "/rules")[1]["rules"]] == ["a"]
    assert d.request("PUT", "/rules/b", {"dst": [V4["b"]], "rate": "1mbit"})[0] == 200
    assert d.stop() == 0
    # Restarted (a container restart with the pins kept): adopted, the API's change stays.
    d = lab.daemon("--initial-rules", str(initial))
    assert [r["name"] for r in d.request("GET", "/rules")[1]["rules"]] == ["a", "b"]
    assert d.stop() == 0
    # Absent file: no rules. Bad rules: one warning line, ready with none.
    initial.unlink()
    d = lab.daemon("--initial-rules", str(initial))
    assert d.request("GET", "/rules")[1] == {"rules": []}
    assert d.stop() == 0
    initial.write_text("rules:\n  - {name: a, dst: [10.77.0.2], rate: 5 parsecs}\n")
    d = lab.daemon("--initial-rules", str(initial))
    assert d.request("GET", "/rules")[1] == {"rules": []}
    [line] = [x for x in d.logs() if x["event"] == "rules.invalid"]
    assert "rules[0].rate" in line["error"] and line["level"] == "warning"
    assert d.stop() == 0
    if netem_available():
        return
    # Valid rules the kernel refuses (no sch_netem here): ready with none, and why.
    initial.write_text(f"rules:\n  - {{name: a, dst: [{V4['a']}], delay: 10ms}}\n")
    d = lab.daemon("--initial-rules", str(initial))
    assert d.request("GET", "/rules")[1] == {"rules": []}
    [line] = [x for x in d.logs() if x["event"] == "rules.refused"]
    assert "sch_netem" in line["error"]
    assert d.request("GET", "/readyz")[0] == 200
    assert d.stop() == 0
    assert "htb" not in lab.tc_state()
