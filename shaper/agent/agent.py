"""The node agent (`shaper agent`): one daemon per node shaping the network namespaces of other
pods and containers, with no sidecar and no restart of the workload.

Each target is a network namespace found by shaper.agent.discover and gets the datapath a
sidecar would build there: the classifier on the interface's egress, HTB with netem leaves,
pins under <bpffs>/shaper/<netns inode>-<iface>, with rule_meta[0] saying that the agent made
them (and for which target), so that

- a restarted agent adopts every target whose namespace still exists, rules and counters in place;
- a sidecar never adopts the agent's shaping and the agent never adopts a sidecar's (each refuses,
  naming the other); while one runs, the interface claim refuses the other at once;
- the sweeper, every SWEEP_S, drops a target whose namespace no process, bind mount or open file
  holds any more (the agent's own sockets do not count: they are what keeps it), removes its pins,
  and removes the pins a sidecar killed by SIGKILL left for a namespace that is gone.

The agent touches a namespace only when a request names it: a read of a target not shaped yet
resolves it (404 gone, 409 ambiguous) and answers from an empty state; the first PUT attaches.
Every datapath access runs on the one kernel thread (shaper.http.server.KernelThread).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import Metric
from prometheus_client.samples import Sample

from shaper.agent import discover
from shaper.agent.spares import Spares
from shaper.agent.targets import TargetSpec, parse_target
from shaper.control.service import Service, audit
from shaper.datapath.interface import Datapath
from shaper.errors import InvalidInput, NotFound, ShaperError, Unauthorized
from shaper.http.api import Api

log = logging.getLogger("shaper")

SWEEP_S = 1.0  # how often dead targets and dead pins are looked for (a namespace goes after two looks)
MAX_ALIASES = 8  # names remembered per target beside the one it is shown by
DEFAULT_IFACE = "eth0"
LABELS = ("pod", "namespace", "container")  # what /metrics adds beside `target`, where known
DESCRIBED = (*LABELS, "container_id", "runtime")  # what GET /targets and the pinned record add

# (ifname, netns path, agent record) -> an unattached datapath; (ifname, netns path) -> the claim.
OpenDatapath = Callable[[str, str, dict], Datapath]
Claim = Callable[[str, str], Any]


@dataclass
class Target:
    """A namespace the agent shapes."""

    inode: int
    name: str  # the spec it was first shaped by, as GET /targets shows it
    fd: int  # the namespace, held open while shaped (its path is /proc/self/fd/<fd>)
    service: Service
    api: Api
    claim: Any
    labels: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    since: float = field(default_factory=time.time)
    aliases: set[str] = field(default_factory=set)

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def describe(self) -> dict:
        return {"target": self.name, "netns": self.inode, "pid": self.pid, "interface": self.service.interface,
                "also_known_as": sorted(self.aliases - {self.name}), **self.labels,
                "rules": len(self.service.controller.live_rules(self.service.observe())) if self.service.ready
                else None, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))}




def _kernel_claim(ifname: str, path: str) -> Any:
    from shaper.datapath.kernel import claim_interface

    return claim_interface(ifname, path, agent=True)


class StalePins(ShaperError):
    """Pins of an earlier target whose namespace inode a new namespace reuses: never adopted."""


class Agent:
    def __init__(self, iface: str = DEFAULT_IFACE, *, bpffs: str | None = None,
                 resolver: discover.Resolver | None = None, open_datapath: OpenDatapath | None = None,
                 claim: Claim = _kernel_claim, alive: Callable[[set[int]], set[int]] = discover.alive,
                 spares: Spares | None = None, nsfs_dev: int | None = None):
        self.iface = iface
        self.bpffs = bpffs or os.environ.get("SHAPER_BPFFS", "/sys/fs/bpf")
        self.resolver = resolver or discover.Resolver()
        self.spares = spares  # classifiers compiled ahead (shaper.agent.spares), when the agent runs for real
        # The device of namespace files (the nsfs): a target's file must be on it (tests give another).
        self.nsfs_dev = nsfs_dev if nsfs_dev is not None else os.stat("/proc/self/ns/net").st_dev
        self.open_datapath = open_datapath or self._kernel_datapath
        self.claim = claim
        self.alive = alive
        self.targets: dict[int, Target] = {}
        self.aliases: dict[str, int] = {}
        self.ready = False
        self.registry = CollectorRegistry()
        self.registry.register(_TargetsCollector(self))
        self.swept = Counter("shaper_agent_swept", "Targets and leftover pin directories removed because their "
                             "network namespace was gone.", ["what"], registry=self.registry)
        for what in ("target", "pins"):
            self.swept.labels(what)
        self.attach_seconds = Gauge("shaper_agent_last_attach_seconds", "Time the last new target took from "
                                    "the request to shaping in place.", registry=self.registry)
        self._last_sweep = 0.0
        self._suspects: set[int] = set()  # namespaces found gone by the last sweep

    def _kernel_datapath(self, ifname: str, path: str, record: dict) -> Datapath:
        from shaper.datapath.kernel import KernelDatapath

        return KernelDatapath(ifname, path, agent=record, spare=self.spares.take if self.spares else None)

    # -- finding targets ------------------------------------------------------------------------------
    def lookup(self, text: str, create: bool, authed: bool = True) -> tuple[Target | None, discover.Found | None]:
        """The target a request names: (shaped target, None), or (None, where it is) if not shaped and not
        `create`.  Raises NotFound (gone), Conflict (ambiguous), InvalidInput (no such form), and for a
        caller without the token (`authed` False) Unauthorized rather than look a name up (/proc scans,
        container runtimes): such a caller reads the targets shaped, by the names they are known by."""
        spec = parse_target(text)
        key = str(spec)
        inode = self.aliases.get(key)
        if inode is not None and inode in self.targets and self._still(spec, inode):
            return self.targets[inode], None
        if not authed:
            raise Unauthorized(f"{key} is not a target this agent shapes under that name; looking it up needs the "
                               "token (Authorization: Bearer <token>)")
        found = self.resolver.resolve(spec)
        if found.inode in self.targets:
            target = self.targets[found.inode]
            self._take_name(key, target)
            return target, None
        if not create:
            return None, found
        return self._shape(spec, found), None

    def _take_name(self, key: str, target: Target) -> None:
        """`key` names `target` now: another target shown by that name is renamed; at most MAX_ALIASES
        names are remembered per target (each is checked again when used)."""
        holder = next((t for t in self.targets.values() if t.name == key and t is not target), None)
        if holder is not None:
            self._rename(holder)
        for other in self.targets.values():
            if other is not target and key in other.aliases:
                other.aliases.discard(key)
        if key not in target.aliases and len(target.aliases) >= MAX_ALIASES:
            oldest = next(a for a in sorted(target.aliases) if a != target.name)
            target.aliases.discard(oldest)
            self.aliases.pop(oldest, None)
        target.aliases.add(key)
        self.aliases[key] = target.inode

    def _still(self, spec: TargetSpec, inode: int) -> bool:
        """A cached name still names that namespace: a PID may now be another process's, an address
        another pod's, a container name another container's (a pod recreated, `podman rm` and run again)."""
        if spec.kind == "pid":
            try:
                return os.stat(f"/proc/{spec.value}/ns/net").st_ino == inode
            except OSError:
                return False
        if spec.kind == "ip":
            return self.resolver.still_holds(self.targets[inode].pid, inode, spec.value)
        return False  # a container: ask its runtime again (lookup() re-resolves)

    def _shape(self, spec: TargetSpec, found: discover.Found, adopt_record: dict | None = None) -> Target:
        """Attach a datapath in a namespace (or, with `adopt_record`, only adopt the one there); undone
        whole if it fails."""
        started = time.monotonic()
        if adopt_record:  # the name and labels it was first shaped with
            name = str(adopt_record.get("target", spec))
            labels = {k: str(v) for k, v in adopt_record.items() if k in DESCRIBED}
        else:
            name, labels = str(spec), {k: v for k, v in found.labels.items() if k in DESCRIBED}
            if "pod" not in labels:  # a pod named by its IP or a PID: its name from the CRI's state, if there
                labels.update(self.resolver.pod_of(found.inode))
        try:
            fd = os.open(found.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            raise NotFound(f"{spec} went away while it was looked up ({exc.strerror})") from None
        claim = dp = None
        try:
            st = os.fstat(fd)
            if st.st_ino != found.inode or st.st_dev != self.nsfs_dev:
                raise NotFound(f"{spec} changed its network namespace while it was looked up: try again")
            path = f"/proc/self/fd/{fd}"
            claim = self.claim(self.iface, path)
            try:
                dp = self.open_datapath(self.iface, path, {"target": name, **labels})
            except InvalidInput as exc:
                if exc.field != "iface":
                    raise
                raise InvalidInput("target", f"{name} has no interface {self.iface}: the agent shapes --iface "
                                   f"{self.iface} in every target", f"a pod or container with an {self.iface}") \
                    from None
            if adopt_record is not None and not dp.adoptable():
                raise StalePins(f"the pins of {name} are not what runs in network namespace {found.inode} now")
            service = Service(dp, self.iface)
            service.log_fields = {"target": name}
            how = dp.attach()
            try:
                service.start(None, who="agent")
            except BaseException:
                if how == "attached":
                    dp.reset()
                raise
        except BaseException:
            if dp is not None:
                dp.close()
            if claim is not None:
                claim.close()
            os.close(fd)
            raise
        target = Target(found.inode, name, fd, service, Api(service), claim, labels, found.pid, aliases=set())
        self.targets[found.inode] = target
        self._take_name(name, target)  # a target shown by that name so far is renamed
        seconds = time.monotonic() - started
        if how == "attached":
            self.attach_seconds.set(seconds)
        audit("target.adopted" if how == "adopted" else "target.attached", target=name, netns=found.inode,
              pid=found.pid, interface=self.iface, seconds=round(seconds, 4),
              rules=len(service.controller.live_rules(service.observe())), **labels)
        return target

    def _rename(self, target: Target) -> None:
        """Give a target whose name now means another namespace a name of its own namespace (pid:PID of a
        process in it, else inode:INODE): series and GET /targets stay one per name."""
        path = self.resolver.path_of(target.inode) or ""
        pid = discover.pid_in(path)
        new = f"pid:{pid}" if pid else f"inode:{target.inode}"
        old, target.name = target.name, new
        target.aliases.discard(old)
        if self.aliases.get(old) == target.inode:
            del self.aliases[old]
        target.aliases.add(new)
        self.aliases[new] = target.inode
        target.service.log_fields = {"target": new}
        try:
            target.service.datapath.set_agent_record({"target": new, **target.labels})
        except (OSError, ShaperError) as exc:
            log.warning("target.rename_unpinned", extra={"fields": {"target": new, "error": str(exc)}})
        audit("target.renamed", target=new, was=old, netns=target.inode,
              reason=f"{old} names another network namespace now")

    # -- start, loop, stop ----------------------------------------------------------------------------
    def adopt_all(self) -> None:
        """At start: take back every target an earlier agent shaped whose namespace still exists."""
        from shaper.datapath.kernel import _pins_complete_in, _record0

        base = os.path.join(self.bpffs, "shaper")
        for name in discover.listdir(base):
            inode_text, _, ifname = name.partition("-")
            path = os.path.join(base, name)
            if ifname != self.iface or not inode_text.isdigit() or int(inode_text) in self.targets \
                    or not _pins_complete_in(path):
                continue
            try:
                record = _record0(path) or {}
            except (OSError, ValueError, ShaperError):
                continue
            mine = record.get("agent")
            if not isinstance(mine, dict):
                continue  # a sidecar's or a host daemon's
            ns_path = self.resolver.path_of(int(inode_text))
            if ns_path is None:
                continue  # gone: the sweeper removes the pins
            try:
                self._shape(parse_target(f"inode:{inode_text}"),
                            discover.Found(int(inode_text), ns_path, discover.pid_in(ns_path), {}),
                            adopt_record=mine)
            except StalePins as exc:
                # An inode number the kernel gave again, to a pod nobody asked to shape: leave it alone.
                shutil.rmtree(path, ignore_errors=True)
                audit("pins.stale", pins=path, target=mine.get("target"), reason=str(exc), action="removed the pins")
            except Exception as exc:  # one target's trouble must not stop the agent from starting
                log.warning("target.adopt_failed", extra={"fields": {"pins": path, "target": mine.get("target"),
                                                                     "error": str(exc)}})
        self.ready = True

    def tick(self) -> None:
        """Once a second: rules whose TTL passed, repairs, interfaces gone, and every SWEEP_S the sweep."""
        for target in list(self.targets.values()):
            service = target.service
            try:
                if not service.datapath.link_present():
                    self._drop(target, "interface gone", reset=True)
                    continue
                service.expire()
                service.repair()
            except ShaperError as exc:  # counted by the service; tried again next tick
                log.debug("target %s: %s", target.name, exc)
        if time.monotonic() - self._last_sweep >= SWEEP_S:
            self.sweep()

    def sweep(self) -> list[str]:
        """Drop targets whose namespace is gone and remove pins of namespaces that are gone; returns what went."""
        self._last_sweep = time.monotonic()
        gone: list[str] = []
        base = os.path.join(self.bpffs, "shaper")
        leftovers: dict[int, list[str]] = {}
        for name in discover.listdir(base):
            inode_text = name.partition("-")[0]
            if inode_text.isdigit() and int(inode_text) not in self.targets:
                leftovers.setdefault(int(inode_text), []).append(name)
        looked = set(self.targets) | set(leftovers)
        live = self.alive(looked) if looked else set()
        # Gone only when found gone twice in a row: a process that forks and exits between the scan's
        # listing of /proc and its look at the child is missed once, not twice.
        dead = {i for i in looked - live if i in self._suspects}
        self._suspects = looked - live
        for inode in [i for i in self.targets if i in dead]:
            target = self.targets[inode]
            gone.append(target.name)
            self._drop(target, "namespace gone", reset=False)
            self.swept.labels("target").inc()
        if leftovers:
            for inode, names in leftovers.items():
                if inode not in dead:
                    continue
                for name in names:
                    shutil.rmtree(os.path.join(base, name), ignore_errors=True)
                    audit("pins.swept", pins=os.path.join(base, name), reason="network namespace gone")
                    self.swept.labels("pins").inc()
                    gone.append(name)
        if gone:
            _remove_if_empty(base)
        return gone

    def remove(self, text: str, who: str) -> dict:
        """DELETE /targets/{target}: remove everything shaper made there and let go of it."""
        target, _ = self.lookup(text, create=False)
        if target is None:
            raise NotFound(f"{text} is not shaped by this agent")
        removed = self._drop(target, f"deleted by {who}", reset=True, keep_on_failure=True)
        return {"deleted": target.name, "removed": removed}

    def _drop(self, target: Target, reason: str, reset: bool, keep_on_failure: bool = False) -> list[str]:
        """Let go of a target: with `reset`, remove its tc objects and pins; else (its namespace is gone,
        and its tc objects with it once the agent lets go) only its pins.  With `keep_on_failure`, a
        reset the kernel refuses is raised and the target kept (DELETE answers the error, tries again)."""
        dp = target.service.datapath
        removed: list[str] = []
        try:
            removed = dp.reset() if reset else dp.forget()
        except ShaperError as exc:
            if keep_on_failure:
                raise
            log.warning("target.remove_failed", extra={"fields": {"target": target.name, "error": str(exc)}})
        target.service.ready = False
        dp.close()
        target.claim.close()
        os.close(target.fd)
        self.targets.pop(target.inode, None)
        for alias in [a for a, i in self.aliases.items() if i == target.inode]:
            del self.aliases[alias]
        audit("target.removed", target=target.name, netns=target.inode, reason=reason, removed=removed,
              **target.labels)
        return removed

    def close(self, reset: bool = False) -> None:
        """On exit: keep every target's shaping for the next agent to adopt, unless `reset`; remove the spare."""
        self.ready = False
        if self.spares is not None:
            self.spares.close()
        for target in list(self.targets.values()):
            if reset:
                self._drop(target, "agent exit (--reset-on-exit)", reset=True)
                continue
            target.service.ready = False
            target.service.datapath.close()
            target.claim.close()
            os.close(target.fd)
        self.targets.clear()
        self.aliases.clear()

    def list(self) -> list[dict]:
        return [t.describe() for t in sorted(self.targets.values(), key=lambda t: t.name)]


def _remove_if_empty(path: str) -> None:
    """The shared shaper/ pin directory goes with its last interface, as a daemon's reset leaves it."""
    try:
        os.rmdir(path)
    except OSError:
        pass


class _TargetsCollector:
    """Every target's series with `target` (and pod, namespace, container where known) added, one family
    per name; and how many targets there are."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        count = Metric("shaper_agent_targets", "Targets the agent shapes.", "gauge")
        count.add_sample("shaper_agent_targets", {}, len(self.agent.targets))
        for target in sorted(self.agent.targets.values(), key=lambda t: t.name):
            extra = {"target": target.name, **{k: target.labels[k] for k in LABELS if target.labels.get(k)}}
            for fam in target.service.registry.collect():
                merged = families.get(fam.name)
                if merged is None:
                    merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    merged.samples.append(Sample(s.name, {**extra, **s.labels}, s.value, s.timestamp, s.exemplar))
        yield count
        yield from families.values()
