"""The lean class/qdisc dump decoder, on bytes built to the kernel's layouts (no socket)."""

import struct

import pytest

from shaper.datapath import tcdump as D


def nla(kind: int, payload: bytes) -> bytes:
    raw = D.NLA.pack(D.NLA.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def message(msg_type: int, seq: int, ifindex: int, handle: int, parent: int, attrs: bytes) -> bytes:
    body = D.TCMSG.pack(0, ifindex, handle, parent, 0) + attrs
    return D.NLMSG.pack(D.NLMSG.size + len(body), msg_type, D.NLM_F_MULTI, seq, 0) + body


def stats2(nbytes: int, packets: int, queue: tuple, pkt64: int | None = None) -> bytes:
    inner = nla(D.TCA_STATS_BASIC, D.BASIC.pack(nbytes, packets)) + nla(D.TCA_STATS_QUEUE, D.QUEUE.pack(*queue))
    if pkt64 is not None:
        inner += nla(D.TCA_STATS_PKT64, D.U64.pack(pkt64))
    return nla(D.TCA_STATS2 | 0x8000, inner)  # NLA_F_NESTED is masked off


def done(seq: int) -> bytes:
    return D.NLMSG.pack(D.NLMSG.size + 4, D.NLMSG_DONE, D.NLM_F_MULTI, seq, 0) + b"\0" * 4


def test_request_layout():
    raw = D.dump_request(D.RTM_GETTCLASS, 7, 99)
    length, msg_type, flags, seq, pid = D.NLMSG.unpack_from(raw)
    assert (length, msg_type, flags, seq, pid) == (len(raw), 42, 0x301, 99, 0) and length == 36
    assert D.TCMSG.unpack_from(raw, 16) == (0, 7, 0, 0, 0)


def test_classes_with_counters_and_kinds():
    a = message(D.RTM_NEWTCLASS, 5, 3, 0x53480001, 0x53480000,
                nla(D.TCA_KIND, b"htb\0") + nla(2, b"\1" * 37) + stats2(123456, 789, (1, 1500, 4, 2, 9)))
    b = message(D.RTM_NEWTCLASS, 5, 3, 0x53480002, 0x53480000,
                nla(D.TCA_KIND, b"htb\0") + stats2(10, 0xFFFFFFFF, (0, 0, 0, 0, 0), pkt64=2**33))
    objects, finished = D.parse(a + b, 5)
    assert not finished
    first, second = objects
    assert (first.kind, first.handle, first.parent, first.ifindex) == ("htb", 0x53480001, 0x53480000, 3)
    assert (first.bytes, first.packets, first.qlen, first.backlog, first.drops, first.requeues,
            first.overlimits) == (123456, 789, 1, 1500, 4, 2, 9)
    assert second.packets == 2**33  # the 64-bit packet counter wins over the wrapped u32
    assert D.parse(done(5), 5) == ([], True)


def test_qdisc_without_stats_and_foreign_sequence_numbers():
    q = message(D.RTM_NEWQDISC, 8, 3, 0x10000, 0x53480001, nla(D.TCA_KIND, b"netem\0"))
    stale = message(D.RTM_NEWQDISC, 7, 3, 0x20000, 0x53480002, nla(D.TCA_KIND, b"pfifo\0"))
    objects, finished = D.parse(stale + q + done(7) + done(8), 8)
    assert finished and [(o.kind, o.parent, o.bytes) for o in objects] == [("netem", 0x53480001, 0)]


def test_an_error_ends_the_dump():
    err = D.NLMSG.pack(D.NLMSG.size + 20, D.NLMSG_ERROR, 0, 4, 0) + struct.pack("=i", -19) + b"\0" * 16
    with pytest.raises(D.DumpError) as exc:
        D.parse(err, 4)
    assert exc.value.errno == 19
    ack = D.NLMSG.pack(D.NLMSG.size + 20, D.NLMSG_ERROR, 0, 4, 0) + struct.pack("=i", 0) + b"\0" * 16
    assert D.parse(ack, 4) == ([], True)


def test_truncated_input_stops_cleanly():
    a = message(D.RTM_NEWTCLASS, 1, 3, 0x53480001, 0, nla(D.TCA_KIND, b"htb\0"))
    assert D.parse(a[:-3], 1) == ([], False)
