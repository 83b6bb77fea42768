"""Which interface shaper controls, and what it leaves when it is refused.

Identity is the network namespace and the ifindex, which a rename keeps: a
second controller given the new name is refused naming the first, pins made
under the old name are found and adopted under the new one, and a program
shaper did not pin is never taken for its own.  A start refused by a foreign
root qdisc leaves nothing, and a bpffs unmounted under the daemon changes
neither shaping nor readiness (the pins are put back).
"""

import os
import re
import subprocess
import tempfile

import pytest

from shaper.datapath.kernel import netns_id
from lab import POD_IF, V4, sh, wait_until

NEW_IF = "shpr0"


def rename(lab, old: str, new: str) -> None:
    sh("ip", "-n", lab.pod, "link", "set", old, "down")
    sh("ip", "-n", lab.pod, "link", "set", old, "name", new)
    sh("ip", "-n", lab.pod, "link", "set", new, "up")


def pins(lab, ifname: str, bpffs: str = "/sys/fs/bpf") -> str:
    return f"{bpffs}/shaper/{netns_id(lab.pod)}-{ifname}"


def tc_of(lab, ifname: str) -> str:
    parts = [sh("tc", "-n", lab.pod, what, "show", "dev", ifname).stdout for what in ("qdisc", "class")]
    parts.append(sh("tc", "-n", lab.pod, "filter", "show", "dev", ifname, "egress", check=False).stdout)
    return re.sub(r"direct_packets_stat \d+ ", "", "\n".join(parts))


def prog_id(lab, ifname: str) -> str | None:
    m = re.search(r" id (\d+)", sh("tc", "-n", lab.pod, "filter", "show", "dev", ifname, "egress").stdout)
    return m.group(1) if m else None


def local(lab, *args: str, iface: str, rules: str | None = None) -> subprocess.CompletedProcess:
    """A local command on `iface` (Lab.shaper always names POD_IF)."""
    import sys

    cmd = [sys.executable, "-m", "shaper", *args, "--iface", iface, "--netns", lab.pod]
    path = None
    if rules is not None:
        path = os.path.join(tempfile.gettempdir(), f"{lab.pod}-identity.yaml")
        with open(path, "w") as f:
            f.write(rules)
        cmd += ["-f", path]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        if path:
            os.unlink(path)


def test_a_renamed_interface_keeps_its_one_controller(lab):
    d = lab.daemon()
    assert d.request("PUT", "/rules/a", {"dst": [V4["a"]], "rate": "10mbit"})[0] == 200
    program = prog_id(lab, POD_IF)
    rename(lab, POD_IF, NEW_IF)
    try:
        # A second daemon on the new name: refused at its claim, naming the holder.
        d2 = lab.daemon("--iface", NEW_IF, port=2333, wait=False)
        assert d2.proc.wait(120) != 0
        assert f"process {d.proc.pid}" in d2.log_text() and "ifindex" in d2.log_text(), d2.log_text()
        # A local reset or apply by the new name is refused the same way and touches nothing.
        before = tc_of(lab, NEW_IF)
        for args, rules in ((("reset",), None), (("apply",), "rules: [{name: x, dst: [10.77.0.3], rate: 1mbit}]")):
            proc = local(lab, *args, iface=NEW_IF, rules=rules)
            assert proc.returncode != 0 and f"process {d.proc.pid}" in proc.stderr, proc.stderr
        assert tc_of(lab, NEW_IF) == before and prog_id(lab, NEW_IF) == program
        # The first daemon keeps working, on the interface it attached to.
        assert d.request("GET", "/readyz")[0] == 200
        assert d.request("PUT", "/rules/b", {"dst": [V4["b"]], "rate": "5mbit"})[0] == 200
        assert "5348:2" in sh("tc", "-n", lab.pod, "class", "show", "dev", NEW_IF).stdout
        assert d.stop() == 0
        # And removed exactly what it created: the interface is as it was, no pins anywhere.
        assert "5348" not in tc_of(lab, NEW_IF) and "clsact" not in tc_of(lab, NEW_IF)
        assert not os.path.exists(pins(lab, POD_IF)) and not os.path.exists(pins(lab, NEW_IF))
    finally:
        rename(lab, NEW_IF, POD_IF)


def test_pins_made_before_a_rename_are_adopted_under_the_new_name(lab):
    d = lab.daemon("--keep-on-exit")
    assert d.request("PUT", "/rules/a", {"dst": [V4["a"]], "rate": "10mbit"})[0] == 200
    assert d.stop() == 0
    program = prog_id(lab, POD_IF)
    rename(lab, POD_IF, NEW_IF)
    try:
        # show finds them by identity, without moving anything.
        shown = local(lab, "show", "-o", "json", iface=NEW_IF)
        assert shown.returncode == 0 and '"a"' in shown.stdout, shown.stderr
        d2 = lab.daemon("--iface", NEW_IF, port=2333)
        ready = [e for e in d2.logs() if e.get("event") == "daemon.ready"]
        assert ready and ready[0]["datapath"] == "adopted", d2.log_text()
        assert [r["name"] for r in d2.request("GET", "/rules")[1]["rules"]] == ["a"]
        assert prog_id(lab, NEW_IF) == program
        assert os.path.isdir(pins(lab, NEW_IF)) and not os.path.exists(pins(lab, POD_IF))
        assert d2.stop() == 0
        assert "5348" not in tc_of(lab, NEW_IF) and not os.path.exists(pins(lab, NEW_IF))
    finally:
        rename(lab, NEW_IF, POD_IF)


def test_reset_after_a_rename_removes_the_pins_made_under_the_old_name(lab):
    lab.shaper("apply", rules="rules: [{name: a, dst: [10.77.0.2], rate: 10mbit}]")
    rename(lab, POD_IF, NEW_IF)
    try:
        proc = local(lab, "reset", iface=NEW_IF)
        assert proc.returncode == 0 and "pins" in proc.stdout and "no pins here" not in proc.stdout, proc.stdout
        assert not os.path.exists(pins(lab, POD_IF)) and "5348" not in tc_of(lab, NEW_IF)
    finally:
        rename(lab, NEW_IF, POD_IF)


def test_a_start_refused_by_a_foreign_root_qdisc_leaves_nothing(lab):
    sh("tc", "-n", lab.pod, "qdisc", "add", "dev", POD_IF, "root", "handle", "1:", "htb")
    before = lab.tc_state()
    proc = lab.shaper("apply", check=False, rules="rules: [{name: a, dst: [10.77.0.2], rate: 10mbit}]")
    assert proc.returncode != 0 and "root qdisc shaper did not create" in proc.stderr, proc.stderr
    assert lab.tc_state() == before
    assert not os.path.exists(pins(lab, POD_IF))
    d = lab.daemon(port=2333, wait=False)
    assert d.proc.wait(120) != 0 and "root qdisc shaper did not create" in d.log_text()
    assert lab.tc_state() == before and not os.path.exists(pins(lab, POD_IF))
    shown = lab.shaper("show", check=False)
    assert shown.returncode == 0 and "not attached" in shown.stdout + shown.stderr
    sh("tc", "-n", lab.pod, "qdisc", "del", "dev", POD_IF, "root")


@pytest.fixture
def private_bpffs(monkeypatch):
    """A bpffs of this test's own (SHAPER_BPFFS), which it may unmount: the host's is shared."""
    base = tempfile.mkdtemp(prefix="shaper-bpffs-")
    sh("mount", "-t", "bpf", "bpf", base)
    monkeypatch.setenv("SHAPER_BPFFS", base)
    try:
        yield base
    finally:
        while sh("umount", base, check=False).returncode == 0:
            pass  # the daemon may have mounted it again on top
        os.rmdir(base)


def test_bpffs_unmounted_under_the_daemon_changes_neither_shaping_nor_readiness(lab, private_bpffs):
    d = lab.daemon("--keep-on-exit")
    assert d.request("PUT", "/rules/a", {"dst": [V4["a"]], "rate": "10mbit"})[0] == 200
    pin_dir = pins(lab, POD_IF, private_bpffs)
    assert os.path.isdir(pin_dir)
    sh("umount", private_bpffs)
    assert not os.path.exists(pin_dir)
    # One truth: the program the daemon holds is attached, so it is ready, changes work,
    # and the pins a restart needs are put back (logged).
    assert d.request("GET", "/readyz")[0] == 200
    assert d.request("PUT", "/rules/b", {"dst": [V4["b"]], "rate": "5mbit"})[0] == 200
    assert "5348:2" in sh("tc", "-n", lab.pod, "class", "show", "dev", POD_IF).stdout
    assert wait_until(lambda: os.path.exists(os.path.join(pin_dir, "classifier")), 30), d.log_text()
    events = [e.get("event") for e in d.logs()]
    assert "pins.missing" in events and "pins.restored" in events, d.log_text()
    # The restored pins are the live ones: a restart adopts the rules, and removes it all on exit.
    assert d.stop() == 0
    d2 = lab.daemon(port=2333)
    assert [e["datapath"] for e in d2.logs() if e.get("event") == "daemon.ready"] == ["adopted"], d2.log_text()
    assert [r["name"] for r in d2.request("GET", "/rules")[1]["rules"]] == ["a", "b"]
    assert d2.stop() == 0
    assert "5348" not in lab.tc_state() and "clsact" not in lab.tc_state() and not os.path.exists(pin_dir)


def test_a_daemon_that_followed_its_interface_keeps_it_through_a_rename(lab):
    d = lab.daemon()
    assert d.request("PUT", "/rules/a", {"dst": [V4["a"]], "rate": "10mbit"})[0] == 200
    lab.delete_link()
    lab.make_link()  # a new ifindex under the same name: the daemon follows it
    assert wait_until(lambda: any(e.get("event") == "interface.back" for e in d.logs()), 120), d.log_text()
    program = prog_id(lab, POD_IF)
    rename(lab, POD_IF, NEW_IF)
    try:
        d2 = lab.daemon("--iface", NEW_IF, port=2333, wait=False)
        assert d2.proc.wait(120) != 0
        assert f"process {d.proc.pid}" in d2.log_text() and f"knows it as {POD_IF}" in d2.log_text(), d2.log_text()
        assert prog_id(lab, NEW_IF) == program and os.path.isdir(pins(lab, POD_IF))
        assert d.request("PUT", "/rules/b", {"dst": [V4["b"]], "rate": "5mbit"})[0] == 200
        assert d.stop() == 0
        assert "5348" not in tc_of(lab, NEW_IF) and not os.path.exists(pins(lab, POD_IF))
    finally:
        rename(lab, NEW_IF, POD_IF)
