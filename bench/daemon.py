"""Sections 3-5, against a running daemon (`shaper run` inside a lab's pod namespace):

3. change latency: from sending `PUT /rules/{name}` to the LPM trie steering the
   rule's new destination to its class (looked up in the pinned map, as the
   classifier does), over many changes, with 10 and with 1,000 rules in place;
4. no disruption: while one rule is changed (rate, destination, deleted and
   re-created) as fast as the API allows, UDP to two other rules' destinations
   is counted at the sender, in their HTB classes and at the receiver;
5. footprint: start to ready, RSS with 0, 1k rules and 100k prefixes, /metrics scrape time.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import tempfile
import time

from shaper.datapath import abi
from shaper.datapath.kernel import KernelDatapath
from lab import POD_IF, V4, Lab, sh
from shaper.core.model import Prefix
from shaper.datapath.tc import in_netns

from .common import load_seconds, percentile, sender_binary, summary


def _key(cidr: str) -> bytes:
    p = Prefix.parse(cidr, "dst")
    return abi.pack_key(p.prefixlen, p.addr)


def _put(conn_factory, path: str, body: dict) -> int:
    conn = conn_factory()
    try:
        conn.request("PUT", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _base_rules(n: int) -> list[dict]:
    return [{"name": f"r{i}", "dst": [f"10.{100 + i // 250}.{i % 250}.0/24"], "rate": "10mbit"} for i in range(n)]


def change_latency(rule_counts=(10, 1000, 10000), changes: int = 1000, keepalive_changes: int = 1000,
                   log=print) -> dict:
    res: dict = {"changes": changes, "rows": []}
    with Lab() as lab:
        d = lab.daemon()
        dp = KernelDatapath(POD_IF, lab.pod)
        dp.open_maps()
        try:
            for nrules in rule_counts:
                rules = _base_rules(nrules)
                assert d.request("PUT", "/rules", {"rules": rules})[0] == 200
                slot = {}
                for r in rules[:min(nrules, changes)]:
                    val = dp.lpm.lookup(_key(r["dst"][0]))
                    slot[r["name"]] = abi.unpack_entry(val).slot

                def measure(count: int, keepalive: bool) -> tuple[list[float], int]:
                    # Each pass its own destinations (10.240/16, then 10.241/16): a change that put back what
                    # the rule already held would be no change at all.
                    net = 241 if keepalive else 240
                    lat: list[float] = []
                    polls = 0
                    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60) if keepalive else None
                    fresh = lambda: http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)  # noqa: E731
                    for k in range(count):
                        rule = rules[k % nrules]
                        new = f"10.{net}.{(k >> 8) & 255}.{k & 255}/32"
                        # A rate no change used before: every change also changes the class.
                        body = {"dst": [rule["dst"][0], new], "rate": f"{1000 + k + (5000 if keepalive else 0)}kbit"}
                        key = _key(new)
                        t0 = time.perf_counter()
                        if keepalive:
                            conn.request("PUT", f"/rules/{rule['name']}", body=json.dumps(body))
                            resp = conn.getresponse()
                            resp.read()
                            status = resp.status
                        else:
                            status = _put(fresh, f"/rules/{rule['name']}", body)
                        assert status == 200, status
                        while True:  # the kernel steers the new destination to the rule's class
                            val = dp.lpm.lookup(key)
                            if val and abi.unpack_entry(val).slot == slot[rule["name"]]:
                                break
                            polls += 1
                            if time.perf_counter() - t0 > 10:
                                raise AssertionError(f"{new} not steered to {rule['name']} after 10 s")
                        lat.append(time.perf_counter() - t0)
                    if conn:
                        conn.close()
                    return lat, polls

                nlogs = len(d.logs())
                lat, polls = in_netns(lab.pod, lambda: measure(changes, False))
                inside = [e["seconds"] for e in d.logs()[nlogs:] if e.get("event") == "rule.put"]
                ka, _ = in_netns(lab.pod, lambda: measure(keepalive_changes, True)) if keepalive_changes else ([], 0)
                row = {"rules": nrules, "changes": len(lat), "p50_ms": percentile(lat, 50) * 1000,
                       "p99_ms": percentile(lat, 99) * 1000, "max_ms": max(lat) * 1000,
                       "min_ms": min(lat) * 1000, "inside_p50_ms": percentile(inside, 50) * 1000,
                       "inside_p99_ms": percentile(inside, 99) * 1000, "extra_polls": polls,
                       "samples_ms": [x * 1000 for x in lat], **_tail(lat, inside)}
                if ka:
                    row.update({"keepalive_changes": len(ka), "keepalive_p50_ms": percentile(ka, 50) * 1000,
                                "keepalive_p99_ms": percentile(ka, 99) * 1000,
                                "keepalive_samples_ms": [x * 1000 for x in ka]})
                res["rows"].append(row)
                log(f"  change latency with {nrules} rules: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                    f"max {row['max_ms']:.1f} ms (inside the daemon p50 {row['inside_p50_ms']:.1f} ms); "
                    f"keep-alive p50 {row.get('keepalive_p50_ms', 0):.1f} ms")
                assert d.request("DELETE", "/rules")[0] == 200
        finally:
            dp.close()
        assert d.stop() == 0
    return res


def _tail(lat: list[float], inside: list[float]) -> dict:
    """Where the slowest 1% of changes spent their time: the daemon's own (its log line's `seconds`,
    lock held to apply done, one line per change in order) against everything else (connection,
    HTTP, JSON, scheduling of the client, the server thread and the poll)."""
    if len(inside) != len(lat) or not lat:
        return {}
    slow = sorted(range(len(lat)), key=lat.__getitem__)[-max(1, len(lat) // 100):]
    return {"tail_n": len(slow), "tail_total_ms": percentile([lat[i] for i in slow], 50) * 1000,
            "tail_inside_ms": percentile([inside[i] for i in slow], 50) * 1000,
            "tail_inside_max_ms": max(inside[i] for i in slow) * 1000}


def _direct_packets(lab: Lab) -> int:
    out = json.loads(sh("tc", "-n", lab.pod, "-s", "-j", "qdisc", "show", "dev", POD_IF).stdout)
    return next(q["options"]["direct_packets_stat"] for q in out if q.get("kind") == "htb" and q.get("root"))


def no_disruption(seconds: float = 6.0, pps: float = 20_000, log=print) -> dict:
    """Two steady rules (a, b) carry paced UDP while rule 'churn' is changed continuously."""
    with Lab() as lab:
        d = lab.daemon()
        mac = json.loads(sh("ip", "-n", lab.dst, "-j", "link", "show", "shp1").stdout)[0]["address"]
        for name in ("a", "b", "c", "d"):  # no ARP crosses the qdisc while we count
            sh("ip", "-n", lab.pod, "neigh", "replace", V4[name], "lladdr", mac, "dev", POD_IF, "nud", "permanent")
        steady = {"a": V4["a"], "b": V4["b"]}
        rules = [{"name": n, "dst": [f"{a}/32"], "rate": "1gbit"} for n, a in steady.items()]
        rules.append({"name": "churn", "dst": [f"{V4['c']}/32"], "rate": "10mbit"})
        assert d.request("PUT", "/rules", {"rules": rules})[0] == 200
        binary = sender_binary()
        receiver = subprocess.Popen(["ip", "netns", "exec", lab.dst, binary, "recv", "0.0.0.0", str(seconds + 3)],
                                    stdout=subprocess.PIPE, text=True)
        dests = tempfile.NamedTemporaryFile("w", suffix=".dst")
        try:
            assert receiver.stdout.readline().strip() == "ready"
            before = {r["name"]: r for r in d.request("GET", "/stats")[1]["rules"]}
            direct0 = _direct_packets(lab)
            dests.write("\n".join(steady.values()) + "\n")
            dests.flush()
            sender = subprocess.Popen(["ip", "netns", "exec", lab.pod, binary, "blast", str(seconds), "18",
                                       dests.name, str(pps)], stdout=subprocess.PIPE, text=True)
            changes = {"put": 0, "delete": 0, "failed": 0}
            t_end = time.monotonic() + seconds - 0.5
            time.sleep(0.3)

            def churn() -> None:
                k = 0
                fresh = lambda: http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)  # noqa: E731
                while time.monotonic() < t_end:
                    k += 1
                    if k % 20 == 0:
                        conn = fresh()
                        conn.request("DELETE", "/rules/churn")
                        resp = conn.getresponse()
                        resp.read()
                        conn.close()
                        changes["delete" if resp.status == 200 else "failed"] += 1
                        continue
                    body = {"dst": [f"{V4['c' if k % 2 else 'd']}/32"], "rate": f"{10 * (1 + k % 3)}mbit"}
                    status = _put(fresh, "/rules/churn", body)
                    changes["put" if status == 200 else "failed"] += 1

            in_netns(lab.pod, churn)
            sent = sender.communicate(timeout=seconds + 30)[0].split()
            received = int(receiver.communicate(timeout=seconds + 30)[0].split()[-3])
        finally:
            dests.close()
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        after = {r["name"]: r for r in d.request("GET", "/stats")[1]["rules"]}
        direct = _direct_packets(lab) - direct0
        assert d.stop() == 0
    sent_n, errors = int(sent[0]), int(sent[1])
    classified = sum(after[n]["class_packets"] - before[n]["class_packets"] for n in steady)
    matched = sum(after[n]["matched_packets"] - before[n]["matched_packets"] for n in steady)
    drops = sum(after[n]["drops"] - before[n]["drops"] for n in steady)
    res = {"seconds": seconds, "pps": pps, "sent": sent_n, "send_errors": errors, "received": received,
           "lost": sent_n - received, "classified": classified, "matched": matched, "class_drops": drops,
           "unshaped": sent_n - classified, "direct_queue_packets": direct, "changes": changes}
    log(f"  no disruption: {res}")
    return res


def rss_kb(pid: int) -> dict:
    text = open(f"/proc/{pid}/status").read()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) for k in ("VmRSS", "VmHWM")}


def _scrapes(d, count: int, nrules: int) -> tuple[dict, str]:
    """`count` scrapes of /metrics timed (a summary), and the last one's text, checked for a series per rule."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        status, text = d.request("GET", "/metrics")
        times.append(time.perf_counter() - t0)
        assert status == 200
    assert sum(1 for line in text.splitlines() if line.startswith("shaper_class_bytes_total{")) == nrules
    return summary(times), text


def _series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def _series_by_family(text: str) -> dict[str, int]:
    """Series per metric family (its name without _total, _bucket, ... suffixes), most first."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def footprint(starts: int = 3, scrapes: int = 20, big: int = 100_000, log=print) -> dict:
    res: dict = {}
    with Lab() as lab:
        load_seconds(cached=True)  # the cache holds the classifier, as after any first load on a machine
        ready_s = []
        for i in range(starts):
            t0 = time.perf_counter()
            d = lab.daemon(wait=False)

            def ready() -> bool:
                try:
                    return d.request("GET", "/readyz")[0] == 200
                except OSError:
                    return False

            while not ready():
                if d.proc.poll() is not None or time.perf_counter() - t0 > 60:
                    raise RuntimeError(f"daemon did not become ready: {d.log_text()}")
                time.sleep(0.01)
            ready_s.append(time.perf_counter() - t0)
            if i < starts - 1:
                assert d.stop() == 0
        res["ready_s"] = summary(ready_s)
        res["compile_s"] = summary([load_seconds(cached=False) for _ in range(starts)])
        res["cached_load_s"] = summary([load_seconds(cached=True) for _ in range(starts)])
        time.sleep(0.5)
        res["rss_0"] = rss_kb(d.proc.pid)
        assert d.request("PUT", "/rules", {"rules": _base_rules(1000)})[0] == 200
        res["rss_1k"] = rss_kb(d.proc.pid)
        res["scrape_1k_s"], text = _scrapes(d, scrapes, 1000)
        res["scrape_bytes"] = len(text)
        res["series_1k"] = _series(text)
        assert d.request("PUT", "/rules", {"rules": _base_rules(10_000)})[0] == 200
        res["rss_10k"] = rss_kb(d.proc.pid)
        res["scrape_10k_s"], text = _scrapes(d, scrapes, 10_000)
        res["scrape_10k_bytes"] = len(text)
        res["series_10k"] = _series(text)
        res["series_10k_by_family"] = _series_by_family(text)
        if big:
            per = max(1, big // 1000)
            nrules = big // per
            body = [{"name": f"r{i}", "dst": [f"10.{128 + ((i * per + j) >> 16)}.{((i * per + j) >> 8) & 255}."
                                               f"{(i * per + j) & 255}/32" for j in range(per)], "rate": "10mbit"}
                    for i in range(nrules)]
            assert d.request("PUT", "/rules", {"rules": body})[0] == 200
            res["rss_big"] = rss_kb(d.proc.pid)
            res["big"] = big
        assert d.stop() == 0
    log(f"  footprint: ready {res['ready_s']}, RSS 0/1k/big {res['rss_0']} {res['rss_1k']} {res.get('rss_big')}, "
        f"scrape 1k {res['scrape_1k_s']}, 10k {res['scrape_10k_s']} ({res['series_10k']} series)")
    return res
