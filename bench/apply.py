"""Section 2: time to apply N per-destination rules.

- shaper from the command line, as a user does it: `shaper apply -f FILE` of a
  YAML rules file of 100,000 prefixes (1 rule x 100,000 and 1,000 rules x 100),
  locally (`--iface`, attaching to an empty interface) and through a running
  daemon (`--server`), timed from the process start to its exit;
- shaper bulk: one `PUT /rules` of N rules to a running daemon (HTTP, JSON,
  validation, plan and kernel writes), and the same through the library
  (`Controller.apply`, no HTTP) for 100,000 prefixes;
- shaper one at a time: N `PUT /rules/{name}` in a row, each on a new connection;
- tcconfig: N `tcset --add` calls, one per destination with a rate (its u32 path).

Each rule is one /32 with a 10 Mbit/s rate; every run starts from an empty interface.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shaper.control.controller import Controller
from shaper.datapath.kernel import KernelDatapath
from lab import POD_IF, ROOT, Lab
from shaper.core.model import parse_rule

from .common import Pair, load_seconds, rule_addr, summary
from .daemon import rss_kb

VENV = ROOT / ".venv-bench"
TCSET = VENV / "bin" / "tcset"


def ensure_tcconfig(log=print) -> Path:
    """tcconfig in its own venv (it pins its own pyroute2 and pulls docker): never in .venv."""
    if not TCSET.exists():
        log("  installing tcconfig into .venv-bench (pip)")
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "tcconfig"],
                       check=True)
    return TCSET


def tcconfig_version() -> str:
    out = subprocess.run([str(VENV / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('tcconfig'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def _lsmod_shim() -> str:
    """tcset probes for sch_netem with lsmod, which fails outright on a kernel without
    loadable modules (no /proc/modules).  This lsmod lists no modules, which is the truth
    here; tcset then goes on (its netem leaf is refused by this kernel, its HTB class and
    u32 filter are made: a rate-only rule works)."""
    d = tempfile.mkdtemp(prefix="shaper-bench-shim-")
    path = os.path.join(d, "lsmod")
    with open(path, "w") as f:
        f.write("#!/bin/sh\necho 'Module                  Size  Used by'\n")
    os.chmod(path, 0o755)
    return d


def rules_body(n: int, per: int = 1) -> list[dict]:
    return [{"name": f"r{i}", "dst": [f"{rule_addr(i * per + j)}/32" for j in range(per)], "rate": "10mbit"}
            for i in range(n)]


def tcconfig_apply(n: int, shim: str) -> tuple[float, dict]:
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    with Pair("tcc") as pair:
        t0 = time.perf_counter()
        failures = 0
        for i in range(n):
            proc = subprocess.run(["ip", "netns", "exec", pair.ns, str(TCSET), Pair.IF, "--rate", "10Mbps",
                                   "--network", rule_addr(i), "--add"], capture_output=True, text=True, env=env,
                                  timeout=300)
            failures += proc.returncode != 0
        elapsed = time.perf_counter() - t0
        filters = pair.run("tc", "filter", "show", "dev", Pair.IF).stdout.count("flowid")
        classes = pair.run("tc", "class", "show", "dev", Pair.IF).stdout.count("class htb")
    return elapsed, {"filters": filters, "classes": classes, "failures": failures}


def library_apply(nrules: int, per: int, repeats: int) -> tuple[list[float], int]:
    """Controller.apply of nrules x per /32 prefixes onto an attached, empty interface."""
    times, entries = [], 0
    rules = [parse_rule(r) for r in rules_body(nrules, per)]
    for _ in range(repeats):
        with Pair("lib") as pair:
            dp = KernelDatapath(Pair.IF, pair.ns)
            try:
                dp.attach()
                t0 = time.perf_counter()
                Controller(dp).apply(rules)
                times.append(time.perf_counter() - t0)
                entries = dp.map_entries()
            finally:
                dp.reset()
                dp.close()
    return times, entries


def write_rules_file(path: Path, nrules: int, per: int) -> None:
    """The rules of rules_body(nrules, per) as a person writes a rules file (block style)."""
    with open(path, "w") as f:
        f.write("rules:\n")
        for rule in rules_body(nrules, per):
            f.write(f"  - name: {rule['name']}\n    rate: {rule['rate']}\n    dst:\n")
            f.write("".join(f"      - {d}\n" for d in rule["dst"]))


def _entries(lab: Lab) -> int:
    with lab.pinned_maps() as dp:
        return dp.map_entries()


def cli_apply(big: int, repeats: int, log=print) -> list[dict]:
    """`shaper apply -f` of `big` prefixes (1 x big, big/100 x 100), local and through a daemon.

    Each run is the whole command: interpreter start, imports, reading and parsing the
    YAML, then attaching and writing (local) or the PUT /rules and its answer (daemon).
    Local runs start from an interface shaper is not attached to; daemon runs from a
    daemon with no rules."""
    rows = []
    shapes = [(1, big)] + ([(big // 100, 100)] if big >= 200 else [])
    load_seconds(cached=True)  # the cache holds the classifier, as after any first load on a machine
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="shaper-bench-cli-") as tmp:
        for nrules, per in shapes:
            path = Path(tmp) / f"rules-{nrules}x{per}.yaml"
            write_rules_file(path, nrules, per)
            # The first local apply on a machine compiles the classifier; every later one loads the
            # compiled one from the cache (objcache). Both are timed, the first only for 1 x big.
            for first in ((True, False) if nrules == 1 else (False,)):
                local = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    lab.shaper("apply", "-f", str(path), env={"SHAPER_CACHE_DIR": "off"} if first else None)
                    local.append(time.perf_counter() - t0)
                    assert _entries(lab) == nrules * per
                    lab.shaper("reset")
                how = "first on the machine: compiles the classifier" if first else "classifier cached"
                rows.append({"n": nrules * per, "method": f"shaper apply -f, local ({nrules} rules x {per} prefixes, "
                             f"{how})", "seconds": summary(local), "cli": True, "first": first})
                log(f"  shaper apply -f {nrules} x {per}, local, {how}: median {summary(local)['median']:.2f}s")
        d = lab.daemon()
        for nrules, per in shapes:
            path = Path(tmp) / f"rules-{nrules}x{per}.yaml"
            remote, inside = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                lab.cli("apply", "-f", str(path), "--server", f"http://127.0.0.1:{d.port}")
                remote.append(time.perf_counter() - t0)
                inside.append(d.logs()[-1]["seconds"])
                assert _entries(lab) == nrules * per
                assert d.request("DELETE", "/rules")[0] == 200
            rows.append({"n": nrules * per, "method": f"shaper apply -f, daemon ({nrules} rules x {per} prefixes)",
                         "seconds": summary(remote), "inside_daemon_s": summary(inside), "cli": True})
            log(f"  shaper apply -f {nrules} x {per}, through the daemon: median {summary(remote)['median']:.2f}s "
                f"(inside the daemon {summary(inside)['median']:.2f}s)")
        assert d.stop() == 0
    return rows


def trie_size_for(n: int) -> int:
    """The SHAPER_MAX_PREFIXES a user sets for `n` prefixes: the next power of two, 1,024 at least."""
    return max(1024, 1 << (n - 1).bit_length())


def _memlock(fd: int) -> int:
    """What the kernel charges for a map (its fdinfo's memlock: the entries it holds, for a trie)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("memlock:"))


def _peak_rss_kb(cmd: list[str], env: dict) -> tuple[float, int]:
    """Run `cmd` through a small Python parent; its time, and the child's peak RSS (ru_maxrss, KiB)."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, **env}).stdout.split()
    return float(out[0]), int(out[1])


def cli_apply_huge(n: int, repeats: int, log=print) -> dict:
    """`shaper apply -f` of one rule of `n` prefixes with the tries sized for them (SHAPER_MAX_PREFIXES),
    locally (classifier cached) and through a daemon: the times, the kernel memory the trie takes,
    the command's peak RSS and the daemon's RSS holding them."""
    size = trie_size_for(n)
    env = {"SHAPER_MAX_PREFIXES": str(size)}
    res: dict = {"n": n, "trie_size": size}
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="shaper-bench-huge-") as tmp:
        path = Path(tmp) / "rules.yaml"
        write_rules_file(path, 1, n)
        res["file_bytes"] = path.stat().st_size
        cmd = [sys.executable, "-m", "shaper", "apply", "-f", str(path), "--iface", POD_IF, "--netns", lab.pod]
        lab.shaper("apply", "-f", str(path), env=env)  # compiles the classifier of this size, once
        with lab.pinned_maps() as dp:
            assert dp.lpm.max_entries == size and dp.map_entries() == n
            res["trie_memlock_bytes"] = _memlock(dp.lpm.fd)
            assert dp.dst_host is not None and dp.dst_host.count() == n  # every prefix is a host
            res["host_hash_memlock_bytes"] = _memlock(dp.dst_host.fd)
        lab.shaper("reset")
        local, peaks = [], []
        for _ in range(repeats):
            seconds, peak = _peak_rss_kb(cmd, env)
            local.append(seconds)
            peaks.append(peak)
            assert _entries(lab) == n
            lab.shaper("reset")
        res["local_s"] = summary(local)
        res["cli_peak_rss_kb"] = max(peaks)
        log(f"  shaper apply -f 1 x {n:,}, local: median {res['local_s']['median']:.2f}s, peak RSS "
            f"{max(peaks) / 1024:.0f} MB, trie {res['trie_memlock_bytes'] / 1e6:.0f} MB, host hash "
            f"{res['host_hash_memlock_bytes'] / 1e6:.0f} MB")
        d = lab.daemon(env=env)
        remote = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            lab.cli("apply", "-f", str(path), "--server", f"http://127.0.0.1:{d.port}", env=env)
            remote.append(time.perf_counter() - t0)
            assert _entries(lab) == n
            res["daemon_rss_kb"] = rss_kb(d.proc.pid)["VmRSS"]
            assert d.request("DELETE", "/rules")[0] == 200
        res["daemon_s"] = summary(remote)
        assert d.stop() == 0
        log(f"  shaper apply -f 1 x {n:,}, through the daemon: median {res['daemon_s']['median']:.2f}s, "
            f"daemon RSS {res['daemon_rss_kb'] / 1024:.0f} MB")
    return res


def _timed_bulk_put(d, body: dict, bulk: list[float], inside: list[float]) -> None:
    """One PUT /rules of `body`: its time seen by the client and inside the daemon; then clear."""
    t0 = time.perf_counter()
    status, out = d.request("PUT", "/rules", body)
    bulk.append(time.perf_counter() - t0)
    assert status == 200, out
    inside.append(d.logs()[-1]["seconds"])
    assert d.request("DELETE", "/rules")[0] == 200


def run(counts=(10, 100, 1000), repeats: int = 3, big: int = 100_000, tcconfig_repeats: dict | None = None,
        huge: int = 1_000_000, log=print) -> dict:
    ensure_tcconfig(log)
    tcconfig_repeats = tcconfig_repeats or {}
    res: dict = {"counts": list(counts), "repeats": repeats, "big": big, "tcconfig": tcconfig_version(), "rows": []}
    with Lab() as lab:
        d = lab.daemon()
        for n in counts:
            bulk, single, inside = [], [], []
            body = {"rules": rules_body(n)}
            for _ in range(repeats):
                _timed_bulk_put(d, body, bulk, inside)
                # A new connection per request, as curl or the CLI does (see section 3 on keep-alive).
                t0 = time.perf_counter()
                for rule in body["rules"]:
                    status, out = d.request("PUT", f"/rules/{rule['name']}", rule)
                    assert status == 200, out
                single.append(time.perf_counter() - t0)
                assert len(d.request("GET", "/rules")[1]["rules"]) == n
                assert d.request("DELETE", "/rules")[0] == 200
            res["rows"].append({"n": n, "method": "shaper PUT /rules (bulk)", "seconds": summary(bulk),
                                "inside_daemon_s": summary(inside)})
            res["rows"].append({"n": n, "method": "shaper PUT /rules/{name} x N", "seconds": summary(single)})
            log(f"  apply N={n}: bulk median {summary(bulk)['median'] * 1000:.1f} ms, "
                f"one at a time {summary(single)['median'] * 1000:.0f} ms")
        if big:
            per = big // 1000 if big >= 1000 else 1
            nrules = big // per
            body = {"rules": rules_body(nrules, per)}
            bulk, inside = [], []
            for _ in range(repeats):
                _timed_bulk_put(d, body, bulk, inside)
            res["rows"].append({"n": big, "method": f"shaper PUT /rules (bulk, {nrules} rules x {per} prefixes)",
                                "seconds": summary(bulk), "inside_daemon_s": summary(inside)})
            log(f"  apply {big} prefixes via the API: median {summary(bulk)['median']:.2f}s "
                f"(inside the daemon {summary(inside)['median']:.2f}s)")
        assert d.stop() == 0
    if huge:
        res["huge"] = cli_apply_huge(huge, max(1, repeats - 1), log)
    if big:
        res["rows"] += cli_apply(big, repeats, log)
        for nrules, per in ((1, big), (max(1, big // 100), 100) if big >= 100 else (1, big)):
            times, entries = library_apply(nrules, per, repeats)
            assert entries == nrules * per, entries
            res["rows"].append({"n": nrules * per, "method": f"shaper Controller.apply ({nrules} rules x {per} prefixes)",
                                "seconds": summary(times)})
            log(f"  library apply {nrules} x {per}: median {summary(times)['median']:.2f}s")
    shim = _lsmod_shim()
    try:  # removed however the run ends (a SIGTERM unwinds through here too)
        for n in counts:
            times, checks = [], []
            for _ in range(tcconfig_repeats.get(n, repeats)):
                elapsed, check = tcconfig_apply(n, shim)
                assert check["filters"] == n, check
                times.append(elapsed)
                checks.append(check)
            res["rows"].append({"n": n, "method": "tcconfig tcset --add x N", "seconds": summary(times),
                                "checks": checks})
            log(f"  tcconfig N={n}: median {summary(times)['median']:.2f}s ({len(times)} run(s)) {checks[-1]}")
    finally:
        shutil.rmtree(shim, ignore_errors=True)
    return res
