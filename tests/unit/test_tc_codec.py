"""The netlink messages shaper builds and reads, encoded and decoded with no socket."""

import os
import struct
import subprocess
import sys

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
