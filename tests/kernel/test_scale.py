"""Scale and footprint on the running kernel: 100,000 prefixes, RSS with 1,000 rules."""

import json
import re
import subprocess
import sys
import textwrap

from lab import POD_IF, ROOT, sh

CHILD = textwrap.dedent("""
    import json, sys, time
    from shaper.control.controller import Controller
    from shaper.datapath.kernel import KernelDatapath
    from shaper.core.model import parse_rule

    iface, netns, nrules, nprefixes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    per = nprefixes // nrules
    rules = []
    for r in range(nrules):
        dst = [f"10.{128 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/32" for i in range(r * per, (r + 1) * per)]
        rules.append(parse_rule({"name": f"r{r}", "dst": dst, "rate": "10mbit"}))
    dp = KernelDatapath(iface, netns)
    t0 = time.monotonic()
    dp.attach()
    t1 = time.monotonic()
    Controller(dp).apply(rules)
    t2 = time.monotonic()
    entries = dp.map_entries()
    t3 = time.monotonic()
    noop = Controller(dp).apply(rules).ops
    t4 = time.monotonic()
    rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
    print(json.dumps({"attach_s": t1 - t0, "apply_s": t2 - t1, "entries": entries, "reapply_s": t4 - t3,
                      "noop_ops": len(noop), "rss_kb": rss}))
""")


def run_child(lab, nrules, nprefixes):
    proc = subprocess.run([sys.executable, "-c", CHILD, POD_IF, lab.pod, str(nrules), str(nprefixes)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_100k_prefixes_across_1000_rules(lab):
    out = run_child(lab, 1000, 100_000)
    print(f"\n100k prefixes / 1000 rules: attach {out['attach_s']:.2f}s, apply {out['apply_s']:.2f}s, "
          f"no-op re-apply {out['reapply_s']:.2f}s, RSS {out['rss_kb'] / 1024:.1f} MB")
    assert out["entries"] == 100_000 and out["noop_ops"] == 0
    # The classifier steers a prefix from the middle of the set: i = 50,000 is rule 500.
    mac = sh("ip", "-n", lab.dst, "-j", "link", "show", "shp1").stdout
    mac = json.loads(mac)[0]["address"]
    sh("ip", "-n", lab.pod, "route", "add", "10.128.0.0/9", "dev", POD_IF)
    sh("ip", "-n", lab.pod, "neigh", "add", "10.128.195.80", "lladdr", mac, "dev", POD_IF)
    lab.send_udp("10.128.195.80", 7)
    rows = lab.show()
    assert len(rows) == 1000
    assert rows["r500"]["matched_packets"] == 7 == rows["r500"]["class_packets"]
    assert sum(r["matched_packets"] for r in rows.values()) == 7


def test_controller_rss_with_1000_rules_under_60mb(lab):
    out = run_child(lab, 1000, 1000)
    print(f"\n1000 rules: apply {out['apply_s']:.2f}s, RSS {out['rss_kb'] / 1024:.1f} MB")
    assert out["rss_kb"] <= 60 * 1024


# Issue 12's bound for the daemon with 1,000 rules.  A footprint, not a timing: measured
# 52.0-52.8 MiB (idle 42.4 MiB, of which importing pyroute2, which imports all of itself, is
# ~19 MiB), so the margin is ~7 MiB (13%) for other library versions and allocator noise.
DAEMON_RSS_BOUND_KB = 60 * 1024


def vm_kb(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        text = f.read()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) for k in ("VmRSS", "VmHWM")}


def test_daemon_rss_with_1000_rules_under_60mb(lab):
    """The whole daemon (HTTP, metrics, the kernel thread) after PUT /rules of 1,000 rules of
    one prefix each (bench's footprint: RSS with 1,000 rules), a scrape and a change on top.
    1,000 rules of 100 prefixes each are printed too, not bounded: 100,000 prefixes are ~18 MB
    of live Python state (a Prefix and its bytes each, and the wanted-entries dict)."""
    d = lab.daemon()
    with open(f"/proc/{d.proc.pid}/cmdline", "rb") as f:
        assert b"shaper" in f.read()  # nsenter execs the daemon: this pid is the daemon's
    idle = vm_kb(d.proc.pid)
    rules = [{"name": f"r{i}", "dst": [f"10.{100 + i // 250}.{i % 250}.0/24"], "rate": "10mbit"} for i in range(1000)]
    assert d.request("PUT", "/rules", {"rules": rules})[0] == 200
    assert d.request("GET", "/metrics")[0] == 200
    assert d.request("PUT", "/rules/r7", {"dst": ["10.250.0.0/24"], "rate": "1mbit"})[0] == 200
    one_k = vm_kb(d.proc.pid)
    big = [{"name": f"r{i}", "dst": [f"10.{128 + ((i * 100 + j) >> 16)}.{((i * 100 + j) >> 8) & 255}."
                                     f"{(i * 100 + j) & 255}/32" for j in range(100)], "rate": "10mbit"}
           for i in range(1000)]
    assert d.request("PUT", "/rules", {"rules": big})[0] == 200
    hundred_k = vm_kb(d.proc.pid)
    print(f"\ndaemon RSS: idle {idle['VmRSS'] / 1024:.1f} MiB; 1,000 rules {one_k['VmRSS'] / 1024:.1f} MiB "
          f"(peak {one_k['VmHWM'] / 1024:.1f}, bound {DAEMON_RSS_BOUND_KB / 1024:.0f}); 1,000 x 100 prefixes "
          f"{hundred_k['VmRSS'] / 1024:.1f} MiB (peak {hundred_k['VmHWM'] / 1024:.1f}, not bounded)")
    assert one_k["VmRSS"] <= DAEMON_RSS_BOUND_KB
    assert d.stop() == 0


def test_scrape_with_1000_rules(lab):
    """/metrics with 1,000 rules: every family has 1,000 series; the time is printed, not asserted."""
    import time

    d = lab.daemon()
    rules = [{"name": f"r{i}", "dst": [f"10.{100 + i // 250}.{i % 250}.0/24"], "rate": "10mbit"} for i in range(1000)]
    status, _ = d.request("PUT", "/rules", {"rules": rules})
    assert status == 200
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        status, text = d.request("GET", "/metrics")
        times.append(time.perf_counter() - t0)
        assert status == 200
    for family in ("shaper_class_bytes_total", "shaper_class_drops_total", "shaper_class_backlog_packets",
                   "shaper_rule_matched_bytes_total"):
        assert sum(1 for line in text.splitlines() if line.startswith(family + "{")) == 1000, family
    print(f"\n/metrics with 1000 rules: {len(text) / 1024:.0f} KiB, scrape {min(times) * 1000:.0f} ms "
          f"(min of 5; median {sorted(times)[2] * 1000:.0f} ms)")
    assert d.stop() == 0
