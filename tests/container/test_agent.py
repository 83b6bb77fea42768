"""`shaper agent` shaping real podman containers it finds through podman, without restarting them.

The agent runs on the host kernel in a lab.node Node's namespace (as in tests/kernel/test_agent.py)
and was started before the containers.  Each container joins a lab.node Pod's namespace
(`--network ns:/proc/<pod pid>/ns/net`: the pod's eth0, with a default route via its peer in the
node, is the container's), so the node namespace routes between containers, and only namespaces
and veths this test made carry traffic.  Rates are measured from container to container: the
sender runs in the shaped container and the receiver, in another container, computes the goodput
(lab's _SENDER/_RECEIVER, run with `podman exec` by the image's python3).
"""

import json
import os
import re
import select
import subprocess
import time

import pytest

from lab import _RECEIVER, _SENDER, sh
from lab.node import Node, wait_gone
from shaper.agent.agent import SWEEP_S
from tests.container.conftest import CONTAINERS_CONF, podman

SWEEP_BOUND_S = 60  # the agent sweeps every second (two looks); a loaded machine gets more


@pytest.fixture
def node():
    with Node() as node:
        yield node


def run_in(image: str, name: str, pod) -> dict:
    """A container that only waits, in `pod`'s network namespace; its `podman inspect`."""
    podman("run", "--detach", "--name", name, "--network", f"ns:/proc/{pod.pid}/ns/net", "--entrypoint", "sleep",
           image, "infinity")
    return inspect(name)


def inspect(name: str) -> dict:
    return json.loads(podman("inspect", "--type", "container", name).stdout)[0]


def goodput(sender: str, receiver: str, listen: str, seconds: float, port: int) -> float:
    """TCP goodput in bit/s from container `sender` to `listen`:`port` in container `receiver`, as the
    receiver measures it over `seconds` from its first byte (lab.tcp_goodput, but inside the containers)."""
    env = {**os.environ, "CONTAINERS_CONF": CONTAINERS_CONF}
    server = subprocess.Popen(["podman", "exec", receiver, "python3", "-u", "-c", _RECEIVER, listen, str(seconds),
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([server.stdout], [], [], 120)
        line = server.stdout.readline() if ready else ""
        assert line.strip() == "listening", f"receiver in {receiver} not listening: {line!r}"
        podman("exec", sender, "python3", "-c", _SENDER, listen, str(seconds), "", str(port),
               timeout=120 + 2 * seconds)
        out, err = server.communicate(timeout=120 + seconds)
        assert server.returncode == 0, f"receiver in {receiver} exited {server.returncode}: {err}"
        return float(out)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def series(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of metric `name`'s samples in a /metrics text."""
    return [dict(re.findall(r'(\w+)="([^"]*)"', m)) for m in re.findall(rf"^{name}\{{([^}}]*)\}} ", text, re.M)]


def targets(node) -> dict[str, dict]:
    status, body = node.request("GET", "/targets")
    assert status == 200, body
    return {t["target"]: t for t in body["targets"]}


def test_containers_shaped_by_name_and_by_id_without_restart(image, node, containers):
    agent = node.agent(env={"CONTAINERS_CONF": CONTAINERS_CONF})  # before any container exists
    a, b, r = node.pod(), node.pod(), node.pod()
    sh("ip", "netns", "exec", node.name, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    name_a, name_b, receiver = containers(), containers(), containers()
    before = {n: run_in(image, n, p) for n, p in ((name_a, a), (name_b, b), (receiver, r))}
    id_b = before[name_b]["Id"]
    for n, p in ((name_a, a), (name_b, b)):
        assert os.stat(f"/proc/{before[n]['State']['Pid']}/ns/net").st_ino == p.inode

    # A by its name, B by its full id (podman only); both towards the receiver's address.
    started = time.monotonic()
    status, body = node.request("PUT", f"/targets/container:{name_a}/rules/recv", {"dst": [r.ip], "rate": "4mbit"})
    assert status == 200, f"{body}\n{agent.text()}"
    first = time.monotonic() - started
    status, body = node.request("PUT", f"/targets/podman:{id_b}/rules/recv", {"dst": [r.ip], "rate": "12mbit"})
    assert status == 200, f"{body}\n{agent.text()}"
    assert a.rates() == {"5348:1": "4Mbit"} and b.rates() == {"5348:1": "12Mbit"}
    assert os.path.isdir(a.pins) and os.path.isdir(b.pins)
    assert r.tc("qdisc", "show").count("htb") == 0  # the receiver is no target

    seconds = 3.0
    got_a = goodput(name_a, receiver, r.ip, seconds, 5311)
    got_b = goodput(name_b, receiver, r.ip, seconds, 5312)
    print(f"\nagent, containers: first shaping of container:NAME {first:.2f} s; measured container to container "
          f"over {seconds:.0f} s: {name_a} (4mbit) {got_a / 1e6:.2f} Mbit/s, {name_b} (12mbit) {got_b / 1e6:.2f} "
          "Mbit/s")
    assert 0.75 * 4e6 <= got_a <= 1.15 * 4e6
    assert 0.75 * 12e6 <= got_b <= 1.15 * 12e6
    assert 2.0 < got_b / got_a < 4.5  # as 12 to 4

    # No restart: the same process since the same start, still running.
    for n in (name_a, name_b):
        now = inspect(n)
        assert now["State"]["Running"] and now["State"]["Pid"] == before[n]["State"]["Pid"], n
        assert now["State"]["StartedAt"] == before[n]["State"]["StartedAt"] and now["RestartCount"] == 0, n

    # Other names of the same containers are the same targets: the bare name, the short id.
    status, body = node.request("GET", f"/targets/{name_a}/rules")
    assert status == 200 and [(x["name"], x["rate"]) for x in body["rules"]] == [("recv", "4mbit")], body
    status, body = node.request("GET", f"/targets/container:{id_b[:12]}/stats")
    assert status == 200 and body["rules"][0]["class_bytes"] > 1_000_000, body
    listed = targets(node)
    assert set(listed) == {f"container:{name_a}", f"podman:{id_b}"}, listed
    assert listed[f"container:{name_a}"]["container"] == name_a and listed[f"container:{name_a}"]["rules"] == 1
    assert listed[f"podman:{id_b}"]["container"] == name_b and listed[f"podman:{id_b}"]["netns"] == b.inode
    assert listed[f"podman:{id_b}"]["also_known_as"] == [f"container:{id_b[:12]}"]

    status, text = node.request("GET", "/metrics")
    assert status == 200
    sent = {(s["target"], s.get("container")) for s in series(text, "shaper_class_bytes_total")}
    assert sent == {(f"container:{name_a}", name_a), (f"podman:{id_b}", name_b)}, sent
    assert "shaper_agent_targets 2.0" in text

    # A's pod process goes: the container alone holds the namespace, which stays shaped.
    a.kill()
    time.sleep(4 * SWEEP_S)  # nothing to wait for but sweeps (two looks each) that should find it alive
    assert os.path.isdir(a.pins) and f"container:{name_a}" in targets(node), agent.text()
    # B's container goes first: the pod's process still holds the namespace.
    podman("rm", "--force", "--time", "0", name_b)
    time.sleep(4 * SWEEP_S)
    assert os.path.isdir(b.pins) and f"podman:{id_b}" in targets(node), agent.text()

    # Whichever goes last takes the namespace with it: the agent sweeps the target and its pins.
    started = time.monotonic()
    podman("rm", "--force", "--time", "0", name_a)
    removed = time.monotonic() - started
    assert wait_gone(a.pins, timeout=SWEEP_BOUND_S) is not None, agent.text()
    took_a = time.monotonic() - started
    b.kill()
    took_b = wait_gone(b.pins, timeout=SWEEP_BOUND_S)
    assert took_b is not None, agent.text()
    print(f"agent, containers: swept {took_a:.2f} s after `podman rm` of the namespace's last container began "
          f"(podman rm took {removed:.2f} s), {took_b:.2f} s after its pod's last process went")
    assert targets(node) == {}
    gone = {e["target"] for e in agent.logs() if e["event"] == "target.removed" and e["reason"] == "namespace gone"}
    assert gone == {f"container:{name_a}", f"podman:{id_b}"}, agent.text()
    assert agent.stop() == 0, agent.text()


def test_containers_that_are_no_targets(image, node, containers):
    agent = node.agent(env={"CONTAINERS_CONF": CONTAINERS_CONF})
    pod = node.pod()
    rule = {"dst": [pod.peer], "rate": "1mbit"}
    missing = containers()  # a name no container has
    status, body = node.request("PUT", f"/targets/container:{missing}/rules/x", rule)
    assert status == 404 and missing in body["error"], body
    status, body = node.request("PUT", f"/targets/podman:{missing}/rules/x", rule)
    assert status == 404 and missing in body["error"], body

    stopped = containers()
    run_in(image, stopped, pod)
    podman("stop", "--time", "0", stopped)
    assert inspect(stopped)["State"]["Running"] is False
    for spec in (f"container:{stopped}", stopped, f"podman:{stopped}"):
        status, body = node.request("PUT", f"/targets/{spec}/rules/x", rule)
        assert status == 404 and "not running" in body["error"] and stopped in body["error"], (spec, body)
    assert targets(node) == {} and not os.path.exists(pod.pins), agent.text()
    assert "htb" not in pod.tc("qdisc", "show")


def test_a_name_follows_its_container(image, node, containers):
    """A container removed and run again under its name (in another pod): the name is the new one's."""
    agent = node.agent(env={"CONTAINERS_CONF": CONTAINERS_CONF})
    a, b = node.pod(), node.pod()
    name = containers()
    first = run_in(image, name, a)
    status, body = node.request("PUT", f"/targets/container:{name}/rules/x", {"dst": [a.peer], "rate": "3mbit"})
    assert status == 200, f"{body}\n{agent.text()}"
    listed = targets(node)[f"container:{name}"]
    assert listed["container_id"] == first["Id"][:12] and listed["runtime"] == "podman", listed
    podman("rm", "--force", "--time", "0", name)
    status, body = node.request("GET", f"/targets/container:{name}/rules")
    assert status == 404 and "no running container" in body["error"], body  # not pod a's rules
    second = run_in(image, name, b)
    status, body = node.request("PUT", f"/targets/container:{name}/rules/x", {"dst": [b.peer], "rate": "5mbit"})
    assert status == 200, f"{body}\n{agent.text()}"
    assert b.rates() == {"5348:1": "5Mbit"} and a.rates() == {"5348:1": "3Mbit"}  # a's own shaping stays
    status, body = node.request("GET", f"/targets/container:{name}/rules")
    assert [r["rate"] for r in body["rules"]] == ["5mbit"], body
    # One name, one target: the earlier one is known by a process in its namespace now.
    listed = targets(node)
    assert {n: t["container_id"] for n, t in listed.items()} == {f"container:{name}": second["Id"][:12],
                                                                  f"pid:{a.pid}": first["Id"][:12]}, listed
    assert any(e["event"] == "target.renamed" and e["target"] == f"pid:{a.pid}" for e in agent.logs())
    status, text = node.request("GET", "/metrics")
    assert sorted(s["target"] for s in series(text, "shaper_rules")) == sorted(listed)
