"""The benchmarks at tiny sizes, so `make bench` cannot rot: every section and every
mechanism (shaper, u32, iptables + ipset, iptables per address, tcconfig; shaper's port
and ingress matches against u32 and ipset port matches) runs for real and must
classify, apply and count what it claims.  The netem accuracy half
needs a VM boot and is left to `make bench`; its rate half runs here on this kernel."""

import shutil

import pytest

from bench import __main__ as bench_main
from bench import accuracy, apply, classify, daemon, match, profile, report, tax
from bench.common import sender_binary
from tests.support.tiers import require_tier


@pytest.fixture(autouse=True, scope="module")
def _bench_tools():
    missing = [t for t in ("gcc", "iptables", "iptables-restore", "ipset") if not shutil.which(t)]
    require_tier(f"{', '.join(missing)} not installed (run `make setup`)" if missing else None)


def test_bench_smoke(tmp_path):
    results = {"meta": {**bench_main.machine(), "smoke": True, "duration_s": 0.0}}

    c = results["classify"] = classify.run(counts=(1, 50), repeats=2, seconds=0.2, log=lambda *_: None)
    assert {(r["n"], r["mechanism"], r["traffic"]) for r in c["rows"]} == \
        {(n, m, t) for n in (1, 50) for m in classify.MECHANISMS for t in ("match", "miss")}
    for r in c["rows"]:
        assert r["pps"]["median"] > 1000, r
        for check in r["checks"]:
            assert check["sent"] > 0 and check["errors"] == 0, r
            if r["mechanism"] != "baseline" and r["traffic"] == "match":
                # Every packet to a rule's destination went into the rule's class, none to the direct queue.
                assert check["classified"] == check["sent"] and check["direct"] == 0, r
            else:
                assert check["classified"] == 0 and check["direct"] == check["sent"], r

    m = results["match"] = match.run(counts=(1, 50), repeats=2, seconds=0.2, log=lambda *_: None)
    assert {(r["n"], r["mechanism"], r["traffic"]) for r in m["rows"]} == \
        {(n, x, t) for n in (1, 50) for x in match.MECHANISMS for t in ("match", "miss")}
    for r in m["rows"]:
        assert r["pps"]["median"] > 1000, r
        for check in r["checks"]:
            assert check["sent"] > 0 and check["errors"] == 0, r
            # Matching traffic all in the rule's class (the ifb's for ingress), the other traffic none of it.
            assert check["classified"] == (check["sent"] if r["traffic"] == "match" else 0), r
            # Unclassified packets: HTB's direct queue on egress; on ingress they never reach the ifb at all.
            unclassified = 0 if r["traffic"] == "match" or r["mechanism"] == "shaper-ingress" else check["sent"]
            assert check["direct"] == unclassified, r
            if r["mechanism"].startswith("shaper"):
                assert check["matched"] == check["classified"], r  # the classifier's own rule counters
    assert {(r["n"], r["mechanism"], r["traffic"]) for r in m["cost_rows"]} == \
        {(n, x, t) for n in (1, 50) for x in match.COSTED for t in ("match", "miss")}
    for r in m["cost_rows"]:
        assert r["runs"] > 0 and r["ns_per_run"]["min"] > 0, r

    a = results["apply"] = apply.run(counts=(2,), repeats=1, big=300, huge=2000, log=lambda *_: None)
    # Past 1,024 prefixes with the tries sized for them: locally and through a daemon of that size.
    assert a["huge"]["trie_size"] == 2048 and a["huge"]["trie_memlock_bytes"] > 2000 * 16
    assert a["huge"]["local_s"]["n"] == 1 and a["huge"]["daemon_s"]["median"] > 0
    assert a["huge"]["cli_peak_rss_kb"] > 10_000 and a["huge"]["daemon_rss_kb"] > 10_000
    methods = {r["method"]: r for r in a["rows"]}
    assert methods["tcconfig tcset --add x N"]["checks"][0]["filters"] == 2
    assert methods["tcconfig tcset --add x N"]["checks"][0]["failures"] == 0
    assert {"shaper PUT /rules (bulk)", "shaper PUT /rules/{name} x N"} <= set(methods)
    assert sum(1 for m in methods if m.startswith("shaper Controller.apply")) == 2
    # The command a user runs, on a file (1 x 300 and 3 x 100), local and through the daemon.
    # Locally with the classifier cached, and (1 x 300) the first on a machine, which compiles it.
    assert {m for m in methods if m.startswith("shaper apply -f")} == {
        *(f"shaper apply -f, daemon ({shape})" for shape in ("1 rules x 300 prefixes", "3 rules x 100 prefixes")),
        *(f"shaper apply -f, local ({shape}, classifier cached)"
          for shape in ("1 rules x 300 prefixes", "3 rules x 100 prefixes")),
        "shaper apply -f, local (1 rules x 300 prefixes, first on the machine: compiles the classifier)"}
    assert all(r["seconds"]["median"] > 0 for r in a["rows"])

    lt = results["latency"] = daemon.change_latency(rule_counts=(5,), changes=20, keepalive_changes=3,
                                                   log=lambda *_: None)
    row = lt["rows"][0]
    assert row["changes"] == 20 and len(row["samples_ms"]) == 20 and 0 < row["p50_ms"] <= row["p99_ms"]

    nd = results["disruption"] = daemon.no_disruption(seconds=2.0, pps=5000, log=lambda *_: None)
    assert nd["sent"] > 5000 and nd["changes"]["put"] > 10 and nd["changes"]["delete"] >= 0
    assert nd["lost"] == 0 and nd["unshaped"] == 0 and nd["matched"] == nd["sent"], nd

    fp = results["footprint"] = daemon.footprint(starts=1, scrapes=2, big=2000, log=lambda *_: None)
    assert 0 < fp["ready_s"]["median"] < 60
    # The cache skips bcc: loading from it is faster than compiling (one compile: seconds; a load: a
    # fraction of one, the verifier's time), on any machine.
    assert fp["cached_load_s"]["median"] < fp["compile_s"]["median"] / 2, (fp["cached_load_s"], fp["compile_s"])
    assert all(fp[k]["VmRSS"] > 10_000 for k in ("rss_0", "rss_1k", "rss_big"))
    assert fp["scrape_1k_s"]["n"] == 2 and fp["scrape_10k_s"]["n"] == 2
    assert fp["series_10k"] > 10_000 and fp["series_10k_by_family"]["shaper_class_bytes_total"] == 10_000

    tx = results["tax"] = tax.run(repeats=1, seconds=0.5, streams=2, big=2000, log=lambda *_: None)
    assert {(r["setup"], r["traffic"]) for r in tx["rows"]} == {(s, k) for s in tax.SETUPS for k in ("tcp", "udp")}
    assert all(r["value"]["median"] > 1000 for r in tx["rows"]), tx["rows"]
    # Nothing to the peer matched a rule: every packet took HTB's direct queue (the tax measured is the unshaped path).
    assert all(v > 1000 for v in tx["direct_packets"].values()), tx["direct_packets"]

    rate = accuracy.measure(sender_binary(), delays={}, rates={"c": 4.0}, seconds=2.0)["rate"][0]
    assert rate["packets"] > 100 and abs(rate["error_pct"]) < 10, rate  # HTB's rate, measured at the receiver
    results["accuracy"] = {"skipped": "smoke"}

    results["profile"] = profile.run(nrules=20, changes=5, big=500, log=lambda *_: None)
    assert results["profile"]["put_top"] and results["profile"]["big_top"]

    md = tmp_path / "benchmarks.md"
    verdicts = report.write(results, md, tmp_path / "benchmarks")
    text = md.read_text()
    for title in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "## 7.", "## 8.", "## Where shaper's time goes"):
        assert title in text, title
    for png in ("classify.png", "match.png", "apply.png", "latency.png"):
        assert (tmp_path / "benchmarks" / png).stat().st_size > 10_000, png
    assert any("no disruption" in v and "**met**" in v for v in verdicts)
    assert report.match_bad_checks(m) == [] and "MISMATCHES" not in text
    # The section's goal lines: measured at each size, with a verdict (a noisy smoke run may miss them).
    for goal in ("the port lookup adds at most 10%", "an unmatched packet costs no more than today",
                 "shaper-port / u32-port", "shaper-port / ipset-port", "ingress against egress"):
        line = next(v for v in verdicts if goal in v)
        assert "1: " in line and "50: " in line, line
