"""Finding a target's network namespace on the node, and telling when it is gone.

Everything here reads /proc (the agent runs with hostPID) or asks a container runtime's
own command (podman, crictl for CRI-O and containerd), where one is installed; nothing
enters a namespace except to read the addresses of one that no process is in.

A namespace is alive while a process other than the agent is in it, a bind mount of it
exists (`ip netns add`, a container runtime's /run/netns/...), or another process holds
it open.  The agent's own references (its netlink sockets and the file it holds open)
do not count: they are what keeps a dead target's namespace, and the pod's veth with it,
around until the agent lets go.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Iterable

from shaper.agent.targets import TargetSpec
from shaper.errors import Conflict, InvalidInput, NotFound, ShaperError

PROC = "/proc"
RUNTIME_TIMEOUT_S = 10.0
# The runtimes asked for container:NAME, in this order (by the program's name, where installed).
RUNTIMES = ("podman", "crictl")
# The state containerd and CRI-O keep of each running container (its OCI config.json, with the
# kubelet's annotations, and its PID): read where no crictl is installed, as in the agent's image.
CRI_STATE = ("/run/containerd/io.containerd.runtime.v2.task", "/run/containers/storage/overlay-containers")
PID_FILES = ("init.pid", "userdata/pidfile")  # containerd, CRI-O
CONFIG_FILES = ("config.json", "userdata/config.json")
# Annotations naming a container and its pod: containerd's CRI plugin, then CRI-O's.
_ANNOTATIONS = {
    "container": ("io.kubernetes.cri.container-name", "io.kubernetes.container.name"),
    "pod": ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"),
    "namespace": ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"),
    "type": ("io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType"),
}
_LOCAL_V4 = re.compile(r"\|-- (\S+)\n\s+/32 host LOCAL")


@dataclass
class Namespace:
    inode: int
    pids: list[int] = field(default_factory=list)  # processes in it (the node's PIDs)
    mounts: list[str] = field(default_factory=list)  # bind mounts of it, as the node's init sees them


@dataclass(frozen=True)
class Found:
    """A resolved target: its namespace, a file to open it by now, and what the agent learnt of it."""

    inode: int
    path: str
    pid: int | None
    labels: dict[str, str]  # container, pod, namespace: where known


def _nsfs_mounts(proc: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for table in dict.fromkeys((f"{proc}/1/mountinfo", f"{proc}/self/mountinfo")):
        try:
            with open(table) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            head, _, tail = line.partition(" - ")
            fields = head.split()
            if tail.startswith("nsfs ") and len(fields) > 4 and fields[3].startswith("net:["):
                out.setdefault(int(fields[3][5:-1]), []).append(fields[4])
    return out


def scan(proc: str = PROC) -> dict[int, Namespace]:
    """Every network namespace a process other than this one is in, or a bind mount holds."""
    me = os.getpid()
    found: dict[int, Namespace] = {}
    for name in os.listdir(proc):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            inode = os.stat(f"{proc}/{name}/ns/net").st_ino
        except OSError:  # gone meanwhile, or a kernel thread's we may not read
            continue
        found.setdefault(inode, Namespace(inode)).pids.append(int(name))
    for inode, mounts in _nsfs_mounts(proc).items():
        found.setdefault(inode, Namespace(inode)).mounts.extend(mounts)
    return found


def held_open(inodes: Iterable[int], proc: str = PROC) -> set[int]:
    """Which of `inodes` another process is in by one of its threads (setns() moves a thread only), or
    holds open by a file descriptor (slow: every thread and fd on the node)."""
    want = {f"net:[{i}]": i for i in inodes}
    held: set[int] = set()
    if not want:
        return held
    me = str(os.getpid())
    for name in os.listdir(proc):
        if not name.isdigit() or name == me:
            continue
        try:
            tasks = os.listdir(f"{proc}/{name}/task")
        except OSError:
            tasks = []
        for tid in tasks:
            try:
                ino = os.stat(f"{proc}/{name}/task/{tid}/ns/net").st_ino
            except OSError:
                continue
            if ino in want.values():
                held.add(ino)
        try:
            fds = os.listdir(f"{proc}/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{proc}/{name}/fd/{fd}")
            except OSError:
                continue
            if link in want:
                held.add(want[link])
        if len(held) == len(want):
            break
    return held


def mounted_anywhere(inodes: Iterable[int], proc: str = PROC) -> set[int]:
    """Which of `inodes` are bind-mounted in any mount namespace on the node (a runtime's private one too)."""
    want = set(inodes)
    found: set[int] = set()
    seen: set[int] = set()
    if not want:
        return found
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            mnt = os.stat(f"{proc}/{name}/ns/mnt").st_ino
        except OSError:
            continue
        if mnt in seen:
            continue
        seen.add(mnt)
        try:
            with open(f"{proc}/{name}/mountinfo") as f:
                text = f.read()
        except OSError:
            continue
        found |= {i for i in want if f" net:[{i}] " in text}
        if found == want:
            break
    return found


def alive(inodes: Iterable[int], proc: str = PROC) -> set[int]:
    """Which of `inodes` are namespaces that still exist for someone other than the agent: a process in
    it or a bind mount of it (the node's mount table), else, looked for only then, a bind mount in any
    other mount namespace or an open file of another process."""
    inodes = set(inodes)
    live = inodes & set(scan(proc))
    live |= mounted_anywhere(inodes - live, proc)
    return live | held_open(inodes - live, proc)


def node_inodes(proc: str = PROC) -> set[int]:
    """The node's own network namespace (init's) and the agent's: never a target."""
    out = {os.stat(f"{proc}/self/ns/net").st_ino}
    try:
        out.add(os.stat(f"{proc}/1/ns/net").st_ino)
    except OSError:
        pass
    return out


def v4_local(fib_trie: str) -> set[str]:
    """The local IPv4 addresses in a /proc/net/fib_trie text."""
    return set(_LOCAL_V4.findall(fib_trie))


def v6_local(if_inet6: str) -> set[str]:
    """The IPv6 addresses in a /proc/net/if_inet6 text, in their short form."""
    out = set()
    for line in if_inet6.splitlines():
        word = line.split()[0] if line.split() else ""
        if len(word) == 32:
            out.add(str(ipaddress.IPv6Address(bytes.fromhex(word))))
    return out


def addresses(ns: Namespace, proc: str = PROC) -> set[str]:
    """The addresses of a namespace, read through one of its processes (or, with none, from a thread
    that joins its bind mount just to read them)."""
    def read(base: str) -> set[str]:
        out: set[str] = set()
        for name, parse in (("fib_trie", v4_local), ("if_inet6", v6_local)):
            try:
                with open(f"{base}/{name}") as f:
                    out |= parse(f.read())
            except OSError:  # no IPv6 in that namespace, or the process went
                continue
        return out

    for pid in ns.pids[:3]:
        got = read(f"{proc}/{pid}/net")
        if got:
            return got
    for mount in ns.mounts[:1]:
        from shaper.datapath.tc import in_netns

        path = mount if os.path.exists(mount) else f"{proc}/1/root{mount}"
        try:
            return in_netns(path, lambda: read("/proc/thread-self/net"))
        except OSError:
            continue
    return set()


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


class RuntimeUnavailable(ShaperError):
    """A container runtime's command did not answer (or could not run): try again."""

    http_status = 503


def _run(argv: list[str]) -> "subprocess.CompletedProcess[str]":
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=RUNTIME_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeUnavailable(f"{argv[0]} did not answer within {RUNTIME_TIMEOUT_S:g} s: try again") from None
    except OSError as exc:
        raise RuntimeUnavailable(f"{argv[0]} could not run: {exc.strerror}") from None


class Resolver:
    """Spec -> Found.  `proc`, `which` and `run` are parameters so the unit tests drive it with
    recorded runtime answers; the agent uses the node's."""

    def __init__(self, proc: str = PROC, which: Callable[[str], str | None] = shutil.which, run: Runner = _run,
                 cri_state: tuple[str, ...] = CRI_STATE, cgroup_of: Callable[[int], str] | None = None):
        self.proc = proc
        self.which = which
        self.run = run
        self.cri_state = cri_state
        self.cgroup_of = cgroup_of or self._cgroup_of

    def _cgroup_of(self, pid: int) -> str:
        try:
            with open(f"{self.proc}/{pid}/cgroup") as f:
                return f.read()
        except OSError:
            return ""

    def still_holds(self, pid: int | None, inode: int, addr: str) -> bool:
        """Whether process `pid` is still in namespace `inode` and it still has `addr` (cheap: no scan)."""
        if not pid:
            return False
        try:
            if os.stat(f"{self.proc}/{pid}/ns/net").st_ino != inode:
                return False
        except OSError:
            return False
        return addr in addresses(Namespace(inode, [pid]), self.proc)

    def resolve(self, spec: TargetSpec) -> Found:
        if spec.kind == "pid":
            found = self._by_pid(int(spec.value), {})
        elif spec.kind == "netns":
            found = self._by_path(spec.value)
        elif spec.kind == "inode":
            path = self.path_of(int(spec.value))
            if path is None:
                raise NotFound(f"no network namespace {spec.value} on this node (no process or mount holds it)")
            found = self._by_path(path)
        elif spec.kind == "ip":
            found = self._by_ip(spec.value)
        else:
            found = self._by_container(spec)
        if found.inode in node_inodes(self.proc):
            raise InvalidInput("target", f"{spec} is in the node's own network namespace (a hostNetwork pod, or a "
                               "process of the node): the agent shapes only the namespaces of pods and containers",
                               "a pod or container with its own network namespace")
        return found

    def path_of(self, inode: int) -> str | None:
        """A file of a namespace by its inode now (a process in it, or a bind mount the agent sees), if any."""
        ns = scan(self.proc).get(inode)
        if ns is None:
            return None
        if ns.pids:
            return f"{self.proc}/{ns.pids[0]}/ns/net"
        return next((m for m in ns.mounts if os.path.exists(m)), None)

    def _by_pid(self, pid: int, labels: dict[str, str]) -> Found:
        path = f"{self.proc}/{pid}/ns/net"
        try:
            inode = os.stat(path).st_ino
        except FileNotFoundError:
            raise NotFound(f"no process {pid} on this node (it may have exited)") from None
        except OSError as exc:
            raise ShaperError(f"cannot read the network namespace of process {pid}: {exc.strerror} (the agent "
                              "needs hostPID and CAP_SYS_PTRACE, or it runs in another PID namespace)") from None
        return Found(inode, path, pid, labels)

    def _by_path(self, value: str) -> Found:
        from shaper.datapath.tc import netns_path

        path = netns_path(value)
        inode = netns_inode(path)
        if inode is None:  # absent, unreadable or not a namespace: one answer, which tells nothing of the file
            raise NotFound(f"no network namespace at {path}")
        return Found(inode, path, pid_in(path, self.proc), {})

    def _by_ip(self, addr: str) -> Found:
        node = node_inodes(self.proc)
        # The node's own namespace is never read: its routes (fib_trie) may be a full table.
        holders = [ns for inode, ns in sorted(scan(self.proc).items())
                   if inode not in node and addr in addresses(ns, self.proc)]
        if not holders:
            raise NotFound(f"no pod or container on this node holds the address {addr} (is the pod on this node? "
                           "ask the agent on the pod's hostIP; the node's own addresses are no targets)")
        if len(holders) > 1:
            raise Conflict(f"the address {addr} is held by {len(holders)} network namespaces on this node ("
                           + "; ".join(_describe(ns) for ns in holders[:5]) + "): name the target by pid:PID, "
                           "inode:INODE or container:NAME instead")
        ns = holders[0]
        if ns.pids:
            return Found(ns.inode, f"{self.proc}/{ns.pids[0]}/ns/net", ns.pids[0], {})
        path = self.path_of(ns.inode)
        if path is None:
            raise NotFound(f"the network namespace holding {addr} is mounted where the agent cannot open it")
        return Found(ns.inode, path, None, {})

    def _by_container(self, spec: TargetSpec) -> Found:
        runtimes = {"podman": ("podman",), "cri": ("crictl",), "container": RUNTIMES}[spec.kind]
        present = [name for name in runtimes if self.which(name)]
        states = [d for d in self.cri_state if os.path.isdir(d)] if spec.kind != "podman" else []
        if states:
            present.append("state")
        if not present:
            raise NotFound(f"no container runtime to ask for {spec}: none of {', '.join(runtimes)} is installed "
                           "where the agent runs" + (f", and no CRI state in {' or '.join(self.cri_state)}"
                                                      if spec.kind != "podman" else ""))
        found: list[Found] = []
        errors: list[str] = []
        absent: list[NotFound] = []  # a runtime that knows the name says why it is no target (not running)
        for name in present:
            try:
                hit = self._podman(spec.value) if name == "podman" else self._crictl(spec.value) \
                    if name == "crictl" else self._cri_state(spec.value, states)
            except (Conflict, RuntimeUnavailable):
                raise
            except NotFound as exc:
                absent.append(exc)
                continue
            except ShaperError as exc:
                errors.append(f"{name}: {exc}")
                continue
            if hit is not None:
                found.append(hit)
        if len(found) > 1 and len({f.inode for f in found}) > 1:
            raise Conflict(f"{spec.value} names containers in {len(found)} runtimes (" +
                           ", ".join(sorted(f.labels.get('runtime', '?') for f in found)) +
                           f"): name it as podman:{spec.value} or cri:{spec.value}")
        if found:
            return found[0]
        if absent:
            raise absent[0]
        if errors:
            raise ShaperError(f"cannot look up {spec}: " + "; ".join(errors))
        raise NotFound(f"no running container named {spec.value} (asked {', '.join(present)})")

    def _podman(self, name: str) -> Found | None:
        done = self.run(["podman", "inspect", "--type", "container", "--format", "json", name])
        if done.returncode != 0:
            if "no such" in (done.stderr or "").lower():
                return None
            raise ShaperError((done.stderr or "").strip().splitlines()[-1] if done.stderr else
                              f"podman inspect exited {done.returncode}")
        info = _json(done.stdout, "podman inspect")
        if not isinstance(info, list) or not info or not isinstance(info[0], dict):
            return None
        state = info[0].get("State") or {}
        cname = str(info[0].get("Name", name)).lstrip("/")
        cid = str(info[0].get("Id", ""))
        if name not in (cname, cid) and not (len(name) >= 12 and cid.startswith(name)):
            return None  # podman takes any unique prefix of an id: "db" must not be the container 'db3f...'
        if not isinstance(state, dict):
            return None
        if not state.get("Running") or not state.get("Pid"):
            raise NotFound(f"container {cname} is not running")
        labels = {"runtime": "podman", "container": cname, "container_id": str(info[0].get("Id", ""))[:12]}
        return self._by_pid(int(state["Pid"]), labels)

    def _crictl(self, name: str) -> Found | None:
        done = self.run(["crictl", "ps", "-o", "json"])
        if done.returncode != 0:
            raise ShaperError((done.stderr or "").strip() or f"crictl ps exited {done.returncode}")
        answer = _json(done.stdout, "crictl ps")
        listed = answer.get("containers") or [] if isinstance(answer, dict) else []
        hits = [c for c in listed if isinstance(c, dict) and (
            c.get("id") == name or len(name) >= 12 and str(c.get("id", "")).startswith(name)
            or (c.get("metadata") or {}).get("name") == name)]
        if not hits:
            return None
        if len(hits) > 1:
            raise Conflict(f"{name} names {len(hits)} CRI containers (" +
                           ", ".join(str(c.get("id", ""))[:12] for c in hits[:5]) + "): give the container id")
        cid = str(hits[0]["id"])
        done = self.run(["crictl", "inspect", "-o", "json", cid])
        if done.returncode != 0:
            raise ShaperError((done.stderr or "").strip() or f"crictl inspect exited {done.returncode}")
        info = _json(done.stdout, "crictl inspect")
        if not isinstance(info, dict):
            raise ShaperError("crictl inspect did not answer an object")
        pid = (info.get("info") or {}).get("pid")
        if not pid:
            raise NotFound(f"CRI container {cid[:12]} has no process (not running)")
        status = info.get("status") or {}
        klabels = status.get("labels") or {}
        labels = {"runtime": "cri", "container": str((status.get("metadata") or {}).get("name", name)),
                  "container_id": cid[:12]}
        if klabels.get("io.kubernetes.pod.name"):
            labels["pod"] = str(klabels["io.kubernetes.pod.name"])
        if klabels.get("io.kubernetes.pod.namespace"):
            labels["namespace"] = str(klabels["io.kubernetes.pod.namespace"])
        return self._by_pid(int(pid), labels)


    def _cri_containers(self, roots: list[str]) -> list[tuple[str, dict[str, str], int]]:
        """(id, annotations' labels, PID) of every running container in containerd's and CRI-O's state."""
        out = []
        for root in roots:
            for bundle in _bundles(root):
                cid = os.path.basename(bundle)
                config = _read_json(bundle, CONFIG_FILES)
                if config is None:
                    continue  # podman's containers share CRI-O's state root, without a config there
                annotations = config.get("annotations") or {}
                labels = {k: next((str(annotations[a]) for a in keys if annotations.get(a)), "")
                          for k, keys in _ANNOTATIONS.items()}
                pid = _read_pid(bundle)
                # A pid file outlives its container (a stopped one keeps it): the process must be
                # in the container's cgroup, or the PID is someone else's now.
                if pid and cid in self.cgroup_of(pid):
                    out.append((cid, labels, pid))
        return out

    def _cri_state(self, name: str, roots: list[str]) -> Found | None:
        """A running container of containerd or CRI-O by id (or its first 12+ characters) or by the
        kubelet's container name, from the runtime's state directory."""
        hits = [(cid, labels, pid) for cid, labels, pid in self._cri_containers(roots)
                if labels["type"] != "sandbox"  # the pod's pause container: named by its pod IP instead
                and (len(name) >= 12 and cid.startswith(name) or cid == name or labels["container"] == name)]
        if not hits:
            return None
        if len({cid for cid, _, _ in hits}) > 1:
            raise Conflict(f"{name} names {len(hits)} running containers (" + ", ".join(
                f"{lab['namespace']}/{lab['pod']} {cid[:12]}" if lab["pod"] else cid[:12] for cid, lab, _ in hits[:5])
                + "): give the container id, or the pod IP")
        cid, labels, pid = hits[0]
        out = {"runtime": "cri", "container_id": cid[:12], **{k: v for k, v in labels.items() if v and k != "type"}}
        return self._by_pid(pid, out)

    def pod_of(self, inode: int) -> dict[str, str]:
        """The Kubernetes pod (pod, namespace) whose containers are in network namespace `inode`, from
        containerd's or CRI-O's state where the agent sees it; empty if none is."""
        roots = [d for d in self.cri_state if os.path.isdir(d)]
        for _cid, labels, pid in self._cri_containers(roots):
            if not labels["pod"]:
                continue
            try:
                if os.stat(f"{self.proc}/{pid}/ns/net").st_ino == inode:
                    return {"pod": labels["pod"], **({"namespace": labels["namespace"]} if labels["namespace"]
                                                     else {})}
            except OSError:
                continue
        return {}


def _bundles(root: str) -> list[str]:
    """The container directories under a runtime's state root: containerd's <namespace>/<id>, CRI-O's <id>."""
    out = []
    for first in listdir(root):
        path = os.path.join(root, first)
        if any(os.path.exists(os.path.join(path, f)) for f in PID_FILES):
            out.append(path)
            continue
        for second in listdir(path):
            inner = os.path.join(path, second)
            if any(os.path.exists(os.path.join(inner, f)) for f in PID_FILES):
                out.append(inner)
    return out


def listdir(path: str) -> list[str]:
    """The names in a directory, sorted; none if it is absent or unreadable."""
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def pid_in(path: str, proc: str = PROC) -> int | None:
    """The PID of a /proc/PID/ns/net path, or None for any other namespace file."""
    m = re.fullmatch(rf"{re.escape(proc)}/([0-9]+)/ns/net", path)
    return int(m.group(1)) if m else None


def _read_json(base: str, names: tuple[str, ...]) -> dict | None:
    for name in names:
        try:
            with open(os.path.join(base, name)) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            continue
    return None


def _read_pid(base: str) -> int | None:
    for name in PID_FILES:
        try:
            with open(os.path.join(base, name)) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) > 0 and os.path.exists(f"/proc/{text}"):
            return int(text)
    return None


def netns_inode(path: str) -> int | None:
    """The inode of the network namespace file at `path`, or None if it is none (absent, unreadable, another
    kind of file).  Opened O_PATH first (no open of a device, a FIFO or a file's content), then checked to
    be on the nsfs and, through a descriptor of that very file, a network namespace."""
    import fcntl

    NS_GET_NSTYPE = 0xB703  # linux/nsfs.h: _IO(0xb7, 0x3)
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_dev != os.stat("/proc/self/ns/net").st_dev:  # not on the nsfs
            return None
        real = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            return st.st_ino if fcntl.ioctl(real, NS_GET_NSTYPE) == 0x40000000 else None  # CLONE_NEWNET
        finally:
            os.close(real)
    except OSError:
        return None
    finally:
        os.close(fd)


def _describe(ns: Namespace) -> str:
    where = f"processes {', '.join(map(str, ns.pids[:3]))}" if ns.pids else f"mounted at {ns.mounts[0]}"
    return f"namespace {ns.inode}, {where}"


def _json(text: str, what: str):
    try:
        return json.loads(text)
    except ValueError:
        raise ShaperError(f"{what} did not answer JSON") from None
