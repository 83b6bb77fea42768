"""The kernel side of ingress, ports and except, driven through KernelDatapath with hand-made operations.

No controller: each test builds plan operations itself (shaper.core.plan types), so what is
checked is the classifier, the maps and the tc/ifb plumbing alone.  Every namespace, veth,
vlan and ifb is created here (the lab fixture) and removed again, shaper's pins included.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from lab import POD_IF, ROOT, V4, V6, sh, tcp_goodput
from shaper.core import plan as P
from shaper.core.model import Prefix, parse_rule
from shaper.datapath.kernel import KernelDatapath, ifb_name

TCP, UDP, ICMP = 6, 17, 1

# Packets of each kind to (addr, port) from the namespace it runs in: UDP datagrams, or TCP
# connection attempts (nobody listens: each is one SYN answered by a RST).
_PACKETS = """
import socket, sys
kind, addr, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
src = (sys.argv[5], int(sys.argv[6])) if len(sys.argv) > 6 else None
family = socket.AF_INET6 if ":" in addr else socket.AF_INET
for _ in range(count):
    if kind == "udp":
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if src:
            s.bind(src)
        s.sendto(b"x" * 64, (addr, port))
    else:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect((addr, port))
        except OSError:
            pass
    s.close()
"""


def prefix(text: str) -> Prefix:
    return Prefix.parse(text, "dst")


def rule(name: str, rate: str = "100mbit") -> object:
    return parse_rule({"name": name, "dst": [V4["a"]], "rate": rate})


def classes(slots: dict[int, str], direction: str = "egress") -> list:
    """The operations that create a class per slot (rate given), with the default leaf."""
    ops = []
    for slot, rate in slots.items():
        r = rule(f"r{slot}", rate)
        ops += [P.CreateClass(slot, r, direction), P.SetLeaf(slot, r, None, direction)]
    return ops


def packets(ns: str, kind: str, addr: str, port: int, count: int, src: tuple[str, int] | None = None) -> None:
    args = [kind, addr, str(port), str(count)] + ([src[0], str(src[1])] if src else [])
    sh("ip", "netns", "exec", ns, sys.executable, "-c", _PACKETS, *args)


def counts(dp: KernelDatapath, slots, direction: str = "egress") -> dict[int, int]:
    return {slot: c.packets for slot, c in dp.counters(list(slots), direction).items()}


def ifb_packets(lab, dp: KernelDatapath) -> int:
    """Packets the ifb's root qdisc has sent: every packet redirected to it, whatever its class."""
    out = sh("tc", "-n", lab.pod, "-s", "qdisc", "show", "dev", ifb_name(dp.ifindex)).stdout
    sent = out.split("Sent ", 1)[1].split()
    return int(sent[2])


@pytest.fixture
def dp(lab):
    d = KernelDatapath(POD_IF, lab.pod)
    assert d.attach() == "attached"
    yield d
    d.reset()
    d.close()
    assert ifb_name(d.ifindex) not in sh("ip", "-n", lab.pod, "link").stdout


def test_ingress_shapes_matched_sources_and_leaves_the_rest_alone(lab, dp):
    assert dp.class_stats("ingress") == {}  # nothing of ingress before the first ingress operation
    assert ifb_name(dp.ifindex) not in sh("ip", "-n", lab.pod, "link").stdout
    dp.execute(classes({1: "10mbit"}, "ingress") + [
        P.UpsertEntries({prefix(V4["a"]): P.Entry(1, 0, 128)}, "ingress")])
    link = sh("ip", "-n", lab.pod, "-d", "link", "show", ifb_name(dp.ifindex)).stdout
    assert "ifb" in link and f"alias shaper ingress of {POD_IF}" in link and "mtu 1500" in link
    assert "5348:1" in sh("tc", "-n", lab.pod, "class", "show", "dev", ifb_name(dp.ifindex)).stdout
    assert "shaper_classifier" in sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "ingress").stdout

    shaped = tcp_goodput(lab.dst, V4["a"], lab.pod, V4["pod"], 3, port=5301)
    ingress = dp.class_stats("ingress")[1]
    assert ingress.packets > 100 and counts(dp, [1], "ingress")[1] > 100
    assert counts(dp, [1])[1] == 0  # the egress counters are another array

    before = ifb_packets(lab, dp)
    unshaped = tcp_goodput(lab.dst, V4["b"], lab.pod, V4["pod"], 3, port=5301)
    print(f"\ningress rate from a (10mbit): {shaped / 1e6:.2f} Mbit/s; unmatched b: {unshaped / 1e6:.0f} Mbit/s")
    assert 8.5e6 <= shaped <= 11e6
    assert unshaped > 100e6
    # None of the unmatched peer's packets (over a million) went through the ifb; a's last
    # packets (the connection's close, a neighbour probe) may still come through it.
    assert ifb_packets(lab, dp) - before <= 3
    assert dp.map_entries("ingress") == 1 and dp.map_entries("egress") == 0
    observed = dp.observe()
    assert observed.ingress_entries == {prefix(V4["a"]): P.Entry(1, 0, 128)}
    assert observed.ingress_classes == {1: "pfifo"} and observed.classes == {}
    # A scrape's read is the class dump alone: the qdisc dump naming a leaf is skipped.  HTB's default
    # leaf is not in a dump; a pfifo grafted by hand is (this kernel has no netem).
    sh("tc", "-n", lab.pod, "qdisc", "add", "dev", ifb_name(dp.ifindex), "parent", "5348:1", "handle", "10:", "pfifo")
    named, bare = dp.class_stats("ingress")[1], dp.class_stats("ingress", leaves=False)[1]
    assert named.leaf == "pfifo" and bare.leaf is None and bare.packets == named.packets > 100


def test_ingress_port_rules_match_the_peers_source_port(lab, dp):
    dp.execute(classes({1: "100mbit", 2: "100mbit"}, "ingress") + [
        P.UpsertEntries({prefix(V4["a"]): P.Entry(2, 0, 128, group=3)}, "ingress"),
        P.UpsertPorts({P.PortKey(3, UDP, 7000, 16): P.PortEntry(1, 0)})])
    packets(lab.dst, "udp", V4["pod"], 9, 20, src=(V4["a"], 7000))
    packets(lab.dst, "udp", V4["pod"], 7000, 10, src=(V4["a"], 7001))  # their port is not 7000: address rule
    assert counts(dp, [1, 2], "ingress") == {1: 20, 2: 10}


def test_ports_and_protocols_before_the_address_rule_at_the_same_prefix(lab, dp):
    # Slot 1: TCP 5001 and 8000-8007; slot 3: UDP 5001 and 8000-8007; slot 4: ICMP (any "port");
    # slot 2: everything else to the same peer (the address-only rule at the key).
    dp.execute(classes({1: "100mbit", 2: "100mbit", 3: "100mbit", 4: "100mbit"}) + [
        P.UpsertEntries({prefix(V4["a"]): P.Entry(2, 0, 128, group=7),
                         prefix(V6["a"]): P.Entry(2, 0, 128, group=7)}),
        P.UpsertPorts({P.PortKey(7, TCP, 5001, 16): P.PortEntry(1, 0), P.PortKey(7, TCP, 8000, 13): P.PortEntry(1, 0),
                       P.PortKey(7, UDP, 5001, 16): P.PortEntry(3, 0), P.PortKey(7, UDP, 8000, 13): P.PortEntry(3, 0),
                       P.PortKey(7, ICMP, 0, 0): P.PortEntry(4, 0)})])
    slots = [1, 2, 3, 4]
    for addr in (V4["a"], V6["a"]):
        dp.execute([P.ResetStats(s) for s in slots])
        packets(lab.pod, "udp", addr, 5001, 10)
        packets(lab.pod, "udp", addr, 8007, 5)
        packets(lab.pod, "udp", addr, 8008, 7)  # just past the range
        packets(lab.pod, "tcp", addr, 5001, 3)
        packets(lab.pod, "tcp", addr, 8003, 2)
        packets(lab.pod, "tcp", addr, 5002, 4)
        got = counts(dp, slots)
        # TCP: one SYN per attempt (a RST answers it); a neighbour probe may add to the address rule.
        assert got[3] == 15 and got[1] == 5, (addr, got)
        assert 11 <= got[2] <= 13, (addr, got)
        lab.ping(addr, count=4)
        after = counts(dp, slots)
        # ICMP has a protocol-only rule; ICMPv6 (58) has none and goes to the address rule.
        if addr == V4["a"]:
            assert after[4] - got[4] == 4
        else:
            assert after[4] == 0 and after[2] - got[2] >= 4
    # A port entry that expired leaves the packet to the address-only rule.
    dp.execute([P.UpsertPorts({P.PortKey(7, UDP, 5001, 16): P.PortEntry(3, 1)}), P.ResetStats(2),
                P.ResetStats(3)])
    packets(lab.pod, "udp", V4["a"], 5001, 6)
    assert counts(dp, [2, 3]) == {2: 6, 3: 0}
    observed = dp.observe()
    assert observed.ports[P.PortKey(7, TCP, 8000, 13)] == P.PortEntry(1, 0)
    assert observed.entries[prefix(V4["a"])] == P.Entry(2, 0, 128, group=7)
    dp.execute([P.DeletePorts((P.PortKey(7, ICMP, 0, 0),))])
    assert P.PortKey(7, ICMP, 0, 0) not in dp.observe().ports


# Ethernet frames with VLAN tags in the data, written to the pod's interface with a packet socket:
# what a VLAN device with reorder_hdr off, or a tagging application, hands the parent's egress.
_TAGGED = """
import socket, struct, sys
ifname, dst, dport, count, tags = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
options = b"\\x01" * int(sys.argv[6]) if len(sys.argv) > 6 else b""  # IPv4 NOP options, a multiple of 4
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
mac = s.getsockname()[4]
udp = struct.pack("!HHHH", 40000, dport, 8 + 16, 0) + bytes(16)
ip = struct.pack("!BBHHHBBH4s4s", 0x45 + len(options) // 4, 0, 20 + len(options) + len(udp), 1, 0, 64, 17, 0,
                 socket.inet_aton("10.77.0.1"), socket.inet_aton(dst)) + options
head = b"\\xff" * 6 + mac
for tpid in filter(None, tags.split(",")):
    head += struct.pack("!HH", int(tpid, 16), 10)
for _ in range(count):
    s.send(head + struct.pack("!H", 0x0800) + ip + udp)
"""


def test_ports_after_ipv4_options(lab, dp):
    """The port is read where the IPv4 header says it ends (ihl 6 and 15, with and without a
    tag), for a port rule held in the address entry and for one in the port trie."""
    dp.execute(classes({1: "100mbit", 2: "100mbit", 3: "100mbit", 4: "100mbit"}) + [
        P.UpsertEntries({prefix(V4["a"]): P.Entry(2, 0, 128, inline=P.Inline(1, 0, UDP, 5001, 16)),
                         prefix(V4["b"]): P.Entry(4, 0, 128, group=1)}),
        P.UpsertPorts({P.PortKey(1, UDP, 5001, 16): P.PortEntry(3, 0)})])
    for tags, options in (("", 4), ("", 40), ("8100", 40)):
        dp.execute([P.ResetStats(slot) for slot in (1, 2, 3, 4)])
        for addr in (V4["a"], V4["b"]):
            sh("ip", "netns", "exec", lab.pod, sys.executable, "-c", _TAGGED, POD_IF, addr, "5001", "10", tags,
               str(options))
            sh("ip", "netns", "exec", lab.pod, sys.executable, "-c", _TAGGED, POD_IF, addr, "5002", "6", tags,
               str(options))
        assert counts(dp, [1, 2, 3, 4]) == {1: 10, 2: 6, 3: 10, 4: 6}, (tags, options)


def test_ports_with_a_vlan_tag_in_the_data(lab, dp):
    """One tag in the data (802.1Q or 802.1ad) is skipped and the inner packet classified, ports
    included; two tags pass unclassified.  A tag the kernel keeps in skb->vlan_tci (a VLAN device
    with reorder_hdr on, the default) is not in the data at all: that is the plain case."""
    dp.execute(classes({1: "100mbit", 2: "100mbit"}) + [
        P.UpsertEntries({prefix(V4["a"]): P.Entry(2, 0, 128, group=1)}),
        P.UpsertPorts({P.PortKey(1, UDP, 5001, 16): P.PortEntry(1, 0)})])
    for tags in ("8100", "88a8"):
        dp.execute([P.ResetStats(1), P.ResetStats(2)])
        sh("ip", "netns", "exec", lab.pod, sys.executable, "-c", _TAGGED, POD_IF, V4["a"], "5001", "10", tags)
        sh("ip", "netns", "exec", lab.pod, sys.executable, "-c", _TAGGED, POD_IF, V4["a"], "5002", "6", tags)
        assert counts(dp, [1, 2]) == {1: 10, 2: 6}, tags
    dp.execute([P.ResetStats(1), P.ResetStats(2)])
    sh("ip", "netns", "exec", lab.pod, sys.executable, "-c", _TAGGED, POD_IF, V4["a"], "5001", "5", "88a8,8100")
    assert counts(dp, [1, 2]) == {1: 0, 2: 0}


def test_except_entries_stop_or_fall_back(lab, dp):
    # 10.0.0.0/8 -> slot 2; 10.77.0.0/16 -> slot 1; carved out of the /16: a's /32 falls back
    # past the /16 to the /8 (prefixlen 96+16), c's /32 stops there (prefixlen 0: unclassified).
    dp.execute(classes({1: "100mbit", 2: "100mbit"}) + [P.UpsertEntries({
        prefix("10.0.0.0/8"): P.Entry(2, 0, 104),
        prefix("10.77.0.0/16"): P.Entry(1, 0, 112),
        prefix(V4["a"]): P.Entry(0, 0, 112, derived=True),
        prefix(V4["c"]): P.Entry(0, 0, 0, derived=True)})])
    packets(lab.pod, "udp", V4["a"], 9, 10)
    got = counts(dp, [1, 2])
    assert got[1] == 0 and 10 <= got[2] <= 11, got
    packets(lab.pod, "udp", V4["b"], 9, 7)
    got = counts(dp, [1, 2])
    assert 7 <= got[1] <= 8, got
    before = dict(got)
    packets(lab.pod, "udp", V4["c"], 9, 9)
    assert counts(dp, [0, 1, 2]) == {0: 0, **before}  # passed unclassified, counted nowhere
    assert dp.observe().entries[prefix(V4["c"])] == P.Entry(0, 0, 0, derived=True)


def test_counters_of_many_rules_read_in_batches_say_what_one_lookup_each_says(lab, dp):
    # Above 256 slots counters() reads the whole per-CPU array in batch calls (a scrape of 10,000 rules)
    # and sums each slot's CPUs from the packed values: it must agree with a lookup per slot.
    slots = list(range(1, 301))
    dp.execute(classes({s: "100mbit" for s in slots}) + [P.UpsertEntries({
        prefix(V4["a"]): P.Entry(7, 0, 128), prefix(V4["b"]): P.Entry(300, 0, 128)})])
    packets(lab.pod, "udp", V4["a"], 9, 5)
    packets(lab.pod, "udp", V4["b"], 9, 3)
    many = dp.counters(slots)
    assert sorted(many) == slots
    assert many == {s: dp.counters([s])[s] for s in slots}
    assert 5 <= many[7].packets <= 6 and 3 <= many[300].packets <= 4, (many[7], many[300])
    assert many[7].bytes >= 5 * 64 and sum(c.packets for c in many.values()) == many[7].packets + many[300].packets
    assert dp.stats.count() == dp.stats.max_entries  # an array has every slot: read_packed read them all


def test_reset_removes_the_ifb_and_the_ingress_filter_and_nothing_else(lab, dp):
    dp.execute(classes({1: "10mbit"}, "ingress") + [P.UpsertEntries({prefix(V4["a"]): P.Entry(1, 0, 128)},
                                                                   "ingress")])
    sh("tc", "-n", lab.pod, "filter", "add", "dev", POD_IF, "ingress", "pref", "100", "protocol", "all",
       "u32", "match", "u32", "0", "0", "classid", "1:1")
    removed = dp.reset()
    assert "ingress filter" in removed and f"ifb {ifb_name(dp.ifindex)}" in removed, removed
    assert "clsact" not in removed  # another filter still uses it
    assert ifb_name(dp.ifindex) not in sh("ip", "-n", lab.pod, "link").stdout
    filters = sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "ingress").stdout
    assert "pref 100 u32" in filters and "shaper" not in filters
    assert "clsact" in sh("tc", "-n", lab.pod, "qdisc", "show", "dev", POD_IF).stdout
    sh("tc", "-n", lab.pod, "qdisc", "del", "dev", POD_IF, "clsact")


def test_a_foreign_device_of_the_ifb_name_is_a_conflict(lab, dp):
    sh("ip", "-n", lab.pod, "link", "add", ifb_name(dp.ifindex), "type", "bridge")
    from shaper.errors import Conflict
    with pytest.raises(Conflict, match="did not create"):
        dp.execute(classes({1: "10mbit"}, "ingress"))
    dp.reset()
    assert ifb_name(dp.ifindex) in sh("ip", "-n", lab.pod, "link").stdout  # not shaper's: left alone
    sh("ip", "-n", lab.pod, "link", "del", ifb_name(dp.ifindex))


_SET_UP_AND_WAIT = """
import sys, time
from shaper.core import plan as P
from shaper.core.model import Prefix, parse_rule
from shaper.datapath.kernel import KernelDatapath
dp = KernelDatapath(sys.argv[1], sys.argv[2])
dp.attach()
r = parse_rule({"name": "in", "dst": ["10.77.0.2"], "rate": "10mbit"})
dp.execute([P.CreateClass(1, r, "ingress"), P.SetLeaf(1, r, None, "ingress"),
            P.UpsertEntries({Prefix.parse("10.77.0.2", "dst"): P.Entry(1, 0, 128)}, "ingress")])
print("ready", flush=True)
time.sleep(600)
"""


def test_attach_adopts_ingress_after_a_sigkill_and_puts_back_a_deleted_ifb(lab):
    child = subprocess.Popen([sys.executable, "-c", _SET_UP_AND_WAIT, POD_IF, lab.pod], stdout=subprocess.PIPE,
                             text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    ifb = ifb_name(int(sh("ip", "netns", "exec", lab.pod, "cat", f"/sys/class/net/{POD_IF}/ifindex").stdout))
    d = KernelDatapath(POD_IF, lab.pod)
    try:
        prog_before = sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "ingress").stdout
        assert d.attach() == "adopted"
        assert sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "ingress").stdout == prog_before
        observed = d.observe()
        assert observed.ingress_classes == {1: "pfifo"}
        assert observed.ingress_entries == {prefix(V4["a"]): P.Entry(1, 0, 128)}
        d.close()

        # The ifb deleted by hand (its classes go with it) and the ingress filter removed:
        # the next attach puts both back, and observe() says the classes are missing.
        sh("ip", "-n", lab.pod, "link", "del", ifb)
        sh("tc", "-n", lab.pod, "filter", "del", "dev", POD_IF, "ingress", "pref", str(0x5348))
        d = KernelDatapath(POD_IF, lab.pod)
        assert d.attach() == "adopted"
        assert "shaper_classifier" in sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "ingress").stdout
        assert "htb 5348:" in sh("tc", "-n", lab.pod, "qdisc", "show", "dev", ifb).stdout
        assert d.observe().ingress_classes == {}
        d.execute(classes({1: "10mbit"}, "ingress"))
        before = d.class_stats("ingress")[1].packets
        time.sleep(0.1)
        packets(lab.dst, "udp", V4["pod"], 9, 10, src=(V4["a"], 7000))
        assert d.class_stats("ingress")[1].packets - before == 10
    finally:
        removed = d.reset()
        d.close()
    assert f"ifb {ifb}" in removed and "ingress filter" in removed, removed


def test_pins_of_the_first_version_are_refused_naming_reset(lab, dp):
    """A pin directory with only what the first version pinned (no ingress or port maps) is an
    earlier shaper's, not someone else's: attach says so and names the reset that clears it."""
    from shaper.errors import ShaperError
    for name in ("classifier_in", "src_lpm", "port_lpm", "rule_stats_in", "ingress_cfg"):
        os.unlink(os.path.join(dp.pin_dir, name))
    other = KernelDatapath(POD_IF, lab.pod)
    try:
        with pytest.raises(ShaperError, match=f"earlier shaper version.*shaper reset --iface {POD_IF}"):
            other.attach()
        assert "shaper_classifier" in sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "egress").stdout
    finally:
        other.close()
    reset = KernelDatapath(POD_IF, lab.pod)
    try:
        removed = reset.reset()
        assert "pins" in removed and any(what.startswith("filter") for what in removed), removed
    finally:
        reset.close()
