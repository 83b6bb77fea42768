"""The datapath interface: every operation the controller, the service and the daemon use.

One datapath is one interface, both directions: tc clsact egress classifies by
destination into the interface's HTB; clsact ingress classifies by source and
redirects only the packets it matched to an ifb shaper creates, whose HTB holds the
ingress classes (KernelDatapath).  The in-memory fake (FakeDatapath) is what unit
tests and the daemon's loop tests drive.  Nothing above shaper.datapath reaches past
this Protocol.  Methods that read one direction take `direction` ("egress" or
"ingress", shaper.core.plan.DIRECTIONS).

Errors are those of shaper.errors: KernelError (the kernel refused; `retryable` for
EBUSY/EAGAIN/EINTR), PermissionDenied, NotSupported, Conflict (state shaper did not
create).  InvariantBroken is the fake's alone: a plan that would leave the kernel
inconsistent, a bug.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from shaper.core import plan as P
from shaper.core.stats import ClassStats, RuleCounters

# What attach() found: "adopted" a running datapath this interface's pins account for
# (its rules kept), or "attached" a fresh one (no rules).
AttachResult = Literal["attached", "adopted"]


@runtime_checkable
class Datapath(Protocol):
    @property
    def ifname(self) -> str:
        """The interface's name (what the daemon was given)."""
        ...

    @property
    def ifindex(self) -> int:
        """The interface's ifindex when the datapath was opened: its identity, which a rename keeps."""
        ...

    # -- life cycle -------------------------------------------------------------
    def attach(self) -> AttachResult:
        """Make the classifier run on the interface: adopt what this interface's pins hold
        (rules kept, traffic untouched), else load, pin and attach afresh.

        Adopting is not a separate call: which one happened is the result.  Raises
        Conflict for a classifier or root qdisc shaper cannot account for, KernelError,
        PermissionDenied or NotSupported otherwise; a failed attach leaves nothing behind."""
        ...

    def is_attached(self) -> bool:
        """Whether shaper's classifier is the one on the interface now (someone may have
        removed or replaced it).  Readiness asks this; may raise KernelError."""
        ...

    def repair(self) -> list[str]:
        """Put back what someone removed of shaper's set-up that traffic depends on (the ingress
        ifb and filter) and return what was put back, [] when intact.  Cheap: the daemon asks
        every second; the caller plans again after a repair.  Raises ShaperError."""
        ...

    def link_present(self) -> bool:
        """Whether the interface this datapath was opened on still exists (the same ifindex).

        Cheap: the daemon asks every second.  False, never an error, for a vanished link;
        KernelError for anything else."""
        ...

    def reset(self) -> list[str]:
        """Remove exactly what shaper created here (after a failed attach: nothing) and
        return what was removed, e.g. ["filter", "htb root", "pins"].  Works on a
        vanished interface (only its pins are left).  Raises KernelError."""
        ...

    def close(self) -> None:
        """Let go of sockets, maps and program held open; the shaping stays as it is.  Never raises."""
        ...

    def adoptable(self) -> bool:
        """Whether attach() would adopt running shaping (pins of this interface, their program attached)
        rather than set it up afresh.  Never raises."""
        ...

    def forget(self) -> list[str]:
        """The interface's network namespace is gone (the node agent's sweeper): remove the pins
        only, since the tc objects go with the namespace.  Returns what was removed."""
        ...

    def set_agent_record(self, agent: dict) -> None:
        """What the node agent calls its target, kept beside the state for the next agent to adopt."""
        ...

    # -- rules ------------------------------------------------------------------
    def observe(self) -> P.Observed:
        """The rules, trie entries and classes held now (attached or adopted first)."""
        ...

    def execute(self, ops: list[P.Operation]) -> None:
        """Run a plan's operations in order.  Stops at the first refusal and raises it
        (KernelError, NotSupported for a missing sch_netem or the netem duplicate
        restriction); the operations before it stay done: the controller rolls back."""
        ...

    # -- the intent record (controller.py: crash safety) -------------------------
    def write_intent(self, data: bytes) -> None:
        """Store a change's undo record, atomically, beside the state.  Raises KernelError
        (also for a record too large to store)."""
        ...

    def read_intent(self) -> bytes | None:
        """The undo record an unfinished change left, or None.  Raises ShaperError if it is damaged."""
        ...

    def clear_intent(self) -> None:
        """Remove the undo record: the commit point of a change.  Safe when there is none."""
        ...

    # -- reads for status and /metrics ------------------------------------------
    def counters(self, slots: list[int], direction: str = "egress") -> dict[int, RuleCounters]:
        """The classifier's packet and byte counts of each slot given, in one direction (zero for a slot never hit)."""
        ...

    def class_stats(self, direction: str = "egress", leaves: bool = True) -> dict[int, ClassStats]:
        """slot -> the statistics of its HTB class and the kind of its leaf, in one direction (ingress: the
        ifb's classes; none before the first ingress rule).  leaves=False: the counters alone, leaf None
        (a class dump without the qdisc dump: a scrape's read).  Raises KernelError."""
        ...

    def rule_names(self) -> dict[int, str]:
        """slot -> rule name, from the records alone (a scrape's view: no trie walk)."""
        ...

    def map_entries(self, direction: str = "egress") -> int:
        """How many prefixes one direction's trie holds."""
        ...
