"""Section 7: the match kinds of issue 14 (protocol and port, ingress) against the address-only match.

Five namespace pairs, one per mechanism, are built for each rule count N and
measured in turn (order rotated each repeat), with the traffic of section 1
(18-byte UDP datagrams to port 9, to 256 destinations in the rules or in none):

- shaper-addr: shaper's egress classifier, one rule holding the N /32s (section 1's "shaper");
- shaper-port: the same N /32s with `protocol: udp, ports: [9]`, so every lookup that finds
  an address goes on through the rule's port group;
- u32-port: N u32 filters under the HTB root, each matching ip dst /32 and protocol 17 and
  destination port 9, via `tc -batch`;
- ipset-port: one ipset `hash:ip,port` holding "address,udp:9" for the N addresses, and one
  iptables mangle POSTROUTING CLASSIFY rule matching it on `dst,dst` (Chaos Mesh-like);
- shaper-ingress: shaper on the receiving side (the pair's far end), one `direction: ingress`
  rule whose N /32 sources include the sender's address 10.66.0.1; its classifier at clsact
  ingress redirects what it matched to the ifb shaper creates, whose HTB holds the class.
  For traffic that matches no rule the sender's route takes a second address, 10.66.0.3, as its
  source: the same rule set, the same destinations, a source in no rule.

Every class has a rate of 10 Gbit/s (never the bottleneck); what no mechanism
matched goes unshaped (HTB's direct queue on egress, not redirected on ingress).
Class counters check that each mechanism classified exactly what it was sent.
Separately, with BPF run-time statistics switched on (BPF_ENABLE_STATS, held by
this process only), the same traffic measures shaper's classifier's own run
time per packet: the program pinned as "classifier" (egress) or "classifier_in"
(ingress) in the datapath's pin directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lab import sh
from shaper.core.model import parse_rule
from shaper.datapath import loader
from shaper.datapath.kernel import KernelDatapath, ifb_name
from shaper.errors import ShaperError

from .classifier_cost import enable_stats, prog_stats
from .classify import HTB_CLASS, _htb, traffic
from .common import Pair, rule_addr, shaper_on, summary

MECHANISMS = ("shaper-addr", "shaper-port", "u32-port", "ipset-port", "shaper-ingress")
COSTED = ("shaper-addr", "shaper-port", "shaper-ingress")
SENDER = "10.66.0.1"
MISS_SOURCE = "10.66.0.3"  # a second address of the sender, in no ingress rule
ROUTE = "10.128.0.0/9"
SETTLE_S = 1.0


@dataclass
class Built:
    """One mechanism on its pair: how to read what it classified, and what to undo."""

    counts: Callable[[], dict]  # {"classified": packets in the class, "direct": unclassified, ...}
    cleanup: Callable[[], None] | None = None
    prog_pin: str | None = None  # shaper's classifier, for its run-time statistics
    prepare: Callable[[str], None] = field(default=lambda kind: None)  # before traffic of this kind


def _egress_counts(pair: Pair, cls: str, dp: KernelDatapath | None = None) -> Callable[[], dict]:
    def counts() -> dict:
        c = pair.class_packets()
        out = {"classified": c.get(cls, 0), "direct": c.get("direct", 0)}
        if dp is not None:
            out["matched"] = sum(x.packets for x in dp.counters(list(dp.rule_names())).values())
        return out
    return counts


def _ingress_counts(pair: Pair, dp: KernelDatapath) -> Callable[[], dict]:
    def counts() -> dict:
        classes = dp.class_stats("ingress")
        direct = 0
        qdiscs = sh("tc", "-n", pair.peer, "-s", "-j", "qdisc", "show", "dev", ifb_name(dp.ifindex)).stdout
        for q in json.loads(qdiscs or "[]"):
            if q.get("kind") == "htb" and q.get("root"):
                direct = q.get("options", {}).get("direct_packets_stat", 0)
        slots = list(dp.rule_names())
        return {"classified": sum(classes[s].packets + classes[s].drops for s in slots if s in classes),
                "dropped": sum(classes[s].drops for s in slots if s in classes), "direct": direct,
                "matched": sum(x.packets for x in dp.counters(slots, "ingress").values())}
    return counts


def setup(mech: str, pair: Pair, n: int) -> Built:
    """Build `mech` with n rules (addresses) on the pair."""
    addrs = [rule_addr(i) for i in range(n)]
    if mech in ("shaper-addr", "shaper-port"):
        rule = {"name": "bench", "dst": [f"{a}/32" for a in addrs], "rate": "10gbit"}
        if mech == "shaper-port":
            rule |= {"protocol": "udp", "ports": [9]}
        dp = shaper_on(Pair.IF, pair.ns, [parse_rule(rule)])
        return Built(_egress_counts(pair, "5348:1", dp), lambda: (dp.reset(), dp.close()),
                     os.path.join(dp.pin_dir, loader.PROG_PIN))
    if mech == "shaper-ingress":
        sources = [f"{SENDER}/32"] + [f"{a}/32" for a in addrs[:n - 1]]
        pair.run("ip", "addr", "add", f"{MISS_SOURCE}/24", "dev", Pair.IF)
        dp = shaper_on("b1", pair.peer, [parse_rule({"name": "bench", "src": sources, "direction": "ingress",
                                                     "rate": "10gbit"})])

        def prepare(kind: str) -> None:
            pair.run("ip", "route", "change", ROUTE, "via", Pair.GW, "src", SENDER if kind == "match" else MISS_SOURCE)
        return Built(_ingress_counts(pair, dp), lambda: (dp.reset(), dp.close()),
                     os.path.join(dp.pin_dir, loader.PROG_IN_PIN), prepare)
    _htb(pair)
    if mech == "u32-port":
        batch = "".join(f"filter add dev {Pair.IF} parent 1: protocol ip prio 1 u32 match ip dst {a}/32 "
                        f"match ip protocol 17 0xff match ip dport 9 0xffff flowid {HTB_CLASS}\n" for a in addrs)
        pair.run("tc", "-batch", "-", stdin=batch, timeout=1800)
    elif mech == "ipset-port":
        restore = f"create bench hash:ip,port maxelem {max(65536, n)}\n" + "".join(f"add bench {a},udp:9\n"
                                                                                   for a in addrs)
        pair.run("ipset", "restore", stdin=restore)
        pair.run("iptables", "-t", "mangle", "-A", "POSTROUTING", "-o", Pair.IF, "-m", "set", "--match-set",
                 "bench", "dst,dst", "-j", "CLASSIFY", "--set-class", HTB_CLASS)
    else:
        raise ValueError(f"unknown mechanism {mech!r}")
    return Built(_egress_counts(pair, HTB_CLASS))


def _settled(counts: Callable[[], dict]) -> dict:
    """Counters once two reads agree: the ifb drains its queue after the sender returns."""
    last = counts()
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = counts()
        if now == last:
            break
        last = now
    return last


def _rotated(mechanisms, r: int) -> list[str]:
    k = r % len(mechanisms)
    return list(mechanisms[k:]) + list(mechanisms[:k])


def _rates(mechanisms, pairs, built, flows, repeats, seconds) -> tuple[dict, dict]:
    samples = {(m, t): [] for m in mechanisms for t in ("match", "miss")}
    checks = {(m, t): [] for m in mechanisms for t in ("match", "miss")}
    for r in range(repeats):
        for kind in ("match", "miss"):
            for mech in _rotated(mechanisms, r):
                built[mech].prepare(kind)
                before = _settled(built[mech].counts)
                out = pairs[mech].blast(flows[kind], seconds)
                after = _settled(built[mech].counts)
                samples[(mech, kind)].append(out["sent"] / out["seconds"])
                checks[(mech, kind)].append({"sent": out["sent"], "errors": out["errors"],
                                             **{k: after[k] - before[k] for k in after}})
    return samples, checks


def _costs(costed, pairs, built, flows, repeats, seconds) -> dict:
    """ns per classifier run, one sample per repeat, with run-time statistics on for this phase only."""
    out = {(m, t): {"samples": [], "runs": 0} for m in costed for t in ("match", "miss")}
    fd = enable_stats()
    try:
        for r in range(repeats):
            for kind in ("match", "miss"):
                for mech in _rotated(costed, r):
                    built[mech].prepare(kind)
                    t0, c0 = prog_stats(built[mech].prog_pin)
                    pairs[mech].blast(flows[kind], seconds)
                    t1, c1 = prog_stats(built[mech].prog_pin)
                    out[(mech, kind)]["samples"].append((t1 - t0) / max(1, c1 - c0))
                    out[(mech, kind)]["runs"] += c1 - c0
    finally:
        os.close(fd)
    return out


def run(counts=(1, 1000, 100_000), repeats: int = 3, seconds: float = 1.0, mechanisms=MECHANISMS,
        log=print) -> dict:
    costed = [m for m in COSTED if m in mechanisms]
    results: dict = {"counts": list(counts), "repeats": repeats, "seconds": seconds, "mechanisms": list(mechanisms),
                     "costed": costed, "rows": [], "cost_rows": []}
    for n in counts:
        pairs: dict[str, Pair] = {}
        built: dict[str, Built] = {}
        try:
            setup_s = {}
            for mech in mechanisms:
                pairs[mech] = Pair(mech.replace("shaper-", "s")).__enter__()
                t0 = time.perf_counter()
                built[mech] = setup(mech, pairs[mech], n)
                setup_s[mech] = time.perf_counter() - t0
                log(f"  match N={n}: {mech} set up in {setup_s[mech]:.2f}s")
            flows = traffic(n)
            samples, checks = _rates(mechanisms, pairs, built, flows, repeats, seconds)
            for mech in mechanisms:
                for kind in ("match", "miss"):
                    s = summary(samples[(mech, kind)])
                    results["rows"].append({"n": n, "mechanism": mech, "traffic": kind, "pps": s,
                                            "samples": samples[(mech, kind)], "ns_per_packet": 1e9 / s["median"],
                                            "setup_s": setup_s[mech], "checks": checks[(mech, kind)]})
                    log(f"  match N={n} {mech:14} {kind:5}: median {s['median']:,.0f} pkt/s "
                        f"(min {s['min']:,.0f}, max {s['max']:,.0f})")
            if costed:
                costs = _costs(costed, pairs, built, flows, repeats, seconds)
                for (mech, kind), c in costs.items():
                    s = summary(c["samples"])
                    results["cost_rows"].append({"n": n, "mechanism": mech, "traffic": kind, "ns_per_run": s,
                                                 "samples": c["samples"], "runs": c["runs"]})
                    log(f"  match N={n} {mech:14} {kind:5}: classifier {s['median']:.1f} ns per run "
                        f"({c['runs']:,} runs)")
        finally:
            for mech, b in built.items():
                if b.cleanup:
                    try:
                        b.cleanup()
                    except (ShaperError, OSError, subprocess.SubprocessError) as exc:
                        # The namespace goes anyway, and with it the tc objects, ifb, iptables rules and ipsets.
                        log(f"  cleanup of {mech} failed: {exc}")
            for pair in pairs.values():
                pair.__exit__()
    return results
