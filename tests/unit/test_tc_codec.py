"""The netlink messages shaper builds and reads, encoded and decoded with no socket."""

import os
import struct
import subprocess
import sys

import pytest

from pyroute2.netlink.rtnl import RTM_NEWQDISC, RTM_NEWTFILTER

from shaper.datapath import netem
from shaper.core.model import parse_rule
from shaper.datapath.tc import _TcMsg
from tests.support.netem_decode import decode_options

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _round_trip(attrs, msg_type=RTM_NEWQDISC):
    msg = _TcMsg()
    msg["index"], msg["handle"], msg["parent"] = 3, 0x10000, 0x53480001
    msg["attrs"] = attrs
    msg["header"]["type"] = msg_type
    msg.encode()
    back = _TcMsg(msg.data)
    back.decode()
    return back


def test_netem_options_travel_as_raw_bytes():
    rule = parse_rule({"name": "x", "dst": "10.0.0.1", "delay": "30ms", "jitter": "3ms", "distribution": "normal",
                       "loss_ge": {"p": "1%", "r": "20%"}, "duplicate": "2%", "corrupt": "0.5%",
                       "reorder": "10%", "gap": 3})
    payload = netem.encode_options(rule)
    back = _round_trip([("TCA_KIND", "netem"), ("TCA_OPTIONS", payload)])
    assert back.get_attr("TCA_OPTIONS") == payload
    opts = decode_options(payload)
    assert opts["latency_ns"] == 30_000_000 and opts["jitter_ns"] == 3_000_000 and opts["gap"] == 3
    assert opts["ge"] == (netem.prob(1), netem.prob(20), 0, 0) and opts["dist_size"] == 4096
    assert opts["duplicate"] == netem.prob(2) and opts["corrupt"] == netem.prob(0.5)


def test_bpf_filter_options_decode_program_id():
    _bpf_filter_options_decode_program_id()


def test_program_id_decodes_after_pyroute2_decoded_a_bpf_filter_itself():
    # pyroute2 compiles a class's table on first use, and a subclass used after that
    # inherited the parent's table (without TCA_BPF_ID). Any tc filter dump in the
    # process does that first; a fresh interpreter makes the order certain.
    code = ("import tests.unit.test_tc_codec as t; from pyroute2.netlink.rtnl.tcmsg import tcmsg; "
            "m = tcmsg(t._bpf_filter_dump()); m.decode(); t._bpf_filter_options_decode_program_id(); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.stdout.strip() == "ok", proc.stderr


def _bpf_filter_dump() -> bytes:
    def nla(kind, payload):
        return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)

    # A filter as the kernel dumps it: name, tag, flags, id (TCA_BPF_ID = 11).
    options = nla(7, b"shaper_classifier\0") + nla(10, b"\xaa" * 8) + nla(8, struct.pack("=I", 1)) + \
        nla(11, struct.pack("=I", 4242))
    body = struct.pack("=BBHiIII", 0, 0, 0, 3, 1, 0xFFFFFFF3, 0) + nla(1, b"bpf\0") + nla(2, options)
    return struct.pack("=IHHII", 16 + len(body), RTM_NEWTFILTER, 0, 1, 0) + body


def _bpf_filter_options_decode_program_id():
    msg = _TcMsg(_bpf_filter_dump())
    msg.decode()
    opts = msg.get_attr("TCA_OPTIONS")
    assert opts.get_attr("TCA_BPF_ID") == 4242 and opts.get_attr("TCA_BPF_NAME") == "shaper_classifier"


def test_other_kinds_keep_pyroute2_decoding():
    back = _round_trip([("TCA_KIND", "htb"), ("TCA_OPTIONS", {"attrs": [["TCA_HTB_INIT", {"defcls": 0}]]})])
    assert back.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_INIT")["defcls"] == 0


def test_uniform_table_spans_the_scale():
    t = netem.uniform_table()
    assert len(t) == 4096 and -netem.NETEM_DIST_SCALE < min(t) < -8000 and 8000 < max(t) < netem.NETEM_DIST_SCALE
    assert abs(sum(t)) < 4096  # symmetric: mean delay unchanged


def test_a_class_request_decodes_as_pyroute2_reads_it():
    """tcdump.request's bytes, read back by pyroute2's tc message parser: what the kernel gets."""
    from shaper.core.model import ClassParams
    from shaper.datapath import tcdump
    from shaper.datapath.tc import _htb_class_options

    options = _htb_class_options(ClassParams(rate_bytes=1_250_000, burst_bytes=15_000))
    raw = tcdump.request(tcdump.RTM_NEWTCLASS, tcdump.NLM_F_REPLACE | tcdump.NLM_F_CREATE, 7, 3, 0x53480005,
                         0x53480000, "htb", options)
    length, msg_type, flags, seq, _ = tcdump.NLMSG.unpack_from(raw)
    assert (length, msg_type, seq) == (len(raw), tcdump.RTM_NEWTCLASS, 7) and length % 4 == 0
    assert flags == tcdump.NLM_F_REQUEST | tcdump.NLM_F_ACK | tcdump.NLM_F_REPLACE | tcdump.NLM_F_CREATE
    family, ifindex, handle, parent, _ = tcdump.TCMSG.unpack_from(raw, tcdump.NLMSG.size)
    assert (ifindex, handle, parent) == (3, 0x53480005, 0x53480000)
    attrs = tcdump.attributes(raw, tcdump.NLMSG.size + tcdump.TCMSG.size, len(raw))
    assert bytes(attrs[tcdump.TCA_KIND]) == b"htb\0" and bytes(attrs[tcdump.TCA_OPTIONS]) == options
    from pyroute2.netlink.rtnl.tcmsg import tcmsg
    msg = tcmsg(raw)
    msg.decode()
    parms = msg.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_PARMS")
    assert parms["rate"] == 1_250_000 and parms["ceil"] == 1_250_000 and parms["buffer"] > 0


def test_a_delete_request_has_no_attributes_and_acks_are_matched_by_sequence():
    from shaper.datapath import tcdump

    raw = tcdump.request(tcdump.RTM_DELTCLASS, 0, 9, 3, 0x53480005, 0x53480000)
    assert len(raw) == tcdump.NLMSG.size + tcdump.TCMSG.size

    def error(seq, code):
        body = struct.pack("=i", -code) + tcdump.NLMSG.pack(36, 41, 0, seq, 0)
        return tcdump.NLMSG.pack(tcdump.NLMSG.size + len(body), tcdump.NLMSG_ERROR, 0, seq, 0) + body

    assert tcdump.ack(error(8, 2), 9) is None  # an earlier request's answer
    assert tcdump.ack(error(8, 0) + error(9, 2), 9) == 2  # ENOENT
    assert tcdump.ack(error(9, 0), 9) == 0
    assert tcdump.ack(b"", 9) is None


def _pyroute2_htb_class_options(rate_bytes: int, burst_bytes: int, quantum: int) -> bytes:
    """The oracle: pyroute2's own encoding of an HTB class's TCA_OPTIONS (what shaper sent before
    tcdump encoded them), cut out of a whole tcmsg."""
    from pyroute2.netlink.rtnl.tcmsg import sched_htb, tcmsg

    from shaper.datapath import tcdump

    msg = tcmsg()
    msg["attrs"] = [("TCA_KIND", "htb"), ("TCA_OPTIONS", sched_htb.get_class_parameters(
        {"rate": rate_bytes, "ceil": rate_bytes, "burst": burst_bytes, "cburst": burst_bytes, "quantum": quantum}))]
    msg.encode()
    data = bytes(msg.data)
    return bytes(tcdump.attributes(data, tcdump.NLMSG.size + tcdump.TCMSG.size, len(data))[tcdump.TCA_OPTIONS])


@pytest.mark.parametrize("rate_bytes", [1000, 1001, 12_345, 125_000, 1_250_000, 123_456_789, 4_000_000_000,
                                        (1 << 32) - 1, 1 << 32, 1_250_000_000_000])
def test_htb_class_options_are_pyroute2s_byte_for_byte(rate_bytes):
    """tcdump's encoding of a class (parameters, both rate tables, the 64-bit rate beyond 32 bits) is
    what pyroute2 encodes for the same class, at the ends of the rates a rule may set (8kbit..10tbit)
    and between, for the burst shaper picks and for others."""
    from pyroute2.netlink.rtnl.tcmsg import common

    from shaper.core.model import UNLIMITED_BURST_BYTES, default_burst_bytes
    from shaper.datapath import tcdump
    from shaper.datapath.tc import HTB_QUANTUM, psched_tick_in_usec

    assert psched_tick_in_usec() == common.tick_in_usec  # both read /proc/net/psched
    for burst in {default_burst_bytes(rate_bytes), 1600, 15_000, UNLIMITED_BURST_BYTES}:
        try:
            theirs = _pyroute2_htb_class_options(rate_bytes, burst, HTB_QUANTUM)
        except struct.error:  # a buffer beyond 32 bits of ticks (4 MB at 8 kbit/s): neither encodes it
            with pytest.raises(struct.error):
                tcdump.htb_class_options(rate_bytes, burst, HTB_QUANTUM, psched_tick_in_usec())
            continue
        ours = tcdump.htb_class_options(rate_bytes, burst, HTB_QUANTUM, psched_tick_in_usec())
        assert ours == theirs, (rate_bytes, burst)
    assert (tcdump.TCA_HTB_RATE64 in tcdump.attributes(ours, 0, len(ours))) == (rate_bytes >= 1 << 32)
