"""What the benchmark sections share: scratch namespace pairs, the C packet
generator, tc counters and summary statistics."""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import statistics
import time
import subprocess
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path

from lab import make_netns, sh
from shaper.control.controller import Controller
from shaper.core.model import Rule
from shaper.datapath import loader
from shaper.datapath.kernel import KernelDatapath

BENCH = Path(__file__).resolve().parent
SENDER_SRC = BENCH / "sender.c"
# Addresses of the classification benchmark: rules are consecutive /32s from
# RULE_BASE; traffic leaves through the pair's gateway and the far namespace
# drops it (a blackhole route), so only the sending side's egress path differs.
CLASS_STATS = re.compile(r"^class htb (\S+) .*\n Sent \d+ bytes (\d+) pkt \(dropped (\d+)", re.M)
RULE_BASE = (10 << 24) | (128 << 16)
MISS_BASE = (10 << 24) | (200 << 16)


def ip4(n: int) -> str:
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def rule_addr(i: int) -> str:
    return ip4(RULE_BASE + i)


@lru_cache(maxsize=None)
def sender_binary(outdir: str | None = None) -> str:
    """Compile bench/sender.c (once per process) and return the binary's path."""
    out = Path(outdir or tempfile.gettempdir()) / f"shaper-bench-sender-{os.getpid()}"
    sh("gcc", "-O2", "-Wall", "-o", str(out), str(SENDER_SRC))
    if outdir is None:  # a given directory is the caller's to remove
        atexit.register(lambda: out.unlink(missing_ok=True))
    return str(out)


def shaper_on(ifname: str, netns: str, rules: list[Rule]) -> KernelDatapath:
    """shaper attached to `ifname` in `netns` with `rules` applied; on failure nothing of it is left.
    The caller resets and closes the datapath it gets."""
    dp = KernelDatapath(ifname, netns)
    try:
        dp.attach()
        Controller(dp).apply(rules)
    except BaseException:
        dp.reset()
        dp.close()
        raise
    return dp


def load_seconds(cached: bool) -> float:
    """What loading the classifier takes alone, into scratch pins: compiled by the loader child
    (`cached` False: the cache set aside) or taken from the compiled-classifier cache."""
    pin_dir = f"/sys/fs/bpf/shaper-bench-compile-{os.getpid()}"
    saved = os.environ.get("SHAPER_CACHE_DIR")
    if not cached:
        os.environ["SHAPER_CACHE_DIR"] = "off"
    t0 = time.perf_counter()
    try:
        loader.load_and_pin(pin_dir)
        return time.perf_counter() - t0
    finally:
        if saved is None:
            os.environ.pop("SHAPER_CACHE_DIR", None)
        else:
            os.environ["SHAPER_CACHE_DIR"] = saved
        shutil.rmtree(pin_dir, ignore_errors=True)


def canary() -> dict:
    """A fixed amount of work timed, at the start and the end of a run: how fast this machine was
    that day, so that absolute times of two runs can be read side by side (the ratios inside one
    run need no such help).  `python_ms`: an interpreter loop (what planning and parsing pay);
    `syscall_us`: one pipe write and read (what netlink and map calls pay); the best of 5 each."""
    def python_loop() -> float:
        t0 = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i & 7
        return (time.perf_counter() - t0) * 1000

    def pipe_round() -> float:
        r, w = os.pipe()
        try:
            t0 = time.perf_counter()
            for _ in range(20_000):
                os.write(w, b"x")
                os.read(r, 1)
            return (time.perf_counter() - t0) / 20_000 * 1e6
        finally:
            os.close(r)
            os.close(w)

    return {"python_ms": min(python_loop() for _ in range(5)), "syscall_us": min(pipe_round() for _ in range(5))}


def summary(values: list[float]) -> dict:
    vals = sorted(values)
    return {"min": vals[0], "median": statistics.median(vals), "max": vals[-1], "n": len(vals)} if vals else {}


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    vals = sorted(values)
    k = max(0, min(len(vals) - 1, int(round(p / 100 * len(vals) + 0.5)) - 1))
    return vals[k]


class Pair:
    """Two scratch namespaces joined by a veth pair: `ns`/b0 (10.66.0.1) sends,
    `peer`/b1 (10.66.0.2) is the gateway for 10.128.0.0/9 and drops what it gets."""

    IF = "b0"
    GW = "10.66.0.2"

    def __init__(self, label: str):
        tag = uuid.uuid4().hex[:6]
        self.ns = f"shb-{tag}-{label}"[:30]
        self.peer = f"shb-{tag}-peer"
        self.created: list[str] = []

    def __enter__(self) -> "Pair":
        try:
            for ns in (self.ns, self.peer):
                self.created.append(make_netns(ns))
                # IPv4 only: no IPv6 router or neighbour solicitation crosses the measured qdisc.
                sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                   "net.ipv6.conf.default.disable_ipv6=1")
            sh("ip", "-n", self.ns, "link", "add", "name", self.IF, "type", "veth", "peer", "name", "b1",
               "netns", self.peer)
            sh("ip", "-n", self.ns, "addr", "add", "10.66.0.1/24", "dev", self.IF)
            sh("ip", "-n", self.peer, "addr", "add", f"{self.GW}/24", "dev", "b1")
            sh("ip", "-n", self.ns, "link", "set", self.IF, "up")
            sh("ip", "-n", self.peer, "link", "set", "b1", "up")
            sh("ip", "-n", self.ns, "route", "add", "10.128.0.0/9", "via", self.GW)
            sh("ip", "netns", "exec", self.peer, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            sh("ip", "-n", self.peer, "route", "add", "blackhole", "10.128.0.0/9")
            mac = json.loads(sh("ip", "-n", self.peer, "-j", "link", "show", "b1").stdout)[0]["address"]
            # A permanent neighbour: no ARP packet ever crosses the measured qdisc.
            sh("ip", "-n", self.ns, "neigh", "replace", self.GW, "lladdr", mac, "dev", self.IF, "nud", "permanent")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self.created):
            # Deleting the namespace removes its qdiscs, filters, iptables rules and ipsets.
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()

    def run(self, *cmd: str, timeout: float = 600, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], input=stdin, capture_output=True, text=True,
                              check=True, timeout=timeout)

    def blast(self, dests: list[str], seconds: float, payload: int = 18, pps: float = 0) -> dict:
        """Send from this namespace with the C generator; returns sent/errors/seconds."""
        with tempfile.NamedTemporaryFile("w", suffix=".dst", delete=False) as f:
            f.write("\n".join(dests) + "\n")
        try:
            out = self.run(sender_binary(), "blast", str(seconds), str(payload), f.name, str(pps),
                           timeout=seconds + 60).stdout.split()
        finally:
            os.unlink(f.name)
        return {"sent": int(out[0]), "errors": int(out[1]), "seconds": float(out[2])}

    def class_packets(self) -> dict[str, int]:
        """classid -> packets seen by the class (sent + dropped), and 'direct' for HTB's direct queue."""
        out: dict[str, int] = {}
        # iproute2 6.1 has no JSON output for classes.
        text = sh("tc", "-n", self.ns, "-s", "class", "show", "dev", self.IF).stdout
        for handle, packets, drops in CLASS_STATS.findall(text):
            out[handle] = int(packets) + int(drops)
        for q in json.loads(sh("tc", "-n", self.ns, "-s", "-j", "qdisc", "show", "dev", self.IF).stdout or "[]"):
            if q.get("kind") == "htb" and q.get("root"):
                out["direct"] = q.get("options", {}).get("direct_packets_stat", 0)
        return out

