"""The lean class/qdisc dump decoder, on the kernel's own replies (recorded by lab/record_netlink.py into
fixtures/netlink, see its README) and, for what a recording cannot show, on bytes built to the kernel's
layouts. No socket."""

import json
import struct
from pathlib import Path

import pytest

from shaper.datapath import tcdump as D

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "netlink"
RECORDED = json.loads((FIXTURES / "recorded.json").read_text())
TC_H_ROOT = 0xFFFFFFFF


def buffers(name: str) -> list[bytes]:
    return [bytes.fromhex(line) for line in (FIXTURES / f"{name}.hex").read_text().split()]


def decode(name: str) -> list[D.TcObject]:
    """What tc.Tc._dump does with the reply: parse each recv() buffer until the dump says it is done."""
    seq, out = RECORDED["sequence"][name], []
    *middle, last = buffers(name)
    for buf in middle:
        objects, done = D.parse(buf, seq)
        assert not done
        out += objects
    objects, done = D.parse(last, seq)
    assert done
    return out + objects


def handle(text: str) -> int:
    """iproute2's "5348:1", "ffff:" and "root" (what it prints for a parent of TC_H_ROOT)."""
    if text == "root":
        return TC_H_ROOT
    major, minor = text.split(":")
    return int(major, 16) << 16 | int(minor or "0", 16)


def counters(o) -> tuple:
    if isinstance(o, dict):
        return tuple(o[k] for k in ("bytes", "packets", "qlen", "backlog", "drops", "requeues", "overlimits"))
    return o.bytes, o.packets, o.qlen, o.backlog, o.drops, o.requeues, o.overlimits


def test_recorded_class_dump_matches_iproute2_and_the_pings_sent():
    classes = decode("class_dump")
    assert {o.ifindex for o in classes} == {RECORDED["ifindex"]}
    want = {handle(c["handle"]): (c["kind"], handle(c.get("parent") or c["root"]), counters(c))
            for c in RECORDED["iproute2"]["class"]}
    assert {o.handle: (o.kind, o.parent, counters(o)) for o in classes} == want
    by_rule = {name: next(o for o in classes if o.handle == handle(r["classid"])) for name, r in RECORDED["rules"].items()}
    for name, o in by_rule.items():
        sent = RECORDED["pings"].get(name, 0)
        assert (o.kind, o.packets, o.bytes) == ("htb", sent, sent * RECORDED["ping_frame_bytes"]), name
        assert o.parent == TC_H_ROOT  # HTB reports a class without a parent class under TC_H_ROOT, not 5348:
    assert by_rule["c"].packets == 0 and by_rule["a"].packets > by_rule["b"].packets > 0


def test_recorded_qdisc_dump_holds_every_interface_and_the_leaf_under_its_class():
    qdiscs = decode("qdisc_dump")
    # The kernel ignores the ifindex of a qdisc dump request (lo's noqueue is here too): Tc._dump keeps
    # only its interface's objects.
    assert {o.ifindex for o in qdiscs} > {RECORDED["ifindex"]}
    ours = [o for o in qdiscs if o.ifindex == RECORDED["ifindex"]]
    want = {handle(q["handle"]): (q["kind"], handle(q["parent"]) if "parent" in q else TC_H_ROOT, counters(q))
            for q in RECORDED["iproute2"]["qdisc"]}
    assert {o.handle: (o.kind, o.parent, counters(o)) for o in ours} == want
    leaf = next(o for o in ours if o.handle == handle(RECORDED["leaf"]["handle"]))
    rule = RECORDED["leaf"]["rule"]
    assert (leaf.kind, leaf.parent) == (RECORDED["leaf"]["kind"], handle(RECORDED["rules"][rule]["classid"]))
    assert leaf.packets == RECORDED["pings"][rule]
    root = next(o for o in ours if o.parent == TC_H_ROOT)
    assert (root.kind, root.handle) == ("htb", handle("5348:"))
    assert root.packets >= sum(RECORDED["pings"].values())  # and what went to its direct queue (ARP)


def test_a_filter_dump_gives_no_objects_and_ends():
    # Filters (the BPF classifier, its name and program id in the recording) are pyroute2's to decode.
    assert decode("filter_dump") == []
    assert b"shaper_classifier" in b"".join(buffers("filter_dump"))


def test_the_kernel_error_reply_raises_with_its_errno():
    (buf,) = buffers("qdisc_get_enodev")
    with pytest.raises(D.DumpError) as exc:
        D.parse(buf, RECORDED["sequence"]["qdisc_get_enodev"])
    assert exc.value.errno == 19  # ENODEV


def test_a_class_dump_of_a_missing_interface_is_empty_not_an_error():
    assert decode("class_dump_missing_ifindex") == []


def test_the_tail_of_another_dump_is_skipped():
    stale = buffers("qdisc_dump")[0]  # sequence 1, as an abandoned dump would have left it
    first, *rest = buffers("class_dump")
    objects, done = D.parse(stale + first, RECORDED["sequence"]["class_dump"])
    assert not done and {o.kind for o in objects} == {"htb"} and len(objects) == len(RECORDED["rules"])
    assert D.parse(rest[-1], RECORDED["sequence"]["qdisc_dump"]) == ([], False)


def test_truncated_input_stops_cleanly():
    buf = buffers("class_dump")[0]
    length = D.NLMSG.unpack_from(buf)[0]
    assert D.parse(buf[:length - 3], RECORDED["sequence"]["class_dump"]) == ([], False)


def test_request_layout():
    raw = D.dump_request(D.RTM_GETTCLASS, 7, 99)
    length, msg_type, flags, seq, pid = D.NLMSG.unpack_from(raw)
    assert (length, msg_type, flags, seq, pid) == (len(raw), 42, 0x301, 99, 0) and length == 36
    assert D.TCMSG.unpack_from(raw, 16) == (0, 7, 0, 0, 0)


# What the recording cannot show: its queue counters are all zero, and the kernel adds TCA_STATS_PKT64 only
# past 2**32 packets. Built with the kernel headers' numbers and layouts, not the decoder's constants.
TCA_KIND, TCA_STATS2, TCA_STATS_BASIC, TCA_STATS_QUEUE, TCA_STATS_PKT64 = 1, 7, 1, 3, 8
RTM_NEWTCLASS, NLMSG_ERROR, NLM_F_MULTI, NLA_F_NESTED = 40, 2, 0x2, 0x8000


def nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def class_message(seq: int, basic: tuple, queue: tuple, pkt64: int | None = None) -> bytes:
    stats = nla(TCA_STATS_BASIC, struct.pack("=QI", *basic)) + nla(TCA_STATS_QUEUE, struct.pack("=5I", *queue))
    if pkt64 is not None:
        stats += nla(TCA_STATS_PKT64, struct.pack("=Q", pkt64))
    body = (struct.pack("=BxxxiIII", 0, 3, 0x53480001, TC_H_ROOT, 0) + nla(TCA_KIND, b"htb\0")
            + nla(TCA_STATS2 | NLA_F_NESTED, stats))
    return struct.pack("=IHHII", 16 + len(body), RTM_NEWTCLASS, NLM_F_MULTI, seq, 0) + body


def test_queue_counters_in_their_order_and_the_64_bit_packet_count():
    (o,), _ = D.parse(class_message(5, (123456, 789), (1, 1500, 4, 2, 9)), 5)
    assert counters(o) == (123456, 789, 1, 1500, 4, 2, 9)
    (o,), _ = D.parse(class_message(5, (10, 0xFFFFFFFF), (0,) * 5, pkt64=2**33), 5)
    assert o.packets == 2**33  # the 64-bit packet counter wins over the wrapped u32


def test_an_ack_ends_the_dump():
    ack = struct.pack("=IHHIIi", 36, NLMSG_ERROR, 0, 4, 0, 0) + b"\0" * 16
    assert D.parse(ack, 4) == ([], True)
