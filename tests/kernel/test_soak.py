"""Soak: a daemon under probes and change churn for a bounded time stays flat.

GET /readyz and /metrics (what a kubelet and Prometheus do) interleaved with
PUT/DELETE of single rules, whole-set replaces and clears, all through the
HTTP API only, against `shaper run` in a lab namespace.  Measured at the start
and the end, both with the same rule set in force: the daemon's open fds and
RSS, and, read from the kernel rather than from the daemon, HTB classes, leaf
qdiscs and trie entries.

SHAPER_SOAK_S sets the churn time (default 45 s, for `make test`);
`make soak` runs it for 10 minutes.  The figures are printed as one JSON line
(`-s` shows it) and are in docs/reliability.md.
"""

import json
import os
import re
import time

from shaper.datapath import abi
from shaper.datapath.maps import Map
from shaper.datapath.kernel import netns_id
from lab import POD_IF, sh

SOAK_S = float(os.environ.get("SHAPER_SOAK_S", "45"))
WARMUP_S = min(10.0, SOAK_S / 4)
FD_NOISE = 4  # a connection being torn down, a netlink dump socket opened lazily
RSS_NOISE_KB = 10 * 1024  # allocator arenas and caches settling; a leak per request grows without bound


def base_set() -> dict:
    """The set in force at both measurements: a few rules, one with many prefixes."""
    rules = [{"name": f"base-{i}", "dst": [f"10.77.{10 + i}.0/24", f"fd77:{10 + i:x}::/64"], "rate": f"{i + 1}mbit"}
             for i in range(4)]
    rules.append({"name": "wide", "dst": [f"10.99.{i // 250}.{i % 250}" for i in range(500)], "rate": "20mbit"})
    return {"rules": rules}


def churn_rule(i: int) -> dict:
    n = i % 20
    return {"dst": [f"10.88.{n}.0/24", f"10.88.{n + 100}.{i % 200}/32", f"fd88:{n:x}::/64"],
            "rate": f"{1 + i % 50}mbit", "ttl": "1h" if i % 3 else "30d"}


def measure(d, lab) -> dict:
    pid = d.proc.pid
    with open(f"/proc/{pid}/status") as f:
        rss_kb = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
    classes = sh("tc", "-n", lab.pod, "class", "show", "dev", POD_IF).stdout.count("class htb")
    qdiscs = len(sh("tc", "-n", lab.pod, "qdisc", "show", "dev", POD_IF).stdout.splitlines())
    pins = f"/sys/fs/bpf/shaper/{netns_id(lab.pod)}-{POD_IF}"
    counts = {}
    for name, key, value in (("dst_lpm", abi.LPM_KEY.size, abi.LPM_VAL.size),
                             ("dst_host", abi.HOST_KEY.size, abi.LPM_VAL.size),
                             ("rule_meta", 4, abi.RULE_META.size)):
        m = Map(os.path.join(pins, name), key, value)
        try:
            counts[name] = m.count()
        finally:
            m.close()
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "rss_kb": rss_kb, "classes": classes, "qdiscs": qdiscs,
            "trie_entries": counts["dst_lpm"], "host_entries": counts["dst_host"], "records": counts["rule_meta"]}


def churn(d, until: float, stats: dict) -> None:
    i = stats.get("i", 0)
    while time.monotonic() < until:
        for path in ("/readyz", "/metrics"):
            status, _ = d.request("GET", path, timeout=60)
            assert status == 200, f"GET {path}: {status} after {i} rounds"
            stats["probes"] = stats.get("probes", 0) + 1
        name = f"churn-{i % 20}"
        status, body = d.request("PUT", f"/rules/{name}", churn_rule(i), timeout=60)
        assert status == 200, f"PUT /rules/{name}: {status} {body}"
        changes = 1
        if i % 5 == 4:
            status, body = d.request("DELETE", f"/rules/churn-{(i + 10) % 20}", timeout=60)
            assert status in (200, 404), f"DELETE: {status} {body}"
            changes += 1
        if i % 25 == 24:
            doc = base_set()
            doc["rules"] += [{"name": f"set-{i % 7}-{k}", "dst": [f"10.66.{k}.{i % 250}"], "rate": "3mbit"}
                             for k in range(10)]
            assert d.request("PUT", "/rules", doc, timeout=60)[0] == 200
            changes += 1
        if i % 100 == 99:
            assert d.request("DELETE", "/rules", timeout=60)[0] == 200
            assert d.request("PUT", "/rules", base_set(), timeout=60)[0] == 200
            changes += 2
        stats["changes"] = stats.get("changes", 0) + changes
        i += 1
    stats["i"] = i


def test_soak_probes_and_churn_stay_flat(lab):
    d = lab.daemon()
    assert d.request("PUT", "/rules", base_set())[0] == 200
    stats: dict = {}
    churn(d, time.monotonic() + WARMUP_S, stats)  # imports, caches and pools reach their size
    assert d.request("PUT", "/rules", base_set())[0] == 200
    start = measure(d, lab)

    began = time.monotonic()
    stats = {"i": stats["i"]}
    samples = []
    next_sample = began
    while time.monotonic() < began + SOAK_S:
        if time.monotonic() >= next_sample:
            samples.append(measure(d, lab)["rss_kb"])
            next_sample += max(5.0, SOAK_S / 20)
        churn(d, min(began + SOAK_S, next_sample), stats)
    elapsed = time.monotonic() - began

    assert d.request("PUT", "/rules", base_set())[0] == 200
    end = measure(d, lab)
    report = {"soak_s": round(elapsed, 1), "probes": stats.get("probes", 0), "changes": stats.get("changes", 0),
              "requests_per_s": round((stats.get("probes", 0) + stats.get("changes", 0)) / elapsed, 1),
              "start": start, "end": end, "rss_kb_samples": samples}
    print("soak: " + json.dumps(report))
    assert stats.get("changes", 0) > 0 and stats.get("probes", 0) > 0
    # The kernel holds exactly the base set again: no class, leaf, trie entry or record left over.
    for key in ("classes", "qdiscs", "trie_entries", "host_entries", "records"):
        assert end[key] == start[key], f"{key}: {start[key]} -> {end[key]} ({report})"
    assert end["fds"] - start["fds"] <= FD_NOISE, f"fds {start['fds']} -> {end['fds']} ({report})"
    assert end["rss_kb"] - start["rss_kb"] <= RSS_NOISE_KB, f"RSS {start['rss_kb']} -> {end['rss_kb']} kB ({report})"
    assert d.stop() == 0
