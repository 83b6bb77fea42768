"""Record the kernel's replies to shaper's tc dumps, as fixtures for the dump decoder's unit tests.

    sudo .venv/bin/python -m lab.record_netlink [DIR]   (default: tests/unit/fixtures/netlink)

In a lab (two network namespaces and a veth pair it creates and removes), `shaper apply` sets up what
it always does (HTB root 5348:, clsact, the BPF classifier, one class per rule) with rate-only rules,
so each class keeps HTB's default leaf, the running kernel needing no sch_netem. Pings through two of
the classes give them known counters. Then the RTM_GETQDISC, RTM_GETTCLASS and RTM_GETTFILTER dumps
of shp0, a qdisc request and a class dump for an interface that does not exist, are sent on a netlink socket in
the pod namespace, and every recv() buffer is saved: DIR/<name>.hex, one buffer a line. The requests
are packed here, not with shaper's codec, so a fixture does not depend on what it tests.

DIR/recorded.json says what was configured and sent, the kernel release, and iproute2's own reading
of the same objects (`tc -s -j`), taken before and after the dumps: the unit tests compare the
decoder's values with both, and the recording is refused if anything moved in between.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import struct
import sys
from pathlib import Path

from lab import POD_IF, ROOT, V4, Lab, sh
from shaper.datapath.tc import in_netns

NLMSG = struct.Struct("=IHHII")  # linux/netlink.h nlmsghdr
TCMSG = struct.Struct("=BxxxiIII")  # linux/rtnetlink.h tcmsg
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_GETQDISC, RTM_GETTCLASS, RTM_GETTFILTER = 38, 42, 46
TC_H_CLSACT_EGRESS = 0xFFFFFFF3
MISSING_IFINDEX = 0x7FFFFFF0  # no interface has it in a namespace made a moment ago

RULES = {"a": (V4["a"], "10mbit"), "b": (V4["b"], "20mbit"), "c": (V4["c"], "30mbit")}
PINGS = {"a": 7, "b": 3}  # rule c's class gets none: a class whose counters are zero
LEAF_RULE, LEAF_HANDLE = "b", "52:"
PING_FRAME_BYTES = 14 + 20 + 8 + 56  # Ethernet + IPv4 + ICMP headers and ping's default 56-byte payload


def request(msg_type: int, flags: int, seq: int, ifindex: int, parent: int = 0) -> bytes:
    body = TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, parent, 0)
    return NLMSG.pack(NLMSG.size + len(body), msg_type, flags, seq, 0) + body


def exchange(sock: socket.socket, raw: bytes) -> list[bytes]:
    """Send one request; every recv() until the reply ends (NLMSG_DONE, or NLMSG_ERROR)."""
    sock.send(raw)
    seq = NLMSG.unpack_from(raw)[3]
    buffers = []
    while True:
        buf = sock.recv(1 << 20)
        buffers.append(buf)
        off = 0
        while off + NLMSG.size <= len(buf):
            length, msg_type, _flags, msg_seq, _pid = NLMSG.unpack_from(buf, off)
            if msg_seq == seq and msg_type in (NLMSG_DONE, NLMSG_ERROR):
                return buffers
            off += (length + 3) & ~3
        if len(buffers) > 64:
            raise RuntimeError(f"no end of reply to request {seq} after 64 reads")


def tc_json(lab: Lab, what: str, *where: str) -> list:
    return json.loads(sh("ip", "netns", "exec", lab.pod, "tc", "-s", "-j", what, "show", "dev", POD_IF,
                         *where).stdout)


# iproute2 6.1 prints nothing for `tc -j class show`, so classes are read from its text.
CLASS_TEXT = re.compile(r"class (?P<kind>\S+) (?P<handle>[0-9a-f]+:[0-9a-f]*) (?:(?P<root>root)|parent (?P<parent>[0-9a-f]+:[0-9a-f]*))"
                        r"(?: leaf (?P<leaf>[0-9a-f]+:))?.*?\n Sent (?P<bytes>\d+) bytes (?P<packets>\d+) pkt \(dropped (?P<drops>\d+), "
                        r"overlimits (?P<overlimits>\d+) requeues (?P<requeues>\d+)\) \n"
                        r" backlog (?P<backlog>\d+)b (?P<qlen>\d+)p", re.S)


def tc_classes(lab: Lab) -> list[dict]:
    text = sh("ip", "netns", "exec", lab.pod, "tc", "-s", "class", "show", "dev", POD_IF).stdout
    found = [{k: (int(v) if v.isdigit() else v) for k, v in m.groupdict().items() if v is not None}
             for m in CLASS_TEXT.finditer(text)]
    if len(found) != text.count("class "):
        raise RuntimeError(f"could not read every class in:\n{text}")
    return found


def iproute2_view(lab: Lab) -> dict:
    return {"qdisc": tc_json(lab, "qdisc"), "class": tc_classes(lab), "filter_egress": tc_json(lab, "filter", "egress")}


def record(out: Path) -> None:
    with Lab() as lab:
        rules = "rules:\n" + "".join(f"  - name: {name}\n    dst: [{dst}]\n    rate: {rate}\n"
                                     for name, (dst, rate) in RULES.items())
        lab.shaper("apply", rules=rules)
        shown = lab.show()
        # Rate-only rules keep HTB's default leaf, which qdisc dumps leave out: one leaf of our own
        # (not netem, which this kernel may lack) puts a leaf in the dump as a netem would be.
        sh("ip", "netns", "exec", lab.pod, "tc", "qdisc", "add", "dev", POD_IF, "parent", shown[LEAF_RULE]["classid"],
           "handle", LEAF_HANDLE, "pfifo", "limit", "100")
        for name, count in PINGS.items():
            got = lab.ping(RULES[name][0], count=count, interval=0.05)
            assert got["received"] == count, f"ping {RULES[name][0]}: {got}"
        ifindex = int(sh("ip", "netns", "exec", lab.pod, "cat", f"/sys/class/net/{POD_IF}/ifindex").stdout)
        before = iproute2_view(lab)
        sock = in_netns(lab.pod, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE))
        with sock:
            replies = {
                "qdisc_dump": exchange(sock, request(RTM_GETQDISC, NLM_F_REQUEST | NLM_F_DUMP, 1, ifindex)),
                "class_dump": exchange(sock, request(RTM_GETTCLASS, NLM_F_REQUEST | NLM_F_DUMP, 2, ifindex)),
                "filter_dump": exchange(sock, request(RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP, 3, ifindex,
                                                      TC_H_CLSACT_EGRESS)),
                "qdisc_get_enodev": exchange(sock, request(RTM_GETQDISC, NLM_F_REQUEST, 4, MISSING_IFINDEX)),
                "class_dump_missing_ifindex": exchange(sock, request(RTM_GETTCLASS, NLM_F_REQUEST | NLM_F_DUMP, 5,
                                                                     MISSING_IFINDEX)),
            }
        after = iproute2_view(lab)
        if before != after:
            raise RuntimeError("the tc objects changed while they were dumped (traffic?): record again")
    out.mkdir(parents=True, exist_ok=True)
    for name, buffers in replies.items():
        (out / f"{name}.hex").write_text("".join(buf.hex() + "\n" for buf in buffers))
    facts = {
        "kernel": platform.release(),
        "recorded_by": "python -m lab.record_netlink",
        "ifindex": ifindex,
        "missing_ifindex": MISSING_IFINDEX,
        "sequence": {"qdisc_dump": 1, "class_dump": 2, "filter_dump": 3, "qdisc_get_enodev": 4,
                     "class_dump_missing_ifindex": 5},
        "rules": {name: {"dst": dst, "rate": rate, "classid": shown[name]["classid"]}
                  for name, (dst, rate) in RULES.items()},
        "pings": PINGS,
        "leaf": {"rule": LEAF_RULE, "handle": LEAF_HANDLE, "kind": "pfifo"},
        "ping_frame_bytes": PING_FRAME_BYTES,
        "iproute2": before,
    }
    (out / "recorded.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    print(f"recorded {', '.join(f'{n} ({len(b)} buffers)' for n, b in replies.items())} on {facts['kernel']} "
          f"into {out}")


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, tc, BPF)")
    record(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "unit" / "fixtures" / "netlink")
