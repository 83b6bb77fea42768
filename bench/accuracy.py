"""Section 6: configured against measured delay and rate, per destination.

netem needs a kernel that has it: the host runs this module inside a VM
booting Debian's stock kernel (lab.run_in_vm, as the VM test tier does);
`python -m bench.accuracy OUT SENDER` is what runs in the guest.  Delay is
the mean ping RTT with the rule minus the mean RTT to the same destination
before any rule (the reply path is not shaped); rate is measured at the
receiver: frames (payload + UDP, IP and Ethernet headers, what HTB counts)
that arrived after a 1 s warm-up, over the time they took, from a sender
offering 1.5 times the rate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab import POD_IF, V4, Lab, run_in_vm, sh

DELAYS_MS = {"a": 10.0, "b": 40.0}
RATES_MBIT = {"c": 4.0, "d": 8.0}
PAYLOAD = 1000
FRAME = PAYLOAD + 8 + 20 + 14
PINGS = 100


def rules_yaml(delays: dict, rates: dict) -> str:
    lines = ["rules:"]
    for name, ms in delays.items():
        lines += [f"  - name: delay-{name}", f"    dst: [{V4[name]}/32]", f"    delay: {ms:g}ms"]
    for name, mbit in rates.items():
        lines += [f"  - name: rate-{name}", f"    dst: [{V4[name]}/32]", f"    rate: {mbit:g}mbit"]
    return "\n".join(lines) + "\n"


def measure_rate(lab: Lab, sender: str, addr: str, mbit: float, seconds: float = 4.0) -> dict:
    pps = mbit * 1e6 * 1.5 / (FRAME * 8)
    receiver = subprocess.Popen(["ip", "netns", "exec", lab.dst, sender, "recv", addr, str(seconds + 1), "1.0"],
                                stdout=subprocess.PIPE, text=True)
    with tempfile.NamedTemporaryFile("w", suffix=".dst") as f:
        f.write(addr + "\n")
        f.flush()
        try:
            assert receiver.stdout.readline().strip() == "ready"
            sh("ip", "netns", "exec", lab.pod, sender, "blast", str(seconds), str(PAYLOAD), f.name, str(pps),
               timeout=seconds + 60)
            count, nbytes, span = receiver.communicate(timeout=seconds + 30)[0].split()
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
    count, span = int(count), float(span)
    measured = (count - 1) * FRAME * 8 / span / 1e6 if count > 1 and span > 0 else 0.0
    return {"configured_mbit": mbit, "measured_mbit": measured, "error_pct": (measured / mbit - 1) * 100,
            "packets": count, "payload_bytes": int(nbytes), "span_s": span, "offered_pps": pps}


def measure(sender: str, delays: dict = DELAYS_MS, rates: dict = RATES_MBIT, pings: int = PINGS,
            seconds: float = 4.0) -> dict:
    """Run inside a kernel with netem (or with delays={} on any kernel with HTB)."""
    out: dict = {"delay": [], "rate": [], "kernel": os.uname().release}
    with Lab() as lab:
        mac = json.loads(sh("ip", "-n", lab.dst, "-j", "link", "show", "shp1").stdout)[0]["address"]
        for name in ("a", "b", "c", "d"):
            sh("ip", "-n", lab.pod, "neigh", "replace", V4[name], "lladdr", mac, "dev", POD_IF, "nud", "permanent")
        before = {n: lab.ping(V4[n], count=pings, interval=0.01) for n in delays}
        lab.shaper("apply", rules=rules_yaml(delays, rates))
        (Path(tempfile.gettempdir()) / f"{lab.pod}-rules.yaml").unlink(missing_ok=True)  # the lab's copy
        for name, ms in delays.items():
            after = lab.ping(V4[name], count=pings, interval=0.01)
            measured = after["avg"] - before[name]["avg"]
            err = measured - ms
            out["delay"].append({"dst": name, "configured_ms": ms, "measured_ms": measured, "error_ms": err,
                                 "error_pct": err / ms * 100, "base_rtt_ms": before[name]["avg"],
                                 "rtt_ms": after["avg"], "rtt_mdev_ms": after["mdev"], "received": after["received"],
                                 "sent": after["sent"], "within_goal": abs(err) <= max(0.5, 0.02 * ms)})
        for name, mbit in rates.items():
            row = measure_rate(lab, sender, V4[name], mbit, seconds)
            row["dst"] = name
            row["within_goal"] = abs(row["error_pct"]) <= 5
            out["rate"].append(row)
        shown = lab.show()
        out["rule_packets"] = {n: r.get("class_packets") for n, r in shown.items()}
    return out


def run_vm(log=print, timeout: float = 900) -> dict:
    """Boot the VM once and measure there; returns the guest's results and the wall time."""
    from .common import sender_binary

    with tempfile.TemporaryDirectory(prefix="shaper-bench-vm-") as rwdir:
        sender = sender_binary(rwdir)
        out = Path(rwdir) / "accuracy.json"
        t0 = time.monotonic()
        proc = run_in_vm(f"{sys.executable} -m bench.accuracy {out} {sender}", rwdir, capture=True, timeout=timeout)
        wall = time.monotonic() - t0
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"accuracy guest failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        res = json.loads(out.read_text())
    res["vm_wall_s"] = wall
    for row in res["delay"]:
        log(f"  delay to {row['dst']}: configured {row['configured_ms']} ms, measured {row['measured_ms']:.2f} ms "
            f"(error {row['error_ms']:+.2f} ms)")
    for row in res["rate"]:
        log(f"  rate to {row['dst']}: configured {row['configured_mbit']} Mbit/s, measured "
            f"{row['measured_mbit']:.2f} ({row['error_pct']:+.1f}%)")
    return res


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(measure(sys.argv[2])))
