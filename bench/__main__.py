"""python -m bench [--smoke] [--sections ...] [--out docs/benchmarks.md]: run the benchmarks, write the report."""

from __future__ import annotations

import argparse
import compileall
import datetime
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from lab import ROOT

from . import accuracy, apply, classify, daemon, match, profile, report, tax
from .common import canary

SECTIONS = ("classify", "match", "apply", "latency", "disruption", "footprint", "tax", "accuracy", "profile")


def full(section: str, log):
    return {
        "classify": lambda: classify.run(log=log),
        "match": lambda: match.run(log=log),
        # tcconfig at 1,000 rules takes ~10 minutes a run: one run there, three below.
        "apply": lambda: apply.run(tcconfig_repeats={1000: 1}, log=log),
        "latency": lambda: daemon.change_latency(log=log),
        "disruption": lambda: daemon.no_disruption(log=log),
        "footprint": lambda: daemon.footprint(log=log),
        "tax": lambda: tax.run(log=log),
        "accuracy": lambda: accuracy.run_vm(log=log),
        "profile": lambda: profile.run(nrules=10_000, changes=1000, log=log),
    }[section]()


def smoke(section: str, log):
    """Tiny sizes: every mechanism and code path, in seconds (tests/kernel/test_bench_smoke.py)."""
    return {
        "classify": lambda: classify.run(counts=(1, 50), repeats=2, seconds=0.2, log=log),
        "match": lambda: match.run(counts=(1, 50), repeats=2, seconds=0.2, log=log),
        "apply": lambda: apply.run(counts=(2,), repeats=1, big=300, huge=2000, log=log),
        "latency": lambda: daemon.change_latency(rule_counts=(5,), changes=20, keepalive_changes=3, log=log),
        "disruption": lambda: daemon.no_disruption(seconds=2.0, pps=5000, log=log),
        "footprint": lambda: daemon.footprint(starts=1, scrapes=2, big=2000, log=log),
        "tax": lambda: tax.run(repeats=1, seconds=0.5, streams=2, big=2000, log=log),
        # Accuracy needs netem, i.e. a VM boot: smoke measures the rate half on this kernel instead.
        "accuracy": lambda: {"skipped": "smoke run: the netem half needs a VM boot (the VM tier boots one already)",
                             "host_rate": accuracy.measure(__import__("bench.common").common.sender_binary(),
                                                           delays={}, rates={"c": 4.0}, seconds=2.0)},
        "profile": lambda: profile.run(nrules=20, changes=5, big=500, log=log),
    }[section]()


def machine() -> dict:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    osr = "?"
    try:
        osr = next(line.split("=", 1)[1].strip().strip('"') for line in open("/etc/os-release")
                   if line.startswith("PRETTY_NAME="))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "kernel": platform.release(), "cpus": os.cpu_count(), "cpu": cpu, "os": osr,
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds, for the tests)")
    ap.add_argument("--sections", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the report from --results without measuring (after editing bench/findings.md)")
    args = ap.parse_args(argv)
    if args.report_only:
        results = json.loads(args.results.read_text())
        for line in report.write(results, args.out, args.out.parent / args.out.stem):
            print("  " + line)
        return 0
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, tc, BPF, iptables)", file=sys.stderr)
        return 2

    bench_pid = os.getpid()

    def stop(signum: int, _frame: object) -> None:
        if os.getpid() != bench_pid:
            # A forked child (pyroute2 opens its netns sockets in one, and ends it with SIGTERM)
            # holds a copy of the bench's stack: unwinding it there would delete the namespaces.
            os._exit(128 + signum)
        raise SystemExit(128 + signum)  # unwinds every lab's `with`: namespaces and pins go too

    signal.signal(signal.SIGTERM, stop)  # `kill` or a CI timeout, not only Ctrl-C

    def log(msg: str) -> None:
        print(msg, flush=True)

    # The compiled-classifier cache of this run (section 5 times the compile without it): what a
    # user has after the first load on a machine, and no state read from or left on the host.
    own_cache = None if os.environ.get("SHAPER_CACHE_DIR") else tempfile.mkdtemp(prefix="shaper-bench-cache-")
    if own_cache:
        os.environ["SHAPER_CACHE_DIR"] = own_cache
    # Byte-compile shaper as an install does (pip, a Debian package, the image): the commands timed
    # here start a Python each, and one that compiles stale modules (PYTHONDONTWRITEBYTECODE, or a
    # tree just edited) spends ~45 ms of a `shaper apply` on it, which no user's command does.
    compileall.compile_dir(ROOT / "shaper", quiet=1)
    results: dict = {"meta": {**machine(), "smoke": args.smoke, "loadavg_start": os.getloadavg()[0],
                              "canary_start": canary()}}
    t0 = time.monotonic()
    try:
        for section in args.sections:
            log(f"bench: {section}")
            s0 = time.monotonic()
            results[section] = (smoke if args.smoke else full)(section, log)
            log(f"bench: {section} done in {time.monotonic() - s0:.0f}s")
    finally:
        if own_cache:
            shutil.rmtree(own_cache, ignore_errors=True)
    results["meta"]["duration_s"] = time.monotonic() - t0
    results["meta"]["loadavg_end"] = os.getloadavg()[0]
    results["meta"]["canary_end"] = canary()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    verdicts = report.write(results, args.out, args.out.parent / args.out.stem)
    log(f"bench: wrote {args.out} and {args.results} in {results['meta']['duration_s'] / 60:.1f} min")
    for line in verdicts:
        log("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
