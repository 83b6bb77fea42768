"""Netlink/tc access for one interface, through pyroute2.

Owns everything shaper does with tc: the HTB root, the clsact qdisc, the
classifier's filter (identified by its own pref and handle), one HTB class
per rule slot and its leaf.  It recognises what it created (HTB handle
SHAPER_HTB_MAJOR:, filter pref FILTER_PREF) and refuses to replace a root qdisc
someone else put there.  Kernel errors become errors that say what to do.
"""

from __future__ import annotations

import copy
import ctypes
import errno as _errno
import os
import socket
import threading
from functools import lru_cache
from typing import Callable, Sequence, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETLINK, RTM_NEWQDISC, RTM_NEWTCLASS, RTM_NEWTFILTER
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.tcmsg import sched_bpf, tcmsg

from shaper.datapath import netem, tcdump
from shaper.errors import Conflict, DumpError, InvalidInput, KernelError, NotSupported, PermissionDenied
from shaper.datapath.abi import HTB_MAJOR, classid_text
from shaper.core.model import ClassParams, Rule
from shaper.core.stats import ClassStats

ROOT = HTB_MAJOR << 16
CLSACT_HANDLE = 0xFFFF0000
CLSACT_PARENT = 0xFFFFFFF1  # TC_H_CLSACT, shared with the ingress qdisc
EGRESS_PARENT = 0xFFFFFFF3
INGRESS_PARENT = 0xFFFFFFF2
HOOK_PARENTS = {"egress": EGRESS_PARENT, "ingress": INGRESS_PARENT}  # the clsact hooks, by direction
FILTER_PREF = 0x5348  # our own pref ("SH") and handle on clsact egress
FILTER_HANDLE = 1
FILTER_NAME = "shaper_classifier"
# The filter's name also records, in the kernel, that shaper added the clsact
# qdisc: reset then removes it even when the pins that record it too are gone
# (a private bpffs, a bpffs unmounted, pins removed by hand).
FILTER_NAME_OWN_CLSACT = "shaper_classifier+clsact"
IFB_TXQLEN = 1000  # the ingress ifb's queue length (see Tc.add_ifb)
ETH_P_ALL = 0x0003
HTB_QUANTUM = 60_000  # classes never borrow (no parent class), so any legal quantum will do

NETEM_MISSING = (
    "sch_netem is not available in this kernel: load it with `modprobe sch_netem` (Debian: in linux-image-*, "
    "Ubuntu: linux-modules-extra-$(uname -r)); rules with only a rate work without it"
)

# The 2025 netem fix made kernels refuse a duplicating netem when another netem
# shares the qdisc tree, and any netem joining a tree that holds a duplicating
# one (duplication could recurse).  It was later reverted for a loop check in
# the datapath (Debian's 6.12 from 6.12.94 accepts; its 6.1.192 still refuses),
# so which rule sets a kernel takes is probed, never inferred from a version.
NETEM_DUPLICATE_REFUSED = (
    "the kernel refused the netem leaf (EINVAL). This kernel refuses `duplicate` when another netem shares the "
    "interface's qdisc tree (the 2025 netem restriction): give duplicate only to a rule that is the sole netem "
    "rule on the interface"
)
NETEM_BESIDE_DUPLICATE_REFUSED = (
    "the kernel refused the netem leaf (EINVAL). This kernel refuses any netem joining a qdisc tree that holds a "
    "duplicating one (the 2025 netem restriction; {duplicating}): give duplicate only to a rule that is the sole "
    "netem rule on the interface"
)
DUP_REFUSED, DUP_ALLOWED, DUP_UNKNOWN = "refused", "allowed", "unknown"


class _BpfFilterOptions(sched_bpf.options):
    # pyroute2 stops at TCA_BPF_FLAGS; the program id is what tells whether
    # the attached classifier is the pinned one.  Like _TcMsg below, clear the
    # "compiled" flag: once pyroute2 has decoded any bpf filter with its own
    # class, a subclass would inherit that compiled table, without TCA_BPF_ID.
    _nlmsg_base__compiled_nla = False
    nla_map = sched_bpf.options.nla_map + (
        ("TCA_BPF_FLAGS_GEN", "uint32"),
        ("TCA_BPF_TAG", "hex"),
        ("TCA_BPF_ID", "uint32"),
    )


class _TcMsg(tcmsg):
    """tcmsg with netem options as raw bytes (netem.py encodes and decodes them)
    and bpf filter options that include the program id."""

    # pyroute2 compiles a class's NLA table once and a subclass inherits the
    # "compiled" flag, which would bind tcmsg.get_options: clear it here.
    # tests/unit/test_tc_codec.py catches a pyroute2 that works otherwise.
    _nlmsg_base__compiled_nla = False

    @staticmethod
    def get_options(self, *argv, **kwarg):
        kind = self.get_attr("TCA_KIND")
        if kind == "netem":
            return self.cdata
        if kind == "bpf":
            return _BpfFilterOptions
        return tcmsg.get_options(self, *argv, **kwarg)


@lru_cache(maxsize=1)
def psched_tick_in_usec() -> float:
    """Packet-scheduler ticks per microsecond, from /proc/net/psched as tc reads it (1.0 where it
    cannot be read, as pyroute2 falls back)."""
    try:
        with open("/proc/net/psched") as f:
            t2us, us2t, clock_res, _ = (int(x, 16) for x in f.read().split()[:4])
    except (OSError, ValueError):
        return 1.0
    return t2us / us2t * (clock_res / 1_000_000)


@lru_cache(maxsize=1024)
def _htb_class_options(params: ClassParams) -> bytes:
    """The TCA_OPTIONS of one of our HTB classes (tcdump.htb_class_options; 1,000 rules at one rate
    encode them once)."""
    return tcdump.htb_class_options(params.rate_bytes, params.burst_bytes, HTB_QUANTUM, psched_tick_in_usec())


def _kernel_error(exc: NetlinkError, op: str, obj: str) -> Exception:
    if exc.code == _errno.EPERM:
        return PermissionDenied(f"{op} {obj}: operation not permitted; shaper needs CAP_NET_ADMIN (run as root)")
    return KernelError(op, obj, exc.code)


_CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def netns_path(netns: str) -> str:
    """The file of a network namespace: a name from `ip netns list` (/run/netns/NAME), or an
    absolute path to a namespace file as it is (/proc/PID/ns/net, /proc/self/fd/N: the node agent's)."""
    return netns if netns.startswith("/") else f"/run/netns/{netns}"


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run fn in a thread that joined a network namespace (see netns_path); sockets it opens stay there.

    setns() moves only the calling thread, so the rest of the process is untouched."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(netns_path(netns), os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
                result["value"] = fn()
            finally:
                os.close(fd)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    t = threading.Thread(target=run, name=f"netns-{netns}")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


def _netlink_socket(netns: str | None, kind: int = socket.SOCK_RAW) -> socket.socket:
    """A NETLINK_ROUTE socket in a named network namespace (or this one); `kind` SOCK_DGRAM for
    pyroute2 (asyncio takes only datagram sockets; for netlink both kinds are the same)."""
    def open_socket() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, kind, socket.NETLINK_ROUTE)

    if not netns:
        return open_socket()
    try:
        return in_netns(netns, open_socket)
    except OSError as exc:
        if exc.errno == _errno.EPERM:
            raise PermissionDenied(f"entering network namespace {netns}: needs CAP_SYS_ADMIN (run as root)") from None
        raise KernelError("open netlink in", netns, exc.errno) from None


class Tc:
    """tc objects on one interface, in the current or a named network namespace.

    `hook` is the clsact direction the classifier's filter sits on: egress (what shaper
    shapes today), or ingress for a second datapath on the same interface."""

    def __init__(self, ifname: str, netns: str | None = None, hook: str = "egress"):
        if hook not in HOOK_PARENTS:
            raise ValueError(f"hook {hook!r}: one of {', '.join(HOOK_PARENTS)}")
        self.ifname = ifname
        self.netns = netns
        self.hook = hook
        self.filter_parent = HOOK_PARENTS[hook]
        if netns and not netns.startswith("/") and ("/" in netns or netns in (".", "..")):
            raise InvalidInput("netns", f"{netns!r} is not a namespace name", "a name listed by `ip netns list`")
        if netns and not os.path.exists(netns_path(netns)):
            what = f"no network namespace at {netns}" if netns.startswith("/") else \
                f"no network namespace named {netns!r}"
            raise InvalidInput("netns", what, "a name listed by `ip netns list`")
        try:
            # In a namespace, from a socket opened by a thread that joined it (in_netns), not
            # pyroute2's netns=: that forks this multi-threaded process for each socket, and a
            # child stuck on a lock another thread held at the fork is never reaped (pyroute2
            # ends it with SIGTERM, which the child's inherited handler only notes, then waits).
            self.ipr = IPRoute(fileno=_netlink_socket(netns, socket.SOCK_DGRAM).detach()) if netns else IPRoute()
        except NetlinkError as exc:
            raise _kernel_error(exc, "open netlink in", netns or "this namespace") from None
        found = self.ipr.link_lookup(ifname=ifname)
        if not found:
            self.ipr.close()
            where = f" in network namespace {netns}" if netns else ""
            raise InvalidInput("iface", f"no interface named {ifname!r}{where}", "an interface listed by `ip link`")
        self.ifindex = found[0]
        for msg_type in (RTM_NEWQDISC, RTM_NEWTFILTER):
            self.ipr.marshal.msg_map[msg_type] = _TcMsg
        # pyroute2 0.9's synchronous nlm_request reads this key, which IPRoute never sets.
        self.ipr.status["nlm_generator"] = False
        self._dump_sock: socket.socket | None = None
        self._seq = 0

    def for_hook(self, hook: str) -> Tc:
        """This interface's other clsact hook, on the same netlink socket and ifindex (a rename
        since this Tc was opened does not matter).  Close the original, not the view."""
        view = copy.copy(self)
        view.hook = hook
        view.filter_parent = HOOK_PARENTS[hook]
        view._dump_sock = None
        return view

    def link_present(self) -> bool:
        """Whether the interface this Tc was opened on still exists (same ifindex).

        Asked without NLM_F_ACK: pyroute2's get_links() asks for one, stops reading at the
        link, and the ACK that follows stays in its socket's queue for good (the daemon
        asks every second: ~80 bytes a second, ~7 MB a day)."""
        msg = ifinfmsg()
        msg["index"] = self.ifindex
        try:
            return bool(self.ipr.nlm_request(msg, msg_type=RTM_GETLINK, msg_flags=NLM_F_REQUEST))
        except NetlinkError as exc:
            if exc.code in (_errno.ENODEV, _errno.ENOENT):
                return False
            raise _kernel_error(exc, "look up", self.ifname) from None

    # -- links (the ingress ifb) -------------------------------------------------
    def link_info(self, name: str) -> tuple[int, str, str] | None:
        """(ifindex, kind, ifalias) of the link called `name` in this Tc's namespace, or None."""
        try:
            links = self.ipr.get_links(ifname=name)
        except NetlinkError as exc:
            if exc.code in (_errno.ENODEV, _errno.ENOENT):
                return None
            raise _kernel_error(exc, "look up", name) from None
        if not links:
            return None
        link = links[0]
        info = link.get_attr("IFLA_LINKINFO")
        kind = (info.get_attr("IFLA_INFO_KIND") if info else None) or ""
        return link["index"], kind, link.get_attr("IFLA_IFALIAS") or ""

    def mtu(self) -> int:
        try:
            return self.ipr.get_links(self.ifindex)[0].get_attr("IFLA_MTU")
        except NetlinkError as exc:
            raise _kernel_error(exc, "look up", self.ifname) from None

    def add_ifb(self, name: str, alias: str) -> int:
        """Create the ifb `name` (this interface's MTU, up, `alias` as its ifalias); returns its ifindex.

        Created with its alias in two steps: whoever removes it checks the alias, or, in
        the moment between, that its own record names the device (kernel.py)."""
        try:
            # txqueuelen: an ifb's default is 32, and HTB's direct queue and default leaves take
            # their limit from it; 1000 (a veth's, an Ethernet NIC's) queues a burst as egress would.
            self.ipr.link("add", ifname=name, kind="ifb", mtu=self.mtu(), txqlen=IFB_TXQLEN)
            index = self.ipr.link_lookup(ifname=name)[0]
            self.ipr.link("set", index=index, ifalias=alias, state="up")
        except NetlinkError as exc:
            raise _kernel_error(exc, "create the ingress ifb", f"{name} for {self.ifname}") from None
        return index

    def set_link_up(self, index: int) -> None:
        try:
            self.ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            raise _kernel_error(exc, "set up", f"link {index}") from None

    def del_link(self, index: int) -> None:
        try:
            self.ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code not in (_errno.ENODEV, _errno.ENOENT):
                raise _kernel_error(exc, "delete", f"link {index}") from None

    def filter_name(self) -> str | None:
        """The name of the program attached at shaper's pref and handle on this Tc's hook, if any."""
        return self._our_filter_option("TCA_BPF_NAME")

    def close(self) -> None:
        self.ipr.close()
        if self._dump_sock is not None:
            self._dump_sock.close()
            self._dump_sock = None

    # -- qdiscs -------------------------------------------------------------
    def qdiscs(self) -> list:
        return list(self.ipr.get_qdiscs(self.ifindex))

    def root_qdisc(self) -> tuple[str, int] | None:
        for q in self.qdiscs():
            if q["parent"] == 0xFFFFFFFF:
                return q.get_attr("TCA_KIND"), q["handle"]
        return None

    def has_our_root(self) -> bool:
        root = self.root_qdisc()
        return root is not None and root == ("htb", ROOT)

    def ensure_root(self) -> bool:
        """Put the HTB root in place; True if it was created now.

        Only the kernel's default root (handle 0:, e.g. noqueue, pfifo_fast,
        mq) is replaced: a root someone configured is theirs, and left alone.
        """
        root = self.root_qdisc()
        if root == ("htb", ROOT):
            return False
        if root is not None and root[1] != 0:
            kind, handle = root
            raise Conflict(
                f"{self.ifname} has a root qdisc shaper did not create ({kind} {handle >> 16:x}:); "
                f"shaper will not replace it. Remove it (tc qdisc del dev {self.ifname} root) or use another interface"
            )
        try:
            # default 0: unmatched packets take HTB's direct queue, neither shaped nor capped.
            self.ipr.tc("replace", "htb", self.ifindex, ROOT, default=0)
        except NetlinkError as exc:
            raise _kernel_error(exc, "create HTB root on", self.ifname) from None
        return True

    def ensure_clsact(self) -> bool:
        """Add a clsact qdisc unless there is one; True if it was created now."""
        for q in self.qdiscs():
            if q["parent"] == CLSACT_PARENT or q["handle"] == CLSACT_HANDLE:
                kind = q.get_attr("TCA_KIND")
                if kind == "clsact":
                    return False
                raise Conflict(f"{self.ifname} has an {kind} qdisc at ffff:, which rules out clsact; remove it first")
        try:
            self.ipr.tc("add", "clsact", self.ifindex)
        except NetlinkError as exc:
            raise _kernel_error(exc, "add clsact qdisc on", self.ifname) from None
        return True

    def clsact_filters(self) -> list:
        out = []
        for parent in (INGRESS_PARENT, EGRESS_PARENT):
            try:
                out += [f for f in self.ipr.get_filters(self.ifindex, parent=parent) if f.get_attr("TCA_KIND")]
            except NetlinkError as exc:
                if exc.code not in (_errno.EINVAL, _errno.ENOENT):
                    raise _kernel_error(exc, "list filters on", self.ifname) from None
        return out

    def has_clsact(self) -> bool:
        return any(q.get_attr("TCA_KIND") == "clsact" for q in self.qdiscs())

    # -- the classifier's filter ---------------------------------------------
    def our_filter(self):
        if not self.has_clsact():
            return None
        for f in self.ipr.get_filters(self.ifindex, parent=self.filter_parent):
            if (f["info"] >> 16) == FILTER_PREF and f.get_attr("TCA_KIND") == "bpf" and f["handle"] == FILTER_HANDLE:
                return f
        return None

    def _our_filter_option(self, name: str):
        f = self.our_filter()
        opts = f.get_attr("TCA_OPTIONS") if f is not None else None
        return opts.get_attr(name) if opts else None

    def filter_prog_id(self) -> int | None:
        """The id of the program attached at shaper's pref and handle, if any."""
        return self._our_filter_option("TCA_BPF_ID")

    def filter_redirect_ifindex(self) -> int | None:
        """Where the attached filter's mirred action redirects (the ingress classifier's ifb), if it has one."""
        return self._redirect_of(self._our_filter_option("TCA_BPF_ACT"))

    def filter_summary(self) -> tuple[int | None, str | None, int | None]:
        """(program id, name, mirred target) of the filter at shaper's pref, from one dump."""
        f = self.our_filter()
        opts = f.get_attr("TCA_OPTIONS") if f is not None else None
        if not opts:
            return None, None, None
        return opts.get_attr("TCA_BPF_ID"), opts.get_attr("TCA_BPF_NAME"), self._redirect_of(opts.get_attr("TCA_BPF_ACT"))

    @staticmethod
    def _redirect_of(act) -> int | None:
        try:
            return act.get_attr("TCA_ACT_PRIO_1").get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")["ifindex"]
        except (AttributeError, KeyError, TypeError):
            return None

    def filter_created_clsact(self) -> bool:
        """Whether the attached filter says shaper added the clsact qdisc (see FILTER_NAME_OWN_CLSACT)."""
        return self._our_filter_option("TCA_BPF_NAME") == FILTER_NAME_OWN_CLSACT

    def attach_filter(self, prog_fd: int, created_clsact: bool = False, redirect_to: int | None = None) -> None:
        """Attach (or atomically replace) the classifier on this Tc's clsact hook; its name records
        whether shaper created the clsact qdisc.

        `redirect_to` (the ingress classifier): attach it without direct action, with a mirred
        action redirecting what it matches to that device's egress (the ifb).  mirred marks the
        packet redirected, which the ifb requires; bpf_redirect() does not on Linux 6.1."""
        how: dict = {"direct_action": True}
        if redirect_to is not None:
            how = {"direct_action": False, "action": [{"kind": "mirred", "direction": "egress",
                                                       "action": "redirect", "ifindex": redirect_to}]}
        try:
            self.ipr.tc(
                "replace-filter",
                "bpf",
                self.ifindex,
                FILTER_HANDLE,
                parent=self.filter_parent,
                prio=FILTER_PREF,
                protocol=ETH_P_ALL,
                fd=prog_fd,
                name=FILTER_NAME_OWN_CLSACT if created_clsact else FILTER_NAME,
                **how,
            )
        except NetlinkError as exc:
            raise _kernel_error(exc, "attach the classifier to", self.ifname) from None

    def detach_filter(self) -> bool:
        if self.our_filter() is None:
            return False
        try:
            self.ipr.tc("del-filter", "bpf", self.ifindex, FILTER_HANDLE, parent=self.filter_parent, prio=FILTER_PREF,
                        protocol=ETH_P_ALL)
        except NetlinkError as exc:
            if exc.code != _errno.ENOENT:
                raise _kernel_error(exc, "detach the classifier from", self.ifname) from None
        return True

    # -- classes and leaves -----------------------------------------------------
    def _own_socket(self) -> socket.socket:
        if self._dump_sock is None:
            self._dump_sock = _netlink_socket(self.netns)
        return self._dump_sock

    def _request(self, msg_type: int, flags: int, handle: int, parent: int, kind: str | None = None,
                 options: bytes | None = None) -> None:
        """One tc request through our own netlink socket (tcdump.request), waiting for its answer;
        a refusal is raised as pyroute2's NetlinkError, as ipr.tc() raises it, for the callers' handling."""
        sock = self._own_socket()
        self._seq += 1
        seq = self._seq
        sock.send(tcdump.request(msg_type, flags, seq, self.ifindex, handle, parent, kind, options))
        while True:
            code = tcdump.ack(sock.recv(65536), seq)
            if code is not None:
                break
        if code:
            raise NetlinkError(code, os.strerror(code))

    def _dump(self, msg_type: int) -> list[tcdump.TcObject]:
        """A class or qdisc dump of this interface through our own netlink socket."""
        sock = self._own_socket()
        self._seq += 1
        sock.send(tcdump.dump_request(msg_type, self.ifindex, self._seq))
        out: list[tcdump.TcObject] = []
        try:
            while True:
                objects, done = tcdump.parse(sock.recv(1 << 20), self._seq)
                out.extend(o for o in objects if o.ifindex == self.ifindex)
                if done:
                    return out
        except DumpError as exc:
            raise KernelError("dump the tc objects of", self.ifname, exc.errno) from None

    def class_stats(self, leaves: bool = True) -> dict[int, ClassStats]:
        """Every class under our root, with its leaf kind: one class dump, and one qdisc dump for the
        kinds (leaves=False: none, leaf None)."""
        kinds = {q.parent: q.kind for q in self._dump(tcdump.RTM_GETQDISC)} if leaves else {}
        out = {}
        for c in self._dump(tcdump.RTM_GETTCLASS):
            if c.handle >> 16 != HTB_MAJOR or c.kind != "htb":
                continue
            out[c.handle & 0xFFFF] = ClassStats(
                classid=c.handle, bytes=c.bytes, packets=c.packets, drops=c.drops, overlimits=c.overlimits,
                requeues=c.requeues, backlog_bytes=c.backlog, backlog_packets=c.qlen, leaf=kinds.get(c.handle))
        return out

    def _class(self, command: str, slot: int, params: ClassParams) -> None:
        flags = NLM_F_REPLACE  # pyroute2's "change-class"
        if command == "replace-class":
            flags |= NLM_F_CREATE
        try:
            self._request(RTM_NEWTCLASS, flags, ROOT | slot, ROOT, "htb", _htb_class_options(params))
        except NetlinkError as exc:
            raise _kernel_error(exc, f"{command.split('-')[0]} HTB class", f"{classid_text(slot)} on {self.ifname}") from None

    def add_class(self, slot: int, params: ClassParams) -> None:
        self._class("replace-class", slot, params)

    def change_class(self, slot: int, params: ClassParams) -> None:
        self._class("change-class", slot, params)

    def del_class(self, slot: int) -> None:
        try:
            self._request(tcdump.RTM_DELTCLASS, 0, ROOT | slot, ROOT)
        except NetlinkError as exc:
            if exc.code != _errno.ENOENT:
                raise _kernel_error(exc, "delete HTB class", f"{classid_text(slot)}") from None

    def set_leaf(self, slot: int, rule: Rule, current: str | None) -> None:
        """Make the leaf of class slot a netem with the rule's impairments, or the default."""
        if not rule.has_netem:
            if current == "netem":
                try:
                    # HTB grafts its default pfifo back when the leaf goes.
                    self.ipr.tc("del", None, self.ifindex, slot << 16, parent=ROOT | slot)
                except NetlinkError as exc:
                    if exc.code != _errno.ENOENT:
                        raise _kernel_error(exc, "remove netem leaf of", f"{classid_text(slot)}") from None
            return
        # change keeps the qdisc (and the packets it holds); a new leaf is grafted.
        flags = 0 if current == "netem" else NLM_F_CREATE | NLM_F_REPLACE
        try:
            self._request(RTM_NEWQDISC, flags, slot << 16, ROOT | slot, "netem", netem.encode_options(rule))
        except NetlinkError as exc:
            if exc.code == _errno.ENOENT and current != "netem":
                raise NotSupported(NETEM_MISSING) from None
            if exc.code == _errno.EINVAL:
                raise self._netem_refusal(exc, rule, () if rule.duplicate_pct else self._duplicating_leaves(slot)) \
                    from None
            raise _kernel_error(exc, "set netem leaf of", f"{classid_text(slot)} on {self.ifname}") from None

    def _netem_refusal(self, exc: NetlinkError, rule: Rule, duplicating: Sequence[int] = ()) -> Exception:
        """EINVAL for a netem leaf: the duplicate restriction where this kernel has it and duplication is
        involved (the rule duplicates, or the leaves of the slots `duplicating` do), else what the kernel said."""
        if not (rule.duplicate_pct or duplicating) or netem_duplicate_policy() == DUP_ALLOWED:
            return _kernel_error(exc, "set netem leaf of", f"rule {rule.name!r} on {self.ifname}")
        if rule.duplicate_pct:
            text = NETEM_DUPLICATE_REFUSED
        else:
            classes = ", ".join(classid_text(slot) for slot in duplicating)
            text = NETEM_BESIDE_DUPLICATE_REFUSED.format(
                duplicating=f"the netem of class{'es' if len(duplicating) > 1 else ''} {classes} duplicates")
        if netem_duplicate_policy() != DUP_REFUSED:
            text = text.replace("This kernel refuses", "Kernels with the 2025 netem restriction refuse")
        return NotSupported(text + f" (refused: netem leaf of rule {rule.name!r})")

    def _duplicating_leaves(self, slot: int) -> list[int]:
        """The slots other than `slot` whose netem leaf duplicates, as the kernel holds them now.

        Read only to explain a refusal: if the read fails, the refusal is reported as the kernel gave it."""
        out = []
        try:
            for q in self.qdiscs():
                raw = q.get_attr("TCA_OPTIONS") if q.get_attr("TCA_KIND") == "netem" else None
                parent = q["parent"]
                if isinstance(raw, bytes) and parent >> 16 == HTB_MAJOR and parent & 0xFFFF != slot \
                        and netem.duplicate_of(raw):
                    out.append(parent & 0xFFFF)
        except (NetlinkError, OSError):
            return []
        return sorted(out)

    # -- removal -----------------------------------------------------------------
    def del_root(self) -> bool:
        if not self.has_our_root():
            return False
        try:
            self.ipr.tc("del", "htb", self.ifindex, ROOT, parent=0xFFFFFFFF)
        except NetlinkError as exc:
            if exc.code != _errno.ENOENT:
                raise _kernel_error(exc, "delete the HTB root of", self.ifname) from None
        return True

    def del_clsact(self) -> None:
        try:
            self.ipr.tc("del", "clsact", self.ifindex)
        except NetlinkError as exc:
            if exc.code not in (_errno.ENOENT, _errno.EINVAL):
                raise _kernel_error(exc, "delete clsact on", self.ifname) from None


_dup_policy: list[str] = []


def netem_duplicate_policy() -> str:
    """Whether this kernel takes a duplicating netem beside another netem in one qdisc tree:
    DUP_REFUSED, DUP_ALLOWED, or DUP_UNKNOWN (no sch_netem, or no right to make a namespace).

    Tried once per process on the loopback of a throwaway network namespace,
    made by a thread that unshares its own: nothing outside it is touched, and
    the kernel removes it with the thread's last socket."""
    if not _dup_policy:
        result: list[str] = []
        t = threading.Thread(target=lambda: result.append(_probe_duplicate()), name="netem-probe")
        t.start()
        t.join()
        _dup_policy.append(result[0] if result else DUP_UNKNOWN)
    return _dup_policy[0]


def _probe_duplicate() -> str:
    if ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWNET) != 0:
        return DUP_UNKNOWN
    with IPRoute() as ipr:
        ipr.status["nlm_generator"] = False  # as in Tc.__init__
        lo = ipr.link_lookup(ifname="lo")[0]
        try:
            ipr.tc("add", "htb", lo, ROOT, default=0)
            for slot in (1, 2):
                ipr.tc("add-class", "htb", lo, ROOT | slot, parent=ROOT, rate=125_000, ceil=125_000, burst=1600,
                       cburst=1600, quantum=HTB_QUANTUM)
        except NetlinkError:
            return DUP_UNKNOWN
        for slot, duplicate in ((1, 0), (2, netem.prob(50))):
            msg = _TcMsg()
            msg["family"], msg["index"], msg["handle"], msg["parent"], msg["info"] = 0, lo, slot << 16, ROOT | slot, 0
            msg["attrs"] = [("TCA_KIND", "netem"), ("TCA_OPTIONS", netem.QOPT.pack(0, 1000, 0, 0, duplicate, 0))]
            try:
                ipr.nlm_request(msg, msg_type=RTM_NEWQDISC,
                                msg_flags=NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)
            except NetlinkError as exc:
                if duplicate and exc.code == _errno.EINVAL:
                    return DUP_REFUSED
                return DUP_UNKNOWN
        return DUP_ALLOWED
