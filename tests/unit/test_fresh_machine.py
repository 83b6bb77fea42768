"""The fresh-machine check's parts, without root: which programs it derives from code and scripts, and that
it fails, naming the program, the code and the package, when setup would not install one.
(The check itself, against a debootstrapped Debian 12, is tests/fresh.)"""

import ast
import struct
import sys

from tests.support.fresh_machine import (ROOT, Need, Use, _usr_merge, check, is_static, python_uses, repo_uses,
                                         runners, setup_packages, shell_commands, visible_helpers)

PYTHON = '''
import shutil, subprocess, sys
from lab import sh

def helper(*args):
    return subprocess.run(args, check=True)

def inns(ns, *cmd):
    return subprocess.run(["ip", "netns", "exec", ns, *cmd])

def cli(*args):
    return subprocess.run([sys.executable, "-m", "shaper", *args])

class Pair:
    def run(self, *cmd):
        return subprocess.run(["nsenter", "--net=/run/netns/x", *cmd])

def f(ns, pair, classify):
    sh("tc", "qdisc", "show")
    helper("ethtool", "-k", "eth0")
    inns(ns, "sysctl", "-w", "x=1")
    cli("apply", "-f", "x")
    cmd = ["nsenter", f"--net=/run/netns/{ns}", "prometheus", "--config.file=x"]
    subprocess.Popen(cmd)
    subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "10.0.0.1"])
    shutil.which("iperf3")
    subprocess.run([sys.executable, "-c", "pass"])
    pair.run("iptables", "-L")
    classify.run(log=print)
'''

SHELL = '''#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(gcc
      make)
opts=(--flag x)
helper() { echo hi; }
if [ "$(id -u)" != 0 ]; then
    echo "x" >&2
fi
for p in "${PKGS[@]}"; do
    dpkg-query -W "$p" | grep -q ok || missing+=("$p")
done
helper
VAR=1 openssl rand \\
    -hex 4 | tr a b
cat <<END
notacommand here
END
size=$(( 3 / 1 ))
echo "$(helper) $(uname -r)" && "${cmd[@]}"
.venv/bin/pip install x
/usr/bin/python3 -m venv .venv  # a comment: ls
'''


def programs(uses):
    return {u.program for u in uses}


def test_programs_from_python_argv_literals_helpers_and_exec_wrappers():
    tree = ast.parse(PYTHON)
    everywhere = {**runners(tree), "sh": ([], False, 0)}
    uses = python_uses(PYTHON, "x.py", visible_helpers(tree, everywhere))
    assert programs(uses) == {"tc", "ethtool", "ip", "sysctl", "nsenter", "prometheus", "ping", "iperf3",
                              "iptables"}
    assert Use("sysctl", "x.py:21") in uses and Use("ip", "x.py:21") in uses
    assert Use("prometheus", "x.py:24") in uses


def test_a_helper_is_only_what_a_module_defines_or_imports():
    everywhere = {"sh": ([], False, 0)}
    assert python_uses("def g():\n    sh('tc')\n", "y.py", visible_helpers(ast.parse("x = 1"), everywhere)) == []
    shadowed = "def sh(*a):\n    return a\n\ndef g():\n    sh('tc')\n"
    assert python_uses(shadowed, "y.py", visible_helpers(ast.parse(shadowed), everywhere)) == []
    imported = "from lab import sh\n\ndef g():\n    sh('tc')\n"
    assert python_uses(imported, "y.py", visible_helpers(ast.parse(imported), everywhere)) == [Use("tc", "y.py:4")]


def test_programs_from_shell_scripts():
    found = shell_commands(SHELL)
    assert {w for _, w in found} == {"dirname", "id", "dpkg-query", "grep", "openssl", "tr", "cat", "uname",
                                     "/usr/bin/python3"}
    assert (15, "openssl") in found and (16, "tr") not in found and (23, "/usr/bin/python3") in found


def test_setup_packages_reads_every_array_and_the_real_list():
    assert setup_packages("PKGS=(a b  # why\n  c)\nPKGS+=(d \"$x\")\nOTHER=(e)\n") == ["a", "b", "c", "d"]
    real = setup_packages((ROOT / "scripts" / "setup.sh").read_text())
    assert "busybox-static" in real and "iproute2" in real


def test_the_repository_scan_finds_what_the_code_runs():
    uses = repo_uses()
    found = programs(uses)
    assert {"ip", "tc", "nsenter", "ping", "podman", "openssl", "debootstrap", "gcc", "prometheus", "vng",
            "sysctl", "make"} <= found, sorted(found)
    # Arguments are never taken for programs (shaper's subcommands, options, array words).
    assert not found & {"apply", "show", "reset", "rule", "status", "busybox-static"}
    assert not [p for p in found if p.startswith("-")]
    for u in uses:
        path, line = u.where.rsplit(":", 1)
        assert (ROOT / path).is_file() and int(line) > 0, u


def fake_providers(table):
    return lambda progs: {p: table.get(p, (None, set())) for p in progs}


def test_check_names_the_program_the_code_and_the_package():
    uses = [Use("tc", "a.py:1"), Use("frobnicate", "x.py:3"), Use("sysctl", "lab.py:9"), Use("vng", "lab.py:5")]
    needs = [Need("busybox", "lab.py run_in_vm", "the initramfs", package="busybox-static", static=True)]
    table = {"tc": ("/usr/sbin/tc", {"iproute2"}), "sysctl": ("/usr/sbin/sysctl", {"procps"}),
             "busybox": ("/bin/busybox", {"busybox"})}
    report = check(uses, needs, fake_providers(table), pip={"vng"}, fresh={"coreutils"},
                   added={"iproute2", "busybox-static"}, static=lambda path: False, conditional={})
    by = {p.split()[0]: p for p in report.problems}
    assert set(by) == {"frobnicate", "sysctl", "busybox"}, report.problems
    assert "x.py:3" in by["frobnicate"] and "no Debian package" in by["frobnicate"]
    assert "lab.py:9" in by["sysctl"] and "add procps to PKGS in scripts/setup.sh" in by["sysctl"]
    assert "statically linked" in by["busybox"]
    assert report.satisfied["tc"] == "iproute2 (setup)" and report.satisfied["vng"] == "pip (.venv)"

    fixed = check(uses[:1] + uses[2:], needs, fake_providers(table), pip={"vng"}, fresh={"coreutils"},
                  added={"iproute2", "busybox-static", "procps"}, static=lambda path: True, conditional={})
    assert fixed.problems == [] and fixed.satisfied["busybox"] == "busybox-static (setup)"


def test_a_needed_package_missing_from_setup_is_named_even_if_another_provides_the_program():
    needs = [Need("busybox", "lab.py run_in_vm", "the initramfs", package="busybox-static", static=True)]
    report = check([], needs, fake_providers({"busybox": ("/bin/busybox", {"busybox"})}), pip=set(),
                   fresh=set(), added={"busybox"}, static=lambda path: True, conditional={})
    assert len(report.problems) == 1 and "add busybox-static to PKGS" in report.problems[0]


def elf(tmp_path, kinds):
    """A minimal 64-bit ELF header with one program header per kind (3 is PT_INTERP)."""
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56,
                                                            len(kinds), 0, 0, 0)
    path = tmp_path / f"elf{len(kinds)}{kinds[0]}"
    path.write_bytes(header + b"".join(struct.pack("<II", k, 0) + bytes(48) for k in kinds))
    return str(path)


def test_is_static_reads_the_program_headers(tmp_path):
    assert is_static(elf(tmp_path, [1, 1]))
    assert not is_static(elf(tmp_path, [6, 3, 1]))
    assert not is_static(sys.executable)  # Debian's python3 is dynamically linked


def test_usr_merge_aliases():
    assert "/usr/bin/ip" in _usr_merge("/bin/ip") and "/sbin/tc" in _usr_merge("/usr/sbin/tc")
