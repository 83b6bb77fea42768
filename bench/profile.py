"""Where shaper's own time goes: cProfile of the daemon's change path and of a bulk apply.

Runs the daemon's core (Service over KernelDatapath, no HTTP) in this process
on a scratch namespace pair, so the profile shows planning, encoding and
kernel calls without the HTTP server's threads.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

from shaper.control.controller import Controller
from shaper.datapath.kernel import KernelDatapath
from shaper.core.model import parse_rule
from shaper.control.service import Service

from .apply import rules_body
from .common import Pair


def _top(prof: cProfile.Profile, calls: int, limit: int = 12) -> list[dict]:
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, _) in stats.stats.items():
        where = filename.split("/site-packages/")[-1].split("/dist-packages/")[-1]
        where = where.split("/work/main/")[-1] if "/work/" in where else where
        rows.append({"function": f"{where}:{line}({func})", "calls_per_op": nc / calls,
                     "own_ms_per_op": tt * 1000 / calls, "cum_ms_per_op": ct * 1000 / calls})
    return sorted(rows, key=lambda r: -r["own_ms_per_op"])[:limit]


def run(nrules: int = 1000, changes: int = 100, big: int = 100_000, log=print) -> dict:
    res: dict = {"nrules": nrules, "changes": changes}
    with Pair("prof") as pair:
        dp = KernelDatapath(Pair.IF, pair.ns)
        try:
            dp.attach()
            svc = Service(dp, Pair.IF)
            svc.start([parse_rule(r) for r in rules_body(nrules)])
            bodies = [parse_rule({"name": f"r{k % nrules}", "dst": [f"10.240.{k >> 8}.{k & 255}/32"],
                                  "rate": f"{10 + 10 * (k % 2)}mbit"}) for k in range(changes)]
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
