"""The classifier's own run time per packet (kernel BPF statistics), at 1 and at N destinations.

`python -m bench.classifier_cost [N...]`: shaper's classifier on one scratch pair
per size, the same traffic as section 1, measured in turns; BPF run-time
statistics are switched on with BPF_ENABLE_STATS, which holds them on only while
this process keeps the returned descriptor (no sysctl is changed).  Prints the
mean nanoseconds per classifier run (includes the ~tens of ns the accounting adds).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

from shaper.datapath import loader
from lab import sh

from .classify import setup, traffic
from .common import Pair

BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
SYS_BPF = 321  # x86_64


def enable_stats() -> int:
    attr = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_uint32) * 32)
    ctypes.c_uint32.from_buffer(attr, 0).value = BPF_STATS_RUN_TIME
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(SYS_BPF, BPF_ENABLE_STATS, attr, ctypes.sizeof(attr))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS")
    return fd


def prog_stats(pin: str) -> tuple[int, int]:
    info = json.loads(sh("bpftool", "-j", "prog", "show", "pinned", pin).stdout)
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


def main(sizes: list[int], repeats: int = 3, seconds: float = 1.0) -> None:
    pairs, cleanups, pins = {}, [], {}
    fd = enable_stats()
    try:
        for n in sizes:
            pairs[n] = Pair(f"cost{n}").__enter__()
            _, cleanup = setup("shaper", pairs[n], n)
            cleanups.append(cleanup)
            from shaper.datapath.kernel import KernelDatapath
            pins[n] = os.path.join(KernelDatapath(Pair.IF, pairs[n].ns).pin_dir, loader.PROG_PIN)
        for kind in ("match", "miss"):
            totals = {n: [0, 0] for n in sizes}
            for _ in range(repeats):
                for n in sizes:
                    t0, c0 = prog_stats(pins[n])
                    pairs[n].blast(traffic(n)[kind], seconds)
                    t1, c1 = prog_stats(pins[n])
                    totals[n][0] += t1 - t0
                    totals[n][1] += c1 - c0
            for n in sizes:
                ns, cnt = totals[n]
                print(f"{kind:5} N={n:>7,}: {ns / cnt:6.1f} ns per classifier run ({cnt:,} runs)")
    finally:
        os.close(fd)
        for c in cleanups:
            c()
        for p in pairs.values():
            p.__exit__()


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [1, 100_000])
