"""Ingress, ports and except through the CLI and the daemon, on the real kernel, in namespaces.

The rules are rate-only here (the host kernel has no sch_netem; netem's delay and loss on ingress
are measured in the VM tier, tests/vm/guest/test_ingress.py).  Counters come from `shaper show`:
one row per rule and direction.
"""

import json
import signal
import sys
import time

from lab import POD_IF, V4, V6, sh, wait_until


def rows(lab) -> dict[tuple[str, str], dict]:
    out = json.loads(lab.shaper("show", "-o", "json").stdout)["rules"]
    return {(r["name"], r.get("direction", "egress")): r for r in out}


def ifbs(lab) -> list[str]:
    out = sh("ip", "-n", lab.pod, "-o", "link", "show", "type", "ifb").stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def tcp_connect(lab, addr: str, port: int, count: int = 5) -> None:
    lab.connect_ms(addr, port, count=count)


INGRESS_RATE = f"""
rules:
  - name: from-c
    src: [{V4['c']}]
    rate: 20mbit
"""


def test_ingress_rate_through_the_ifb_measured_with_tcp(lab):
    lab.shaper("apply", rules=INGRESS_RATE)
    assert len(ifbs(lab)) == 1
    shaped = lab.throughput(V4["c"], 3, incoming=True)
    other = lab.throughput(V4["d"], 2, incoming=True)
    out = lab.throughput(V4["c"], 2)  # the same peer, egress: no rule
    print(f"\ningress from c (20mbit): {shaped / 1e6:.2f} Mbit/s; from d (no rule): {other / 1e6:.0f} Mbit/s; "
          f"to c (egress, no rule): {out / 1e6:.0f} Mbit/s")
    assert 18e6 <= shaped <= 22e6
    assert other > 200e6 and out > 200e6
    r = rows(lab)[("from-c", "ingress")]
    # The classifier's counter and the ifb class's see the same packets.
    assert r["matched_packets"] > 1000 and r["matched_packets"] == r["class_packets"]


def test_unmatched_ingress_is_not_redirected(lab):
    lab.shaper("apply", rules=INGRESS_RATE)
    ifb = ifbs(lab)[0]

    def ifb_packets() -> int:
        stats = json.loads(sh("ip", "-n", lab.pod, "-s", "-j", "link", "show", ifb).stdout)[0]["stats64"]
        return stats["tx"]["packets"]

    before = ifb_packets()
    lab.ping(V4["d"], count=50)
    lab.ping(V4["a"], count=50)
    assert ifb_packets() == before  # replies from d and a never went through the ifb
    lab.ping(V4["c"], count=50)
    assert ifb_packets() >= before + 50


PORTS = f"""
rules:
  - name: pg
    dst: [{V4['b']}, "{V6['b']}"]
    direction: both
    protocol: tcp
    ports: [5432]
    rate: 100mbit
  - name: b-udp
    dst: [{V4['b']}, "{V6['b']}"]
    protocol: udp
    rate: 100mbit
  - name: b-rest
    dst: [{V4['b']}, "{V6['b']}"]
    rate: 100mbit
"""


def test_port_and_protocol_steering_with_counters_v4_and_v6(lab):
    lab.shaper("apply", rules=PORTS)
    for addr in (V4["b"], V6["b"]):
        tcp_connect(lab, addr, 5432, count=5)  # SYN out (pg, egress), SYN-ACK in (pg, ingress)
        tcp_connect(lab, addr, 5433, count=5)  # b-rest: egress only
        lab.send_udp(addr, 40)  # b-udp
        lab.ping(addr, count=10)  # ICMP: b-rest
    r = rows(lab)
    print("\n" + "\n".join(f"{k}: {v['matched_packets']}" for k, v in sorted(r.items())))
    # 2 families x 5 connects: at least SYN + ACK + RST each way out, SYN-ACK back in.
    assert r[("pg", "egress")]["matched_packets"] >= 2 * 5 * 2
    assert r[("pg", "ingress")]["matched_packets"] >= 2 * 5
    assert 2 * 40 <= r[("b-udp", "egress")]["matched_packets"] <= 2 * 40 + 4
    assert r[("b-rest", "egress")]["matched_packets"] >= 2 * (5 * 2 + 10)
    assert ("b-rest", "ingress") not in r and ("b-udp", "ingress") not in r



def test_an_expired_port_rule_leaves_its_packets_to_the_protocol_rule_in_the_kernel(lab):
    # No daemon: the classifier alone must skip pg once its TTL passed, to `b-tcp` (the same
    # prefix, protocol only), not to the address-only `b-rest`.
    lab.shaper("apply", rules=f"""
rules:
  - name: pg
    dst: [{V4['b']}]
    protocol: tcp
    ports: [5432]
    ttl: 3s
    rate: 100mbit
  - name: b-tcp
    dst: [{V4['b']}]
    protocol: tcp
    rate: 100mbit
  - name: b-rest
    dst: [{V4['b']}]
    rate: 100mbit
""")
    applied = time.monotonic()
    tcp_connect(lab, V4["b"], 5432, count=3)
    before = {k[0]: v["matched_packets"] for k, v in rows(lab).items()}
    assert before["pg"] >= 3 * 2 and before["b-tcp"] == 0
    time.sleep(max(0.0, applied + 3.5 - time.monotonic()))  # past pg's TTL
    tcp_connect(lab, V4["b"], 5432, count=3)
    after = {k[0]: v["matched_packets"] for k, v in rows(lab).items()}
    assert after["pg"] == before["pg"], after
    assert after["b-tcp"] >= 3 * 2 and after["b-rest"] == before["b-rest"], after


def test_except_falls_through_to_a_less_specific_rule(lab):
    lab.shaper("apply", rules=f"""
rules:
  - name: net
    dst: [10.77.0.0/16]
    except: [{V4['d']}]
    rate: 100mbit
  - name: all
    dst: [0.0.0.0/0]
    rate: 100mbit
""")
    lab.ping(V4["d"], count=30)
    lab.ping(V4["a"], count=20)
    r = rows(lab)
    assert 30 <= r[("all", "egress")]["matched_packets"] <= 33
    assert 20 <= r[("net", "egress")]["matched_packets"] <= 23
    # Without the catch-all, the excepted peer passes unclassified.
    lab.shaper("apply", rules=f"""
rules:
  - name: net
    dst: [10.77.0.0/16]
    except: [{V4['d']}]
    rate: 100mbit
""")
    before = rows(lab)[("net", "egress")]["matched_packets"]
    lab.ping(V4["d"], count=30)
    assert rows(lab)[("net", "egress")]["matched_packets"] <= before + 2


def test_reset_removes_the_ifb_and_the_ingress_filter_and_nothing_else(lab):
    # Someone else's ingress filter on the pod's interface, at another pref, must stay.
    sh("tc", "-n", lab.pod, "qdisc", "add", "dev", POD_IF, "clsact")
    sh("tc", "-n", lab.pod, "filter", "add", "dev", POD_IF, "ingress", "pref", "7", "protocol", "ip", "u32", "match",
       "ip", "dst", "10.99.0.1/32")
    lab.shaper("apply", rules=INGRESS_RATE)
    assert len(ifbs(lab)) == 1
    lab.shaper("reset")
    assert ifbs(lab) == []
    filters = sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "ingress").stdout
    assert "u32" in filters and "bpf" not in filters
    assert "clsact" in sh("tc", "-n", lab.pod, "qdisc", "show", "dev", POD_IF).stdout  # not shaper's
    assert "htb" not in sh("tc", "-n", lab.pod, "qdisc", "show", "dev", POD_IF).stdout


def test_kill_9_and_adoption_with_ingress_rules(lab, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(INGRESS_RATE + f"""  - name: to-b
    dst: [{V4['b']}]
    direction: both
    rate: 50mbit
""")
    d = lab.daemon("--rules", str(rules))
    lab.wait_ready(d)
    ifb = ifbs(lab)
    assert len(ifb) == 1
    d.stop(signal.SIGKILL)
    assert ifbs(lab) == ifb  # the shaping stays with no controller
    shaped = lab.throughput(V4["c"], 2, incoming=True)
    assert 18e6 <= shaped <= 22e6
    d2 = lab.daemon()  # no rules given: adopt what runs
    lab.wait_ready(d2)
    assert [line for line in d2.logs() if line["event"] == "daemon.ready"][0]["datapath"] == "adopted"
    r = rows(lab)
    assert {k for k in r} >= {("from-c", "ingress"), ("to-b", "egress"), ("to-b", "ingress")}
    assert ifbs(lab) == ifb
    assert lab.throughput(V4["c"], 2, incoming=True) <= 22e6
    d2.stop(signal.SIGTERM)
    assert wait_until(lambda: ifbs(lab) == [], timeout=30)


def test_the_daemon_puts_back_an_ifb_or_filter_removed_by_hand(lab):
    d = lab.daemon()
    d.request("PUT", "/rules/from-c", {"src": [V4["c"]], "rate": "20mbit"})
    [ifb] = ifbs(lab)
    qlen = json.loads(sh("ip", "-n", lab.pod, "-j", "link", "show", ifb).stdout)[0]["txqlen"]
    assert qlen == 1000  # not the ifb default of 32: HTB's leaves take their limit from it

    def shaped() -> bool:
        classes = sh("tc", "-n", lab.pod, "class", "show", "dev", ifb).stdout if ifb in ifbs(lab) else ""
        filters = sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "ingress").stdout
        return "5348:1" in classes and "shaper_classifier" in filters

    # The ifb deleted: mirred would drop every matched packet; the daemon makes it again, with its class.
    sh("ip", "-n", lab.pod, "link", "del", ifb)
    assert wait_until(shaped, timeout=15), d.log_text()
    rate = lab.throughput(V4["c"], 2, incoming=True)
    assert 18e6 <= rate <= 22e6
    # The ingress filter removed: attached again.
    sh("tc", "-n", lab.pod, "filter", "del", "dev", POD_IF, "ingress", "pref", str(0x5348))
    assert wait_until(shaped, timeout=15), d.log_text()
    assert lab.throughput(V4["c"], 2, incoming=True) <= 22e6
    put_back = [x["put_back"] for x in d.logs() if x["event"] == "datapath.repaired"]
    assert len(put_back) == 2, put_back
    assert d.request("GET", "/readyz")[0] == 200
    assert d.stop() == 0
    assert ifbs(lab) == []


def test_a_local_apply_puts_back_an_ifb_or_filter_removed_by_hand(lab):
    lab.shaper("apply", rules=INGRESS_RATE)
    [ifb] = ifbs(lab)
    sh("ip", "-n", lab.pod, "link", "del", ifb)
    lab.shaper("apply", rules=INGRESS_RATE)  # the same rules: only the put-back differs
    assert ifbs(lab) == [ifb]
    assert "5348:1" in sh("tc", "-n", lab.pod, "class", "show", "dev", ifb).stdout
    assert 18e6 <= lab.throughput(V4["c"], 2, incoming=True) <= 22e6
    sh("tc", "-n", lab.pod, "filter", "del", "dev", POD_IF, "ingress", "pref", str(0x5348))
    lab.shaper("apply", rules=INGRESS_RATE)
    assert "shaper_classifier" in sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "ingress").stdout
    assert lab.throughput(V4["c"], 2, incoming=True) <= 22e6


def test_an_interface_made_again_does_not_leave_the_old_ifb(lab):
    d = lab.daemon()
    d.request("PUT", "/rules/from-c", {"src": [V4["c"]], "rate": "20mbit"})
    [old] = ifbs(lab)
    lab.delete_link()
    assert wait_until(lambda: any(x["event"] == "interface.gone" for x in d.logs()), 5)
    lab.make_link()
    assert wait_until(lambda: d.request("GET", "/readyz")[0] == 200, 15), d.log_text()
    assert wait_until(lambda: len(ifbs(lab)) == 1 and old not in ifbs(lab), 15), ifbs(lab)
    assert lab.throughput(V4["c"], 2, incoming=True) <= 22e6
    assert d.stop() == 0
    assert ifbs(lab) == []


def test_a_class_from_the_ifb_left_on_a_packet_does_not_pick_an_egress_class(lab):
    # A packet shaped on ingress keeps skb->priority 5348:N; forwarded or bridged out again it
    # would go to egress class N, another rule's.  A socket priority of 5348:2 stands in for it.
    lab.shaper("apply", rules=RULES_TWO_CLASSES)
    code = ("import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_PRIORITY,0x53480002);"
            "[s.sendto(b'x',(sys.argv[1],9)) for _ in range(40)]")
    sh("ip", "netns", "exec", lab.pod, sys.executable, "-c", code, V4["d"])  # d: no rule
    r = rows(lab)
    assert r[("b", "egress")]["class_packets"] == r[("b", "egress")]["matched_packets"] == 0, r


RULES_TWO_CLASSES = f"""
rules:
  - name: a
    dst: [{V4['a']}]
    rate: 100mbit
  - name: b
    dst: [{V4['b']}]
    rate: 100mbit
"""


def test_a_fresh_start_clears_the_ingress_an_earlier_start_left(lab):
    lab.shaper("apply", rules=INGRESS_RATE)
    [old_ifb] = ifbs(lab)
    old_index = json.loads(sh("ip", "-n", lab.pod, "-j", "link", "show", old_ifb).stdout)[0]["ifindex"]
    # The egress classifier removed by hand: the next start cannot adopt and starts afresh.
    sh("tc", "-n", lab.pod, "filter", "del", "dev", POD_IF, "egress", "pref", str(0x5348))
    lab.shaper("apply", rules=INGRESS_RATE)
    [ifb] = ifbs(lab)
    assert json.loads(sh("ip", "-n", lab.pod, "-j", "link", "show", ifb).stdout)[0]["ifindex"] != old_index
    filters = sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "ingress").stdout
    assert filters.count("shaper_classifier") == 1
    assert 18e6 <= lab.throughput(V4["c"], 2, incoming=True) <= 22e6
    assert rows(lab)[("from-c", "ingress")]["matched_packets"] > 1000
