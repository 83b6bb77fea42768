"""An in-memory datapath with the kernel's semantics, for tests and dry runs.

It implements shaper.datapath.interface.Datapath, and keeps what
KernelDatapath keeps (rule records, LPM entries, classes and their leaves),
and the interface's life: whether its link exists (`present`) and whether the
classifier is on it (`attached`), so the daemon's loop is tested without root.
It classifies an address the way classifier.c does (longest
prefix, expired entries fall back to a shorter prefix), and checks after
every operation that no LPM entry points at a class that does not exist.
It keeps a controller's intent record too, and can die like a process killed
by SIGKILL after the Nth kernel operation (`crash_after`), for crash tests.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field, replace
from typing import Callable

from shaper.datapath import abi
from shaper.core import plan as P
from shaper.core import tables
from shaper.datapath.interface import AttachResult
from shaper.errors import InvariantBroken, KernelError
from shaper.core.model import ClassParams, Prefix, Rule
from shaper.core.stats import ClassStats, RuleCounters


class Crashed(BaseException):
    """The simulated process died (a BaseException: no `except Exception` clean-up runs, as with SIGKILL)."""


@dataclass
class FakeDatapath:
    records: dict[int, tuple[Rule, int]] = field(default_factory=dict)
    entries: dict[Prefix, P.Entry] = field(default_factory=dict)  # egress (by destination)
    classes: dict[int, ClassParams] = field(default_factory=dict)
    leaves: dict[int, Rule | None] = field(default_factory=dict)
    rule_counters: dict[int, RuleCounters] = field(default_factory=dict)
    ingress_entries: dict[Prefix, P.Entry] = field(default_factory=dict)  # ingress (by source)
    ingress_classes: dict[int, ClassParams] = field(default_factory=dict)  # the ifb's
    ingress_leaves: dict[int, Rule | None] = field(default_factory=dict)
    ingress_counters: dict[int, RuleCounters] = field(default_factory=dict)
    ports: dict[P.PortKey, P.PortEntry] = field(default_factory=dict)
    # Called before each operation; raise from it to simulate a kernel refusal.
    before_op: Callable[[P.Operation], None] | None = None
    # Called after each operation with self (e.g. to sample steering).
    after_op: Callable[["FakeDatapath", P.Operation], None] | None = None
    executed: list[P.Operation] = field(default_factory=list)
    intent: bytes | None = None
    # Die after this many kernel operations (intent writes and clears count; an entry
    # batch cut short is left half written, as a kill during a batch syscall can).
    crash_after: int | None = None
    ops_done: int = 0
    ifname: str = "fake0"
    ifindex: int = 1
    present: bool = True  # the link exists (a test deletes it by setting False)
    # Most tests drive a service past start-up, so a fake starts attached; one that
    # tests start-up says attached=False.
    attached: bool = True
    agent: dict | None = None  # what the node agent calls its target (set_agent_record)
    # Called at attach(); raise from it to refuse the attach.
    before_attach: Callable[[], None] | None = None
    closed: bool = False
    # What repair() reports and clears: a test that removes part of the ingress set-up
    # (the ifb takes its classes: clear ingress_classes too) says so here.
    broken: list[str] = field(default_factory=list)

    # -- life cycle --------------------------------------------------------------
    def attach(self) -> AttachResult:
        if not self.present:
            raise KernelError("attach the classifier to", self.ifname, errno.ENODEV)
        if self.before_attach:
            self.before_attach()
        if self.attached:  # the classifier and its pins are there: keep what they hold
            return "adopted"
        self._forget()  # pins without a classifier on the interface: start afresh
        self.attached = True
        return "attached"

    def is_attached(self) -> bool:
        return self.present and self.attached

    def link_present(self) -> bool:
        return self.present

    def repair(self) -> list[str]:
        broken, self.broken = self.broken, []  # set by a test: what someone removed
        return broken

    def reset(self) -> list[str]:
        removed = ["filter", "htb root"] if self.attached and self.present else []
        self._forget()
        self.intent = None
        self.attached = False
        return removed + ["pins"]

    def close(self) -> None:
        self.closed = True

    def adoptable(self) -> bool:
        return self.attached and self.present

    def forget(self) -> list[str]:
        self._forget()
        self.intent = None
        return ["pins"]

    def set_agent_record(self, agent: dict) -> None:
        self.agent = agent

    def _forget(self) -> None:
        """Drop the rules' state (records, trie entries, classes, leaves), as a fresh attach or a reset does."""
        for table in (self.records, self.entries, self.classes, self.leaves, self.ingress_entries,
                      self.ingress_classes, self.ingress_leaves, self.ports):
            table.clear()

    def _step(self) -> bool:
        """Count one kernel operation; True if the process dies before finishing it."""
        if self.crash_after is not None and self.ops_done >= self.crash_after:
            return True
        self.ops_done += 1
        return False

    def write_intent(self, data: bytes) -> None:
        if self._step():
            raise Crashed("before the intent was written")
        self.intent = data

    def read_intent(self) -> bytes | None:
        return self.intent

    def clear_intent(self) -> None:
        if self._step():
            raise Crashed("before the intent was cleared")
        self.intent = None

    def observe(self) -> P.Observed:
        def kinds(leaves: dict[int, Rule | None]) -> dict[int, str]:
            return {slot: ("netem" if leaf is not None else "pfifo") for slot, leaf in leaves.items()}

        tables = P.Observed(entries=dict(self.entries), classes=kinds(self.leaves),
                            ingress_entries=dict(self.ingress_entries), ingress_classes=kinds(self.ingress_leaves),
                            ports=dict(self.ports))
        dst_of = P.named_dst(tables)
        rules = {rule.name: P.ObservedRule(slot, replace(rule, dst=dst_of.get(slot, ())), expires)
                 for slot, (rule, expires) in self.records.items()}
        return replace(tables, rules=rules)

    def _side(self, direction: str) -> tuple[dict, dict, dict]:
        """(trie, classes, leaves) of a direction."""
        if direction == "egress":
            return self.entries, self.classes, self.leaves
        return self.ingress_entries, self.ingress_classes, self.ingress_leaves

    def execute(self, ops: list[P.Operation]) -> None:
        for op in ops:
            if self.before_op:
                self.before_op(op)
            if self._step():
                if isinstance(op, P.UpsertEntries) and len(op.entries) > 1:
                    self._one(P.UpsertEntries(dict(list(op.entries.items())[: len(op.entries) // 2]), op.direction))
                elif isinstance(op, P.DeleteEntries) and len(op.prefixes) > 1:
                    self._one(P.DeleteEntries(op.prefixes[: len(op.prefixes) // 2], op.direction))
                elif isinstance(op, P.UpsertPorts) and len(op.entries) > 1:
                    self._one(P.UpsertPorts(dict(list(op.entries.items())[: len(op.entries) // 2])))
                raise Crashed(f"during {P.describe(op)}")
            self._one(op)
            self.executed.append(op)
            self.check()
            if self.after_op:
                self.after_op(self, op)

    def _one(self, op: P.Operation) -> None:
        if isinstance(op, P.WriteRecord):
            self.records[op.slot] = (op.rule, op.expires_ns)
        elif isinstance(op, P.ResetStats):
            self.rule_counters[op.slot] = RuleCounters()
            self.ingress_counters[op.slot] = RuleCounters()
        elif isinstance(op, P.CreateClass):
            _, classes, leaves = self._side(op.direction)
            classes[op.slot] = op.rule.class_params()
            leaves[op.slot] = None
        elif isinstance(op, P.ChangeClass):
            _, classes, _ = self._side(op.direction)
            if op.slot not in classes:
                raise InvariantBroken(f"change of missing {op.direction} class {op.slot}")
            classes[op.slot] = op.rule.class_params()
        elif isinstance(op, P.SetLeaf):
            _, classes, leaves = self._side(op.direction)
            if op.slot not in classes:
                raise InvariantBroken(f"leaf for missing {op.direction} class {op.slot}")
            leaves[op.slot] = op.rule.leaf_params()
        elif isinstance(op, P.UpsertEntries):
            trie, _, _ = self._side(op.direction)
            trie.update(op.entries)
            if len(trie) > P.MAX_PREFIXES:  # the trie's max_entries (the check reads it at run time)
                raise KernelError("write", "dst_lpm" if op.direction == "egress" else "src_lpm", errno.ENOSPC)
        elif isinstance(op, P.DeleteEntries):
            trie, _, _ = self._side(op.direction)
            for p in op.prefixes:
                trie.pop(p, None)
        elif isinstance(op, P.UpsertPorts):
            self.ports.update(op.entries)
        elif isinstance(op, P.DeletePorts):
            for k in op.keys:
                self.ports.pop(k, None)
        elif isinstance(op, P.DeleteClass):
            _, classes, leaves = self._side(op.direction)
            classes.pop(op.slot, None)
            leaves.pop(op.slot, None)
        elif isinstance(op, P.DeleteRecord):
            self.records.pop(op.slot, None)

    def counters(self, slots: list[int], direction: str = "egress") -> dict[int, RuleCounters]:
        counts = self.rule_counters if direction == "egress" else self.ingress_counters
        return {slot: counts.get(slot, RuleCounters()) for slot in slots}

    def class_stats(self, direction: str = "egress", leaves: bool = True) -> dict[int, ClassStats]:
        _, classes, netem = self._side(direction)
        return {slot: ClassStats(abi.classid(slot), leaf="netem" if leaves and netem.get(slot) else None)
                for slot in classes}

    def rule_names(self) -> dict[int, str]:
        return {slot: rule.name for slot, (rule, _) in self.records.items()}

    def map_entries(self, direction: str = "egress") -> int:
        return len(self._side(direction)[0])

    def count(self, addr: bytes, now_ns: int, nbytes: int = 100, direction: str = "egress", proto: int = 0,
              port: int = 0) -> None:
        """Count one packet the way the classifier does (for counter tests)."""
        classid = self.steer(addr, now_ns, direction, proto, port)
        if classid is not None:
            slot = classid & 0xFFFF
            counts = self.rule_counters if direction == "egress" else self.ingress_counters
            c = counts.get(slot, RuleCounters())
            counts[slot] = RuleCounters(c.packets + 1, c.bytes + nbytes)

    def check(self) -> None:
        """No trie entry points at a class or port group that does not exist, in either direction."""
        groups = tables.group_members(self.ports)
        for direction in P.DIRECTIONS:
            trie, classes, _ = self._side(direction)
            for prefix, val in trie.items():
                if val.slot and val.slot not in classes:
                    raise InvariantBroken(f"{prefix} ({direction}) steers to class {val.slot}, which does not exist")
                if val.prefixlen not in (0, prefix.prefixlen):
                    raise InvariantBroken(f"{prefix} ({direction}): inconsistent entry {val}")
                if val.inline is not None and val.inline.slot not in classes:
                    raise InvariantBroken(f"{prefix} ({direction}): its port rule steers to class {val.inline.slot}, "
                                          f"which does not exist")
                if val.group:
                    if val.group not in groups:
                        raise InvariantBroken(f"{prefix} ({direction}) points at port group {val.group}, which is "
                                              f"empty")
                    missing = [slot for slot in groups[val.group] if slot not in classes]
                    if missing:
                        raise InvariantBroken(f"{prefix} ({direction}): port group {val.group} steers to class "
                                              f"{missing[0]}, which does not exist")

    def steer(self, addr: bytes, now_ns: int, direction: str = "egress", proto: int = 0,
              port: int = 0) -> int | None:
        """The classid the classifier would set for a packet's peer address (and protocol and port), or None."""
        slot = tables.classify({"egress": self.entries, "ingress": self.ingress_entries}, self.ports, direction,
                               addr, proto, port, now_ns)
        return abi.classid(slot) if slot else None
