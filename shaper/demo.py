"""`make demo`: per-destination shaping in a lab of network namespaces.

A "pod" namespace with shaper on its interface, and destinations (IPv4 and
IPv6) behind it.  It measures each destination (ping RTT and loss, TCP
throughput), applies an example rule set, measures again, prints the table,
and removes everything.  Where the running kernel has no sch_netem it says so
and runs the same lab in a VM (Debian's stock kernel under virtme-ng).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from .lab import V4, V6, Lab, netem_available, run_in_vm

RULES = f"""
rules:
  - name: db
    dst: [{V4['a']}, "{V6['a']}"]
    delay: 50ms
  - name: cache
    dst: [{V4['b']}]
    rate: 2mbit
    loss: 1%
  - name: subnet
    dst: [10.77.1.0/24]
    delay: 20ms
    jitter: 5ms
"""
DESTINATIONS = (
    (V4["a"], "db", "delay 50ms"),
    (V6["a"], "db", "delay 50ms"),
    (V4["b"], "cache", "rate 2mbit, loss 1%"),
    (V4["c"], "subnet", "delay 20ms +/- 5ms"),
    (V4["d"], "-", "none"),
    (V6["b"], "-", "none"),
)


def measure(lab: Lab) -> dict[str, dict]:
    out = {}
    for addr, _, _ in DESTINATIONS:
        res = lab.ping(addr, count=40, interval=0.02)
        if ":" not in addr:
            res["tput"] = lab.throughput(addr, 2)
        out[addr] = res
    return out


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def table(before: dict, after: dict) -> str:
    head = ("destination", "rule", "configured", "rtt before", "rtt after", "loss before", "loss after",
            "tput before", "tput after")
    rows = [head]
    for addr, rule, conf in DESTINATIONS:
        b, a = before[addr], after[addr]
        tp = lambda r: f"{r['tput'] / 1e6:.1f} Mbit/s" if "tput" in r else "-"  # noqa: E731
        rows.append((addr, rule, conf, _ms(b["avg"]), _ms(a["avg"]), f"{b['loss_pct']:.0f}%",
                     f"{a['loss_pct']:.0f}%", tp(b), tp(a)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run_lab() -> None:
    with Lab() as lab:
        print("measuring without shaper ...", flush=True)
        before = measure(lab)
        print("applying rules:" + RULES, flush=True)
        print(lab.shaper("apply", rules=RULES).stdout.strip())
        print("measuring with shaper ...", flush=True)
        after = measure(lab)
        print(lab.shaper("show").stdout)
        print(table(before, after))
    print("\nlab removed (namespaces, tc objects, pins)")


def run_demo_in_vm() -> int:
    rw = tempfile.mkdtemp(prefix="shaper-demo-")
    try:
        return run_in_vm(f"{sys.executable} -m shaper.demo --in-vm", rw).returncode
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(rw, ignore_errors=True)


def main(argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces, tc, BPF)", file=sys.stderr)
        return 1
    if "--in-vm" not in argv and not netem_available():
        print("This kernel has no sch_netem (delay/jitter/loss need it): running the lab in a VM with "
              "Debian's stock kernel (virtme-ng, TCG; about a minute) ...", flush=True)
        return run_demo_in_vm()
    run_lab()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
