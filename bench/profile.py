"""Where shaper's own time goes: cProfile of the daemon's change path and of a bulk apply.

Runs the daemon's core (Service over KernelDatapath, no HTTP) in this process
on a scratch namespace pair, so the profile shows planning, encoding and
kernel calls without the HTTP server's threads.
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import time

from shaper.control.controller import Controller
from shaper.datapath.kernel import KernelDatapath
from shaper.core.model import parse_rule
from shaper.control.service import Service

from .apply import rules_body
from .common import Pair, percentile


def _top(prof: cProfile.Profile, calls: int, limit: int = 12) -> list[dict]:
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, _) in stats.stats.items():
        where = filename.split("/site-packages/")[-1].split("/dist-packages/")[-1]
        where = where.split("/work/main/")[-1] if "/work/" in where else where
        rows.append({"function": f"{where}:{line}({func})", "calls_per_op": nc / calls,
                     "own_ms_per_op": tt * 1000 / calls, "cum_ms_per_op": ct * 1000 / calls})
    return sorted(rows, key=lambda r: -r["own_ms_per_op"])[:limit]


def _timed_puts(svc: Service, bodies: list) -> dict:
    """Each put timed without the profiler, with the garbage collections that ran during it: the slowest
    1% of changes, and how many of them had a collection of the oldest generation (the one that walks
    every object the daemon keeps, as many as its rules) inside them."""
    running: list[int] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "start":
            running.append(info["generation"])

    times, full = [], []
    gc.callbacks.append(seen)
    try:
        for rule in bodies:
            del running[:]
            t0 = time.perf_counter()
            svc.put(rule, "bench")
            times.append(time.perf_counter() - t0)
            full.append(2 in running)
    finally:
        gc.callbacks.remove(seen)
    slow = sorted(range(len(times)), key=times.__getitem__)[-max(1, len(times) // 100):]
    return {"p50_ms": percentile(times, 50) * 1000, "p99_ms": percentile(times, 99) * 1000,
            "max_ms": max(times) * 1000, "slowest": len(slow), "slowest_with_full_gc": sum(full[i] for i in slow),
            "full_gcs": sum(full)}


def run(nrules: int = 1000, changes: int = 100, big: int = 100_000, log=print) -> dict:
    res: dict = {"nrules": nrules, "changes": changes}
    with Pair("prof") as pair:
        dp = KernelDatapath(Pair.IF, pair.ns)
        try:
            dp.attach()
            svc = Service(dp, Pair.IF)
            svc.start([parse_rule(r) for r in rules_body(nrules)])
            # Two rounds of changes (timed, then profiled), each moving a rule to a new destination and rate.
            bodies = [parse_rule({"name": f"r{k % nrules}", "dst": [f"10.{240 + k // 65536}.{(k >> 8) & 255}.{k & 255}/32"],
                                  "rate": f"{10 + 10 * (k % 2)}mbit"}) for k in range(2 * changes)]
            res["unprofiled"] = _timed_puts(svc, bodies[changes:])
            bodies = bodies[:changes]
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for rule in bodies:
                svc.put(rule, "bench")
            prof.disable()
            res["put_ms"] = (time.perf_counter() - t0) * 1000 / changes
            res["put_top"] = _top(prof, changes)
            svc.clear("bench")
            if big:
                per = max(1, big // 1000)
                rules = [parse_rule(r) for r in rules_body(big // per, per)]
                ctl = Controller(dp)
                ctl.apply([])
                prof = cProfile.Profile()
                t0 = time.perf_counter()
                prof.enable()
                ctl.apply(rules)
                prof.disable()
                res["big"] = big
                res["big_s"] = time.perf_counter() - t0
                res["big_top"] = _top(prof, 1)
        finally:
            dp.reset()
            dp.close()
    log(f"  profile: PUT among {nrules} rules {res['put_ms']:.1f} ms (profiled); "
        f"{big} prefixes {res.get('big_s', 0):.2f} s (profiled)")
    return res
