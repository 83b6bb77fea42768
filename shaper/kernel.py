"""The real datapath: pins, maps and tc objects of one interface.

`KernelDatapath` is what the controller drives on a live kernel; it offers the
same small interface as the in-memory fake used in unit tests (`observe`,
`execute`, `counters`, `class_stats`, `reset`).  State lives in the kernel
only: the program and maps are pinned under
  <bpffs>/shaper/<netns inode>-<ifname>/
and rule_meta holds every rule's record (rule_meta[0] is the controller's own:
ifindex and whether it created the clsact qdisc), so a controller that dies
leaves shaping running and a new one adopts it without touching traffic.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import struct
from dataclasses import replace
from typing import Iterator

from . import layout, loader, plan as P
from .bpfmap import Map, obj_get, prog_id
from .errors import Conflict, NotSupported, PermissionDenied
from .model import Prefix, rule_from_record
from .stats import ClassStats, RuleCounters
from .tc import Tc, in_netns

BPFFS_MAGIC_TYPE = "bpf"
RECORD_VERSION = 1
_SLOT = struct.Struct("=I")


def ensure_bpffs(base: str) -> None:
    """Mount a bpffs at `base` unless one is there (iproute2 does the same for tc pins)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            if parts[4] == base and parts[sep + 1] == BPFFS_MAGIC_TYPE:
                return
    os.makedirs(base, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", base.encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        if err == 1:
            raise PermissionDenied(f"mounting a bpffs at {base} was refused: needs CAP_SYS_ADMIN, or mount it first "
                                   f"(mount -t bpf bpf {base})")
        raise NotSupported(f"cannot mount a bpffs at {base}: {os.strerror(err)}")


def claim_interface(ifname: str, netns: str | None) -> socket.socket:
    """Hold the interface for this process: one controller per interface.

    The claim is an abstract unix socket named after the interface, bound in
    the interface's network namespace: abstract names are per namespace, seen
    by every container sharing it, and released by the kernel when the holder
    dies, even by SIGKILL, so there is no stale lock to clean up.  Returns the
    socket; keep it open while in control.  Raises Conflict naming the holder.
    """
    name = f"\0shaper/{ifname}".encode()

    def bind() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(name)
            sock.listen(64)  # never accepted: probes only read the listener's credentials
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
        # Someone holds it: ask the kernel who (credentials of the listener).
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)  # a full backlog must not block the probe
        try:
            probe.connect(name)
            pid = struct.unpack("=iII", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            holder = f"process {pid}"
        except OSError:
            holder = "another process"
        finally:
            probe.close()
        where = f" in network namespace {netns}" if netns else ""
        raise Conflict(f"{ifname}{where} is controlled by another shaper ({holder}); stop it first, or talk to "
                       "it with the client commands (shaper rule ..., --server)")

    return in_netns(netns, bind) if netns else bind()


def netns_id(netns: str | None) -> int:
    return os.stat(f"/run/netns/{netns}" if netns else "/proc/self/ns/net").st_ino


class KernelDatapath:
    def __init__(self, ifname: str, netns: str | None = None, bpffs: str | None = None):
        self.bpffs = bpffs or os.environ.get("SHAPER_BPFFS", "/sys/fs/bpf")
        self.tc = Tc(ifname, netns)
        self.ifname = ifname
        self.netns = netns
        self.pin_dir = os.path.join(self.bpffs, "shaper", f"{netns_id(netns)}-{ifname}")
        self.lpm: Map | None = None
        self.stats: Map | None = None
        self.meta: Map | None = None

    def close(self) -> None:
        self.close_maps()
        self.tc.close()

    # -- attach / adopt -----------------------------------------------------------
    def _pins_complete(self) -> bool:
        return all(os.path.exists(os.path.join(self.pin_dir, n)) for n in (loader.PROG_PIN,) + loader.MAP_NAMES)

    def open_maps(self) -> None:
        self.lpm = Map(os.path.join(self.pin_dir, "dst_lpm"), layout.LPM_KEY.size, layout.LPM_VAL.size)
        self.stats = Map(os.path.join(self.pin_dir, "rule_stats"), 4, layout.RULE_STATS.size, percpu=True)
        self.meta = Map(os.path.join(self.pin_dir, "rule_meta"), 4, layout.RULE_META.size)

    def read_record(self, slot: int) -> dict | None:
        assert self.meta is not None
        raw = self.meta.lookup(_SLOT.pack(slot))
        return json.loads(layout.unpack_meta(raw)) if raw else None

    def _write_record(self, slot: int, record: dict) -> None:
        assert self.meta is not None
        payload = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
        self.meta.update(_SLOT.pack(slot), layout.pack_meta(payload))

    def is_attached(self) -> bool:
        return self._pins_complete() and self.tc.our_filter() is not None

    def attach(self) -> str:
        """Load, pin and attach what is missing; returns 'adopted' or 'attached'."""
        ensure_bpffs(self.bpffs)
        adopted = False
        if self._pins_complete():
            self.open_maps()
            own = self.read_record(0)
            if own and own.get("ifindex") == self.tc.ifindex and self._pinned_program_attached():
                adopted = True
            else:
                # Pins of an interface that no longer exists (its tc objects went with
                # it), or of an earlier namespace whose inode number this one reuses (a
                # pod killed without cleanup): the same name and ifindex, but not our
                # program on the interface. Start afresh rather than adopt its rules.
                self.close_maps()
                self.remove_pins()
        if not adopted:
            self.remove_pins()
            os.makedirs(os.path.dirname(self.pin_dir), exist_ok=True)
            try:
                loader.load_and_pin(self.pin_dir)
            except BaseException:
                self.remove_pins()  # nothing left behind, not even an empty shaper/ directory
                raise
            self.open_maps()
            self._write_record(0, {"version": RECORD_VERSION, "ifindex": self.tc.ifindex, "ifname": self.ifname,
                                   "created_clsact": False})
        own = self.read_record(0) or {}
        self.tc.ensure_root()
        if not self.tc.has_clsact():
            # Record first: a crash between the two leaves reset knowing what to remove.
            self._write_record(0, {**own, "created_clsact": True})
            self.tc.ensure_clsact()
        fd = obj_get(os.path.join(self.pin_dir, loader.PROG_PIN))
        try:
            if self.tc.filter_prog_id() != prog_id(fd):
                self.tc.attach_filter(fd)
        finally:
            os.close(fd)
        return "adopted" if adopted else "attached"

    def _pinned_program_attached(self) -> bool:
        fd = obj_get(os.path.join(self.pin_dir, loader.PROG_PIN))
        try:
            return self.tc.filter_prog_id() == prog_id(fd)
        finally:
            os.close(fd)

    def close_maps(self) -> None:
        for m in (self.lpm, self.stats, self.meta):
            if m:
                m.close()
        self.lpm = self.stats = self.meta = None

    def remove_pins(self) -> None:
        if os.path.isdir(self.pin_dir):
            shutil.rmtree(self.pin_dir)
        try:  # the shared shaper/ directory goes with its last interface
            os.rmdir(os.path.dirname(self.pin_dir))
        except OSError:
            pass

    # -- the datapath interface ------------------------------------------------
    def observe(self) -> P.Observed:
        assert self.lpm and self.meta
        entries: dict[Prefix, layout.LpmVal] = {}
        for key, value in self.lpm.items():
            prefixlen, addr = layout.unpack_key(key)
            entries[Prefix(addr, prefixlen)] = layout.LpmVal.unpack(value)
        dst_of: dict[int, list[Prefix]] = {}
        for prefix, val in entries.items():
            dst_of.setdefault(val.rule_id, []).append(prefix)
        rules = {}
        for slot, record in self._records():
            rule = rule_from_record(record["rule"], tuple(dst_of.get(slot, ())))
            rules[rule.name] = P.ObservedRule(slot, rule, record.get("expires_ns", 0))
        classes = {slot: (cs.leaf or "pfifo") for slot, cs in self.tc.class_stats().items()}
        return P.Observed(rules=rules, entries=entries, classes=classes)

    def rule_names(self) -> dict[int, str]:
        """slot -> rule name from the records alone (what a scrape needs; no trie walk)."""
        return {slot: record["rule"]["name"] for slot, record in self._records()}

    def _records(self) -> Iterator[tuple[int, dict]]:
        """(slot, record) of every rule; slot 0 is the controller's own record."""
        assert self.meta
        for key, raw in self.meta.items():
            (slot,) = _SLOT.unpack(key)
            if slot:
                yield slot, json.loads(layout.unpack_meta(raw))

    def execute(self, ops: list[P.Operation]) -> None:
        assert self.lpm and self.meta and self.stats
        for op in ops:
            if isinstance(op, P.WriteRecord):
                # dst lives in the trie: do not format every prefix only to drop them.
                rule = replace(op.rule, dst=()).to_dict()
                del rule["dst"]
                self._write_record(op.slot, {"rule": rule, "expires_ns": op.expires_ns})
            elif isinstance(op, P.ResetStats):
                zero = b"\0" * (self.stats.slot_size * self.stats.ncpus)
                self.stats.update(_SLOT.pack(op.slot), zero)
            elif isinstance(op, P.CreateClass):
                self.tc.add_class(op.slot, op.rule.class_params())
            elif isinstance(op, P.ChangeClass):
                self.tc.change_class(op.slot, op.rule.class_params())
            elif isinstance(op, P.SetLeaf):
                self.tc.set_leaf(op.slot, op.rule, op.current)
            elif isinstance(op, P.UpsertEntries):
                self.lpm.update_many([(layout.pack_key(p.prefixlen, p.addr), v.pack()) for p, v in op.entries.items()])
            elif isinstance(op, P.DeleteEntries):
                self.lpm.delete_many([layout.pack_key(p.prefixlen, p.addr) for p in op.prefixes])
            elif isinstance(op, P.DeleteClass):
                self.tc.del_class(op.slot)
            elif isinstance(op, P.DeleteRecord):
                self.meta.delete(_SLOT.pack(op.slot))
            else:  # pragma: no cover - plan returns only the types above
                raise TypeError(op)

    def counters(self, slots: list[int]) -> dict[int, RuleCounters]:
        assert self.stats
        out = {}
        for slot in slots:
            packets = nbytes = 0
            for cpu_value in self.stats.lookup_percpu(_SLOT.pack(slot)):
                p, b = layout.RULE_STATS.unpack(cpu_value)
                packets += p
                nbytes += b
            out[slot] = RuleCounters(packets, nbytes)
        return out

    def class_stats(self) -> dict[int, ClassStats]:
        return self.tc.class_stats()

    def map_entries(self) -> int:
        assert self.lpm
        return sum(1 for _ in self.lpm.keys())

    def reset(self) -> list[str]:
        """Remove exactly what shaper created here; returns what was removed."""
        removed: list[str] = []
        own = None
        if not self.tc.link_present():
            # The interface went and its tc objects with it; only the pins are left.
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
        if self.tc.detach_filter():
            removed.append("filter")
        if own and own.get("created_clsact") and self.tc.has_clsact() and not self.tc.clsact_filters():
            self.tc.del_clsact()
            removed.append("clsact")
        if self.tc.del_root():
            removed.append("htb root")
        self.close_maps()
        if os.path.isdir(self.pin_dir):
            self.remove_pins()
            removed.append("pins")
        return removed

