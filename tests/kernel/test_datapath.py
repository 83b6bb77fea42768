"""The classifier, the tc tree and the controller on the running kernel, in namespaces."""

import json
import os
import subprocess
import sys
import time

import pytest

from lab import POD_IF, ROOT, V4, V6, netem_available, sh

RULES = f"""
rules:
  - name: a
    dst: [{V4['a']}/32, "{V6['a']}"]
    rate: 100mbit
  - name: b
    dst: [{V4['b']}]
    rate: 20mbit
"""


def test_v4_and_v6_land_in_their_classes(lab):
    lab.shaper("apply", rules=RULES)
    lab.send_udp(V4["a"], 300)
    lab.send_udp(V6["a"], 200)
    lab.send_udp(V4["b"], 100)
    lab.send_udp(V4["d"], 50)  # no rule: must not be counted anywhere
    rows = lab.show()
    a, b = rows["a"], rows["b"]
    # Rule counters (classifier) and class counters (HTB) see the same packets.
    assert a["matched_packets"] == a["class_packets"] and a["matched_bytes"] == a["class_bytes"]
    assert b["matched_packets"] == b["class_packets"]
    # A unicast neighbour probe may add a packet or two to a rule.
    assert 500 <= a["matched_packets"] <= 503
    assert 100 <= b["matched_packets"] <= 102
    assert a["classid"] != b["classid"]


def test_htb_rate_per_destination(lab):
    lab.shaper("apply", rules=RULES)
    shaped = lab.throughput(V4["b"], 3)
    unshaped = lab.throughput(V4["d"], 3)
    print(f"\nrate b (20mbit): {shaped / 1e6:.2f} Mbit/s; unshaped d: {unshaped / 1e6:.0f} Mbit/s")
    assert 18e6 <= shaped <= 22e6  # +/-10%
    assert unshaped > 200e6  # unmatched traffic is not capped


def test_runtime_change_moves_traffic_without_touching_qdiscs(lab):
    lab.shaper("apply", rules=RULES)
    before = lab.handles()
    prog_before = sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "egress").stdout
    moved = RULES.replace(f"[{V4['a']}/32, \"{V6['a']}\"]", f"[{V4['a']}/32, \"{V6['a']}\", {V4['b']}]")
    moved = moved.replace(f"dst: [{V4['b']}]", f"dst: [{V4['d']}]")
    out = lab.shaper("apply", rules=moved).stdout
    assert "1 change(s)" in out  # one batch of map updates, nothing else
    lab.send_udp(V4["b"], 100)
    rows = lab.show()
    assert 100 <= rows["a"]["matched_packets"] <= 102 and rows["b"]["matched_packets"] == 0
    assert lab.handles() == before
    assert sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "egress").stdout == prog_before


def test_changing_rate_changes_only_that_class(lab):
    lab.shaper("apply", rules=RULES)
    before = lab.handles()
    lab.shaper("apply", rules=RULES.replace("rate: 20mbit", "rate: 5mbit"))
    assert lab.handles() == before
    classes = sh("tc", "-n", lab.pod, "class", "show", "dev", POD_IF).stdout
    assert "rate 5Mbit" in classes and "rate 100Mbit" in classes


def test_ttl_stops_matching_with_no_controller_alive(lab):
    lab.shaper("apply", rules=RULES + f"""  - name: t
    dst: [{V4['d']}]
    rate: 10mbit
    ttl: 2s
""")
    # The CLI process has exited: only the kernel enforces the TTL now.
    lab.send_udp(V4["d"], 20)
    assert 20 <= lab.show()["t"]["matched_packets"] <= 21
    time.sleep(2.2)
    lab.send_udp(V4["d"], 50)
    lab.send_udp(V4["a"], 10)
    rows = lab.show()
    assert rows["t"]["matched_packets"] <= 21 and rows["t"]["expires_in"] == "expired"
    assert rows["a"]["matched_packets"] >= 10


def test_restarted_controller_adopts_without_change(lab):
    lab.shaper("apply", rules=RULES)
    before = lab.tc_state()
    out = lab.shaper("apply", rules=RULES).stdout
    assert "0 change(s)" in out
    assert lab.tc_state() == before  # same program id, same handles, same parameters
    from shaper.datapath.kernel import KernelDatapath
    dp = KernelDatapath(POD_IF, lab.pod)
    try:
        assert dp.attach() == "adopted"
    finally:
        dp.close()
    assert lab.tc_state() == before


def test_reset_leaves_tc_exactly_as_before(lab):
    # Something of the user's own on the interface: a clsact with an ingress filter.
    sh("tc", "-n", lab.pod, "qdisc", "add", "dev", POD_IF, "clsact")
    sh("tc", "-n", lab.pod, "filter", "add", "dev", POD_IF, "ingress", "pref", "7", "protocol", "ip", "u32",
       "match", "ip", "src", "10.77.0.9/32", "classid", "1:1")
    before = lab.tc_state()
    lab.shaper("apply", rules=RULES)
    assert lab.tc_state() != before
    out = lab.shaper("reset").stdout
    assert "clsact" not in out  # the user's clsact stays
    assert lab.tc_state() == before
    from shaper.datapath.kernel import netns_id

    assert not os.path.exists(f"/sys/fs/bpf/shaper/{netns_id(lab.pod)}-{POD_IF}")


def test_reset_on_a_fresh_interface_restores_default_and_pins(lab):
    from shaper.datapath.kernel import netns_id

    before = lab.tc_state()
    lab.shaper("apply", rules=RULES)
    # This lab's pins only: other shapers (another test run, a benchmark) may have theirs.
    pins = f"/sys/fs/bpf/shaper/{netns_id(lab.pod)}-{POD_IF}"
    # intent: the crash-safety record's map, made by the first change (docs/reliability.md)
    assert sorted(os.listdir(pins)) == ["classifier", "classifier_in", "dst_host", "dst_lpm", "ingress_cfg", "intent",
                                        "port_lpm", "rule_meta", "rule_stats", "rule_stats_in", "src_lpm"]
    assert "removed filter, clsact, htb root, pins" in lab.shaper("reset").stdout
    assert lab.tc_state() == before
    assert not os.path.exists(pins)
    assert "nothing" in lab.shaper("reset").stdout  # idempotent


def test_foreign_root_qdisc_is_refused_and_left_alone(lab):
    sh("tc", "-n", lab.pod, "qdisc", "add", "dev", POD_IF, "root", "handle", "9:", "tbf", "rate", "1gbit",
       "burst", "64kb", "latency", "50ms")
    before = lab.tc_state()
    proc = lab.shaper("apply", rules=RULES, check=False)
    assert proc.returncode == 1 and "did not create" in proc.stderr
    lab.shaper("reset")
    assert lab.tc_state() == before


def _kernel_snapshot(lab) -> tuple:
    show = lab.shaper("show", "-o", "json").stdout
    rows = json.loads(show)["rules"]
    for r in rows:
        r.pop("expires_in", None)
    return lab.tc_state(), rows


@pytest.mark.parametrize("bad", [
    "rules: [{name: a, dst: [10.77.0.2], delay: 5 parsecs}]",
    "rules: [{name: a, dst: [10.77.0.2]}, {name: a, dst: [10.77.0.3]}]",
    "rules: [{name: a, dst: [10.77.0.2]}, {name: b, dst: [10.77.0.2]}]",
    "rules: [{name: a, dst: [10.77.0.2], speed: 1mbit}]",
    "rules: [{name: a, dst: [10.77.0.2/8]}]",
    "rules: {{",
])
def test_invalid_rule_sets_change_nothing(lab, bad):
    lab.shaper("apply", rules=RULES)
    before = _kernel_snapshot(lab)
    proc = lab.shaper("apply", rules=bad, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("shaper: ")
    assert _kernel_snapshot(lab) == before


def test_missing_netem_is_named_and_nothing_half_applied(lab):
    if netem_available():
        pytest.skip("this kernel has sch_netem; the VM tier covers netem")
    lab.shaper("apply", rules=RULES)
    before = _kernel_snapshot(lab)
    proc = lab.shaper("apply", rules=RULES + f"  - name: slow\n    dst: [{V4['d']}]\n    delay: 50ms\n", check=False)
    assert proc.returncode == 1 and "sch_netem" in proc.stderr
    assert _kernel_snapshot(lab) == before


def test_unknown_interface_and_netns(lab):
    proc = subprocess.run([sys.executable, "-m", "shaper", "show", "--iface", "nope0", "--netns", lab.pod],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "no interface named 'nope0'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "shaper", "show", "--iface", "x", "--netns", "no-such-ns"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "no network namespace" in proc.stderr


def test_the_predicted_state_is_what_the_kernel_holds(lab):
    """The daemon caches plan's outcome instead of reading the kernel back: they must agree."""
    from shaper.control.controller import Controller
    from shaper.datapath.kernel import KernelDatapath
    from shaper.core.model import parse_rule

    dp = KernelDatapath(POD_IF, lab.pod)
    try:
        dp.attach()
        ctl = Controller(dp)
        sets = [
            [{"name": "a", "dst": [V4["a"], V6["a"]], "rate": "10mbit", "ttl": "1h"},
             {"name": "b", "dst": ["10.77.0.0/24"], "rate": "2mbit", "burst": "64kb"}],
            [{"name": "b", "dst": ["10.77.0.0/24", V4["c"]], "rate": "3mbit"},
             {"name": "c", "dst": ["::/0"], "rate": "1gbit"}],
            [],
        ]
        for rules in sets:
            assert ctl.apply([parse_rule(r) for r in rules]).observed == dp.observe()
    finally:
        dp.reset()
        dp.close()


def test_the_host_hash_holds_exactly_the_tries_host_entries(lab):
    """dst_host is dst_lpm's prefixlen-128 entries again (bpf/shaper.h), value for value, through
    every kind of change: added, moved to another rule, given a port rule, carved out by an
    `except`, removed.  The classifier reads the hash first, so a stale entry would shape a
    host by a rule it left."""
    from shaper.control.controller import Controller
    from shaper.core.model import parse_rule
    from shaper.datapath.kernel import KernelDatapath

    dp = KernelDatapath(POD_IF, lab.pod)
    try:
        dp.attach()
        assert dp.dst_host is not None
        ctl = Controller(dp)
        sets = [
            [{"name": "a", "dst": [V4["a"], V6["a"], "10.77.0.0/24"], "rate": "10mbit"},
             {"name": "b", "dst": [V4["b"]], "rate": "2mbit", "ttl": "1h"}],
            # a's v4 host moves to b; b's host gets a port rule beside it; c carves a host out of a /24
            [{"name": "a", "dst": [V6["a"], "10.77.0.0/24"], "rate": "10mbit"},
             {"name": "b", "dst": [V4["a"], V4["b"]], "rate": "3mbit"},
             {"name": "pg", "dst": [V4["b"]], "protocol": "tcp", "ports": [5432], "rate": "1mbit"},
             {"name": "c", "dst": ["10.99.0.0/24"], "except": ["10.99.0.7"], "rate": "1gbit"}],
            [{"name": "b", "dst": [V4["b"]], "rate": "3mbit"}],
            [],
        ]
        sizes = []
        for rules in sets:
            ctl.apply([parse_rule(r) for r in rules])
            want = lab.trie_hosts(dp)
            assert dict(dp.dst_host.items()) == want
            sizes.append(len(want))
        assert sizes == [3, 4, 1, 0], sizes  # every kind of entry was there to compare
        # The hash answers: traffic to a host of the last set but one lands in its rule.
        ctl.apply([parse_rule({"name": "b", "dst": [V4["b"]], "rate": "3mbit"})])
        lab.send_udp(V4["b"], 40)
        lab.send_udp(V4["a"], 30)
        assert 40 <= ctl.stats()[0].matched.packets <= 42
    finally:
        dp.reset()
        dp.close()


def test_a_lost_host_hash_pin_is_put_back_or_refused_and_pins_from_before_it_are_adopted(lab):
    """The classifier reads dst_host first, so no controller may go on without writing it: a
    daemon that holds it pins it again; a new controller that cannot reach it refuses to adopt.
    Pins made before the hash (their record does not say host_hash) are adopted without it."""
    from shaper.control.controller import Controller
    from shaper.core.model import parse_rule
    from shaper.datapath.kernel import KernelDatapath
    from shaper.errors import Conflict

    dp = KernelDatapath(POD_IF, lab.pod)
    try:
        dp.attach()
        Controller(dp).apply([parse_rule({"name": "a", "dst": [V4["a"]], "rate": "10mbit"})])
        pin = os.path.join(dp.pin_dir, "dst_host")
        assert dp.read_record(0)["host_hash"] is True
        os.unlink(pin)
        assert dp.is_attached() and os.path.exists(pin)  # the holder pins it again
        os.unlink(pin)
        other = KernelDatapath(POD_IF, lab.pod)
        try:
            with pytest.raises(Conflict, match="not the one pinned"):
                other.attach()
        finally:
            other.close()
        assert dp.is_attached() and os.path.exists(pin)
        # An earlier shaper's pins: no hash pinned, and a record that does not claim one.
        own = dp.read_record(0)
        del own["host_hash"]
        dp._write_record(0, own)
        os.unlink(pin)
        earlier = KernelDatapath(POD_IF, lab.pod)
        try:
            assert earlier.attach() == "adopted" and earlier.dst_host is None
            Controller(earlier).apply([parse_rule({"name": "a", "dst": [V4["a"], V4["b"]], "rate": "10mbit"})])
            assert len(earlier.observe().entries) == 2
        finally:
            earlier.close()
    finally:
        dp.reset()
        dp.close()
