"""A node for the agent's tests: the node's network namespace, a client, and "pods" made later.

- the node: a named namespace where `shaper agent` runs (it is the agent's "hostNetwork");
- the client: a named namespace with a veth to the node, from which requests come, the way a
  test harness elsewhere in the cluster reaches the agent on the pod's hostIP;
- pods: processes in namespaces of their own with no name (`unshare -n`), each with an eth0
  whose peer is in the node, as a CNI plugin would make them.  Killing a pod's process is the
  namespace going away, as when a pod is deleted.

Everything is removed on exit, pins of the pods' namespaces included.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from lab import NetnsHTTPConnection, make_netns, sh, stop_or_dump, wait_until

NODE_IP, CLIENT_IP = "10.79.0.1", "10.79.0.2"
AGENT_PORT = 2333
TOKEN = "agent-tier-token-0123456789abcdef"
BPFFS = os.environ.get("SHAPER_BPFFS", "/sys/fs/bpf")


def pod_ips(i: int, base: int = 80) -> tuple[str, str]:
    """(the pod's address, its peer's in the node) of pod number i (0..1023) of a node whose pods' addresses
    start at 10.<base>.0.0: each node its own, since the agent finds a pod by its address on the whole host."""
    return f"10.{base + i // 256}.{i % 256}.2", f"10.{base + i // 256}.{i % 256}.1"


class Pod:
    def __init__(self, node: "Node", i: int):
        self.i = i
        self.ip, self.peer = pod_ips(i, node.base)
        self.proc = subprocess.Popen(["unshare", "-n", "sleep", "3600"], start_new_session=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        mine = os.stat("/proc/self/ns/net").st_ino
        if not wait_until(lambda: _inode(self.pid) not in (None, mine), timeout=30):
            self.kill()
            raise RuntimeError(f"unshare -n (pid {self.pid}) made no namespace within 30 s")
        self.inode = _inode(self.pid)
        self.link = f"{node.tag}p{i}"
        sh("ip", "-n", node.name, "link", "add", self.link, "type", "veth", "peer", "name", "eth0",
           "netns", str(self.pid))
        sh("ip", "-n", node.name, "addr", "add", f"{self.peer}/24", "dev", self.link)
        sh("ip", "-n", node.name, "link", "set", self.link, "up")
        self.run("ip", "addr", "add", f"{self.ip}/24", "dev", "eth0")
        self.run("ip", "link", "set", "eth0", "up")
        self.run("ip", "link", "set", "lo", "up")
        self.run("ip", "route", "add", "default", "via", self.peer)

    @property
    def netns(self) -> str:
        """What lab.tcp_goodput and lab.in_namespace take for it."""
        return f"pid:{self.pid}"

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("nsenter", "-t", str(self.pid), "-n", *cmd, check=check)

    def tc(self, *what: str) -> str:
        return self.run("tc", *what, "dev", "eth0").stdout

    def qdiscs(self) -> str:
        """`tc qdisc show` of eth0 without HTB's direct_packets_stat, a traffic counter: what shaper made
        there, which a pod's own packets (IPv6 neighbour and router solicitations) do not change."""
        return re.sub(r"direct_packets_stat \d+", "direct_packets_stat -", self.tc("qdisc", "show"))

    def rates(self) -> dict[str, str]:
        """classid -> rate of the HTB classes on eth0."""
        return dict(re.findall(r"class htb (\S+) .*?rate (\S+)", self.tc("class", "show")))

    @property
    def pins(self) -> str:
        return os.path.join(BPFFS, "shaper", f"{self.inode}-eth0")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Agent:
    def __init__(self, node: "Node", how: str, args: tuple[str, ...], env: dict[str, str] | None = None):
        self.log = tempfile.NamedTemporaryFile(prefix="shaper-agent-", suffix=".log", delete=False)
        enter = ["ip", "netns", "exec", node.name] if how == "ip-netns-exec" else \
            ["nsenter", f"--net=/run/netns/{node.name}"]
        self.proc = subprocess.Popen([*enter, sys.executable, "-m", "shaper", "agent", "--listen",
                                      f"{NODE_IP}:{AGENT_PORT}", "--token-file", node.token_file, *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **env} if env else None,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def logs(self) -> list[dict]:
        with open(self.log.name) as f:
            return [json.loads(line) for line in f if line.startswith("{")]

    def text(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    @property
    def pid(self) -> int:
        """The agent's own process (ip netns exec and nsenter exec it; the log says)."""
        return next(e["pid"] for e in self.logs() if e["event"] == "agent.listen")

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None and not stop_or_dump(self.proc, sig, timeout):
            raise RuntimeError(f"shaper agent still running {timeout:.0f}s after {signal.Signals(sig).name}, "
                               f"aborted (its stacks end the log):\n" + self.text())
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


class Node:
    def __init__(self) -> None:
        self.tag = "sha" + uuid.uuid4().hex[:5]
        self.base = random.randrange(80, 160, 4)  # 10.<base>.0.0/14: unlikely to be another node's at once
        self.name = f"{self.tag}-node"
        self.client = f"{self.tag}-cli"
        self.pods: list[Pod] = []
        self.agents: list[Agent] = []
        self.created: list[str] = []
        fd, self.token_file = tempfile.mkstemp(prefix="shaper-agent-token-")
        os.write(fd, TOKEN.encode())
        os.close(fd)

    def __enter__(self) -> "Node":
        try:
            for ns in (self.name, self.client):
                self.created.append(make_netns(ns))
            sh("ip", "-n", self.client, "link", "add", "cl0", "type", "veth", "peer", "name", "nc0",
               "netns", self.name)
            sh("ip", "-n", self.client, "addr", "add", f"{CLIENT_IP}/24", "dev", "cl0")
            sh("ip", "-n", self.name, "addr", "add", f"{NODE_IP}/24", "dev", "nc0")
            sh("ip", "-n", self.client, "link", "set", "cl0", "up")
            sh("ip", "-n", self.name, "link", "set", "nc0", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for agent in self.agents:
            try:
                pid = agent.pid
            except (OSError, StopIteration, ValueError):
                pid = None
            agent.close()
            if pid is not None:  # an agent killed leaves its spare classifier (shaper.agent.spares)
                shutil.rmtree(os.path.join(BPFFS, "shaper", f"_spare-{pid}"), ignore_errors=True)
                shutil.rmtree(os.path.join(BPFFS, "shaper", f"_spare-{pid}_new"), ignore_errors=True)
        for pod in self.pods:
            pod.kill()
        for ns in reversed(self.created):
            sh("ip", "netns", "del", ns, check=False)
        for pod in self.pods:  # the agent keeps shaping on exit: pins of namespaces now gone
            shutil.rmtree(pod.pins, ignore_errors=True)
        try:
            os.rmdir(os.path.join(BPFFS, "shaper"))
        except OSError:
            pass
        os.unlink(self.token_file)

    def pod(self) -> Pod:
        pod = Pod(self, len(self.pods))
        self.pods.append(pod)
        return pod

    def agent(self, *args: str, how: str = "nsenter", wait: bool = True, env: dict[str, str] | None = None) -> Agent:
        """`shaper agent` in the node's namespace; `env` is added to this process's environment for it
        (e.g. CONTAINERS_CONF, so the podman it asks sees what the test's podman calls see)."""
        agent = Agent(self, how, args, env)
        self.agents.append(agent)
        if wait:
            ok = wait_until(lambda: agent.proc.poll() is not None or self._ready(), timeout=120, step=0.1)
            if not ok or agent.proc.poll() is not None:
                raise RuntimeError(f"shaper agent not ready within 120 s ({agent.proc.poll()=}):\n{agent.text()}")
        return agent

    def _ready(self) -> bool:
        try:
            return self.request("GET", "/readyz", timeout=2)[0] == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body: object = None, token: str | None = TOKEN,
                timeout: float = 120) -> tuple[int, object]:
        """A request from the client namespace to the agent on the node's address."""
        conn = NetnsHTTPConnection(self.client, NODE_IP, AGENT_PORT, timeout=timeout)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                         headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            ctype = resp.getheader("Content-Type", "")
            return resp.status, (json.loads(raw) if ctype.startswith("application/json") else raw.decode())
        finally:
            conn.close()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """The shaper CLI from the client namespace, at the agent."""
        return sh("ip", "netns", "exec", self.client, sys.executable, "-m", "shaper", *args,
                  "--server", f"http://{NODE_IP}:{AGENT_PORT}", "--token-file", self.token_file, check=check)


def _inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def wait_gone(path: str, timeout: float = 30) -> float | None:
    """Seconds until `path` no longer exists, or None if it is still there after `timeout`."""
    start = time.monotonic()
    if wait_until(lambda: not os.path.exists(path), timeout=timeout, step=0.05):
        return time.monotonic() - start
    return None
