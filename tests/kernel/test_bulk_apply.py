"""Bulk work from the command line: a rules file of 100,000 prefixes applied with `shaper apply -f`,
locally and through the daemon, lands whole in the trie and classifies traffic.  Times are
printed, never asserted (the benchmark measures them: bench/apply.py)."""

import subprocess
import time

from pyroute2 import IPRoute

from lab import POD_IF, V4, sh
from shaper.core.model import ClassParams
from shaper.datapath.tc import HTB_QUANTUM, ROOT, Tc, in_netns

BIG = 100_000


def write_rules(path, nrules: int, per: int, extra: str | None = None) -> None:
    """nrules rules of `per` /32s each in 10.128.0.0/10 (block style, as people write files);
    `extra` (an address in the lab) joins the first rule."""
    with open(path, "w") as f:
        f.write("rules:\n")
        for i in range(nrules):
            f.write(f"  - name: bulk-{i}\n    rate: 100mbit\n    dst:\n")
            if i == 0 and extra:
                f.write(f"      - {extra}/32\n")
            for j in range(i * per, (i + 1) * per - (1 if i == 0 and extra else 0)):
                n = (10 << 24) | (128 << 16) | j
                f.write(f"      - {n >> 24}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}/32\n")


def trie_entries(lab) -> int:
    with lab.pinned_maps() as dp:
        return dp.map_entries()


def timed(what: str, fn):
    t0 = time.perf_counter()
    out = fn()
    print(f"{what}: {time.perf_counter() - t0:.2f}s")
    return out


def test_apply_file_of_100k_prefixes_locally(lab, tmp_path):
    path = tmp_path / "big.yaml"
    write_rules(path, 1, BIG, extra=V4["a"])
    proc = timed("shaper apply -f (1 x 100,000, local)", lambda: lab.shaper("apply", "-f", str(path)))
    assert proc.stdout == f"{POD_IF}: 1 rule(s), 5 change(s)\n"
    assert proc.stderr == ""  # piped: no progress
    assert trie_entries(lab) == BIG
    # Read back in batches (BATCH_CHUNK a call) as one entry at a time does.
    with lab.pinned_maps() as dp:
        batched = timed("trie read in batches", lambda: list(dp.lpm.items()))
        dp.lpm._lookup_batch_ok = False
        one_by_one = timed("trie read one entry at a time", lambda: list(dp.lpm.items()))
    assert len(batched) == BIG and sorted(batched) == sorted(one_by_one)
    # The trie classifies: traffic to the one lab address among the 100,000 is the rule's.
    lab.send_udp(V4["a"], 50)
    (row,) = lab.show().values()
    assert row["name"] == "bulk-0" and len(row["dst"]) == BIG and row["matched_packets"] >= 50
    # The same file again: read back from the kernel, nothing to change.
    proc = timed("shaper apply -f again (no change)", lambda: lab.shaper("apply", "-f", str(path)))
    assert proc.stdout == f"{POD_IF}: 1 rule(s), 0 change(s)\n"
    assert trie_entries(lab) == BIG


def test_apply_files_of_100k_prefixes_through_the_daemon(lab, tmp_path):
    one, many = tmp_path / "one.yaml", tmp_path / "many.yaml"
    write_rules(one, 1, BIG, extra=V4["a"])
    write_rules(many, 1000, BIG // 1000, extra=V4["b"])
    d = lab.daemon()
    server = f"http://127.0.0.1:{d.port}"
    proc = timed("shaper apply -f (1 x 100,000, daemon)", lambda: lab.cli("apply", "-f", str(one), "--server", server))
    assert proc.stdout == f"{server}: 1 rule(s) applied\n" and proc.stderr == ""
    assert trie_entries(lab) == BIG
    print(f"  inside the daemon: {d.logs()[-1]['seconds']}s")
    # Replaced by 1,000 rules of 100: every old entry moved or removed, every new one there.
    proc = timed("shaper apply -f (1,000 x 100, daemon, replacing)",
                 lambda: lab.cli("apply", "-f", str(many), "--server", server))
    assert proc.stdout == f"{server}: 1000 rule(s) applied\n"
    assert trie_entries(lab) == BIG
    print(f"  inside the daemon: {d.logs()[-1]['seconds']}s")
    status, body = d.request("GET", "/rules")
    assert status == 200 and len(body["rules"]) == 1000
    assert sum(len(r["dst"]) for r in body["rules"]) == BIG
    lab.send_udp(V4["b"], 20)
    status, stats = d.request("GET", "/stats")
    assert {r["name"]: r["matched_packets"] for r in stats["rules"]}["bulk-0"] >= 20
    assert d.stop() == 0


def test_htb_class_as_pyroute2_makes_it(lab):
    """Classes are sent with options shaper encodes itself (tcdump.htb_class_options), once per
    parameters: the kernel holds exactly what pyroute2's own ipr.tc("replace-class", "htb", ...)
    makes, a 64-bit rate (40 Gbit/s, 10 Tbit/s) included."""
    tc = Tc(POD_IF, lab.pod)
    try:
        tc.ensure_root()
        params = [ClassParams(1_250_000, 3200), ClassParams(4_000_000_000, 4_000_000), ClassParams(1000, 1600),
                  ClassParams(125_000_000, 250_000), ClassParams(5_000_000_000, 10_000_000),
                  ClassParams(1_250_000_000_000, 2_500_000_000)]

        def reference() -> None:
            with IPRoute() as ipr:
                ipr.status["nlm_generator"] = False  # as Tc does: each call done when it returns
                for i, p in enumerate(params):
                    ipr.tc("replace-class", "htb", tc.ifindex, ROOT | (101 + i), parent=ROOT, rate=p.rate_bytes,
                           ceil=p.rate_bytes, burst=p.burst_bytes, cburst=p.burst_bytes, quantum=HTB_QUANTUM)

        in_netns(lab.pod, reference)
        for i, p in enumerate(params):
            tc.add_class(1 + i, p)
        tc.change_class(1, params[2])
        tc.change_class(1, params[0])
        out = sh("tc", "-n", lab.pod, "-d", "class", "show", "dev", POD_IF).stdout
        classes = {line.split()[2]: " ".join(line.split()[3:]) for line in out.splitlines()
                   if line.startswith("class htb")}
        for i in range(len(params)):
            assert classes[f"5348:{1 + i:x}"] == classes[f"5348:{101 + i:x}"], out
    finally:
        tc.close()
    assert subprocess.run(["tc", "-n", lab.pod, "qdisc", "del", "dev", POD_IF, "root"]).returncode == 0
