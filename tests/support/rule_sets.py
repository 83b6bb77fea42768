"""Random rule sets for the property-style unit tests (plan, crash recovery): names and destinations
drawn from fixed pools, each destination in one rule only, and a random mix of delay, rate and TTL."""

from __future__ import annotations

import random

from shaper.core.model import parse_ruleset


def random_rule_set(rnd: random.Random, names: list[str], addrs: list[str], *, max_dst: int,
                    ttl_s: tuple[int, int]) -> list:
    """A valid rule set: a random subset of `names`, each with 1..max_dst of `addrs` (the pool may run out
    first, which ends the set), a delay in 60% of rules, a rate in 50%, a TTL drawn from ttl_s in 20%,
    ingress or both directions in 30%, a protocol in 20% (with ports in half of those)."""
    pool = addrs[:]
    rnd.shuffle(pool)
    specs = []
    for name in rnd.sample(names, rnd.randint(0, len(names))):
        dst = [pool.pop() for _ in range(rnd.randint(1, max_dst)) if pool]
        if not dst:
            break
        spec = {"name": name, "dst": dst}
        if rnd.random() < 0.6:
            spec["delay"] = f"{rnd.randint(1, 50)}ms"
        if rnd.random() < 0.5:
            spec["rate"] = f"{rnd.choice([1, 2, 10])}mbit"
        if rnd.random() < 0.2:
            spec["ttl"] = f"{rnd.randint(*ttl_s)}s"
        if rnd.random() < 0.3:
            spec["direction"] = rnd.choice(["ingress", "both"])
        if rnd.random() < 0.2:
            spec["protocol"] = rnd.choice(["tcp", "udp"])
            if rnd.random() < 0.5:
                spec["ports"] = rnd.choice([[22], [5432, "8000-8100"]])
        specs.append(spec)
    return parse_ruleset({"rules": specs})
