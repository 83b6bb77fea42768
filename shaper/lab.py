"""Network-namespace labs, for `make demo` and the kernel and VM test tiers.

A Lab is a "pod" namespace whose veth leads to a "dst" namespace holding
every destination address.  Everything it creates it removes, shaper's state
included, even when a test fails.  Traffic goes only to addresses inside it.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POD_IF = "shp0"
V4 = {"pod": "10.77.0.1", "a": "10.77.0.2", "b": "10.77.0.3", "c": "10.77.1.5", "d": "10.77.0.4"}
V6 = {"pod": "fd77::1", "a": "fd77::2", "b": "fd77::3"}
CLIENT = {"client": "10.78.0.2", "gateway": "10.78.0.1"}  # Lab.add_client: a third namespace, routed by dst


def sh(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout)


def netem_available() -> bool:
    """Try a netem qdisc in a scratch namespace (a module may autoload; built-in shows no /sys/module)."""
    ns = f"shp-probe-{uuid.uuid4().hex[:6]}"
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "add", "name", "p0", "type", "veth", "peer", "name", "p1")
        return sh("tc", "-n", ns, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms",
                  check=False).returncode == 0
    finally:
        sh("ip", "netns", "del", ns, check=False)


def vm_kernel() -> str | None:
    """Debian's generic stock kernel (netem as a module, 9p for virtme-ng), the newest."""
    images = [p for p in glob.glob("/boot/vmlinuz-*-amd64") if "cloud" not in p]
    key = lambda p: [int(x) if x.isdigit() else x for x in re.split(r"[.-]", p)]  # noqa: E731
    return sorted(images, key=key)[-1] if images else None


def vng_path() -> str | None:
    cand = Path(sys.executable).parent / "vng"
    return str(cand) if cand.exists() else shutil.which("vng")


def run_in_vm(command: str, rwdir: str, *, capture: bool = False,
              timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a shell command as root in a VM booting Debian's stock kernel (virtme-ng, TCG).

    The VM sees this host's filesystem read-only, `rwdir` writable (also its
    TMPDIR), the netem/HTB/clsact/cls_bpf/veth modules loaded, and starts in
    the source tree.  /dev/kvm does not work for a guest here, hence TCG."""
    kernel, vng = vm_kernel(), vng_path()
    if not kernel or not vng:
        raise RuntimeError("no VM kernel (linux-image-amd64) or virtme-ng (vng): run `make setup`")
    script = Path(rwdir) / "guest.sh"
    script.write_text(
        "set -e\n"
        "modprobe -a sch_netem sch_htb sch_ingress cls_bpf veth\n"
        f"cd {ROOT}\n"
        f"export PYTHONDONTWRITEBYTECODE=1 TMPDIR={rwdir}\n"
        f"{command}\n"
    )
    # vng runs virtme-run from PATH: the venv's bin must be on it.
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"}
    cmd = [vng, "-r", kernel, "--disable-kvm", "--force-9p", "--memory", "2G", "--cpus", "2",
           "--rwdir", str(rwdir), "--exec", f"bash {script}"]
    return subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout, env=env, cwd=ROOT,
                          stdin=subprocess.DEVNULL)


def make_netns(name: str) -> str:
    """A new network namespace with its loopback up (removed again if that fails)."""
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
    except BaseException:
        sh("ip", "netns", "del", name, check=False)
        raise
    return name


class Lab:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.pod = f"shp-{tag}-pod"
        self.dst = f"shp-{tag}-dst"
        self.created: list[str] = []
        self.daemons: list[Daemon] = []

    def __enter__(self) -> "Lab":
        try:
            for ns in (self.pod, self.dst):
                self.created.append(make_netns(ns))
            self.make_link()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def make_link(self) -> None:
        """The veth pair pod/shp0 <-> dst/shp1 with every address (again, after delete_link)."""
        sh("ip", "-n", self.pod, "link", "add", "name", POD_IF, "type", "veth", "peer", "name", "shp1",
           "netns", self.dst)
        sh("ip", "-n", self.pod, "link", "set", POD_IF, "up")
        sh("ip", "-n", self.dst, "link", "set", "shp1", "up")
        sh("ip", "-n", self.pod, "addr", "add", f"{V4['pod']}/16", "dev", POD_IF)
        sh("ip", "-n", self.pod, "addr", "add", f"{V6['pod']}/64", "dev", POD_IF, "nodad")
        for name, addr in V4.items():
            if name != "pod":
                sh("ip", "-n", self.dst, "addr", "add", f"{addr}/16", "dev", "shp1")
        for name, addr in V6.items():
            if name != "pod":
                sh("ip", "-n", self.dst, "addr", "add", f"{addr}/64", "dev", "shp1", "nodad")
        # Warm neighbour caches so the first measured packet is not an ARP/ND wait.
        for addr in list(V4.values())[1:] + list(V6.values())[1:]:
            self.ping(addr, count=1, check=False)

    def add_client(self) -> str:
        """A "client" namespace (another pod of the cluster), reaching the pod through the dst
        namespace, which routes; returns its name. Traffic from the pod to it leaves by shp0."""
        ns = self.pod.replace("-pod", "-cli")
        self.created.append(make_netns(ns))
        sh("ip", "-n", ns, "link", "add", "name", "cli0", "type", "veth", "peer", "name", "shc1", "netns", self.dst)
        sh("ip", "-n", ns, "addr", "add", f"{CLIENT['client']}/24", "dev", "cli0")
        sh("ip", "-n", ns, "link", "set", "cli0", "up")
        sh("ip", "-n", self.dst, "addr", "add", f"{CLIENT['gateway']}/24", "dev", "shc1")
        sh("ip", "-n", self.dst, "link", "set", "shc1", "up")
        sh("ip", "netns", "exec", self.dst, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        sh("ip", "-n", ns, "route", "add", "default", "via", CLIENT["gateway"])
        sh("ip", "-n", self.pod, "route", "add", f"{CLIENT['client']}/32", "via", V4["d"])
        return ns

    def delete_link(self) -> None:
        """Remove the pair, as when a pod's interface goes away (its tc objects go with it)."""
        sh("ip", "-n", self.pod, "link", "del", POD_IF)

    def __exit__(self, *exc: object) -> None:
        for daemon in self.daemons:
            daemon.kill()
        if self.pod in self.created:
            self.shaper("reset", check=False)
        for ns in reversed(self.created):
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()
        (Path(tempfile.gettempdir()) / f"{self.pod}-rules.yaml").unlink(missing_ok=True)

    # -- helpers ------------------------------------------------------------------------
    def shaper(self, *args: str, check: bool = True, rules: str | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "shaper", *args, "--iface", POD_IF, "--netns", self.pod]
        if rules is not None:
            path = Path(tempfile.gettempdir()) / f"{self.pod}-rules.yaml"
            path.write_text(rules)
            cmd += ["-f", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def cli(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a shaper client command inside the pod namespace (where the daemon listens)."""
        cmd = ["nsenter", f"--net=/run/netns/{self.pod}", sys.executable, "-m", "shaper", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, **(env or {})})
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def daemon(self, *args: str, port: int = 2332, wait: bool = True) -> "Daemon":
        """Start `shaper run --iface shp0` inside the pod namespace, listening on its loopback."""
        d = Daemon(self.pod, port, args)
        self.daemons.append(d)
        if wait:
            d.wait_ready()
        return d

    def show(self) -> dict[str, dict]:
        out = self.shaper("show", "-o", "json").stdout
        return {r["name"]: r for r in json.loads(out)["rules"]}

    def ping(self, addr: str, count: int = 5, interval: float = 0.01, check: bool = True,
             timeout: float = 120) -> dict:
        proc = sh("ip", "netns", "exec", self.pod, "ping", "-n", "-q", "-c", str(count), "-i", str(interval),
                  "-W", "2", addr, check=False, timeout=timeout)
        if check and proc.returncode not in (0, 1):
            raise AssertionError(proc.stderr)
        return parse_ping(proc.stdout)

    def send_udp(self, addr: str, count: int, size: int = 64) -> None:
        code = ("import socket,sys;a=sys.argv[1];f=socket.AF_INET6 if ':' in a else socket.AF_INET;"
                "s=socket.socket(f,socket.SOCK_DGRAM);[s.sendto(b'x'*int(sys.argv[3]),(a,9)) "
                "for _ in range(int(sys.argv[2]))]")
        sh("ip", "netns", "exec", self.pod, sys.executable, "-c", code, addr, str(count), str(size))

    def throughput(self, addr: str, seconds: float = 2) -> float:
        """TCP goodput from the pod to `addr` in bit/s, measured by the receiver.

        A small Python sender/receiver rather than iperf3: iperf3 needs a
        writable /tmp, which a VM sharing the host's root read-only lacks."""
        server = subprocess.Popen(["ip", "netns", "exec", self.dst, sys.executable, "-c", _RECEIVER, addr],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            listening = lambda: f"{addr}:5201" in sh("ip", "netns", "exec", self.dst, "ss", "-ltnH").stdout  # noqa
            if not wait_until(listening, 10):
                raise RuntimeError(f"receiver on {addr} did not start: {server.stderr.read() if server.poll() else ''}")
            sh("ip", "netns", "exec", self.pod, sys.executable, "-c", _SENDER, addr, str(seconds),
               timeout=60 + 2 * seconds)
            out, err = server.communicate(timeout=30 + seconds)
            if server.returncode != 0:
                raise RuntimeError(f"receiver on {addr} failed: {err.strip()}")
            return float(out)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()

    def tc_state(self) -> str:
        """What `tc` shows of the pod interface, without counters."""
        parts = [sh("tc", "-n", self.pod, "qdisc", "show", "dev", POD_IF).stdout,
                 sh("tc", "-n", self.pod, "class", "show", "dev", POD_IF).stdout]
        for where in ("ingress", "egress"):
            parts.append(sh("tc", "-n", self.pod, "filter", "show", "dev", POD_IF, where, check=False).stdout)
        return re.sub(r"direct_packets_stat \d+ ", "", "\n".join(parts))

    def handles(self) -> list[str]:
        """Kinds and handles of every qdisc and class: changes if any object is recreated."""
        out = []
        for what in ("qdisc", "class"):
            for line in sh("tc", "-n", self.pod, what, "show", "dev", POD_IF).stdout.splitlines():
                out.append(" ".join(line.split()[:5]))
        return sorted(out)


class Daemon:
    """A `shaper run` in a namespace (as in a pod: nsenter keeps the host's /sys/fs/bpf)."""

    def __init__(self, netns: str, port: int, args: tuple[str, ...]):
        self.netns = netns
        self.port = port
        self.log = tempfile.NamedTemporaryFile(prefix=f"{netns}-daemon-", suffix=".log", delete=False)
        cmd = ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-m", "shaper", "run", "--iface", POD_IF,
               "--listen", f"127.0.0.1:{port}", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, cwd=ROOT)

    def logs(self) -> list[dict]:
        with open(self.log.name) as f:
            return [json.loads(line) for line in f if line.startswith("{")]

    def log_text(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shaper run exited {self.proc.returncode}: {self.log_text()}")
            try:
                return self.request("GET", "/readyz")[0] == 200
            except OSError:
                return False

        if not wait_until(ready, timeout, 0.1):
            raise RuntimeError(f"shaper run not ready after {timeout}s: {self.log_text()}")

    def request(self, method: str, path: str, body: object = None, token: str | None = None,
                raw: bytes | None = None, headers: dict | None = None) -> tuple[int, object]:
        conn = NetnsHTTPConnection(self.netns, "127.0.0.1", self.port, timeout=120)
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            text = resp.read()
            ctype = resp.getheader("Content-Type", "")
            return resp.status, (json.loads(text) if ctype.startswith("application/json") else text.decode())
        finally:
            conn.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        if os.path.exists(self.log.name):
            os.unlink(self.log.name)


def netns_connect(netns: str, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection made from inside a named network namespace."""
    from .tc import in_netns

    return in_netns(netns, lambda: socket.create_connection((host, port), timeout=timeout))


class NetnsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, netns: str, host: str, port: int, timeout: float = 30):
        super().__init__(host, port, timeout=timeout)
        self.netns = netns

    def connect(self) -> None:
        self.sock = netns_connect(self.netns, self.host, self.port, self.timeout)


_RECEIVER = """
import socket, sys, time
addr = sys.argv[1]
srv = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, 5201))
srv.listen(1)
conn, _ = srv.accept()
total, first, last = 0, None, None
while True:
    data = conn.recv(1 << 16)
    if not data:
        break
    last = time.monotonic()
    first = first or last
    total += len(data)
print(total * 8 / (last - first) if last and last > first else 0.0)
"""
_SENDER = """
import socket, sys, time
addr, seconds = sys.argv[1], float(sys.argv[2])
s = socket.create_connection((addr, 5201), timeout=30)
buf = bytes(1 << 16)
end = time.monotonic() + seconds
while time.monotonic() < end:
    s.sendall(buf)
s.close()
"""


def parse_ping(text: str) -> dict:
    out = {"sent": 0, "received": 0, "loss_pct": 100.0, "min": None, "avg": None, "max": None, "mdev": None}
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    if m:
        out["sent"], out["received"] = int(m.group(1)), int(m.group(2))
        out["loss_pct"] = 100.0 * (1 - out["received"] / out["sent"]) if out["sent"] else 100.0
    m = re.search(r"\+(\d+) duplicates", text)
    out["duplicates"] = int(m.group(1)) if m else 0
    m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", text)
    if m:
        out["min"], out["avg"], out["max"], out["mdev"] = map(float, m.groups())
    return out


def wait_until(pred, timeout: float = 10, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()
