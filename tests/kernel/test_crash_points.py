"""kill -9 at every point of a change (kernel tier): after each, a fresh controller finds
the interrupted change, rolls it back and says so; the kernel then holds exactly the old
set, whose GET /rules can be PUT back.  The kill comes from tests/kernel/crashing.py."""

import logging
import subprocess
import sys
from pathlib import Path

import yaml

from shaper.control.controller import Controller
from shaper.datapath.kernel import KernelDatapath, claim_interface
from lab import POD_IF, ROOT, Daemon, wait_until
from shaper.core.model import parse_ruleset

CRASHING = Path(__file__).with_name("crashing.py")
SPLIT = 40  # entries per counted piece of a trie batch


def rule_set(prefix: str, names: range, second: int, rate: str, per_rule: int = 60) -> dict:
    return {"rules": [{"name": f"{prefix}{i}", "dst": [f"10.{second}.{i}.{j}" for j in range(per_rule)],
                       "rate": rate} for i in names]}


# Old: k0..k9 and o0..o9.  New: k0..k9 kept with another rate and other destinations,
# o* deleted, n0..n9 created.  Every kind of operation is in the plan.
# Two more rules cover ingress and ports: one moves from ingress to both directions and gains
# peers, the other changes its ports (its port group's entries are rewritten in place, and its
# host's value in the trie and the host hash with them: the one in-place host change).
OLD = {"rules": rule_set("k", range(10), 1, "10mbit")["rules"] + rule_set("o", range(10), 2, "20mbit")["rules"] + [
    {"name": "pi", "src": ["10.5.0.0/24"], "rate": "10mbit"},
    {"name": "pp", "dst": ["10.5.1.0/24", "10.5.3.1"], "protocol": "tcp", "ports": [5432], "rate": "10mbit"}]}
NEW = {"rules": rule_set("k", range(10), 3, "30mbit")["rules"] + rule_set("n", range(10), 4, "40mbit")["rules"] + [
    {"name": "pi", "dst": ["10.5.0.0/24", "10.5.2.0/24"], "direction": "both", "rate": "20mbit"},
    {"name": "pp", "dst": ["10.5.1.0/24", "10.5.3.1"], "protocol": "tcp", "ports": [5433, "6000-6100"],
     "rate": "10mbit"}]}


def write(lab, name: str, rules: dict) -> Path:
    path = Path("/tmp") / f"{lab.pod}-{name}.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


def crashing_apply(lab, path: Path, n: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(CRASHING), str(n), str(SPLIT), "apply", "-f", str(path), "--iface", POD_IF,
           "--netns", lab.pod]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def kernel_state(lab):
    """What the kernel holds: the rules and tries (observe), the host hash, the tc tree.  The
    hash must agree with the trie after every roll-back: the classifier reads it first."""
    with lab.pinned_maps() as dp:
        observed = dp.observe()
        hosts = dict(dp.dst_host.items())
        trie_hosts = lab.trie_hosts(dp)
    assert hosts == trie_hosts, f"dst_host: {len(hosts)} entries, the trie's hosts: {len(trie_hosts)}"
    return observed, hosts, lab.tc_state()


def recover(lab, caplog):
    """A fresh controller's start: adopt, recover, and return (what it logged, the rules it holds)."""
    claim = claim_interface(POD_IF, lab.pod)
    dp = KernelDatapath(POD_IF, lab.pod)
    try:
        assert dp.attach() == "adopted"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shaper"):
            done = Controller(dp).recover()
        return done, caplog.text, [o.rule for o in dp.observe().rules.values()]
    finally:
        dp.close()
        claim.close()


def test_kill_9_at_every_sampled_point_of_an_apply_leaves_the_old_set(lab, caplog):
    old, new = write(lab, "old", OLD), write(lab, "new", NEW)
    lab.shaper("apply", rules=yaml.safe_dump(OLD))
    old_state = kernel_state(lab)
    total = crashing_apply(lab, new, 10**9)
    assert total.returncode == 0, total.stderr
    count = int(total.stderr.split("crashing: ")[1].split()[0])
    new_state = kernel_state(lab)
    assert count > 60 and new_state != old_state
    points = sorted(set(range(0, 4)) | set(range(4, count, max(1, count // 14))) | {count - 2, count - 1})
    for n in points:
        lab.shaper("apply", rules=yaml.safe_dump(OLD))
        assert kernel_state(lab) == old_state
        proc = crashing_apply(lab, new, n)
        assert proc.returncode == -9, f"point {n}: {proc.returncode} {proc.stderr}"
        done, logged, rules = recover(lab, caplog)
        if n == 0:  # killed before the intent was written: nothing happened
            assert done is None and kernel_state(lab) == old_state
            continue
        assert done is not None and "interrupted change (22 rule(s) -> 22) was found and rolled back" in logged, n
        assert kernel_state(lab) == old_state, f"after a kill at kernel operation {n} of {count}"
        # GET /rules of the adopted set, PUT back: valid, and no change.
        again = parse_ruleset({"rules": [r.to_dict() for r in rules]})
        dp = KernelDatapath(POD_IF, lab.pod)
        claim = claim_interface(POD_IF, lab.pod)
        try:
            dp.attach()
            assert Controller(dp).apply(again).ops == []
        finally:
            dp.close()
            claim.close()
    # After the last point, the change itself still goes through whole.
    assert crashing_apply(lab, new, 10**9).returncode == 0
    assert kernel_state(lab) == new_state
    old.unlink()
    new.unlink()


def test_kill_9_of_the_daemon_during_put_rules_is_rolled_back_and_logged_at_its_restart(lab):
    d = lab.daemon("--keep-on-exit")
    assert d.request("PUT", "/rules", OLD)[0] == 200
    d.stop()
    old_state = kernel_state(lab)
    for n in (7, 45):
        cmd = ["nsenter", f"--net=/run/netns/{lab.pod}", sys.executable, str(CRASHING), str(n), str(SPLIT), "run",
               "--iface", POD_IF, "--listen", "127.0.0.1:2332", "--keep-on-exit"]
        crashing = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        try:
            probe = Daemon.__new__(Daemon)
            probe.netns, probe.port = lab.pod, 2332

            def up() -> bool:
                try:
                    return Daemon.request(probe, "GET", "/readyz", timeout=5)[0] == 200
                except OSError:
                    return False

            assert wait_until(up, 120, 0.2), "the crashing daemon never became ready"
            try:
                Daemon.request(probe, "PUT", "/rules", NEW, timeout=60)
            except OSError:
                pass  # the daemon died mid-request: no answer is the point
            assert crashing.wait(60) == -9
        finally:
            if crashing.poll() is None:
                crashing.kill()
                crashing.wait()
        d2 = lab.daemon("--keep-on-exit")
        recovered = [x for x in d2.logs() if x["event"] == "rules.recovered"]
        assert recovered and recovered[0]["rules"] == 22 and recovered[0]["interrupted_to"] == 22, d2.log_text()
        status, body = d2.request("GET", "/rules")
        assert status == 200 and len(body["rules"]) == 22
        assert d2.request("PUT", "/rules", body)[0] == 200  # what GET /rules says can be PUT back
        d2.stop()
        assert kernel_state(lab) == old_state
