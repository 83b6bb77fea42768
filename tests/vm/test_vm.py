"""The VM tier: boot Debian's stock kernel (it has sch_netem) under virtme-ng, once,
and run tests/vm/guest inside it.  TCG only: /dev/kvm does not work for a guest here."""

import re
import sys

from shaper.lab import run_in_vm
from tiers import require_tier, vm_tier_problem

GUEST_TIMEOUT_S = 1500


def test_netem_tier_in_vm(tmp_path):
    require_tier(vm_tier_problem())
    proc = run_in_vm(f"SHAPER_IN_VM=1 SHAPER_REQUIRE_ALL_TIERS=1 {sys.executable} -m pytest tests/vm/guest -q -s "
                     "-p no:cacheprovider -ra", str(tmp_path), capture=True, timeout=GUEST_TIMEOUT_S)
    print(proc.stdout[-12000:])
    print(proc.stderr[-3000:], file=sys.stderr)
    assert proc.returncode == 0, "guest tests failed (output above)"
    # pytest's own final line (the guests' output may itself say "skipped", e.g. schemathesis phases).
    final = [line for line in proc.stdout.splitlines() if re.fullmatch(r"=* ?\d+ passed.* in [\d.]+s.*", line)][-1]
    assert "skipped" not in final and "failed" not in final and "error" not in final, final
