"""`ip netns exec NS shaper ...` behaves exactly like `nsenter --net=/run/netns/NS shaper ...` (kernel tier).

`ip netns exec` gives the command a private mount namespace with a fresh
/sys, hiding the host's bpffs: without care shaper pinned into a bpffs that
died with the command, then lost its state.  Here every command is run the way
a person types it, and the pins, the tc objects and the counters are checked
from outside.  Also: a classifier at shaper's pref that shaper cannot account
for is reported and never replaced; reset removes the clsact qdisc whenever
shaper added it, even with the pins gone.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest

from lab import POD_IF, ROOT, V4, Daemon, sh, wait_until

RULES = f"rules:\n  - {{name: a, dst: [{V4['a']}], rate: 10mbit}}\n  - {{name: b, dst: [{V4['b']}], rate: 50mbit}}\n"
RATE_ONLY = f"rules:\n  - {{name: a, dst: [{V4['a']}], rate: 10mbit}}\n"


def ip_netns_exec(lab, *args: str, rules: str | None = None, check: bool = True,
                  prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`ip netns exec POD shaper ARGS --iface shp0`, as a person runs it (relative -f path included)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["ip", "netns", "exec", lab.pod, *prefix, sys.executable, "-m", "shaper", *args, "--iface", POD_IF]
        if rules is not None:
            with open(os.path.join(tmp, "rules.yaml"), "w") as f:
                f.write(rules)
            cmd += ["-f", "rules.yaml"]  # relative to the cwd: must survive rejoining the host's mounts
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
    return proc


def nsenter(lab, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["nsenter", f"--net=/run/netns/{lab.pod}", sys.executable, "-m", "shaper", *args, "--iface", POD_IF]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
    return proc


def pin_dir(lab) -> str:
    return f"/sys/fs/bpf/shaper/{os.stat(f'/run/netns/{lab.pod}').st_ino}-{POD_IF}"


def filter_line(lab) -> str:
    out = sh("tc", "-n", lab.pod, "filter", "show", "dev", POD_IF, "egress").stdout
    return next((line for line in out.splitlines() if " id " in line), "")


def prog_id(lab) -> str | None:
    line = filter_line(lab)
    return line.split(" id ")[1].split()[0] if line else None


def rules_of(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(proc.stdout)["rules"]}


def test_apply_show_reset_under_ip_netns_exec_match_nsenter(lab):
    before = lab.tc_state()
    ip_netns_exec(lab, "apply", rules=RULES)
    assert os.path.isdir(pin_dir(lab)), "pinned into a private bpffs that died with the command"
    prog = prog_id(lab)
    assert prog
    lab.send_udp(V4["a"], 50)

    seen = {"ip netns exec": rules_of(ip_netns_exec(lab, "show", "-o", "json")),
            "nsenter": rules_of(nsenter(lab, "show", "-o", "json")),
            "--netns": lab.show()}
    for how, rules in seen.items():
        assert sorted(rules) == ["a", "b"], how
        assert rules["a"]["matched_packets"] >= 50, how
    assert seen["ip netns exec"] == seen["nsenter"] == seen["--netns"]

    # A second apply adopts: same program, counters and classes kept.
    classes = sh("tc", "-n", lab.pod, "class", "show", "dev", POD_IF).stdout
    out = ip_netns_exec(lab, "apply", rules=RULES).stdout
    assert "0 change(s)" in out, out
    assert prog_id(lab) == prog
    assert sh("tc", "-n", lab.pod, "class", "show", "dev", POD_IF).stdout == classes
    assert rules_of(ip_netns_exec(lab, "show", "-o", "json"))["a"]["matched_packets"] >= 50

    out = ip_netns_exec(lab, "reset").stdout
    assert "clsact" in out and "pins" in out, out
    assert lab.tc_state() == before and not os.path.exists(pin_dir(lab))
    assert "nothing of shaper's" in ip_netns_exec(lab, "reset").stdout


def test_a_shell_under_ip_netns_exec_reaches_the_host_pins(lab):
    """`ip netns exec NS bash` then shaper in that shell: the nearest ancestor outside is the caller's."""
    ip_netns_exec(lab, "apply", rules=RATE_ONLY, prefix=("sh", "-c", 'exec "$@"', "sh"))
    assert os.path.isdir(pin_dir(lab))
    assert sorted(rules_of(nsenter(lab, "show", "-o", "json"))) == ["a"]
    nsenter(lab, "reset")


def _private_bpffs_apply(lab) -> None:
    """A shaper whose pins live in a bpffs nobody else sees (what `ip netns exec` used to cause)."""
    script = (f'mount -t bpf bpf /sys/fs/bpf && exec "{sys.executable}" -m shaper apply --iface {POD_IF} '
              f'-f "$0"')
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(RATE_ONLY)
        f.flush()
        sh("ip", "netns", "exec", lab.pod, "sh", "-c", script, f.name)


@pytest.mark.parametrize("how", ["ip netns exec", "--netns"])
def test_a_classifier_shaper_cannot_account_for_is_reported_never_replaced(lab, how):
    before = lab.tc_state()
    _private_bpffs_apply(lab)
    foreign = prog_id(lab)
    assert foreign and not os.path.exists(pin_dir(lab))
    run = (lambda *a, **k: ip_netns_exec(lab, *a, **k)) if how == "ip netns exec" else \
        (lambda *a, rules=None, **k: lab.shaper(*a, rules=rules, **k))

    shown = run("show", check=False)
    assert shown.returncode == 1 and f"program id {foreign}" in shown.stderr, shown
    refused = run("apply", rules=RULES, check=False)
    assert refused.returncode == 1 and "will not replace it" in refused.stderr, refused
    assert prog_id(lab) == foreign and not os.path.exists(pin_dir(lab))

    # reset removes it on request, and the clsact with it: the filter's name says shaper added it.
    assert "shaper_classifier+clsact" in filter_line(lab)
    out = run("reset").stdout
    assert f"program {foreign}" in out and "clsact" in out, out
    assert lab.tc_state() == before


def test_reset_keeps_a_clsact_shaper_did_not_add(lab):
    sh("tc", "-n", lab.pod, "qdisc", "add", "dev", POD_IF, "clsact")
    before = lab.tc_state()
    ip_netns_exec(lab, "apply", rules=RATE_ONLY)
    assert "shaper_classifier+clsact" not in filter_line(lab)
    ip_netns_exec(lab, "reset")
    assert lab.tc_state() == before and "clsact" in before


class IpNetnsExecDaemon(Daemon):
    """`ip netns exec POD shaper run`, the way a person starts it by hand."""

    def __init__(self, netns: str, port: int, args: tuple[str, ...] = ()):
        self.netns = netns
        self.port = port
        self.log = tempfile.NamedTemporaryFile(prefix=f"{netns}-daemon-", suffix=".log", delete=False)
        cmd = ["ip", "netns", "exec", netns, sys.executable, "-m", "shaper", "run", "--iface", POD_IF,
               "--listen", f"127.0.0.1:{port}", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, cwd=ROOT)


def start_daemon(lab) -> Daemon:
    d = IpNetnsExecDaemon(lab.pod, 2332)
    lab.daemons.append(d)  # the lab kills it, whatever happens
    d.wait_ready(timeout=120)
    return d


def test_daemon_under_ip_netns_exec_killed_and_restarted_adopts(lab):
    before = lab.tc_state()
    d = start_daemon(lab)
    assert d.request("PUT", "/rules/a", {"dst": [V4["a"]], "rate": "10mbit"})[0] == 200
    lab.send_udp(V4["a"], 40)
    handles, prog = lab.handles(), prog_id(lab)
    assert os.path.isdir(pin_dir(lab))
    d.stop(signal.SIGKILL)

    d2 = start_daemon(lab)
    assert [x for x in d2.logs() if x["event"] == "daemon.ready"][0]["datapath"] == "adopted"
    status, body = d2.request("GET", "/stats")
    assert status == 200 and [r["name"] for r in body["rules"]] == ["a"]
    assert body["rules"][0]["matched_packets"] >= 40  # counters survived the kill
    assert lab.handles() == handles and prog_id(lab) == prog  # nothing recreated, no class left behind
    assert d2.stop() == 0
    assert wait_until(lambda: lab.tc_state() == before, 10), lab.tc_state()
    assert not os.path.exists(pin_dir(lab))
