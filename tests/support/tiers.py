"""Which test tiers can run here; in CI a tier that cannot run fails instead of skipping."""

from __future__ import annotations

import os
import shutil

import pytest

from lab import vm_kernel, vm_kernel_problem, vng_path


def require_tier(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get("CI") or os.environ.get("SHAPER_REQUIRE_ALL_TIERS"):
        pytest.fail(f"tier cannot run: {reason}")
    pytest.skip(reason)


def root_and_programs_problem(root_for: str, programs: tuple[str, ...]) -> str | None:
    """Why a tier that needs root (for `root_for`) and `programs` on PATH cannot run, or None."""
    if os.geteuid() != 0:
        return f"needs root ({root_for})"
    for tool in programs:
        if not shutil.which(tool):
            return f"{tool} is not installed (run `make setup`)"
    return None


def kernel_tier_problem() -> str | None:
    return root_and_programs_problem("network namespaces, tc, BPF", ("ip", "tc", "ping", "ss"))


def vm_tier_problem(kernel: str | None = None) -> str | None:
    """Why the VM tier (or its run on `kernel`, an image in /boot) cannot run here."""
    problem = kernel_tier_problem()
    if problem:
        return problem
    if not vm_kernel():
        return "no Debian generic kernel image in /boot (apt-get install linux-image-amd64)"
    if kernel and vm_kernel_problem(kernel):
        return vm_kernel_problem(kernel)
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    if not vng_path():
        return "virtme-ng is not installed (pip install virtme-ng)"
    return None
