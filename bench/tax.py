"""Section 8: what shaper costs the traffic it does not shape.

A pod's eth0 is a veth with no qdisc (noqueue): a packet goes from the socket
to the peer without a queue or a lock.  shaper puts a root HTB and a clsact
classifier in front of every packet, matched or not.  Three namespace pairs,
measured in turn (order rotated each repeat):

- bare: the veth as a pod has it, noqueue;
- HTB alone: a root HTB as shaper makes it (unclassified packets take its direct queue), no
  classifier: what the qdisc costs by itself;
- shaper, 1 rule: shaper attached, one rule for another destination;
- shaper, 100,000 prefixes: shaper attached, 1,000 rules of 100 /32s, none of them the destination.

Traffic goes to the peer's own address (10.66.0.2), in no rule: TCP goodput of
`iperf3 -P 4` (four streams, what the peer received) and the packet rate of
18-byte UDP datagrams from the C generator (to addresses the peer drops).
"""

from __future__ import annotations

import json
import subprocess
import time

from shaper.core.model import parse_rule

from .common import MISS_BASE, Pair, ip4, rule_addr, shaper_on, summary

SETUPS = ("bare", "htb", "shaper-1", "shaper-100k")
IPERF_PORT = 5299


def _rules(nrules: int, per: int) -> list:
    return [parse_rule({"name": f"r{i}", "dst": [f"{rule_addr(i * per + j)}/32" for j in range(per)],
                        "rate": "10mbit"}) for i in range(nrules)]


def _attach(pair: Pair, rules: list):
    dp = shaper_on(Pair.IF, pair.ns, rules)
    return lambda: (dp.reset(), dp.close())


def tcp_goodput(pair: Pair, seconds: float, streams: int) -> float:
    """bit/s the peer received from `streams` TCP streams of iperf3 over `seconds` (whole, at least 1)."""
    server = subprocess.Popen(["ip", "netns", "exec", pair.peer, "iperf3", "-s", "-1", "-B", Pair.GW,
                               "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    duration = str(max(1, round(seconds)))  # iperf3 takes whole seconds, and 0 is forever
    try:
        deadline = time.monotonic() + 30
        while True:
            proc = subprocess.run(["ip", "netns", "exec", pair.ns, "iperf3", "-c", Pair.GW, "-p", str(IPERF_PORT),
                                   "-P", str(streams), "-t", duration, "-J"],
                                  capture_output=True, text=True, timeout=seconds + 60)
            try:
                received = json.loads(proc.stdout)["end"]["sum_received"]["bits_per_second"]
                if proc.returncode == 0:
                    return received
            except (ValueError, KeyError):  # an "error" document: the server was not listening yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"iperf3 failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
            time.sleep(0.2)
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run(repeats: int = 5, seconds: float = 2.0, streams: int = 4, big: int = 100_000, log=print) -> dict:
    res: dict = {"repeats": repeats, "seconds": seconds, "streams": streams, "big": big, "rows": []}
    pairs: dict[str, Pair] = {}
    cleanups = []
    try:
        for name in SETUPS:
            pairs[name] = Pair(name).__enter__()
            if name == "htb":
                pairs[name].run("tc", "qdisc", "add", "dev", Pair.IF, "root", "handle", "5348:", "htb")
            elif name == "shaper-1":
                cleanups.append(_attach(pairs[name], _rules(1, 1)))
            elif name == "shaper-100k":
                per = max(1, big // 1000)
                cleanups.append(_attach(pairs[name], _rules(big // per, per)))
        misses = [ip4(MISS_BASE + i * 7) for i in range(256)]
        samples = {(n, kind): [] for n in SETUPS for kind in ("tcp", "udp")}
        for r in range(repeats):
            order = list(SETUPS[r % len(SETUPS):]) + list(SETUPS[:r % len(SETUPS)])
            for name in order:
                samples[(name, "tcp")].append(tcp_goodput(pairs[name], seconds, streams))
            for name in order:
                out = pairs[name].blast(misses, seconds / 2)
                samples[(name, "udp")].append(out["sent"] / out["seconds"])
        for name in SETUPS:
            for kind in ("tcp", "udp"):
                s = samples[(name, kind)]
                ratio = [x / y for x, y in zip(s, samples[("bare", kind)])]
                res["rows"].append({"setup": name, "traffic": kind, "value": summary(s), "samples": s,
                                    "vs_bare": summary(ratio)})
                log(f"  tax {name:12} {kind}: median {summary(s)['median']:,.0f} "
                    f"({summary(ratio)['median']:.3f} of bare)")
        # What the shaped pairs did with the traffic: all of it through HTB's direct queue, none classified.
        res["direct_packets"] = {n: pairs[n].class_packets().get("direct", 0) for n in SETUPS[1:]}
    finally:
        for cleanup in cleanups:
            try:
                cleanup()
            except Exception as exc:
                log(f"  cleanup failed: {exc}")
        for pair in pairs.values():
            pair.__exit__()
    return res
