"""The node agent with netem, inside the VM: a delay put on a running "pod" through the agent's API
from a client namespace, measured with ping from the pod; its neighbour pod is not delayed.
(The agent's other behaviour is measured in the kernel tier, tests/kernel/test_agent.py.)"""

import os

from lab import parse_ping
from lab.node import Node

DELAY_MS = 40


def ping(pod, addr: str, count: int = 20) -> dict:
    return parse_ping(pod.run("ping", "-n", "-c", str(count), "-i", "0.05", "-W", "2", addr, check=False).stdout)


def test_delay_on_a_running_pod():
    assert os.path.exists("/sys/module/sch_netem"), "the guest kernel must have sch_netem loaded"
    with Node() as node:
        agent = node.agent(how="ip-netns-exec")
        a, b = node.pod(), node.pod()  # after the agent started, as pods come and go on a node
        before = {p.ip: ping(p, p.peer)["median"] for p in (a, b)}
        status, body = node.request("PUT", f"/targets/{a.ip}/rules/peer", {"dst": [a.peer], "delay": f"{DELAY_MS}ms"})
        assert status == 200, body
        after = {p.ip: ping(p, p.peer)["median"] for p in (a, b)}
        print(f"\nagent (VM): ping pod a -> node {before[a.ip]:.2f} -> {after[a.ip]:.2f} ms with delay {DELAY_MS}ms; "
              f"pod b {before[b.ip]:.2f} -> {after[b.ip]:.2f} ms (no rule)")
        assert after[a.ip] >= DELAY_MS and DELAY_MS - 3 < after[a.ip] - before[a.ip] < DELAY_MS + 25
        assert after[b.ip] < before[b.ip] + 10
        assert "netem" in a.tc("qdisc", "show") and "netem" not in b.tc("qdisc", "show")

        # Taken off again through the agent: the pod is as it was.
        status, body = node.request("DELETE", f"/targets/{a.ip}")
        assert status == 200 and "htb root" in body["removed"], body
        assert ping(a, a.peer)["median"] < before[a.ip] + 10
        assert agent.stop() == 0
