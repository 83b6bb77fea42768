"""python -m bench.agent [--pods N] [--sweeps K]: what the node agent costs per target, measured as a user
sees it (lab.node: the agent in a node namespace, pods made after it started, requests from a client
namespace), and printed as a Markdown table (docs/agent.md holds a run).

- time to first shaping: PUT /targets/{pod IP}/rules/NAME on a pod not shaped yet, until its 200
  (classifier attached, the rule's class made): with the agent idle (its spare classifier compiled
  ahead, shaper.agent.spares), and in a burst of back-to-back new pods (each waits for a compile);
  then a second rule on a shaped pod;
- memory: the agent's RSS once ready and with N targets shaped, per target;
- /metrics with N targets: time and size;
- sweep latency: a pod's process killed until its pins are gone, one pod at a time (K of them),
  then the rest at once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from lab import wait_until
from lab.node import BPFFS, Node

IDLE = 5  # pods shaped one at a time with the spare classifier ready


def _q(values: list[float]) -> tuple[float, float, float]:
    values = sorted(values)
    return values[0], statistics.median(values), values[-1]


def run(pods: int = 50, sweeps: int = 5, log=print) -> dict:
    with Node() as node:
        agent = node.agent()
        made = [node.pod() for _ in range(pods)]
        rss_idle = agent.rss_kb()
        spare = os.path.join(BPFFS, "shaper", f"_spare-{agent.pid}", "ingress_cfg")
        idle, first, second = [], [], []
        for pod in made[:IDLE]:
            assert wait_until(lambda: os.path.exists(spare), timeout=120, step=0.02), agent.text()
            start = time.monotonic()
            status, body = node.request("PUT", f"/targets/{pod.ip}/rules/peer", {"dst": [pod.peer], "rate": "10mbit"})
            idle.append(time.monotonic() - start)
            assert status == 200, body
        for pod in made[IDLE:]:
            start = time.monotonic()
            status, body = node.request("PUT", f"/targets/{pod.ip}/rules/peer", {"dst": [pod.peer], "rate": "10mbit"})
            first.append(time.monotonic() - start)
            assert status == 200, body
        for pod in made[:10]:
            start = time.monotonic()
            status, body = node.request("PUT", f"/targets/{pod.ip}/rules/more", {"dst": ["10.254.0.0/16"],
                                                                               "rate": "1mbit"})
            second.append(time.monotonic() - start)
            assert status == 200, body
        rss_full = agent.rss_kb()
        scrapes = []
        for _ in range(5):
            start = time.monotonic()
            status, text = node.request("GET", "/metrics")
            scrapes.append(time.monotonic() - start)
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        one = []
        for pod in made[:sweeps]:
            start = time.monotonic()
            pod.kill()
            assert wait_until(lambda: not os.path.exists(pod.pins), timeout=60, step=0.02), agent.text()
            one.append(time.monotonic() - start)
        start = time.monotonic()
        for pod in made[sweeps:]:
            pod.kill()
        assert wait_until(lambda: not any(os.path.exists(p.pins) for p in made), timeout=120, step=0.05)
        mass = time.monotonic() - start
        agent.stop()
    out = {
        "pods": pods,
        "first_shaping_idle_s": _q(idle), "first_shaping_s": _q(first), "second_rule_s": _q(second),
        "rss_idle_mib": rss_idle / 1024, "rss_full_mib": rss_full / 1024,
        "rss_per_target_kib": (rss_full - rss_idle) / pods,
        "metrics_s": _q(scrapes), "metrics_kib": len(text) / 1024, "metrics_series": series,
        "sweep_one_s": _q(one), "sweep_all_s": mass, "sweep_all_n": pods - sweeps,
    }
    log(table(out))
    return out


def table(r: dict) -> str:
    def mmm(v: tuple[float, float, float], scale: float = 1.0, unit: str = "s") -> str:
        return " / ".join(f"{x * scale:.3g}" for x in v) + f" {unit}"

    rows = [
        (f"first shaping of a new target, agent idle ({IDLE} pods; min / median / max)",
         mmm(r["first_shaping_idle_s"], 1000, "ms")),
        (f"first shaping of a new target, {r['pods'] - IDLE} back to back", mmm(r["first_shaping_s"])),
        ("a further rule on a shaped target", mmm(r["second_rule_s"], 1000, "ms")),
        ("agent RSS, ready / with targets", f"{r['rss_idle_mib']:.1f} / {r['rss_full_mib']:.1f} MiB"),
        ("RSS per target", f"{r['rss_per_target_kib']:.0f} KiB"),
        (f"/metrics with {r['pods']} targets", f"{mmm(r['metrics_s'], 1000, 'ms')}, {r['metrics_kib']:.0f} KiB, "
                                                f"{r['metrics_series']} series"),
        ("sweep: pod killed -> its pins gone, one at a time", mmm(r["sweep_one_s"])),
        (f"sweep: {r['sweep_all_n']} pods killed at once -> every pin gone", f"{r['sweep_all_s']:.2f} s"),
    ]
    lines = [f"| {r['pods']} pods | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.agent", description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, default=50)
    ap.add_argument("--sweeps", type=int, default=5, help="pods killed one at a time for the sweep latency")
    args = ap.parse_args()
    run(args.pods, min(args.sweeps, args.pods))


if __name__ == "__main__":
    main()
