"""The VM tier: boot Debian's stock kernel (it has sch_netem) under virtme-ng, once,
and run tests/vm/guest inside it.  TCG only: /dev/kvm does not work for a guest here."""

import os
import subprocess
import sys

from shaper.lab import ROOT
from tiers import require_tier, vm_kernel, vm_tier_problem, vng_path

GUEST_TIMEOUT_S = 1500


def run_in_vm(tmp_path, command: str) -> subprocess.CompletedProcess:
    script = tmp_path / "guest.sh"
    script.write_text(
        "set -e\n"
        "modprobe -a sch_netem sch_htb sch_ingress cls_bpf veth\n"
        f"cd {ROOT}\n"
        f"export SHAPER_IN_VM=1 SHAPER_REQUIRE_ALL_TIERS=1 PYTHONDONTWRITEBYTECODE=1 TMPDIR={tmp_path}\n"
        f"{command}\n"
    )
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"}
    cmd = [vng_path(), "-r", vm_kernel(), "--disable-kvm", "--force-9p", "--memory", "2G", "--cpus", "2",
           "--rwdir", str(tmp_path), "--exec", f"bash {script}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=GUEST_TIMEOUT_S, env=env, cwd=ROOT,
                          stdin=subprocess.DEVNULL)


def test_netem_tier_in_vm(tmp_path):
    require_tier(vm_tier_problem())
    proc = run_in_vm(tmp_path, f"{sys.executable} -m pytest tests/vm/guest -q -s -p no:cacheprovider -ra")
    print(proc.stdout[-12000:])
    print(proc.stderr[-3000:], file=sys.stderr)
    assert proc.returncode == 0, "guest tests failed (output above)"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout and " failed" not in proc.stdout
