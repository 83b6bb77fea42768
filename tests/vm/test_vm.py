"""The VM tier: boot each of Debian's stock kernels in /boot (they have sch_netem) under
virtme-ng and run tests/vm/guest inside it.  TCG only: /dev/kvm does not work for a guest here.

The newest kernel runs the netem, API, fuzzer, seed-scenario and node-agent tests; older
ones the netem, ingress and API tests.  Ingress runs on the older kernels only: 6.1 is
where the ifb's quirks live (it drops what mirred did not send it), and the kernel
tier covers ingress on the running kernel; the fuzzer and the seed scenario test
shaper, not the kernel.  Each suite takes 7-9 minutes under TCG on an idle machine and
15-25 on a busy one (ingress is about half of the 6.1 suite); the timeouts are 25 minutes each.
The guest kernel's errors and warnings are among the output.  A guest that dies without
the script's status (a panic) is booted once more, and a pass on that second boot still
warns with the first boot's last lines."""

import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from lab import VM_DIED, kernel_release, run_in_vm, vm_kernels
from tests.support.tiers import require_tier, vm_tier_problem

KERNELS = vm_kernels()
NEWEST = ("tests/vm/guest/test_netem.py tests/vm/guest/test_api.py tests/vm/guest/test_schemathesis.py "
          "tests/vm/guest/test_seed.py tests/vm/guest/test_agent.py")
OLDER = "tests/vm/guest/test_netem.py tests/vm/guest/test_ingress.py tests/vm/guest/test_api.py"
GUEST_TIMEOUT_S = 1500


def test_two_kernel_series_for_the_vm_tier():
    """6.1 and 6.12 differ in what netem accepts (duplicate): the tier must see both."""
    require_tier(vm_tier_problem())
    series = {".".join(kernel_release(k).split(".")[:2]) for k in KERNELS}
    require_tier(None if len(series) >= 2 else
                 f"one kernel series in /boot ({', '.join(sorted(series))}): run `make setup` "
                 "(linux-image-amd64 and linux-image-6.12-amd64)")


@pytest.mark.parametrize("kernel", KERNELS or [None], ids=lambda k: kernel_release(k) if k else "none")
def test_guest_suite_in_vm(kernel, tmp_path):
    require_tier(vm_tier_problem(kernel))
    suite = NEWEST if kernel == KERNELS[-1] else OLDER
    command = (f"SHAPER_IN_VM=1 SHAPER_REQUIRE_ALL_TIERS=1 {sys.executable} -m pytest {suite} -q -s "
               "-p no:cacheprovider -ra")

    def boot(n: int) -> subprocess.CompletedProcess:
        start = time.monotonic()
        print(f"\n--- VM {kernel_release(kernel)}, boot {n}: {suite} ---", flush=True)
        rwdir = tmp_path / f"boot{n}"
        rwdir.mkdir()
        # With the kernel's console: a guest that panics says why among the lines.
        return run_in_vm(command, str(rwdir), kernel=kernel, timeout=GUEST_TIMEOUT_S, console=True,
                         on_line=lambda line: print(f"[{time.monotonic() - start:6.1f}s] {line}", flush=True))

    proc = boot(1)
    if proc.returncode == VM_DIED:
        # The guest ended without the script's status: a kernel panic or qemu gone, not a
        # test's verdict.  Once in CI (6.12, no output at all) it did so and was not seen
        # again here; boot once more, and say so even when the second boot passes.
        first = proc.stdout.splitlines()[-40:]
        proc = boot(2)
        if proc.returncode == 0:
            warnings.warn(f"the {kernel_release(kernel)} guest died (vng status {VM_DIED}) and passed on a "
                          "second boot; the first boot's last lines:\n" + "\n".join(first))
    assert proc.returncode == 0, f"guest tests on {kernel_release(kernel)} failed (output above)"
    # pytest's own final line (the guests' output may itself say "skipped", e.g. schemathesis phases).
    final = [line for line in proc.stdout.splitlines() if re.fullmatch(r"=* ?\d+ passed.* in [\d.]+s.*", line)][-1]
    assert "skipped" not in final and "failed" not in final and "error" not in final, final


def test_every_guest_file_runs_on_some_kernel():
    """A guest test file in neither suite would never run, and the tier would still pass."""
    guest = {str(p) for p in Path("tests/vm/guest").glob("test_*.py")}
    assert guest and guest <= set(NEWEST.split()) | set(OLDER.split()), sorted(guest)
