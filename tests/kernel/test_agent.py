"""`shaper agent` against the kernel: pods (namespaces with a process in them) made after the agent
started, shaped and swept through the agent's API from a client namespace (lab.node).

Rates only (this kernel has no sch_netem): the VM tier measures a delay on a target.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lab import NetnsHTTPConnection, sh, tcp_goodput, wait_until
from lab.node import BPFFS, TOKEN, Node, wait_gone

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def node():
    with Node() as node:
        yield node


def rule(dst: str, rate: str) -> dict:
    return {"dst": [dst], "rate": rate}


def test_two_pods_shaped_independently(node):
    node.agent(how="ip-netns-exec")
    a, b = node.pod(), node.pod()  # after the agent started
    # By address, and by PID: each its own datapath, pinned per namespace.
    assert node.request("PUT", f"/targets/{a.ip}/rules/peer", rule(a.peer, "4mbit"))[0] == 200
    status, body = node.request("PUT", f"/targets/pid:{b.pid}/rules/peer", rule(b.peer, "16mbit"))
    assert status == 200, body
    assert a.rates() == {"5348:1": "4Mbit"} and b.rates() == {"5348:1": "16Mbit"}
    assert os.path.isdir(a.pins) and os.path.isdir(b.pins)

    got_a = tcp_goodput(a.netns, a.ip, node.name, a.peer, seconds=2, port=5301)
    got_b = tcp_goodput(b.netns, b.ip, node.name, b.peer, seconds=2, port=5302)
    print(f"\nagent: pod a 4mbit -> {got_a / 1e6:.2f} Mbit/s, pod b 16mbit -> {got_b / 1e6:.2f} Mbit/s")
    assert 3.0e6 < got_a < 4.6e6 and 12.0e6 < got_b < 18.4e6

    # One namespace named two ways is one target; the other's rules are its own.
    status, body = node.request("GET", f"/targets/pid:{a.pid}/rules")
    assert status == 200 and [(r["name"], r["rate"]) for r in body["rules"]] == [("peer", "4mbit")]
    status, body = node.request("GET", "/targets")
    assert sorted((t["target"], t["pid"], t["rules"]) for t in body["targets"]) == \
        sorted([(a.ip, a.pid, 1), (f"pid:{b.pid}", b.pid, 1)])
    status, stats = node.request("GET", f"/targets/{b.ip}/stats")
    assert status == 200 and stats["rules"][0]["class_bytes"] > 1_000_000

    status, text = node.request("GET", "/metrics")
    assert status == 200
    assert re.search(rf'shaper_class_bytes_total\{{[^}}]*target="{re.escape(a.ip)}"[^}}]*\}} [1-9]', text)
    assert re.search(rf'shaper_rule_rate_bytes_per_second\{{[^}}]*target="pid:{b.pid}"[^}}]*\}} 2e\+06', text)
    assert "shaper_agent_targets 2.0" in text

    # The CLI, from the client namespace, with --target.
    out = node.cli("rule", "set", "extra", "--dst", "10.99.0.0/16", "--rate", "1mbit", "--target", a.ip).stdout
    assert "extra" in out
    listed = node.cli("rule", "list", "-o", "json", "--target", f"pid:{a.pid}").stdout
    assert '"extra"' in listed and '"peer"' in listed
    assert b.rates() == {"5348:1": "16Mbit"}  # b untouched
    assert a.ip in node.cli("target", "list").stdout

    # Removing a target removes everything shaper made there, and only there.
    out = node.cli("target", "rm", a.ip).stdout
    assert "pins" in out and "htb root" in out
    assert "htb" not in a.tc("qdisc", "show") and not os.path.exists(a.pins)
    assert b.rates() == {"5348:1": "16Mbit"}


def test_requests_that_touch_nothing(node):
    agent = node.agent()
    a = node.pod()
    before = a.qdiscs()
    # Reads and dry runs of a pod not shaped yet: an empty set, and nothing made there.
    assert node.request("GET", f"/targets/{a.ip}/rules") == (200, {"rules": []})
    status, plan = node.request("PUT", f"/targets/{a.ip}/rules/x?dry_run=1", rule(a.peer, "1mbit"))
    assert status == 200 and plan["dry_run"] and plan["rule_changes"]
    assert node.request("DELETE", f"/targets/{a.ip}/rules")[1] == {"deleted": []}
    assert a.qdiscs() == before and not os.path.exists(a.pins)
    assert node.request("GET", "/targets")[1]["targets"] == []

    status, body = node.request("GET", f"/targets/10.{node.base + 3}.250.2/rules")
    assert status == 404 and "no pod or container on this node holds the address" in body["error"]
    status, body = node.request("PUT", f"/targets/{a.peer}/rules/x", rule(a.ip, "1mbit"))
    assert status == 404 and "the node's own addresses are no targets" in body["error"]
    for spec in (f"pid:{agent.pid}", f"netns:{node.name}"):  # the agent's (the node's) own namespace
        status, body = node.request("PUT", f"/targets/{spec}/rules/x", rule(a.ip, "1mbit"))
        assert status == 422 and "node's own network namespace" in body["error"], (spec, body)
    # Only namespace files: no path of the node or of a container is opened, or told apart.
    for path in ("/etc/shadow", "/proc/1/root/etc/passwd", "/run/netns/../../etc/shadow", "/dev/watchdog"):
        status, body = node.request("GET", "/targets/netns:" + path.replace("/", "%2F") + "/rules")
        assert status == 422 and "not a namespace file the agent opens" in body["error"], (path, body)
    status, body = node.request("GET", "/targets/netns:%2Frun%2Fnetns%2Fno-such-ns/rules")
    assert status == 404
    status, body = node.request("PUT", "/targets/pid:999999999/rules/x", rule(a.ip, "1mbit"))
    assert status == 422 and "pid:" in body["error"]
    status, body = node.request("GET", "/targets/nope:x/rules")
    assert status == 422
    assert node.request("PUT", f"/targets/{a.ip}/rules/x", rule(a.peer, "1mbit"), token=None)[0] == 401

    # Two namespaces holding one address: ambiguous, and each candidate named.
    twin = node.pod()
    twin.run("ip", "addr", "add", f"{a.ip}/32", "dev", "lo")
    status, body = node.request("PUT", f"/targets/{a.ip}/rules/x", rule(a.peer, "1mbit"))
    assert status == 409 and str(a.pid) in body["error"] and str(twin.pid) in body["error"]
    assert not os.path.exists(a.pins) and not os.path.exists(twin.pins)


def test_a_new_target_takes_the_classifier_compiled_ahead(node):
    from shaper.datapath.kernel import _prog_id_at

    agent = node.agent()
    spare = os.path.join(BPFFS, "shaper", f"_spare-{agent.pid}")
    assert wait_until(lambda: os.path.exists(os.path.join(spare, "ingress_cfg")), timeout=120), agent.text()
    compiled = _prog_id_at(spare)
    a = node.pod()
    assert node.request("PUT", f"/targets/{a.ip}/rules/x", rule(a.peer, "3mbit"))[0] == 200
    assert _prog_id_at(a.pins) == compiled  # moved, not compiled on the request's time
    assert a.rates() == {"5348:1": "3Mbit"}
    assert wait_until(lambda: os.path.exists(os.path.join(spare, "ingress_cfg")), timeout=120)  # the next one
    assert _prog_id_at(spare) != compiled
    # An agent killed leaves its spare; the next one removes it (an upgrade never takes an old classifier).
    agent.stop(signal.SIGKILL)
    assert os.path.isdir(spare)
    # Killed while it compiles its spare: the loader child dies with it (it would pin for nobody).
    # The compile is a second (the compiled-classifier cache set aside: from it, the spare takes
    # milliseconds and no child): an agent whose loader this test did not see at work is stopped
    # and another started, three times at most.
    for _ in range(3):
        again = node.agent(wait=False, env={"SHAPER_CACHE_DIR": "off"})
        assert wait_until(lambda: any(e["event"] == "agent.listen" for e in again.logs()), timeout=120), \
            again.text()
        loading = os.path.join(BPFFS, "shaper", f"_spare-{again.pid}_new")
        if wait_until(lambda: loader_of(loading), timeout=30, step=0.01):
            break
        assert again.stop() == 0
    else:
        pytest.fail("three agents compiled their spare before this test saw their loader")
    assert not os.path.exists(spare)  # the killed agent's, removed at the start
    again.stop(signal.SIGKILL)
    assert wait_until(lambda: not loader_of(loading), timeout=10), loader_of(loading)
    assert not os.path.exists(os.path.join(loading, "ingress_cfg"))  # it pinned nothing after its agent died
    third = node.agent()
    assert not os.path.exists(loading) and third.stop() == 0
    assert not [n for n in os.listdir(os.path.join(BPFFS, "shaper")) if n.startswith("_spare")]


def loader_of(pin_dir: str) -> list[str]:
    """The loader processes pinning into pin_dir."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "shaper.datapath.loader" in cmd and pin_dir in cmd:
            out.append(pid)
    return out


def test_an_address_that_moved_names_its_new_pod(node):
    agent = node.agent()
    a, b = node.pod(), node.pod()
    assert node.request("PUT", f"/targets/{a.ip}/rules/x", rule(a.peer, "3mbit"))[0] == 200
    a.run("ip", "addr", "del", f"{a.ip}/24", "dev", "eth0")  # the address moves to pod b
    b.run("ip", "addr", "add", f"{a.ip}/32", "dev", "lo")
    status, body = node.request("PUT", f"/targets/{a.ip}/rules/x", rule(b.peer, "5mbit"))
    assert status == 200, body
    assert b.rates() == {"5348:1": "5Mbit"} and a.rates() == {"5348:1": "3Mbit"}
    listed = {t["target"]: t["netns"] for t in node.request("GET", "/targets")[1]["targets"]}
    assert listed == {a.ip: b.inode, f"pid:{a.pid}": a.inode}, agent.text()
    status, text = node.request("GET", "/metrics")
    assert text.count("shaper_rules{") == 2


def test_killed_pod_is_swept_and_so_are_a_dead_sidecars_pins(node):
    agent = node.agent()
    a, b = node.pod(), node.pod()
    for pod in (a, b):
        assert node.request("PUT", f"/targets/{pod.ip}/rules/peer", rule(pod.peer, "8mbit"))[0] == 200
    a.kill()  # the pod is deleted: its namespace goes (once the agent lets go of it)
    took = wait_gone(a.pins, timeout=30)
    assert took is not None, agent.text()
    print(f"\nagent: pins of a killed pod swept {took:.2f} s after the kill")
    assert wait_until(lambda: sh("ip", "-n", node.name, "link", "show", a.link, check=False).returncode != 0, 10)
    assert [t["target"] for t in node.request("GET", "/targets")[1]["targets"]] == [b.ip]
    assert any(e["event"] == "target.removed" and e["reason"] == "namespace gone" for e in agent.logs())
    assert b.rates() == {"5348:1": "8Mbit"}
    assert re.search(r'shaper_agent_swept_total\{what="target"\} 1.0', node.request("GET", "/metrics")[1])

    # A sidecar in pod c, killed with SIGKILL, leaves its pins; the pod then goes.
    c = node.pod()
    sidecar = subprocess_sidecar(c)
    try:
        assert wait_until(lambda: sidecar_ready(c), timeout=120, step=0.2), "the sidecar never got ready"
        # While it runs, the agent refuses its interface, naming it.
        status, body = node.request("PUT", f"/targets/{c.ip}/rules/x", rule(c.peer, "1mbit"))
        assert status == 409 and f"process {sidecar.pid}" in body["error"] and "shaper run" in body["error"]
    finally:
        sidecar.kill()
        sidecar.wait()
    assert os.path.isdir(c.pins)  # SIGKILL: nothing cleaned up
    # Its pins say a sidecar made them: the agent does not adopt them while the pod lives.
    status, body = node.request("PUT", f"/targets/{c.ip}/rules/x", rule(c.peer, "1mbit"))
    assert status == 409 and "not this node's agent" in body["error"], body
    c.kill()
    took = wait_gone(c.pins, timeout=30)
    assert took is not None, agent.text()
    print(f"agent: a dead sidecar's pins swept {took:.2f} s after its pod went")
    assert any(e["event"] == "pins.swept" and e["pins"] == c.pins for e in agent.logs())


def sidecar_ready(pod) -> bool:
    conn = NetnsHTTPConnection(f"/proc/{pod.pid}/ns/net", "127.0.0.1", 2332, timeout=2)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def subprocess_sidecar(pod):
    return subprocess.Popen(["nsenter", "-t", str(pod.pid), "-n", sys.executable, "-m", "shaper", "run", "--iface",
                             "eth0", "--listen", "127.0.0.1:2332"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def shaper_in(pod, *args: str) -> subprocess.CompletedProcess:
    """The shaper CLI run inside a pod's namespace, as a sidecar or a user there would."""
    return subprocess.run(["nsenter", "-t", str(pod.pid), "-n", sys.executable, "-m", "shaper", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def test_a_sidecar_refuses_the_agents_pod(node, tmp_path):
    agent = node.agent()
    a = node.pod()
    assert node.request("PUT", f"/targets/{a.ip}/rules/peer", rule(a.peer, "8mbit"))[0] == 200
    # While the agent runs: its claim on the interface refuses a sidecar, and names the agent.
    done = shaper_in(a, "run", "--iface", "eth0", "--listen", "127.0.0.1:2332")
    assert done.returncode != 0 and "the shaper agent of this node" in done.stderr, done.stderr
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    done = shaper_in(a, "apply", "--iface", "eth0", "-f", str(rules))
    assert done.returncode != 0 and "the shaper agent of this node" in done.stderr, done.stderr
    # With the agent stopped (its shaping kept), the record in the pins still says whose it is.
    assert agent.stop() == 0
    done = shaper_in(a, "run", "--iface", "eth0", "--listen", "127.0.0.1:2332")
    assert done.returncode != 0 and f"shaped by the shaper agent of this node (target {a.ip})" in done.stderr, \
        done.stderr
    assert a.rates() == {"5348:1": "8Mbit"}


def test_restart_adopts_every_target(node):
    agent = node.agent()
    pods = [node.pod() for _ in range(3)]
    for i, pod in enumerate(pods):
        assert node.request("PUT", f"/targets/{pod.ip}/rules/peer", rule(pod.peer, f"{i + 2}mbit"))[0] == 200
    pods[0].run("ping", "-c", "3", "-i", "0.01", pods[0].peer)
    sent = node.request("GET", f"/targets/{pods[0].ip}/stats")[1]["rules"][0]["matched_packets"]
    assert agent.stop() == 0
    for i, pod in enumerate(pods):  # kept on exit: shaping goes on without the agent
        assert pod.rates() == {"5348:1": f"{i + 2}Mbit"} and os.path.isdir(pod.pins)

    again = node.agent(how="ip-netns-exec")
    status, body = node.request("GET", "/targets")
    assert sorted((t["target"], t["rules"]) for t in body["targets"]) == sorted((p.ip, 1) for p in pods)
    adopted = [e for e in again.logs() if e["event"] == "target.adopted"]
    assert len(adopted) == 3, again.text()
    status, stats = node.request("GET", f"/targets/{pods[0].ip}/stats")
    assert stats["rules"][0]["matched_packets"] >= sent  # the counters came along
    assert node.request("PUT", f"/targets/{pods[1].ip}/rules/peer", rule(pods[1].peer, "9mbit"))[0] == 200
    assert pods[1].rates() == {"5348:1": "9Mbit"} and pods[2].rates() == {"5348:1": "4Mbit"}
    # Addressed by another name after the restart: the same target.
    assert node.request("GET", f"/targets/pid:{pods[2].pid}/rules")[1]["rules"][0]["rate"] == "4mbit"
    assert again.stop() == 0


def test_fifty_pods(node):
    agent = node.agent()
    pods = [node.pod() for _ in range(50)]
    rss0 = agent.rss_kb()
    times = []
    for pod in pods:
        start = time.monotonic()
        status, body = node.request("PUT", f"/targets/{pod.ip}/rules/peer", rule(pod.peer, "10mbit"))
        times.append(time.monotonic() - start)
        assert status == 200, body
    rss1 = agent.rss_kb()
    times.sort()
    print(f"\nagent, 50 pods: first shaping of a new target median {times[25]:.2f} s, max {times[-1]:.2f} s; "
          f"RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB ({(rss1 - rss0) / 50:.0f} KiB per target)")
    assert all(p.rates() == {"5348:1": "10Mbit"} for p in pods)
    body = node.request("GET", "/targets")[1]
    assert len(body["targets"]) == 50
    start = time.monotonic()
    status, text = node.request("GET", "/metrics")
    scrape = time.monotonic() - start
    assert len(set(re.findall(r'shaper_rules\{[^}]*target="([^"]+)"', text))) == 50
    print(f"agent, 50 pods: /metrics {len(text) // 1024} KiB in {scrape * 1000:.0f} ms")
    for pod in pods:
        pod.kill()
    start = time.monotonic()
    assert wait_until(lambda: not any(os.path.exists(p.pins) for p in pods), timeout=60), agent.text()
    print(f"agent, 50 pods killed: every pin swept within {time.monotonic() - start:.2f} s")
    assert node.request("GET", "/targets")[1]["targets"] == []
    assert not os.path.exists(os.path.join(BPFFS, "shaper")) or not [
        n for n in os.listdir(os.path.join(BPFFS, "shaper")) if any(n.startswith(f"{p.inode}-") for p in pods)]
    assert agent.stop(signal.SIGTERM) == 0
    assert TOKEN  # the requests above carried it


def test_pins_that_no_longer_match_their_namespace_are_not_adopted(node):
    """A namespace inode the kernel gave again to a pod nobody asked to shape holds none of the
    target's shaping: simulated by removing the classifier while the agent is stopped."""
    agent = node.agent()
    a, b = node.pod(), node.pod()
    for pod in (a, b):
        assert node.request("PUT", f"/targets/{pod.ip}/rules/x", rule(pod.peer, "3mbit"))[0] == 200
    assert agent.stop() == 0
    a.run("tc", "filter", "del", "dev", "eth0", "egress")
    before = a.qdiscs()
    again = node.agent()
    assert [t["target"] for t in node.request("GET", "/targets")[1]["targets"]] == [b.ip]
    assert not os.path.exists(a.pins) and a.qdiscs() == before  # removed its pins, touched nothing
    assert "filter" not in a.run("tc", "filter", "show", "dev", "eth0", "egress").stdout
    assert any(e["event"] == "pins.stale" and e["target"] == a.ip for e in again.logs()), again.text()
    assert again.stop() == 0
