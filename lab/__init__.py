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
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
POD_IF = "shp0"
V4 = {"pod": "10.77.0.1", "a": "10.77.0.2", "b": "10.77.0.3", "c": "10.77.1.5", "d": "10.77.0.4"}
V6 = {"pod": "fd77::1", "a": "fd77::2", "b": "fd77::3"}
CLIENT = {"client": "10.78.0.2", "gateway": "10.78.0.1"}  # Lab.add_client: a third namespace, routed by dst


# Generous: the first bcc compile in a loaded TCG guest, on a cold 9p page cache, has taken
# over a minute.  Waits poll a condition, so the bound costs nothing when things go well.
READY_TIMEOUT_S = float(os.environ.get("SHAPER_READY_TIMEOUT_S", "120"))
GUEST_READY_TIMEOUT_S = 300  # TCG is several times slower again when the host is busy
VM_DIED = 255  # vng's status when the guest ended without the script's (a panic, qemu gone)


def stop_or_dump(proc: subprocess.Popen, sig: int, timeout: float) -> bool:
    """Send `sig` and wait for the process; True if it exited.  If it did not, SIGABRT makes
    shaper write every thread's stack to its log (faulthandler) before it dies, so the failure
    says where it was stuck; SIGKILL if even that does not end it."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGABRT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return False


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


def _version_key(path: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"[.+~-]", path)]


def vm_kernels() -> list[str]:
    """Debian's generic stock kernels in /boot (netem as a module, 9p for virtme-ng), oldest first.

    Found by glob, never by version: Debian moves them.  The cloud flavour has no 9p."""
    images = [p for p in glob.glob("/boot/vmlinuz-*-amd64") if "cloud" not in p]
    return sorted(images, key=_version_key)


def vm_kernel() -> str | None:
    """The newest of vm_kernels()."""
    images = vm_kernels()
    return images[-1] if images else None


def kernel_release(image: str) -> str:
    return Path(image).name.removeprefix("vmlinuz-")


def vm_kernel_problem(image: str) -> str | None:
    """Why a guest on this kernel could not run shaper: bcc compiles against its headers,
    netem must be a module it can load."""
    rel = kernel_release(image)
    if not Path(f"/lib/modules/{rel}/build/include").is_dir():
        return f"no headers for {rel} (/lib/modules/{rel}/build): install linux-headers-{rel}"
    if not glob.glob(f"/lib/modules/{rel}/kernel/net/sched/sch_netem.ko*"):
        return f"{rel} has no sch_netem module"
    return None


def vng_path() -> str | None:
    cand = Path(sys.executable).parent / "vng"
    return str(cand) if cand.exists() else shutil.which("vng")


def run_in_vm(command: str, rwdir: str, *, kernel: str | None = None, capture: bool = False,
              timeout: float | None = None, on_line=None, console: bool = False) -> subprocess.CompletedProcess:
    """Run a shell command as root in a VM booting one of Debian's stock kernels (virtme-ng, TCG).

    The VM sees this host's filesystem read-only, `rwdir` writable (also its
    TMPDIR), the netem/HTB/clsact/cls_bpf/veth/ifb/8021q modules loaded, and starts in
    the source tree.  /dev/kvm does not work for a guest here, hence TCG.
    `kernel` is an image path (default: the newest).  With `on_line`, each line
    of output (the guest's and vng's, merged) is passed to it as it arrives and
    also returned.  On a timeout the whole VM (vng, qemu) is killed before
    subprocess.TimeoutExpired is raised.

    With `console`, the guest kernel's console at loglevel 5 (errors and warnings: an oops,
    a WARN splat, a panic's report) goes to stderr, so with `on_line` it is among the
    lines.  Without it a guest that panics leaves nothing but vng's exit status 255
    (VM_DIED): vng boots with panic=-1, and qemu ends without the script's status."""
    kernel, vng = kernel or vm_kernel(), vng_path()
    if not kernel or not vng:
        raise RuntimeError("no VM kernel (linux-image-amd64) or virtme-ng (vng): run `make setup`")
    script = Path(rwdir) / "guest.sh"
    script.write_text(
        "set -e\n"
        "modprobe -a sch_netem sch_htb sch_ingress cls_bpf act_mirred veth ifb 8021q\n"
        f"cd {ROOT}\n"
        f"export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TMPDIR={rwdir} "
        f"SHAPER_READY_TIMEOUT_S={GUEST_READY_TIMEOUT_S:.0f}\n"
        f"{command}\n"
    )
    # vng runs virtme-run from PATH: the venv's bin must be on it.
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"}
    cmd = [vng, "-r", kernel, "--disable-kvm", "--force-9p", "--memory", "2G", "--cpus", "2",
           "--rwdir", str(rwdir), "--exec", f"bash {script}"]
    if console:
        # --verbose shows the boot console; loglevel=5 (the last loglevel wins) keeps only
        # what is worse than a notice.  An oops raises the level by itself.
        cmd[-2:-2] = ["--verbose", "--append", "loglevel=5"]
    piped = capture or on_line is not None
    # Its own session, so a timeout or an interrupt can end qemu as well as vng.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if piped else None,
                            stderr=(subprocess.STDOUT if on_line else subprocess.PIPE) if piped else None,
                            text=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        if on_line is None:
            out, err = proc.communicate(timeout=timeout)
        else:
            lines: list[str] = []

            def read() -> None:
                for line in proc.stdout:
                    lines.append(line)
                    on_line(line.rstrip("\n"))

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            proc.wait(timeout)
            reader.join()
            out, err = "".join(lines), ""
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


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
    def __init__(self, reset_on_exit: bool = True) -> None:
        """reset_on_exit=False: the caller removes shaper's state itself (the demo, whose
        daemon does; `shaper reset` costs ~20 s of imports in a TCG guest)."""
        tag = uuid.uuid4().hex[:6]
        self.pod = f"shp-{tag}-pod"
        self.dst = f"shp-{tag}-dst"
        self.created: list[str] = []
        self.daemons: list[Daemon] = []
        self.reset_on_exit = reset_on_exit

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
        if self.pod in self.created and self.reset_on_exit:
            self.shaper("reset", check=False)
        for ns in reversed(self.created):
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()
        (Path(tempfile.gettempdir()) / f"{self.pod}-rules.yaml").unlink(missing_ok=True)

    # -- helpers ------------------------------------------------------------------------
    def shaper(self, *args: str, check: bool = True, rules: str | None = None,
               env: dict | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "shaper", *args, "--iface", POD_IF, "--netns", self.pod]
        if rules is not None:
            path = Path(tempfile.gettempdir()) / f"{self.pod}-rules.yaml"
            path.write_text(rules)
            cmd += ["-f", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, **env} if env else None)
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

    def daemon(self, *args: str, port: int = 2332, wait: bool = True, env: dict | None = None) -> "Daemon":
        """Start `shaper run --iface shp0` inside the pod namespace, listening on its loopback; `env` is
        added to this process's environment for it."""
        d = Daemon(self.pod, port, args, env)
        self.daemons.append(d)
        if wait:
            self.wait_ready(d)
        return d

    def stop_daemons(self) -> None:
        """Stop the daemons still running (a test that failed half-way), so the next test
        on this lab does not find shp0 claimed; reset if one had to be killed."""
        killed = False
        for d in self.daemons:
            if d.proc.poll() is None:
                killed |= "SIGKILL" in d.terminate()
        if killed:
            self.shaper("reset", check=False)

    def wait_ready(self, d: "Daemon", timeout: float | None = None) -> None:
        """d.wait_ready, and after a failed start also remove what that daemon may have left
        (a SIGKILL leaves its tc objects and pins), so the next test starts clean."""
        try:
            d.wait_ready(timeout)
        except RuntimeError:
            self.shaper("reset", check=False)
            raise

    def show(self) -> dict[str, dict]:
        """Each rule's row by name: its egress row when it has one (`show` gives one row per direction)."""
        out = self.shaper("show", "-o", "json").stdout
        rows: dict[str, dict] = {}
        for r in json.loads(out)["rules"]:
            rows.setdefault(r["name"], r)
        return rows

    def ping(self, addr: str, count: int = 5, interval: float = 0.01, check: bool = True,
             timeout: float = 120) -> dict:
        proc = sh("ip", "netns", "exec", self.pod, "ping", "-n", "-c", str(count), "-i", str(interval),
                  "-W", "2", addr, check=False, timeout=timeout)
        if check and proc.returncode not in (0, 1):
            raise AssertionError(proc.stderr)
        return parse_ping(proc.stdout)

    def ping_during(self, addr: str, action, count: int = 300, interval: float = 0.01, lead_s: float = 0.5) -> dict:
        """Ping `addr` from the pod (`count` at `interval`) while `action()` runs, started `lead_s` into
        the pings; returns the pings' summary (parse_ping) once both are done."""
        result: dict = {}

        def pings() -> None:
            proc = subprocess.run(["ip", "netns", "exec", self.pod, "ping", "-n", "-q", "-c", str(count), "-i",
                                   str(interval), addr], capture_output=True, text=True, timeout=120 + count * interval)
            result.update(parse_ping(proc.stdout))

        t = threading.Thread(target=pings)
        t.start()
        try:
            time.sleep(lead_s)
            action()
        finally:
            t.join()
        return result

    def send_udp(self, addr: str, count: int, size: int = 64) -> None:
        code = ("import socket,sys;a=sys.argv[1];f=socket.AF_INET6 if ':' in a else socket.AF_INET;"
                "s=socket.socket(f,socket.SOCK_DGRAM);[s.sendto(b'x'*int(sys.argv[3]),(a,9)) "
                "for _ in range(int(sys.argv[2]))]")
        sh("ip", "netns", "exec", self.pod, sys.executable, "-c", code, addr, str(count), str(size))

    def throughput(self, addr: str, seconds: float = 2, start_timeout: float = 120, *,
                   incoming: bool = False) -> float:
        """TCP goodput from the pod to `addr` in bit/s (incoming: from `addr` to the pod, which the
        pod receives), measured by the receiver over `seconds` from its first byte (so data still
        queued behind a slow class when the sender stops is not waited for).

        A small Python sender/receiver rather than iperf3: iperf3 needs a
        writable /tmp, which a VM sharing the host's root read-only lacks."""
        pod_addr = V6["pod"] if ":" in addr else V4["pod"]
        # The receiver listens where the data goes; the sender binds `addr` when it is the peer, so
        # the pod sees the packets come from `addr` (the dst namespace holds every peer address).
        if incoming:
            return tcp_goodput(self.dst, addr, self.pod, pod_addr, seconds, start_timeout=start_timeout)
        return tcp_goodput(self.pod, "", self.dst, addr, seconds, start_timeout=start_timeout)

    def connect_ms(self, addr: str, port: int, count: int = 20, *, incoming: bool = False) -> dict:
        """TCP connect() times in ms between the pod and `addr`:`port` (incoming: from `addr`, bound
        as the source port `port`, to the pod's port 5202), `count` of them: min, median, max.  One
        round trip each (SYN out, SYN-ACK back), so a delay either way shows in full."""
        pod_addr = V6["pod"] if ":" in addr else V4["pod"]
        listener, listen, lport, client, target, tport, source = (
            (self.pod, pod_addr, 5202, self.dst, pod_addr, 5202, (addr, port)) if incoming else
            (self.dst, addr, port, self.pod, addr, port, None))
        server = subprocess.Popen(["ip", "netns", "exec", listener, sys.executable, "-u", "-c", _ACCEPTOR, listen,
                                   str(lport)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([server.stdout], [], [], 120)
            if not ready or server.stdout.readline().strip() != "listening":
                raise RuntimeError(f"acceptor on {listen}:{lport} (netns {listener}) did not start")
            src = f"{source[0]},{source[1]}" if source else ""
            proc = sh("ip", "netns", "exec", client, sys.executable, "-c", _CONNECTOR, target, str(tport),
                      str(count), src, timeout=120 + count * 5)
            times = sorted(float(x) for x in proc.stdout.split())
            return {"min": times[0], "median": times[len(times) // 2], "max": times[-1], "count": len(times)}
        finally:
            server.kill()
            server.wait()

    @contextmanager
    def pinned_maps(self) -> Iterator:
        """The pod interface's datapath with its pinned maps open, to read what the kernel holds
        (no claim, nothing attached); closed on leaving."""
        from shaper.datapath.kernel import KernelDatapath

        dp = KernelDatapath(POD_IF, self.pod)
        try:
            dp.open_maps()
            yield dp
        finally:
            dp.close()

    @staticmethod
    def trie_hosts(dp) -> dict[bytes, bytes]:
        """address -> raw value of the whole-address entries (HOST_PREFIXLEN) of `dp`'s destination
        trie: what its host hash (dst_host) must hold, value for value."""
        from shaper.datapath import abi
        from shaper.datapath.kernel import HOST_PREFIXLEN

        return {addr: v for prefixlen, addr, v in ((*abi.unpack_key(k), v) for k, v in dp.lpm.items())
                if prefixlen == HOST_PREFIXLEN}

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

    def __init__(self, netns: str, port: int, args: tuple[str, ...], env: dict | None = None):
        self.netns = netns
        self.port = port
        self.log = tempfile.NamedTemporaryFile(prefix=f"{netns}-daemon-", suffix=".log", delete=False)
        cmd = ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-m", "shaper", "run", "--iface", POD_IF,
               "--listen", f"127.0.0.1:{port}", *args]
        # Its own process group, as under a supervisor: tests can signal the group (killpg).
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, cwd=ROOT, start_new_session=True,
                                     env={**os.environ, **env} if env else None)

    def logs(self) -> list[dict]:
        with open(self.log.name) as f:
            return [json.loads(line) for line in f if line.startswith("{")]

    def log_text(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for GET /readyz to answer 200.  On timeout or an early exit the daemon
        is stopped (so it holds neither the interface nor its claim for the next
        test) and the error says what was awaited, for how long, and the daemon's log."""
        timeout = READY_TIMEOUT_S if timeout is None else timeout
        what = f"GET /readyz on 127.0.0.1:{self.port} in netns {self.netns}"
        start = time.monotonic()

        def ready() -> bool:
            if self.proc.poll() is not None:
                return True
            # Its own log first: another daemon left on the port would answer /readyz too.
            if '"daemon.ready"' not in self.log_text():
                return False
            try:
                return self.request("GET", "/readyz", timeout=10)[0] == 200
            except OSError:
                return False

        ok = wait_until(ready, timeout, 0.2)
        waited = time.monotonic() - start
        if ok and self.proc.poll() is None:
            return
        if self.proc.poll() is not None:
            why = f"shaper run exited {self.proc.returncode} after {waited:.1f}s while waiting for {what}"
        else:
            why = f"{what}: no 200 within {timeout:.0f}s; stopped the daemon ({self.terminate()})"
        raise RuntimeError(f"{why}\n--- daemon log ({self.log.name}) ---\n{self.log_text()}")

    def terminate(self, grace: float = 30) -> str:
        """SIGTERM (it removes what it created), SIGKILL after `grace` seconds; reaped either way."""
        if self.proc.poll() is not None:
            return f"had exited {self.proc.returncode}"
        self.proc.send_signal(signal.SIGTERM)
        try:
            return f"SIGTERM: exited {self.proc.wait(grace)}"
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return f"SIGTERM ignored for {grace:.0f}s, SIGKILL: exited {self.proc.wait()}"

    def request(self, method: str, path: str, body: object = None, token: str | None = None,
                raw: bytes | None = None, headers: dict | None = None, timeout: float = 120) -> tuple[int, object]:
        conn = NetnsHTTPConnection(self.netns, "127.0.0.1", self.port, timeout=timeout)
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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """Signal the daemon and return its exit status.  A SIGTERM/SIGINT that does not
        end in a clean exit prints the daemon's log (pytest shows it with the failure)."""
        if not stop_or_dump(self.proc, sig, timeout):
            raise RuntimeError(f"shaper run (pid {self.proc.pid}, netns {self.netns}) still running {timeout:.0f}s "
                               f"after {signal.Signals(sig).name}; aborted (its stacks end the log)\n"
                               f"--- daemon log ---\n{self.log_text()}")
        code = self.proc.returncode
        if code != 0 and sig in (signal.SIGTERM, signal.SIGINT):
            print(f"shaper run exited {code} on {signal.Signals(sig).name}; its log:\n{self.log_text()}",
                  file=sys.stderr)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        if os.path.exists(self.log.name):
            os.unlink(self.log.name)


def netns_connect(netns: str, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection made from inside a named network namespace."""
    from shaper.datapath.tc import in_netns

    return in_netns(netns, lambda: socket.create_connection((host, port), timeout=timeout))


class NetnsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, netns: str, host: str, port: int, timeout: float = 30):
        super().__init__(host, port, timeout=timeout)
        self.netns = netns

    def connect(self) -> None:
        self.sock = netns_connect(self.netns, self.host, self.port, self.timeout)


def in_namespace(netns: str) -> list[str]:
    """The command prefix that runs a program in a network namespace: a name (`ip netns exec`), or
    pid:PID for the namespace of a process with no name (`nsenter`: a node agent's "pod")."""
    if netns.startswith("pid:"):
        return ["nsenter", "-t", netns[4:], "-n"]
    return ["ip", "netns", "exec", netns]


def tcp_goodput(sender: str, source: str, receiver: str, listen: str, seconds: float = 2, *,
                port: int = 5201, start_timeout: float = 120) -> float:
    """TCP goodput in bit/s from namespace `sender` (bound to `source` when given) to `listen`:`port`
    in namespace `receiver`, measured by the receiver over `seconds` from its first byte.
    Either namespace may be pid:PID (see in_namespace)."""
    server = subprocess.Popen([*in_namespace(receiver), sys.executable, "-u", "-c", _RECEIVER, listen,
                               str(seconds), str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The receiver says "listening" once it is: a condition to wait on, not a guess.
        start = time.monotonic()
        ready, _, _ = select.select([server.stdout], [], [], start_timeout)
        line = server.stdout.readline() if ready else ""
        if line.strip() != "listening":
            state = "still running" if server.poll() is None else f"exited {server.returncode}"
            if server.poll() is None:
                server.kill()
            _, err = server.communicate(timeout=30)
            raise RuntimeError(f"receiver on {listen} (netns {receiver}) not listening after "
                               f"{time.monotonic() - start:.1f}s (bound {start_timeout:.0f}s): {state}; "
                               f"stdout {line.strip()!r}; stderr: {err.strip() or '(empty)'}")
        sh(*in_namespace(sender), sys.executable, "-c", _SENDER, listen, str(seconds), source, str(port),
           timeout=start_timeout + 2 * seconds)
        out, err = server.communicate(timeout=start_timeout + seconds)
        if server.returncode != 0:
            raise RuntimeError(f"receiver on {listen} exited {server.returncode}: {err.strip()}")
        return float(out)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


_RECEIVER = """
import socket, sys, time
addr, seconds, port = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
srv = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port))
srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept()
total, first, last = 0, None, None
while True:
    data = conn.recv(1 << 16)
    if not data:
        break
    last = time.monotonic()
    if first is None:
        # What the first read returns queued up before it: counting it would inflate a slow rate.
        first = last
        continue
    total += len(data)
    if last - first >= seconds:
        break
print(total * 8 / (last - first) if last and last > first else 0.0)
"""
_SENDER = """
import socket, sys, time
addr, seconds, source, port = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.create_connection((addr, port), timeout=30, source_address=(source, 0) if source else None)
buf = bytes(1 << 16)
end = time.monotonic() + seconds
try:
    while time.monotonic() < end:
        s.sendall(buf)
except (BrokenPipeError, ConnectionResetError):
    pass  # the receiver stops once it has measured for long enough
s.close()
"""


_ACCEPTOR = """
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port))
srv.listen(128)
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    try:  # the client ends it with a reset (no TIME_WAIT here to trip its next connect from the same port)
        conn.recv(1)
    except OSError:
        pass
    conn.close()
"""
# Connects `count` times and prints each connect()'s time in ms; with a source "ADDR,PORT" it binds
# it (SO_REUSEADDR and a linger of 0, so the same source port is free again at once).
_CONNECTOR = """
import socket, struct, sys, time
addr, port, count, source = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for _ in range(count):
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if source:
        host, sport = source.rsplit(",", 1)
        s.bind((host, int(sport)))
    s.settimeout(10)
    start = time.monotonic()
    s.connect((addr, port))
    print((time.monotonic() - start) * 1000, flush=True)
    s.close()
    time.sleep(0.02)
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
    # From the per-reply lines (absent with -q).  An emulated CPU stalls now and then and adds
    # tens of ms to one reply: that moves the mean, not the median.
    rtts = sorted(float(v) for v in re.findall(r"time=([\d.]+) ms", text))
    pick = lambda q: rtts[min(len(rtts) - 1, int(q * len(rtts)))] if rtts else None  # noqa: E731
    out["median"], out["p5"], out["p95"] = pick(0.5), pick(0.05), pick(0.95)
    return out


def wait_until(pred, timeout: float = 10, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()
