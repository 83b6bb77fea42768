"""Section 1: per-packet classification cost against the number of destination rules.

Five namespace pairs, one per mechanism, are built for each rule count N and
measured in turn (order rotated each repeat), so every mechanism sees the
same machine load:

- baseline: HTB root and one class, no classifier (everything takes the direct queue);
- shaper: shaper's clsact BPF classifier and LPM trie, one rule holding the N /32s;
- u32: N u32 filters under the HTB root, one per /32 (tcconfig, Litmus, Pumba), via `tc -batch`;
- ipset: one iptables CLASSIFY rule matching an ipset (hash:ip) of the N addresses (Chaos Mesh);
- iptables: N iptables CLASSIFY rules, one per address (comcast).

iptables is Debian 12's default `iptables` (the nf_tables backend, iptables-nft);
its rules are in the mangle table's POSTROUTING chain, matched on the output interface.

Every classifier steers matches into one HTB class of 10 Gbit/s (never the
bottleneck); the rest goes to HTB's direct queue, unshaped.  Traffic is 18-byte
UDP payloads from the C generator to 256 destinations spread evenly over the
rule set ("match") or to 256 addresses in no rule ("miss").  Class counters
check that each mechanism really classified what it was sent.
"""

from __future__ import annotations

import time

from shaper.core.model import parse_rule

from .common import MISS_BASE, Pair, ip4, rule_addr, shaper_on, summary

MECHANISMS = ("baseline", "shaper", "u32", "ipset", "iptables")
HTB_CLASS = "1:10"
DESTS = 256


def _htb(pair: Pair) -> None:
    pair.run("tc", "qdisc", "add", "dev", Pair.IF, "root", "handle", "1:", "htb")
    pair.run("tc", "class", "add", "dev", Pair.IF, "parent", "1:", "classid", HTB_CLASS, "htb", "rate", "10gbit",
             "quantum", "60000")


def setup(mech: str, pair: Pair, n: int):
    """Build `mech` with n rules on the pair; returns (the class matches go to, a cleanup or None)."""
    addrs = [rule_addr(i) for i in range(n)]
    if mech == "shaper":
        dp = shaper_on(Pair.IF, pair.ns, [parse_rule({"name": "bench", "dst": [f"{a}/32" for a in addrs],
                                                        "rate": "10gbit"})])
        return "5348:1", lambda: (dp.reset(), dp.close())
    _htb(pair)
    if mech == "u32":
        batch = "".join(f"filter add dev {Pair.IF} parent 1: protocol ip prio 1 u32 match ip dst {a}/32 "
                        f"flowid {HTB_CLASS}\n" for a in addrs)
        pair.run("tc", "-batch", "-", stdin=batch, timeout=1800)
    elif mech == "ipset":
        restore = f"create bench hash:ip maxelem {max(65536, n)}\n" + "".join(f"add bench {a}\n" for a in addrs)
        pair.run("ipset", "restore", stdin=restore)
        pair.run("iptables", "-t", "mangle", "-A", "POSTROUTING", "-o", Pair.IF, "-m", "set", "--match-set",
                 "bench", "dst", "-j", "CLASSIFY", "--set-class", HTB_CLASS)
    elif mech == "iptables":
        rules = "".join(f"-A POSTROUTING -o {Pair.IF} -d {a}/32 -j CLASSIFY --set-class {HTB_CLASS}\n"
                        for a in addrs)
        pair.run("iptables-restore", stdin=f"*mangle\n{rules}COMMIT\n", timeout=1800)
    return (None if mech == "baseline" else HTB_CLASS), None


def traffic(n: int) -> dict[str, list[str]]:
    step = max(1, n // DESTS)
    match = [rule_addr(min(n - 1, i * step + step // 2)) for i in range(min(n, DESTS))]
    return {"match": match, "miss": [ip4(MISS_BASE + i * 7) for i in range(DESTS)]}


def run(counts=(1, 100, 1000, 10_000, 100_000), repeats: int = 3, seconds: float = 1.0,
        mechanisms=MECHANISMS, log=print) -> dict:
    results: dict = {"counts": list(counts), "repeats": repeats, "seconds": seconds, "mechanisms": list(mechanisms),
                     "rows": []}
    for n in counts:
        pairs: dict[str, Pair] = {}
        cleanups = []
        try:
            classes, setup_s = {}, {}
            for mech in mechanisms:
                pairs[mech] = Pair(mech).__enter__()
                t0 = time.perf_counter()
                classes[mech], cleanup = setup(mech, pairs[mech], n)
                setup_s[mech] = time.perf_counter() - t0
                if cleanup:
                    cleanups.append(cleanup)
                log(f"  classify N={n}: {mech} set up in {setup_s[mech]:.2f}s")
            samples = {(m, t): [] for m in mechanisms for t in ("match", "miss")}
            checks = {(m, t): [] for m in mechanisms for t in ("match", "miss")}
            flows = traffic(n)
            for r in range(repeats):
                order = list(mechanisms[r % len(mechanisms):]) + list(mechanisms[:r % len(mechanisms)])
                for kind in ("match", "miss"):
                    for mech in order:
                        pair = pairs[mech]
                        before = pair.class_packets()
                        out = pair.blast(flows[kind], seconds)
                        after = pair.class_packets()
                        pps = out["sent"] / out["seconds"]
                        samples[(mech, kind)].append(pps)
                        cls = classes[mech]
                        classified = (after.get(cls, 0) - before.get(cls, 0)) if cls else 0
                        direct = after.get("direct", 0) - before.get("direct", 0)
                        checks[(mech, kind)].append({"sent": out["sent"], "errors": out["errors"],
                                                     "classified": classified, "direct": direct})
            for mech in mechanisms:
                for kind in ("match", "miss"):
                    s = summary(samples[(mech, kind)])
                    results["rows"].append({"n": n, "mechanism": mech, "traffic": kind, "pps": s,
                                            "samples": samples[(mech, kind)],
                                            "ns_per_packet": 1e9 / s["median"], "setup_s": setup_s[mech],
                                            "checks": checks[(mech, kind)]})
                    log(f"  classify N={n} {mech:8} {kind:5}: median {s['median']:,.0f} pkt/s "
                        f"(min {s['min']:,.0f}, max {s['max']:,.0f})")
        finally:
            for cleanup in cleanups:
                try:
                    cleanup()
                except Exception as exc:  # the namespace goes anyway; pins are removed by reset
                    log(f"  cleanup failed: {exc}")
            for pair in pairs.values():
                pair.__exit__()
    return results
