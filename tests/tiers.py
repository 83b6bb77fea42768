"""Which test tiers can run here; in CI a tier that cannot run fails instead of skipping."""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from pathlib import Path

import pytest


def require_tier(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get("CI") or os.environ.get("SHAPER_REQUIRE_ALL_TIERS"):
        pytest.fail(f"tier cannot run: {reason}")
    pytest.skip(reason)


def kernel_tier_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, BPF)"
    for tool in ("ip", "tc", "ping", "ss"):
        if not shutil.which(tool):
            return f"{tool} is not installed (run `make setup`)"
    return None


def vm_kernel() -> str | None:
    """Debian's generic stock kernel (netem as a module, 9p for virtme-ng), newest first."""
    images = [p for p in glob.glob("/boot/vmlinuz-*-amd64") if "cloud" not in p]
    key = lambda p: [int(x) if x.isdigit() else x for x in re.split(r"[.-]", p)]  # noqa: E731
    return sorted(images, key=key)[-1] if images else None


def vng_path() -> str | None:
    cand = Path(sys.executable).parent / "vng"
    return str(cand) if cand.exists() else shutil.which("vng")


def vm_tier_problem() -> str | None:
    problem = kernel_tier_problem()
    if problem:
        return problem
    if not vm_kernel():
        return "no Debian generic kernel image in /boot (apt-get install linux-image-amd64)"
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    if not vng_path():
        return "virtme-ng is not installed (pip install virtme-ng)"
    return None
