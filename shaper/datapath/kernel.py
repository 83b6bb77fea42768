"""The real datapath: pins, maps and tc objects of one interface.

`KernelDatapath` is what the controller drives on a live kernel; it implements
shaper.datapath.interface.Datapath, as the in-memory fake used in unit tests
does.  State lives in the kernel
only: the program and maps are pinned under
  <bpffs>/shaper/<netns inode>-<ifname>/
and rule_meta holds every rule's record (rule_meta[0] is the controller's own:
ifindex, whether it created the clsact qdisc, and the ifb once ingress is set
up), so a controller that dies leaves shaping running and a new one adopts it
without touching traffic.

Egress: the classifier at clsact egress looks destinations up in dst_lpm and
picks a class of the interface's HTB.  Ingress, set up by the first ingress
operation: an ifb "shpin<ifindex>" with its own HTB root (the ingress classes,
numbered as the egress ones), and classify_ingress at clsact ingress, which
looks sources up in src_lpm and redirects what it matched to the ifb.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import socket
import struct
import zlib
from dataclasses import replace
from itertools import starmap
from operator import itemgetter
from typing import Callable, Iterator, Mapping

from shaper.datapath import abi, loader
from shaper.core import plan as P
from shaper.datapath.interface import AttachResult
from shaper.datapath.maps import Map, map_create, obj_get, obj_pin, prog_id
from shaper.errors import Conflict, KernelError, NotSupported, PermissionDenied, ShaperError
from shaper.core.model import Prefix
from shaper.core.stats import ClassStats, RuleCounters
from shaper.datapath.tc import FILTER_NAME, FILTER_NAME_OWN_CLSACT, FILTER_PREF, Tc, in_netns, netns_path

log = logging.getLogger("shaper")

BPFFS_MAGIC_TYPE = "bpf"
_CLONE_NEWNS = 0x00020000
RECORD_VERSION = 1
_SLOT = struct.Struct("=I")
IFB_PREFIX = "shpin"  # + the interface's ifindex: at most 15 characters, as IFNAMSIZ needs
IFB_ALIAS = "shaper ingress of "  # + the interface's name when the ifb was made


def ifb_name(ifindex: int) -> str:
    return f"{IFB_PREFIX}{ifindex}"


def _mounts(pid: str = "self") -> Iterator[tuple[str, str, str]]:
    """(mount point, fs type, source) of each mount in a process's mount namespace."""
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            yield parts[4], parts[sep + 1], parts[sep + 2]


def _is_bpffs(base: str, pid: str = "self") -> bool:
    return any(point == base and fstype == BPFFS_MAGIC_TYPE for point, fstype, _ in _mounts(pid))


def _mnt_ns(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    return 0


def _ancestor_outside(mnt_ns: int) -> int | None:
    """The nearest ancestor process whose mount namespace is not `mnt_ns`, if one can be seen."""
    pid = os.getpid()
    try:
        while (pid := _parent(pid)) > 0:
            if _mnt_ns(pid) != mnt_ns:
                return pid
    except OSError:  # an ancestor gone meanwhile, or not ours to see
        pass
    return None


def under_ip_netns_exec() -> str | None:
    """The namespace name if this process runs in the mount namespace `ip netns exec` made, else None.

    `ip netns exec NS` unshares the mount namespace and mounts a fresh sysfs
    on /sys whose source is NS (so /sys/class/net shows NS's devices).  That
    hides the host's bpffs at /sys/fs/bpf: whatever is pinned there lands in a
    private bpffs that dies with the command."""
    for point, fstype, source in _mounts():
        if point == "/sys" and fstype == "sysfs" and source != "sysfs" and "/" not in source \
                and os.path.exists(f"/run/netns/{source}"):
            return source
    return None


def join_host_mounts(base: str) -> None:
    """Under `ip netns exec`, rejoin the mount namespace it was started from.

    shaper's state lives in pins on the host's bpffs, so `ip netns exec NS
    shaper ...` must see the same bpffs as `nsenter --net=/run/netns/NS shaper
    ...` does.  The network namespace is kept; only the mounts change, to those
    of the nearest ancestor process outside this private mount namespace (the
    shell that ran `ip netns exec`), as nsenter --net would have left them.
    setns(CLONE_NEWNS) needs a single-threaded process: call this before any
    thread starts.  Does nothing elsewhere (a container's own mounts, a host)."""
    netns = under_ip_netns_exec()
    if netns is None or _is_bpffs(base):
        return
    pid = _ancestor_outside(_mnt_ns("self"))
    hint = (f"run it as `nsenter --net=/run/netns/{netns} shaper ...` or `shaper ... --netns {netns}`, "
            f"or mount the host's bpffs at {base} inside the command")
    if not pid:
        raise NotSupported(f"under `ip netns exec {netns}` the host's bpffs at {base} is hidden and no process "
                           f"outside that private mount namespace was found to reach it: {hint}")
    cwd = os.getcwd()
    try:
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
    except OSError as exc:
        raise NotSupported(f"under `ip netns exec {netns}` the host's bpffs at {base} is hidden, and the mount "
                           f"namespace of process {pid} cannot be opened ({exc.strerror}): {hint}") from None
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise NotSupported(f"under `ip netns exec {netns}` the host's bpffs at {base} is hidden, and joining "
                               f"the mount namespace of process {pid} failed ({os.strerror(err)}): {hint}")
    finally:
        os.close(fd)
    try:  # setns reset the working directory to the namespace's root: relative paths must still work
        os.chdir(cwd)
    except OSError:
        pass


def ensure_bpffs(base: str) -> None:
    """Mount a bpffs at `base` unless one is there (iproute2 does the same for tc pins)."""
    if _is_bpffs(base):
        return
    os.makedirs(base, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", base.encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        if err == 1:
            raise PermissionDenied(f"mounting a bpffs at {base} was refused: needs CAP_SYS_ADMIN, or mount it first "
                                   f"(mount -t bpf bpf {base})")
        raise NotSupported(f"cannot mount a bpffs at {base}: {os.strerror(err)}")


class _Claim(socket.socket):
    """The claim's listening socket; closing it also lets go of the claims held with it."""

    def __init__(self) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.also: list[socket.socket] = []

    def close(self) -> None:
        for sock in self.also:
            sock.close()
        super().close()


def _holder(name: bytes, ifname: str = "") -> str:
    """Who listens on an abstract claim: the node agent (it says so with a second claim), or the
    listener's process as the kernel gives it, with its command line where this process sees it."""
    if ifname and _claimed_by(_agent_claim(ifname)) is not None:
        return "the shaper agent of this node (shaper agent; ask it at /targets/<target>/rules)"
    who = _claimed_by(name)
    if who is None:
        return "another process"
    pid = who.rpartition(" ")[2]
    if pid == "0":  # in a PID namespace this process cannot see (a pod's sidecar, seen from the node)
        return "a process outside this PID namespace"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read(200).replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        cmd = ""
    return f"{who}: {cmd}" if cmd else who


def _agent_claim(ifname: str) -> bytes:
    """The second claim the node agent holds on a target's interface, so that who is refused knows who holds it."""
    return f"\0shaper/agent/{ifname}".encode()


def _claimed_by(name: bytes) -> str | None:
    """"process PID" if some process holds the abstract claim `name` (in this thread's netns), else None."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a full backlog must not block the probe
    try:
        probe.connect(name)
    except BlockingIOError:
        return "another process"
    except OSError:  # ECONNREFUSED: nobody listens
        return None
    try:
        return f"process {struct.unpack('=iII', probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]}"
    except OSError:
        return "another process"
    finally:
        probe.close()


def claim_interface(ifname: str, netns: str | None, agent: bool = False) -> socket.socket:
    """Hold the interface for this process: one controller per interface.

    The claim is an abstract unix socket bound in the interface's network
    namespace: abstract names are per namespace, seen by every container
    sharing it, and released by the kernel when the holder dies, even by
    SIGKILL, so there is no stale lock to clean up.  Two are held: one named
    after the ifindex, which a rename keeps (a second shaper given the new
    name is refused), and one after the name, so nobody takes the name while
    a daemon waits for its vanished interface to come back.  Returns the
    socket; keep it open while in control.  Raises Conflict naming the holder.
    The node agent (`agent`) holds a third, which names it to whoever it refuses.
    """
    where = f" in network namespace {netns}" if netns else ""
    advice = "stop it first, or talk to it with the client commands (shaper rule ..., --server)"

    def bind(name: bytes) -> socket.socket | None:
        sock = _Claim()
        try:
            sock.bind(name)
            sock.listen(64)  # never accepted: probes only read the listener's credentials
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
        return None

    def claim() -> socket.socket:
        try:
            ifindex = socket.if_nametoindex(ifname)
        except OSError:  # absent: the name alone (the datapath says the interface is missing)
            ifindex = 0
        by_name = f"\0shaper/{ifname}".encode()
        by_index = f"\0shaper/ifindex/{ifindex}".encode()  # "/" is never in an interface name
        held = bind(by_index) if ifindex else None
        if ifindex and held is None:
            raise Conflict(f"{ifname}{where} (ifindex {ifindex}) is controlled by another shaper "
                           f"({_holder(by_index, ifname)}), which may know it by an earlier name; {advice}")
        named = bind(by_name)
        if named is None:
            if held is not None:
                held.close()
            raise Conflict(f"{ifname}{where} is controlled by another shaper ({_holder(by_name, ifname)}); {advice}")
        if held is not None:
            named.also.append(held)
        if agent:
            marker = bind(_agent_claim(ifname))
            if marker is None:  # only a holder of by_name binds it: a leftover cannot be
                named.close()
                raise Conflict(f"{ifname}{where} is controlled by another shaper agent; {advice}")
            named.also.append(marker)
        return named

    return in_netns(netns, claim) if netns else claim()


def netns_id(netns: str | None) -> int:
    return os.stat(netns_path(netns) if netns else "/proc/self/ns/net").st_ino


def _pack_entries(entries: Mapping[Prefix, P.Entry]) -> tuple[bytes, bytes]:
    """The trie keys and values of `entries` as two packed arrays, for one batch write.

    Iterated in C (map, starmap): 100,000 entries packed one by one in a Python loop took
    longer than the kernel takes to store them.  The plan shares one value object among a
    rule's entries, so each distinct value is packed once."""
    prefixes = list(entries)
    keys = b"".join(starmap(abi.LPM_KEY.pack, zip(map(itemgetter(1), prefixes), map(itemgetter(0), prefixes))))
    return keys, _pack_values(list(entries.values()))


def _pack_values(values: list[P.Entry]) -> bytes:
    """The trie values `values` packed back to back, each distinct value object packed once."""
    packed = {id(v): abi.pack_entry(v) for v in dict(zip(map(id, values), values)).values()}
    return b"".join(map(packed.__getitem__, map(id, values)))


HOST_PREFIXLEN = 128  # a whole address, as the tries store it (IPv4 mapped): dst_host's entries


def _pack_hosts(entries: Mapping[Prefix, P.Entry]) -> tuple[bytes, bytes]:
    """dst_host's keys and values for the prefixlen-128 entries of `entries` (IPv6 /128s,
    IPv4 /32s): the whole address, and the value the trie holds for it."""
    # The prefixes themselves, no (address, value) pair per host (py-spy put 0.1-0.2 s of a 100,000-host
    # apply in that comprehension; alone, either form takes 12-24 ms: the cause was not found).
    hosts = [p for p in entries if p.prefixlen == HOST_PREFIXLEN]
    return b"".join(map(itemgetter(0), hosts)), _pack_values(list(map(entries.__getitem__, hosts)))


def _read_trie(trie: Map) -> dict[Prefix, P.Entry]:
    entries: dict[Prefix, P.Entry] = {}
    values: dict[bytes, P.Entry] = {}  # a rule's entries share a value or two: decode each once
    for key, raw in trie.items():
        prefixlen, addr = abi.unpack_key(key)
        value = values.get(raw)
        if value is None:
            value = values[raw] = abi.unpack_entry(raw)
        entries[Prefix(addr, prefixlen)] = value
    return entries


def _pins_complete_in(pin_dir: str) -> bool:
    """Every pin there: the programs and maps, and the host hash unless the pins were made without
    one (an earlier shaper's, whose classifier does not read it: their record does not say
    `host_hash`).  Without that, losing only the hash's pin would let the next controller adopt
    a classifier that reads a hash it could no longer write."""
    if not all(os.path.exists(os.path.join(pin_dir, n))
               for n in (loader.PROG_PIN, loader.PROG_IN_PIN) + loader.MAP_NAMES):
        return False
    if all(os.path.exists(os.path.join(pin_dir, n)) for n in loader.HOST_MAPS):
        return True
    try:
        own = _record0(pin_dir)
    except (OSError, ValueError, ShaperError):
        return True  # an unreadable record is refused where it is read
    return not (own or {}).get("host_hash")


def _first_version_pins_in(pin_dir: str) -> bool:
    """Whether `pin_dir` holds what the first shaper version pinned and nothing of the ingress maps."""
    return all(os.path.exists(os.path.join(pin_dir, n)) for n in loader.FIRST_VERSION_PINS) \
        and not os.path.exists(os.path.join(pin_dir, "src_lpm"))


def _prog_id_at(pin_dir: str) -> int:
    fd = obj_get(os.path.join(pin_dir, loader.PROG_PIN))
    try:
        return prog_id(fd)
    finally:
        os.close(fd)


def _record0(pin_dir: str) -> dict | None:
    """The controller's own record (rule_meta[0]) in a pin directory."""
    meta = Map(os.path.join(pin_dir, "rule_meta"), 4, abi.RULE_META.size)
    try:
        raw = meta.lookup(_SLOT.pack(0))
    finally:
        meta.close()
    return json.loads(abi.unpack_meta(raw)) if raw else None


INTENT_PIN = "intent"
_INTENT_CHUNK = 4096  # bytes per map value
_INTENT_MAX_CHUNKS = 4096  # 16 MiB: a change of 524,288 prefixes packs to well under half
_INTENT_HEAD = struct.Struct("=4sIII")  # magic, length, chunks, crc32
_INTENT_MAGIC = b"SHI1"
_BPF_MAP_TYPE_HASH = 1
_BPF_F_NO_PREALLOC = 1


def _create_intent_map(path: str) -> None:
    """Create and pin the intent map: a hash of 4 KiB chunks, allocated only while a change runs.

    Created here rather than by the loader so pins made by an earlier shaper gain it
    without a reload; removing the pin directory removes it with the rest."""
    fd = map_create(_BPF_MAP_TYPE_HASH, "shaper_intent", 4, _INTENT_CHUNK, _INTENT_MAX_CHUNKS, _BPF_F_NO_PREALLOC,
                    f"the intent map {path}")
    try:
        obj_pin(fd, path)
    finally:
        os.close(fd)


class KernelDatapath:
    """The Datapath (interface.py) of one interface's tc clsact egress hook."""

    ifname: str
    _intent: Map | None = None  # the intent map, opened on first use

    def __init__(self, ifname: str, netns: str | None = None, bpffs: str | None = None,
                 agent: dict | None = None, spare: Callable[[str], bool] | None = None):
        self.bpffs = bpffs or os.environ.get("SHAPER_BPFFS", "/sys/fs/bpf")
        # The node agent's description of its target (kept in rule_meta[0]): shaping set up
        # by the agent is adopted only by the agent, and a sidecar's only by a sidecar.
        self.agent = agent
        # The node agent's classifiers compiled ahead: spare(pin_dir) moves a fresh, never
        # attached one there and says whether it did; otherwise attach() compiles one.
        self.spare = spare
        join_host_mounts(self.bpffs)
        self.tc = Tc(ifname, netns)
        self.ifname = ifname
        self.netns = netns
        try:
            self.pin_dir = self._locate_pins()
        except BaseException:
            self.tc.close()  # its netlink socket would hold the namespace (a node agent's target) open
            raise
        self.lpm: Map | None = None
        self.stats: Map | None = None
        self.meta: Map | None = None
        self.src_lpm: Map | None = None
        self.ports: Map | None = None
        self.stats_in: Map | None = None
        self.ingress_cfg: Map | None = None
        # The host hash beside dst_lpm (None in pins made before it: see loader.HOST_MAPS).
        self.dst_host: Map | None = None
        # The program this process attached or adopted, held open: what readiness compares
        # the interface's filter with, and what is pinned again if the pins vanish.
        self.prog_fd: int | None = None
        self.prog_in_fd: int | None = None  # the ingress program, once ingress is set up or adopted
        self._tc_in: Tc | None = None  # the interface's clsact ingress hook (a view of self.tc)
        self._ifb_tc: Tc | None = None  # the ifb's HTB (opened on the ifb's ifindex of the moment)
        self._ingress_ready = False
        self._pins_lost = False
        self._attach_failed = False

    @property
    def ifindex(self) -> int:
        return self.tc.ifindex

    def link_present(self) -> bool:
        return self.tc.link_present()

    def close(self) -> None:
        self.close_maps()
        self._release_prog()
        self._close_ingress_tc()
        self.tc.close()

    def _release_prog(self) -> None:
        if self.prog_fd is not None:
            os.close(self.prog_fd)
            self.prog_fd = None
        if self.prog_in_fd is not None:
            os.close(self.prog_in_fd)
            self.prog_in_fd = None
        self._ingress_ready = False

    def _close_ingress_tc(self) -> None:
        if self._ifb_tc is not None:
            self._ifb_tc.close()
        self._tc_in = self._ifb_tc = None  # the ingress hook shares self.tc's socket

    # -- attach / adopt -----------------------------------------------------------
    def _pins_complete(self) -> bool:
        return _pins_complete_in(self.pin_dir)

    def open_maps(self) -> None:
        self.lpm = Map(os.path.join(self.pin_dir, "dst_lpm"), abi.LPM_KEY.size, abi.LPM_VAL.size)
        self.stats = Map(os.path.join(self.pin_dir, "rule_stats"), 4, abi.RULE_STATS.size, percpu=True)
        self.meta = Map(os.path.join(self.pin_dir, "rule_meta"), 4, abi.RULE_META.size)
        self.src_lpm = Map(os.path.join(self.pin_dir, "src_lpm"), abi.LPM_KEY.size, abi.LPM_VAL.size)
        self.ports = Map(os.path.join(self.pin_dir, "port_lpm"), abi.PORT_KEY.size, abi.PORT_VAL.size)
        self.stats_in = Map(os.path.join(self.pin_dir, "rule_stats_in"), 4, abi.RULE_STATS.size, percpu=True)
        self.ingress_cfg = Map(os.path.join(self.pin_dir, "ingress_cfg"), 4, abi.INGRESS_CFG.size)
        hosts = os.path.join(self.pin_dir, "dst_host")
        self.dst_host = Map(hosts, abi.HOST_KEY.size, abi.LPM_VAL.size) if os.path.exists(hosts) else None

    def read_record(self, slot: int) -> dict | None:
        assert self.meta is not None
        raw = self.meta.lookup(_SLOT.pack(slot))
        return json.loads(abi.unpack_meta(raw)) if raw else None

    def _write_record(self, slot: int, record: dict) -> None:
        assert self.meta is not None
        payload = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
        self.meta.update(_SLOT.pack(slot), abi.pack_meta(payload))

    def adoptable(self) -> bool:
        """Whether attach() would adopt what is pinned here: complete pins whose record names this
        interface's ifindex and whose program is the one attached to it (Datapath.adoptable)."""
        if not self._pins_complete():
            return False
        try:
            return self._runs(_record0(self.pin_dir), self.tc.filter_prog_id())
        except (OSError, ValueError, ShaperError):
            return False

    def _runs(self, own: dict | None, attached: int | None) -> bool:
        """Whether the pins (their record `own`) are what runs on the interface, whose filter's program is
        `attached`: the record names this ifindex and the pinned program is that one."""
        return bool(own and own.get("ifindex") == self.tc.ifindex and attached is not None
                    and attached == self._pinned_prog_id())

    def forget(self) -> list[str]:
        """The namespace is gone: its pins are all that is left of shaper's (Datapath.forget)."""
        self.close_maps()
        if not os.path.isdir(self.pin_dir):
            return []
        self.remove_pins()
        return ["pins"]

    def set_agent_record(self, agent: dict) -> None:
        """The node agent renamed its target: what rule_meta[0] says of it, for the next agent to adopt."""
        self.agent = agent
        own = self.read_record(0) or {}
        self._write_record(0, {**own, "agent": agent})

    def is_attached(self) -> bool:
        """Whether shaper's program is the one attached to the interface.

        After attach() that is the program this process holds: its maps are open,
        so shaping and changes work whatever happened to the pins (a bpffs
        unmounted, a pin removed by hand), and missing pins are put back (see
        _restore_pins).  Before attach() (show, a local reset) it is the pinned one."""
        if self.prog_fd is None:
            return self._pins_complete() and self.tc.filter_prog_id() == self._pinned_prog_id()
        if self.tc.filter_prog_id() != prog_id(self.prog_fd):
            return False
        self._restore_pins()
        return True

    def _restore_pins(self) -> None:
        """Pin the held program and maps again where they are missing or are not ours.

        Without its pins a restart would not adopt the running shaping (it would
        find a classifier it cannot account for and refuse to start), so losing
        them is logged, and they are put back, mounting a bpffs again if needed."""
        objects = {loader.PROG_PIN: self.prog_fd, "dst_lpm": self.lpm, "rule_stats": self.stats,
                   "rule_meta": self.meta, "src_lpm": self.src_lpm, "port_lpm": self.ports,
                   "rule_stats_in": self.stats_in, "ingress_cfg": self.ingress_cfg}
        if self.dst_host is not None:
            objects["dst_host"] = self.dst_host
        if self.prog_in_fd is not None:
            objects[loader.PROG_IN_PIN] = self.prog_in_fd
        if self._intent is not None:  # an interrupted change's undo must survive a restart too
            objects[INTENT_PIN] = self._intent
        try:
            if self._pins_complete() and self._pinned_prog_id() == prog_id(self.prog_fd):
                self._pins_lost = False
                return
        except ShaperError:
            pass  # unreadable pins are repaired like missing ones
        if not self._pins_lost:
            log.warning("pins.missing", extra={"fields": {
                "interface": self.ifname, "pins": self.pin_dir,
                "action": "shaping continues from the open program and maps; pinning them again"}})
        self._pins_lost = True
        try:
            ensure_bpffs(self.bpffs)
            os.makedirs(self.pin_dir, exist_ok=True)
            for name, obj in objects.items():
                path = os.path.join(self.pin_dir, name)
                if os.path.exists(path):
                    os.unlink(path)
                obj_pin(obj if isinstance(obj, int) else obj.fd, path)
        except (OSError, ShaperError) as exc:
            log.warning("pins.restore_failed", extra={"fields": {
                "interface": self.ifname, "pins": self.pin_dir, "error": str(exc),
                "consequence": "shaping continues; a restart would not adopt it"}})
            return
        self._pins_lost = False
        log.warning("pins.restored", extra={"fields": {"interface": self.ifname, "pins": self.pin_dir}})

    def unaccounted_filter(self) -> int | None:
        """The program id of a classifier at shaper's pref that is not the one pinned here, if any.

        Another shaper put it there with its pins out of sight (a private
        bpffs, another container's) or another tool uses the pref: either way
        shaper cannot account for it, and never replaces it silently."""
        attached = self.tc.filter_prog_id()
        if attached is None or (self.prog_fd is not None and attached == prog_id(self.prog_fd)):
            return None
        if self._pins_complete() and attached == self._pinned_prog_id():
            return None
        return attached

    def check_accounted(self) -> None:
        """Raise Conflict if a classifier at shaper's pref is not the one pinned here."""
        attached = self.unaccounted_filter()
        if attached is not None:
            raise Conflict(
                f"{self.ifname} has a classifier at shaper's pref {FILTER_PREF} (BPF program id {attached}) that "
                f"is not the one pinned in {self.pin_dir}: another shaper attached it with its pins out of sight "
                f"(a private bpffs, another container's) or another tool uses that pref. shaper will not replace "
                f"it; stop whatever controls it, or remove it with `shaper reset --iface {self.ifname}`"
            )

    def attach(self) -> AttachResult:
        """Load, pin and attach what is missing; returns 'adopted' or 'attached'.

        Refuses (Conflict) to replace a classifier at shaper's pref that is not
        the program pinned here, or a root qdisc someone else configured; a
        refused or failed start leaves nothing behind."""
        created: list[str] = []
        try:
            ensure_bpffs(self.bpffs)
            attached = self.tc.filter_prog_id()
            self._move_renamed_pins()
            self._refuse_first_version_pins(attached)
            adopted = False
            if self._pins_complete():
                self.open_maps()
                own = self.read_record(0)
                adopted = self._runs(own, attached)
                if not adopted:
                    self.close_maps()
                else:
                    self._check_owner(own)
                    self._check_size()
            if not adopted:
                self.check_accounted()
                # Before the compile and the pins: a root someone else configured refuses the
                # start with nothing loaded (a refused apply left a program and a 262,144-entry
                # trie pinned, and `show` then said "not attached").
                if self.tc.ensure_root():
                    created.append("root")
                # Pins of an interface that no longer exists (its tc objects went with
                # it), or of an earlier namespace whose inode number this one reuses (a
                # pod killed without cleanup): the same name and ifindex, but no program
                # on the interface. Start afresh rather than adopt its rules.
                self._clear_ingress_leftovers()
                self.remove_pins()
                created.append("pins")
                os.makedirs(os.path.dirname(self.pin_dir), exist_ok=True)
                if self.spare is None or not self.spare(self.pin_dir):
                    loader.load_and_pin(self.pin_dir)
                self.open_maps()
                self._write_record(0, {"version": RECORD_VERSION, "ifindex": self.tc.ifindex,
                                       "ifname": self.ifname, "created_clsact": False,
                                       "host_hash": self.dst_host is not None,
                                       **({"agent": self.agent} if self.agent is not None else {})})
            own = self.read_record(0) or {}
            if own and own.get("ifname") != self.ifname:  # adopted after a rename
                own = {**own, "ifname": self.ifname}
                self._write_record(0, own)
            self.tc.ensure_root()
            if not self.tc.has_clsact():
                # Record first: a crash between the two leaves reset knowing what to remove.
                own = {**own, "created_clsact": True}
                self._write_record(0, own)
                self.tc.ensure_clsact()
                created.append("clsact")
            self.prog_fd = obj_get(os.path.join(self.pin_dir, loader.PROG_PIN))
            self.prog_in_fd = obj_get(os.path.join(self.pin_dir, loader.PROG_IN_PIN))
            if attached != prog_id(self.prog_fd):
                self.tc.attach_filter(self.prog_fd, created_clsact=bool(own.get("created_clsact")))
            if adopted and own.get("ingress"):
                # Put back what is missing of the ingress set up earlier (an ifb deleted
                # takes its classes: observe() then reports none and the next plan recreates them).
                self._ensure_ingress()
        except BaseException:
            self._attach_failed = True
            self._undo(created)
            raise
        return "adopted" if adopted else "attached"

    def _check_size(self) -> None:
        """Refuse to adopt tries of another size than this process plans for (SHAPER_MAX_PREFIXES)."""
        from shaper.core import model

        assert self.lpm is not None
        if self.lpm.max_entries != model.MAX_PREFIXES:
            raise Conflict(f"{self.ifname}'s tries hold {self.lpm.max_entries:,} prefixes (made with "
                           f"SHAPER_MAX_PREFIXES={self.lpm.max_entries}); this shaper uses {model.MAX_PREFIXES:,}: "
                           f"run it with SHAPER_MAX_PREFIXES={self.lpm.max_entries}, or remove the shaping with "
                           f"`shaper reset` and apply again")

    def _check_owner(self, own: dict) -> None:
        """Refuse to adopt shaping that the other kind of controller set up (node agent / sidecar)."""
        theirs = own.get("agent")
        if self.agent is not None and theirs is None:
            raise Conflict(f"{self.ifname} is shaped by a shaper that is not this node's agent (a sidecar, `shaper "
                           f"run` or `shaper apply`, pinned in {self.pin_dir}); the agent leaves it alone: stop that "
                           f"shaper, or remove its shaping with `shaper reset` in that namespace, then try again")
        if self.agent is None and theirs is not None:
            target = theirs.get("target", "?") if isinstance(theirs, dict) else "?"
            raise Conflict(f"{self.ifname} is shaped by the shaper agent of this node (target {target}); change it "
                           f"through the agent (/targets/{target}/rules), or delete the target there "
                           f"(DELETE /targets/{target}), or with the agent gone `shaper reset --iface "
                           f"{self.ifname}` here, before shaping it from here")

    def _clear_ingress_leftovers(self) -> None:
        """Before a fresh start: remove the ingress filter and ifb an earlier start left (its egress
        classifier gone, say), so its program stops redirecting by stale rules.  Only shaper's:
        the filter named as shaper names it, the ifbs the old record names or of this ifindex,
        aliased as shaper's for this interface."""
        try:
            own = _record0(self.pin_dir) if self._pins_complete() else None
        except (OSError, ValueError, ShaperError):
            own = None
        hook = self._ingress_hook()
        attached, name, _redirect = hook.filter_summary()
        if attached is not None and name in (FILTER_NAME, FILTER_NAME_OWN_CLSACT):
            hook.detach_filter()
            log.info("ingress.leftover_removed", extra={"fields": {"interface": self.ifname, "object": "filter"}})
        for removed in self._remove_old_ifb(own or {}) + self._remove_old_ifb({"ingress": ifb_name(self.tc.ifindex)}):
            log.info("ingress.leftover_removed", extra={"fields": {"interface": self.ifname, "object": removed}})

    def _refuse_first_version_pins(self, attached: int | None) -> None:
        """Pins the first shaper version made (no ingress maps) are not someone else's: say whose they are."""
        if not _first_version_pins_in(self.pin_dir):
            return
        running = " and its classifier is attached" if attached is not None else ""
        raise ShaperError(
            f"{self.pin_dir} holds the pins of an earlier shaper version (without the ingress and port maps)"
            f"{running}: this shaper cannot adopt them. Run `shaper reset --iface {self.ifname}` with this "
            f"shaper (it removes the earlier one's classifier, classes and pins), then apply the rules again")

    # -- ingress: the ifb and the clsact ingress filter ---------------------------
    def _ingress_hook(self) -> Tc:
        if self._tc_in is None:
            self._tc_in = self.tc.for_hook("ingress")
        return self._tc_in

    def _ifb(self) -> tuple[int, str, str] | None:
        """(ifindex, kind, alias) of the device named as this interface's ifb, if there is one."""
        return self.tc.link_info(ifb_name(self.tc.ifindex))

    def _ifb_hook(self, index: int) -> Tc:
        """The Tc of the ifb, reopened when the ifb is another device than last time."""
        if self._ifb_tc is not None and self._ifb_tc.ifindex != index:
            self._ifb_tc.close()
            self._ifb_tc = None
        if self._ifb_tc is None:
            self._ifb_tc = Tc(ifb_name(self.tc.ifindex), self.netns)
        return self._ifb_tc

    def _ensure_ingress(self) -> Tc:
        """Set ingress up, or put back what is missing of it; returns the ifb's Tc.

        Each step is recorded in rule_meta[0] before it is taken (one record names the
        ifb, and every step below is one reset undoes when present), so a crash at any
        point leaves reset knowing what to remove.  Steps: the ifb, its HTB root, its
        ifindex in ingress_cfg, classify_ingress at the interface's clsact ingress."""
        name = ifb_name(self.tc.ifindex)
        if self._ingress_ready and self._ifb_tc is not None:
            return self._ifb_tc
        assert self.ingress_cfg is not None and self.prog_in_fd is not None
        own = self.read_record(0) or {}
        # Refusals first, so a refused apply has created nothing.
        hook = self._ingress_hook()
        attached, filter_name, redirect = hook.filter_summary()
        if attached is not None and attached != prog_id(self.prog_in_fd) and \
                filter_name not in (FILTER_NAME, FILTER_NAME_OWN_CLSACT):
            raise Conflict(f"{self.ifname} has a classifier at shaper's pref {FILTER_PREF} on clsact ingress "
                           f"(BPF program id {attached}) that shaper did not attach; remove it "
                           f"(tc filter del dev {self.ifname} ingress pref {FILTER_PREF}), then apply again")
        found = self._ifb()
        if found is not None and not self._ifb_is_ours(found, own):
            index, kind, alias = found
            raise Conflict(f"{self.ifname}'s ingress needs the device name {name}, which {kind or 'a'} device "
                           f"{index} ({alias or 'no alias'}) shaper did not create holds; remove or rename it "
                           f"(ip link del {name}), then apply again")
        if own.get("ingress") != name:
            own = {**own, "ingress": name}
            self._write_record(0, own)
        if found is None:
            index = self.tc.add_ifb(name, IFB_ALIAS + self.ifname)
        else:
            index = found[0]
            self.tc.set_link_up(index)
        ifb = self._ifb_hook(index)
        ifb.ensure_root()
        self.ingress_cfg.update(_SLOT.pack(0), abi.INGRESS_CFG.pack(index, 0))
        # Attached, or replaced (atomically) when it is not this program or its mirred action names
        # another ifindex than the ifb's (the ifb was made again).
        if attached != prog_id(self.prog_in_fd) or redirect != index:
            hook.attach_filter(self.prog_in_fd, created_clsact=bool(own.get("created_clsact")), redirect_to=index)
        self._ingress_ready = True
        return ifb

    def _ifb_is_ours(self, found: tuple[int, str, str], own: dict) -> bool:
        """An ifb shaper made for this interface: its alias says so, or (created, alias not yet set) the record."""
        _index, kind, alias = found
        if kind != "ifb":
            return False
        return alias.startswith(IFB_ALIAS) or (not alias and own.get("ingress") == ifb_name(self.tc.ifindex))

    def _ingress_tree(self) -> Tc | None:
        """The ifb's Tc if the ifb is there (ingress classes live on it), else None."""
        found = self._ifb()
        if found is None or not self._ifb_is_ours(found, (self.read_record(0) if self.meta else None) or {}):
            return None  # none, or a device of that name shaper did not make: not its classes
        return self._ifb_hook(found[0])

    def repair(self) -> list[str]:
        """Put back shaper's ingress set-up where someone removed part of it; returns what was put back.

        With the ifb deleted, the ingress filter's mirred action has no target and drops every
        packet the classifier matched; with the filter removed, ingress rules stop applying.
        Cheap when intact (one record read, one link lookup, one filter dump), so the daemon
        asks every second; nothing to do before the first ingress rule.  The ifb's classes
        went with it: the caller plans again (observe() then reports them missing)."""
        if self.prog_in_fd is None or self.meta is None:
            return []
        own = self.read_record(0) or {}
        if not own.get("ingress"):
            return []
        found = self._ifb()
        broken = []
        if found is None or not self._ifb_is_ours(found, own):
            broken.append(f"ifb {ifb_name(self.tc.ifindex)}")
        attached, _name, redirect = self._ingress_hook().filter_summary()
        if attached != prog_id(self.prog_in_fd) or (found is not None and redirect != found[0]):
            broken.append("ingress filter")
        if not broken:
            return []
        self._ingress_ready = False
        self._ensure_ingress()
        return broken

    def _reset_ingress(self, own: dict | None) -> list[str]:
        """Remove shaper's filter at clsact ingress and its ifb (which takes the ifb's qdiscs).

        Only shaper's: the filter at shaper's pref whose name is shaper's, the ifb of this
        interface's name whose alias (or, pins readable, record) says shaper made it."""
        removed = []
        hook = self._ingress_hook()
        if hook.filter_prog_id() is not None and hook.filter_name() in (FILTER_NAME, FILTER_NAME_OWN_CLSACT):
            hook.detach_filter()
            removed.append("ingress filter")
        found = self._ifb()
        if found is not None and self._ifb_is_ours(found, own or {}):
            if self._ifb_tc is not None:
                self._ifb_tc.close()
                self._ifb_tc = None
            self.tc.del_link(found[0])
            removed.append(f"ifb {ifb_name(self.tc.ifindex)}")
        self._ingress_ready = False
        return removed

    def _remove_old_ifb(self, own: dict | None = None) -> list[str]:
        """Delete the ifb that the pinned record names, if it is still there and shaper's (its
        alias names this interface): the ifb of an earlier link of this name, which took its
        clsact filters with it but not the ifb."""
        if own is None:
            try:
                own = (self.read_record(0) if self.meta else _record0(self.pin_dir)) or {}
            except (OSError, ValueError, ShaperError):
                own = {}
        name = own.get("ingress")
        if not name:
            return []
        found = self.tc.link_info(name)
        if found is None or found[1] != "ifb" or found[2] != IFB_ALIAS + self.ifname:
            return []
        if self._ifb_tc is not None:
            self._ifb_tc.close()
            self._ifb_tc = None
        self.tc.del_link(found[0])
        return [f"ifb {name}"]

    def _undo(self, created: list[str]) -> None:
        """Remove what a failed attach created, newest first, and let go of what it opened."""
        self._release_prog()
        self.close_maps()
        for what in reversed(created):
            try:
                if what == "clsact" and not self.tc.clsact_filters():
                    self.tc.del_clsact()
                elif what == "root":
                    self.tc.del_root()
                elif what == "pins":
                    self.remove_pins()  # nothing left behind, not even an empty shaper/ directory
            except (OSError, ShaperError) as exc:  # the original error is the one to report
                log.warning("attach.undo_failed", extra={"fields": {"interface": self.ifname, "object": what,
                                                                    "error": str(exc)}})

    def _move_renamed_pins(self) -> None:
        """Pins found under the interface's earlier name (see _locate_pins) move to its name now."""
        own = self._own_pin_dir()
        if self.pin_dir == own:
            return
        # A daemon that followed its interface to a new ifindex holds the old name's claim
        # but not this ifindex's: its pins are still its own.
        old_name = os.path.basename(self.pin_dir).split("-", 1)[1]
        claim = f"\0shaper/{old_name}".encode()
        holder = in_netns(self.netns, lambda: _claimed_by(claim)) if self.netns else _claimed_by(claim)
        if holder is not None:
            raise Conflict(f"{self.ifname} (ifindex {self.tc.ifindex}) is controlled by another shaper ({holder}), "
                           f"which knows it as {old_name}; stop it first, or talk to it with the client commands "
                           f"(shaper rule ..., --server)")
        try:
            os.rename(self.pin_dir, own)
        except OSError as exc:  # still usable where they are
            log.warning("pins.rename_failed", extra={"fields": {"from": self.pin_dir, "to": own,
                                                                "error": exc.strerror}})
            return
        log.info("pins.renamed", extra={"fields": {"interface": self.ifname, "from": self.pin_dir, "to": own}})
        self.pin_dir = own

    def _own_pin_dir(self) -> str:
        return os.path.join(self.bpffs, "shaper", f"{netns_id(self.netns)}-{self.ifname}")

    def _locate_pins(self) -> str:
        """Where this interface's pins are: under its name, or under the name it had when
        they were made, if it was renamed since.

        The directory's name is for people; the interface's identity is its network
        namespace (the inode in the name) and its ifindex, which a rename keeps and
        rule_meta[0] records.  Pins elsewhere are this interface's only if their record
        says this ifindex and their program is the one attached here: a program that is
        not the one shaper pinned is never taken for it."""
        own = self._own_pin_dir()
        if _pins_complete_in(own):
            return own
        parent, head = os.path.dirname(own), f"{netns_id(self.netns)}-"
        attached = self.tc.filter_prog_id()
        try:
            names = sorted(os.listdir(parent)) if attached is not None else []
        except OSError:
            names = []
        for name in names:
            path = os.path.join(parent, name)
            if not name.startswith(head) or path == own or not _pins_complete_in(path):
                continue
            try:
                record = _record0(path)
                if record and record.get("ifindex") == self.tc.ifindex and _prog_id_at(path) == attached:
                    return path
            except (OSError, ValueError, ShaperError):
                continue
        return own

    def _pinned_prog_id(self) -> int:
        return _prog_id_at(self.pin_dir)

    def close_maps(self) -> None:
        for m in (self.lpm, self.stats, self.meta, self._intent, self.src_lpm, self.ports, self.stats_in,
                  self.ingress_cfg, self.dst_host):
            if m:
                m.close()
        self.lpm = self.stats = self.meta = self._intent = None
        self.src_lpm = self.ports = self.stats_in = self.ingress_cfg = self.dst_host = None

    def remove_pins(self) -> None:
        if os.path.isdir(self.pin_dir):
            shutil.rmtree(self.pin_dir)
        try:  # the shared shaper/ directory goes with its last interface
            os.rmdir(os.path.dirname(self.pin_dir))
        except OSError:
            pass

    # -- the datapath interface ------------------------------------------------
    def observe(self) -> P.Observed:
        assert self.lpm and self.meta and self.src_lpm and self.ports
        entries = _read_trie(self.lpm)
        ingress_entries = _read_trie(self.src_lpm)
        ports = {abi.unpack_port_key(k): abi.unpack_port_entry(v) for k, v in self.ports.items()}
        classes = {slot: (cs.leaf or "pfifo") for slot, cs in self.tc.class_stats().items()}
        ifb = self._ingress_tree()
        if ifb is None:
            self._ingress_ready = False  # gone (deleted by hand?): the next ingress operation rebuilds it
        ingress_classes = {slot: (cs.leaf or "pfifo") for slot, cs in ifb.class_stats().items()} if ifb else {}
        observed = P.Observed(entries=entries, classes=classes, ingress_entries=ingress_entries,
                              ingress_classes=ingress_classes, ports=ports)
        return P.attach_rules(observed, self._records())

    def rule_names(self) -> dict[int, str]:
        """slot -> rule name from the records alone (what a scrape needs; no trie walk)."""
        return {slot: record["rule"]["name"] for slot, record in self._records()}

    def _records(self) -> Iterator[tuple[int, dict]]:
        """(slot, record) of every rule; slot 0 is the controller's own record."""
        assert self.meta
        for key, raw in self.meta.items():
            (slot,) = _SLOT.unpack(key)
            if slot:
                yield slot, json.loads(abi.unpack_meta(raw))

    def execute(self, ops: list[P.Operation]) -> None:
        assert self.lpm and self.meta and self.stats and self.src_lpm and self.ports and self.stats_in
        for op in ops:
            if isinstance(op, P.WriteRecord):
                # dst lives in the trie: do not format every prefix only to drop them.
                rule = replace(op.rule, dst=()).to_dict()
                del rule["dst"]
                self._write_record(op.slot, {"rule": rule, "expires_ns": op.expires_ns})
            elif isinstance(op, P.ResetStats):
                for stats in (self.stats, self.stats_in):
                    stats.update(_SLOT.pack(op.slot), b"\0" * (stats.slot_size * stats.ncpus))
            elif isinstance(op, (P.CreateClass, P.ChangeClass, P.SetLeaf, P.DeleteClass)):
                self._class_op(op)
            elif isinstance(op, P.UpsertEntries):
                # The trie first, then the hash: a new host is in the trie (which the hash's
                # miss falls through to) before the hash has it.
                self._trie(op.direction).update_packed(*_pack_entries(op.entries))
                hosts = self._hosts(op.direction)
                if hosts is not None:
                    hosts.update_packed(*_pack_hosts(op.entries))
            elif isinstance(op, P.DeleteEntries):
                # The hash first: a host gone from it still has its trie entry until that goes.
                hosts = self._hosts(op.direction)
                if hosts is not None:
                    hosts.delete_many([p.addr for p in op.prefixes if p.prefixlen == HOST_PREFIXLEN])
                trie = self.src_lpm if op.direction == "ingress" else self.lpm  # nothing to set up to delete
                trie.delete_many([abi.pack_key(p.prefixlen, p.addr) for p in op.prefixes])
            elif isinstance(op, P.UpsertPorts):
                keys = b"".join(map(abi.pack_port_key, op.entries))
                self.ports.update_packed(keys, b"".join(map(abi.pack_port_entry, op.entries.values())))
            elif isinstance(op, P.DeletePorts):
                self.ports.delete_many([abi.pack_port_key(k) for k in op.keys])
            elif isinstance(op, P.DeleteRecord):
                self.meta.delete(_SLOT.pack(op.slot))
            else:  # pragma: no cover - plan returns only the types above
                raise TypeError(op)

    def _hosts(self, direction: str) -> Map | None:
        """The host hash of a direction: egress's dst_host, None for ingress (src_lpm has none) and
        in pins from before it (their classifier reads the trie alone)."""
        return None if direction == "ingress" else self.dst_host

    def _trie(self, direction: str) -> Map:
        """The trie of a direction; an ingress one is set up first (ifb, filter), before it is written."""
        if direction == "ingress":
            assert self.src_lpm
            if not self._ingress_ready:
                self._ensure_ingress()
            return self.src_lpm
        assert self.lpm
        return self.lpm

    def _class_op(self, op: P.CreateClass | P.ChangeClass | P.SetLeaf | P.DeleteClass) -> None:
        if op.direction == "ingress":
            if isinstance(op, P.DeleteClass):
                tc = self._ingress_tree()  # no ifb, no class to delete: nothing to set up for it
                if tc is None:
                    return
            else:
                tc = self._ensure_ingress()
        else:
            tc = self.tc
        if isinstance(op, P.CreateClass):
            tc.add_class(op.slot, op.rule.class_params())
        elif isinstance(op, P.ChangeClass):
            tc.change_class(op.slot, op.rule.class_params())
        elif isinstance(op, P.SetLeaf):
            tc.set_leaf(op.slot, op.rule, op.current)
        else:
            tc.del_class(op.slot)

    # -- the intent record (controller.py: crash safety) ---------------------------------
    def _intent_map(self, create: bool) -> Map | None:
        if self._intent is None:
            path = os.path.join(self.pin_dir, INTENT_PIN)
            if not os.path.exists(path):
                if not create:
                    return None
                _create_intent_map(path)
            self._intent = Map(path, 4, _INTENT_CHUNK)
        return self._intent

    def write_intent(self, data: bytes) -> None:
        """Store a change's intent: the chunks, then the head that makes them count (one atomic update)."""
        chunks = (len(data) + _INTENT_CHUNK - 1) // _INTENT_CHUNK
        if chunks >= _INTENT_MAX_CHUNKS:
            raise KernelError("store", f"an intent record of {len(data)} bytes", hint=f"at most "
                              f"{(_INTENT_MAX_CHUNKS - 1) * _INTENT_CHUNK} bytes: make the change in smaller steps")
        m = self._intent_map(create=True)
        assert m is not None
        keys = b"".join(_SLOT.pack(i) for i in range(1, chunks + 1))
        m.update_packed(keys, data.ljust(chunks * _INTENT_CHUNK, b"\0"))
        head = _INTENT_HEAD.pack(_INTENT_MAGIC, len(data), chunks, zlib.crc32(data))
        m.update(_SLOT.pack(0), head.ljust(_INTENT_CHUNK, b"\0"))

    def read_intent(self) -> bytes | None:
        """The intent a change left here, or None; a head whose chunks do not check out is an error."""
        m = self._intent_map(create=False)
        raw = m.lookup(_SLOT.pack(0)) if m else None
        if raw is None:
            return None
        magic, length, chunks, crc = _INTENT_HEAD.unpack_from(raw)
        data = b"".join(m.lookup(_SLOT.pack(i)) or b"" for i in range(1, chunks + 1))[:length]
        if magic != _INTENT_MAGIC or len(data) != length or zlib.crc32(data) != crc:
            raise ShaperError(f"the intent record in {m.path} is damaged: the kernel state may be a mix of two "
                              f"rule sets; run `shaper show`, then apply the set you want")
        return data

    def clear_intent(self) -> None:
        """Remove the head first (the change's commit point), then the chunks."""
        m = self._intent_map(create=False)
        if m is None:
            return
        m.delete(_SLOT.pack(0))
        m.delete_many(list(m.keys()))

    def counters(self, slots: list[int], direction: str = "egress") -> dict[int, RuleCounters]:
        stats = self.stats_in if direction == "ingress" else self.stats
        assert stats
        out = {}
        packed = stats.read_packed() if len(slots) > 256 else None
        if packed is not None:
            # Many rules: the whole array in a few batch reads beats a lookup per rule (10,000: 60 ms).
            keys, values = packed
            step, size = stats.slot_size, stats.slot_size * stats.ncpus
            where = {slot: i * size for i, (slot,) in enumerate(_SLOT.iter_unpack(keys))}
            unpack = abi.RULE_STATS.unpack_from
            for slot in slots:
                at = where.get(slot)
                if at is None:
                    break
                packets = nbytes = 0
                for offset in range(at, at + size, step):
                    p, b = unpack(values, offset)
                    packets += p
                    nbytes += b
                out[slot] = RuleCounters(packets, nbytes)
            if len(out) == len(slots):
                return out
            out = {}  # an array has every slot: one missing means the read fell short, so one by one
        for slot in slots:
            packets = nbytes = 0
            for cpu_value in stats.lookup_percpu(_SLOT.pack(slot)):
                p, b = abi.RULE_STATS.unpack(cpu_value)
                packets += p
                nbytes += b
            out[slot] = RuleCounters(packets, nbytes)
        return out

    def class_stats(self, direction: str = "egress", leaves: bool = True) -> dict[int, ClassStats]:
        if direction == "ingress":
            ifb = self._ingress_tree()
            return ifb.class_stats(leaves) if ifb else {}
        return self.tc.class_stats(leaves)

    def map_entries(self, direction: str = "egress") -> int:
        trie = self.src_lpm if direction == "ingress" else self.lpm
        assert trie
        return trie.count()

    def reset(self) -> list[str]:
        """Remove exactly what shaper created here; returns what was removed.

        After a failed attach() there is nothing of this controller's left to remove (it
        undid what it created), and what was there is someone else's: a daemon refused
        for another shaper's classifier must not remove it on its way out."""
        if self._attach_failed:
            return []
        removed: list[str] = []
        own = None
        if not self.tc.link_present():
            # The interface went and its tc objects with it; its pins are left, and its
            # ifb (a device of its own, named by the old ifindex).
            removed += self._remove_old_ifb()
            self.close_maps()
            if os.path.isdir(self.pin_dir):
                self.remove_pins()
                removed.append("pins")
            return removed
        if self._pins_complete():
            try:
                if self.meta is None:
                    self.open_maps()
                own = self.read_record(0)
            except Exception:  # unreadable pins still get removed below
                own = None
        # Either record says shaper added the clsact qdisc: the pinned one, or the
        # filter's name when the pins are out of sight.
        created_clsact = bool(own and own.get("created_clsact")) or self.tc.filter_created_clsact()
        unaccounted = self.unaccounted_filter()
        if self.tc.detach_filter():
            removed.append("filter" if unaccounted is None else f"filter (program {unaccounted}, no pins here)")
        removed += self._reset_ingress(own)
        if created_clsact and self.tc.has_clsact() and not self.tc.clsact_filters():
            self.tc.del_clsact()
            removed.append("clsact")
        if self.tc.del_root():
            removed.append("htb root")
        self.close_maps()
        if os.path.isdir(self.pin_dir):
            self.remove_pins()
            removed.append("pins")
        return removed

