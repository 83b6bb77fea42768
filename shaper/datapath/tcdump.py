"""A lean codec for tc class and qdisc dumps (counters and kinds, nothing else), and for the
requests a change sends most (an HTB class or a netem leaf set, a class deleted), with the
HTB class options those carry.

pyroute2 decodes every attribute of every message (HTB parameters, rate
tables, netem options), about 0.1 ms a class: a /metrics scrape of 1,000
rules spent most of its time there.  This decodes only what ClassStats needs
with `struct`, from bytes, so it is tested without a socket; tc.py owns the
socket.  Requests likewise: pyroute2's request path (its message objects and
event loop) took 0.7 ms of a 1 ms change of one HTB class, and its encoding of
a class's options (two rate tables computed through its nla objects) 0.9 ms
for every rate not seen before.  Layouts: linux/netlink.h, linux/rtnetlink.h, linux/gen_stats.h.
"""

from __future__ import annotations

import struct
from typing import Iterable, NamedTuple

from shaper.errors import DumpError

NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
NLA = struct.Struct("=HH")  # len, type
NLA_SIZE, TCMSG_SIZE = NLA.size, TCMSG.size  # ints, not attribute loads, in the loops of a dump
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLM_F_MULTI, NLM_F_ACK = 0x2, 0x4
NLM_F_REPLACE, NLM_F_CREATE = 0x100, 0x400
RTM_NEWQDISC, RTM_DELQDISC, RTM_GETQDISC, RTM_NEWTCLASS, RTM_DELTCLASS, RTM_GETTCLASS = 36, 37, 38, 40, 41, 42
TCA_KIND, TCA_OPTIONS, TCA_STATS2 = 1, 2, 7
TCA_STATS_BASIC, TCA_STATS_QUEUE, TCA_STATS_PKT64 = 1, 3, 8
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
BASIC = struct.Struct("=QI")  # gnet_stats_basic: bytes, packets (u32)
QUEUE = struct.Struct("=IIIII")  # gnet_stats_queue: qlen, backlog, drops, requeues, overlimits
U64 = struct.Struct("=Q")
# An HTB class's TCA_OPTIONS (linux/pkt_sched.h): struct tc_htb_opt (two struct tc_ratespec: cell_log,
# linklayer, overhead, cell_align, mpu, rate; then buffer, cbuffer, quantum, level, prio) and the
# rate tables iproute2's tc sends with it.
TCA_HTB_PARMS, TCA_HTB_CTAB, TCA_HTB_RTAB, TCA_HTB_RATE64, TCA_HTB_CEIL64 = 1, 3, 4, 6, 7
HTB_OPT = struct.Struct("=BBHhHIBBHhHIIIIII")
RATE_TABLE = struct.Struct("=256I")
U32_MAX = (1 << 32) - 1
RTAB_CELL_LOG = 3  # the smallest with (mtu >> cell_log) <= 255 for tc's default mtu of 1600
_CELL_SIZES = tuple((i + 1) << RTAB_CELL_LOG for i in range(256))  # the size each table entry is the time of


class TcObject(NamedTuple):
    """One class or qdisc of a dump: where it is, its kind and its counters (a tuple: a scrape of
    10,000 rules makes 20,000 of them)."""

    ifindex: int
    handle: int
    parent: int
    kind: str
    bytes: int = 0
    packets: int = 0
    qlen: int = 0
    backlog: int = 0
    drops: int = 0
    requeues: int = 0
    overlimits: int = 0



def dump_request(msg_type: int, ifindex: int, seq: int) -> bytes:
    """An RTM_GETTCLASS/RTM_GETQDISC dump request for one interface."""
    body = TCMSG.pack(0, ifindex, 0, 0, 0)
    return NLMSG.pack(NLMSG.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def request(msg_type: int, flags: int, seq: int, ifindex: int, handle: int, parent: int,
            kind: str | None = None, options: bytes | None = None) -> bytes:
    """A tc object request (RTM_NEWTCLASS, RTM_DELTCLASS, RTM_NEWQDISC, ...) asking for an ACK: the
    object's kind and its TCA_OPTIONS as given (already encoded), where there are."""
    attrs = b""
    if kind is not None:
        attrs += _attr(TCA_KIND, kind.encode() + b"\0")
    if options is not None:
        attrs += _attr(TCA_OPTIONS, options)
    body = TCMSG.pack(0, ifindex, handle, parent, 0) + attrs
    return NLMSG.pack(NLMSG.size + len(body), msg_type, flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def xmit_ticks(rate_bytes: int, sizes: Iterable[int], tick_in_usec: float) -> list[int]:
    """The time to send each of `sizes` bytes at the rate, in the kernel's packet-scheduler ticks, as
    tc computes it (whole microseconds first, then ticks; /proc/net/psched gives the tick).  Many
    sizes at once: a call per size was two thirds of a rate table's time."""
    return [int(int(1_000_000 * (size / rate_bytes)) * tick_in_usec) for size in sizes]


def htb_class_options(rate_bytes: int, burst_bytes: int, quantum: int, tick_in_usec: float) -> bytes:
    """The TCA_OPTIONS of an HTB class whose ceil is its rate and cburst its burst, byte for byte as
    pyroute2's ipr.tc("replace-class", "htb", ...) encodes them (tests/unit/test_tc_codec.py holds
    pyroute2 to it): the parameters, the rate table twice (rate and ceil are one), and the 64-bit
    rate where the 32-bit field cannot hold it.  The kernel reads its rate from the parameters;
    the table is checked and kept for tc's older users, so it is sent as tc sends it."""
    rate32 = min(rate_bytes, U32_MAX)
    (buffer,) = xmit_ticks(rate_bytes, (burst_bytes,), tick_in_usec)
    table = RATE_TABLE.pack(*xmit_ticks(rate32, _CELL_SIZES, tick_in_usec))
    out = (_attr(TCA_HTB_PARMS, HTB_OPT.pack(RTAB_CELL_LOG, 0, 0, -1, 0, rate32, RTAB_CELL_LOG, 0, 0, -1, 0, rate32,
                                             buffer, buffer, quantum, 0, 0))
           + _attr(TCA_HTB_RTAB, table) + _attr(TCA_HTB_CTAB, table))
    if rate_bytes > U32_MAX:
        out += _attr(TCA_HTB_RATE64, U64.pack(rate_bytes)) + _attr(TCA_HTB_CEIL64, U64.pack(rate_bytes))
    return out


def _attr(kind: int, payload: bytes) -> bytes:
    length = NLA.size + len(payload)
    return NLA.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def ack(buf: bytes, seq: int) -> int | None:
    """The answer to request `seq` in one recv(): 0 for done, an errno for refused, None if the
    buffer holds no answer to it (messages of other sequence numbers are skipped)."""
    off = 0
    while off + NLMSG.size <= len(buf):
        length, msg_type, _flags, msg_seq, _pid = NLMSG.unpack_from(buf, off)
        if length < NLMSG.size or off + length > len(buf):
            break
        if msg_seq == seq and msg_type == NLMSG_ERROR and length >= NLMSG.size + 4:
            (code,) = struct.unpack_from("=i", buf, off + NLMSG.size)
            return -code
        off += _align(length)
    return None


def _align(n: int) -> int:
    return (n + 3) & ~3


def attributes(buf: bytes, start: int, end: int) -> dict[int, memoryview]:
    """type -> payload of the netlink attributes in buf[start:end]."""
    out = {}
    view = memoryview(buf)
    while start + NLA.size <= end:
        length, kind = NLA.unpack_from(buf, start)
        if length < NLA.size or start + length > end:
            break
        out[kind & NLA_TYPE_MASK] = view[start + NLA.size: start + length]
        start += _align(length)
    return out


def parse(buf: bytes, seq: int) -> tuple[list[TcObject], bool]:
    """Decode one recv() of dump `seq`; returns its objects and whether the dump is done.

    Messages of another sequence number (the tail of an earlier, abandoned
    dump) are skipped."""
    objects = []
    off = 0
    while off + NLMSG.size <= len(buf):
        length, msg_type, _flags, msg_seq, _pid = NLMSG.unpack_from(buf, off)
        if length < NLMSG.size or off + length > len(buf):
            break
        if msg_seq != seq:
            off += _align(length)
            continue
        if msg_type == NLMSG_DONE:
            return objects, True
        if msg_type == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", buf, off + NLMSG.size)
            if code:
                raise DumpError(-code)
            return objects, True
        if msg_type in (RTM_NEWTCLASS, RTM_NEWQDISC):
            objects.append(_object(buf, off + NLMSG.size, off + length))
        off += _align(length)
    return objects, False


_NLA, _BASIC, _QUEUE, _U64 = NLA.unpack_from, BASIC.unpack_from, QUEUE.unpack_from, U64.unpack_from
_KINDS: dict[bytes, str] = {}  # TCA_KIND as dumped (with its NUL) -> the kind


def _object(buf: bytes, start: int, end: int) -> TcObject:
    """One dumped object: its kind and the counters of TCA_STATS2, read in place (no attribute
    table, no copies: this runs for every class and every qdisc of a scrape)."""
    _family, ifindex, handle, parent, _info = TCMSG.unpack_from(buf, start)
    kind = ""
    nbytes = packets = qlen = backlog = drops = requeues = overlimits = 0
    packets64 = False
    at = start + TCMSG_SIZE
    while at + NLA_SIZE <= end:
        length, atype = _NLA(buf, at)
        if length < NLA_SIZE or at + length > end:
            break
        atype &= NLA_TYPE_MASK
        if atype == TCA_KIND:
            raw = buf[at + NLA_SIZE: at + length]
            kind = _KINDS.get(raw)  # a handful of kinds, each decoded once
            if kind is None:
                kind = _KINDS[raw] = raw.split(b"\0", 1)[0].decode()
        elif atype == TCA_STATS2:
            sub, sub_end = at + NLA_SIZE, at + length
            while sub + NLA_SIZE <= sub_end:
                slen, stype = _NLA(buf, sub)
                if slen < NLA_SIZE or sub + slen > sub_end:
                    break
                stype &= NLA_TYPE_MASK
                size = slen - NLA_SIZE
                if stype == TCA_STATS_BASIC and size >= BASIC.size:
                    nbytes, packets32 = _BASIC(buf, sub + NLA_SIZE)
                    if not packets64:
                        packets = packets32
                elif stype == TCA_STATS_PKT64 and size >= U64.size:
                    (packets,) = _U64(buf, sub + NLA_SIZE)  # the u32 of BASIC wraps
                    packets64 = True
                elif stype == TCA_STATS_QUEUE and size >= QUEUE.size:
                    qlen, backlog, drops, requeues, overlimits = _QUEUE(buf, sub + NLA_SIZE)
                sub += (slen + 3) & ~3  # _align, inline
        at += (length + 3) & ~3
    return TcObject(ifindex, handle, parent, kind, nbytes, packets, qlen, backlog, drops, requeues, overlimits)
