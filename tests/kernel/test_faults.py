"""Faults the daemon must survive (kernel tier): SIGKILL under traffic, TTL with the daemon dead,
the interface vanishing and coming back, a second controller, reset after kill -9."""

import os
import re
import signal
import subprocess
import threading
import time

from lab import POD_IF, V4, parse_ping, sh, wait_until


def pins_of(lab) -> list[str]:
    base = "/sys/fs/bpf/shaper"
    inode = os.stat(f"/run/netns/{lab.pod}").st_ino
    return [p for p in (os.listdir(base) if os.path.isdir(base) else []) if p == f"{inode}-{POD_IF}"]


def prog_id(lab) -> str:
    out = sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "egress").stdout
    return out.split(" id ")[1].split()[0]


def ping_in_background(lab, addr: str, count: int, interval: float) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        proc = subprocess.run(["ip", "netns", "exec", lab.pod, "ping", "-n", "-q", "-c", str(count), "-i",
                               str(interval), addr], capture_output=True, text=True, timeout=120)
        result.update(parse_ping(proc.stdout))

    t = threading.Thread(target=run)
    t.start()
    return t, result


def test_sigkill_under_traffic_then_restart_adopts_without_loss(lab):
    d = lab.daemon()
    d.request("PUT", "/rules", {"rules": [{"name": "a", "dst": [V4["a"]], "rate": "10mbit"},
                                          {"name": "b", "dst": [V4["b"]], "rate": "50mbit"}]})
    handles, state, prog = lab.handles(), lab.tc_state(), prog_id(lab)
    t, result = ping_in_background(lab, V4["b"], 400, 0.01)
    time.sleep(1)
    d.stop(signal.SIGKILL)
    assert lab.handles() == handles and lab.tc_state() == state  # shaping carries on, untouched
    time.sleep(0.5)
    d2 = lab.daemon()
    t.join()
    assert result["sent"] == 400 and result["received"] == 400, result  # no packet lost across kill + restart
    assert lab.handles() == handles and lab.tc_state() == state and prog_id(lab) == prog  # nothing recreated
    assert [x for x in d2.logs() if x["event"] == "daemon.ready"][0]["datapath"] == "adopted"
    stats = {r["name"]: r for r in d2.request("GET", "/stats")[1]["rules"]}
    assert stats["b"]["matched_packets"] >= 400 and stats["b"]["class_packets"] == stats["b"]["matched_packets"]
    assert d2.stop() == 0


def test_ttl_expires_on_time_with_the_daemon_dead(lab):
    d = lab.daemon()
    d.request("PUT", "/rules/brief", {"dst": [V4["c"]], "rate": "10mbit", "ttl": "2s"})
    d.request("PUT", "/rules/keep", {"dst": [V4["b"]], "rate": "10mbit"})
    put_at = time.monotonic()
    d.stop(signal.SIGKILL)
    lab.send_udp(V4["c"], 5)
    assert time.monotonic() - put_at < 1.8, "too slow to send before the TTL"
    time.sleep(max(0.0, put_at + 2.3 - time.monotonic()))
    lab.send_udp(V4["c"], 9)  # after the TTL, with no daemon: the classifier ignores the entry
    lab.send_udp(V4["b"], 4)
    rows = lab.show()
    assert rows["brief"]["matched_packets"] == 5 and rows["brief"]["expires_in"] == "expired"
    assert rows["keep"]["matched_packets"] == 4
    d2 = lab.daemon()  # adopts, then removes what expired
    assert wait_until(lambda: [r["name"] for r in d2.request("GET", "/rules")[1]["rules"]] == ["keep"], 5)
    assert wait_until(lambda: "5348:1 " not in sh("tc", "-n", lab.pod, "class", "show", "dev", POD_IF).stdout, 5)
    assert d2.stop() == 0


def test_interface_vanishes_and_comes_back(lab):
    d = lab.daemon()
    d.request("PUT", "/rules/a", {"dst": [V4["a"]], "rate": "10mbit"})
    d.request("PUT", "/rules/t", {"dst": [V4["c"]], "rate": "5mbit", "ttl": "1h"})
    lab.delete_link()
    assert wait_until(lambda: d.request("GET", "/readyz")[0] == 503, 5)
    assert wait_until(lambda: any(x["event"] == "interface.gone" for x in d.logs()), 5)
    assert d.request("PUT", "/rules/x", {"dst": [V4["d"]], "rate": "1mbit"})[0] == 503
    assert d.proc.poll() is None  # waiting, not crashing
    time.sleep(1.5)
    lab.make_link()
    assert wait_until(lambda: d.request("GET", "/readyz")[0] == 200, 15), d.log_text()
    rules = {r["name"]: r for r in d.request("GET", "/rules")[1]["rules"]}
    assert rules["a"] == {"name": "a", "dst": [f"{V4['a']}/32"], "rate": "10mbit"}
    assert set(rules) == {"a", "t"}  # t keeps the TTL it had left (just under 1h)
    assert sorted(lab.handles())[:1] and "5348:1" in sh("tc", "-n", lab.pod, "class", "show", "dev", POD_IF).stdout
    lab.send_udp(V4["a"], 6)
    stats = {r["name"]: r for r in d.request("GET", "/stats")[1]["rules"]}
    assert stats["a"]["matched_packets"] == 6 == stats["a"]["class_packets"]
    assert stats["t"]["expires_in"].startswith("59m")
    events = [x["event"] for x in d.logs()]
    assert "interface.gone" in events and "interface.back" in events
    assert d.stop() == 0
    assert not pins_of(lab) and "htb" not in lab.tc_state()


def test_a_second_controller_is_refused(lab):
    d = lab.daemon()
    d.request("PUT", "/rules/a", {"dst": [V4["a"]], "rate": "10mbit"})
    state = lab.tc_state()
    second = lab.daemon(port=2333, wait=False)
    assert second.proc.wait(60) == 1
    # Named by its PID and its command line.
    assert f"controlled by another shaper (process {d.proc.pid}: " in second.log_text()
    assert re.search(rf"\(process {d.proc.pid}: \S*python\S* -m shaper run --iface {POD_IF}", second.log_text())
    local = lab.shaper("apply", rules="rules: []", check=False)
    assert local.returncode == 1 and "controlled by another shaper" in local.stderr
    local = lab.shaper("reset", check=False)
    assert local.returncode == 1 and "controlled by another shaper" in local.stderr
    assert lab.tc_state() == state and d.request("GET", "/readyz")[0] == 200
    assert lab.shaper("show").returncode == 0  # reading is fine
    assert d.stop() == 0


def test_reset_after_kill_9_removes_every_trace_and_nothing_else(lab):
    # Someone else's objects: a clsact ingress filter on the same interface, a qdisc on another one.
    sh("tc", "-n", lab.pod, "qdisc", "add", "dev", POD_IF, "clsact")
    sh("tc", "-n", lab.pod, "filter", "add", "dev", POD_IF, "ingress", "pref", "7", "protocol", "ip", "u32",
       "match", "u32", "0", "0")
    sh("ip", "-n", lab.pod, "link", "add", "other0", "type", "veth", "peer", "name", "other1")
    sh("tc", "-n", lab.pod, "qdisc", "add", "dev", "other0", "root", "tbf", "rate", "1mbit", "burst", "10kb",
       "latency", "50ms")
    before = lab.tc_state() + sh("tc", "-n", lab.pod, "qdisc", "show", "dev", "other0").stdout
    d = lab.daemon()
    d.request("PUT", "/rules/a", {"dst": [V4["a"]], "rate": "10mbit"})
    assert pins_of(lab)
    d.stop(signal.SIGKILL)
    out = lab.shaper("reset").stdout
    assert out.strip() == f"{POD_IF}: removed filter, htb root, pins"  # clsact stays: it was not ours
    assert lab.tc_state() + sh("tc", "-n", lab.pod, "qdisc", "show", "dev", "other0").stdout == before
    assert not pins_of(lab)


def test_pins_without_our_program_on_the_interface_are_not_adopted(lab):
    """Pins whose name and ifindex match but whose program is not on the interface: what a pod
    sees when its netns reuses the inode number of a pod killed without cleanup (same eth0,
    same ifindex). Simulated by removing the clsact (and with it the filter) under the pins."""
    lab.shaper("apply", rules=f"rules:\n  - {{name: old, dst: [{V4['a']}], rate: 1mbit}}\n")
    before = pins_of(lab)
    assert before
    sh("tc", "-n", lab.pod, "qdisc", "del", "dev", POD_IF, "clsact")
    d = lab.daemon()
    assert d.request("GET", "/rules")[1] == {"rules": []}  # the old pod's rule is not inherited
    assert [x for x in d.logs() if x["event"] == "daemon.ready"][0]["datapath"] == "attached"
    assert d.request("PUT", "/rules/new", {"dst": [V4["b"]], "rate": "2mbit"})[0] == 200
    assert d.stop() == 0
    assert not pins_of(lab)
