"""The container tier: the image built with podman (base made by debootstrap, no registry) and
run as the webhook would inject it, in a "pod" network namespace."""

import os
import shutil
import subprocess
import uuid

import pytest

from lab import ROOT, Lab
from tests.support.tiers import kernel_tier_problem, require_tier

IMAGE = os.environ.get("SHAPER_IMAGE", "localhost/shaper:dev")
CONTAINERS_CONF = str(ROOT / "scripts" / "containers.conf")


def container_tier_problem() -> str | None:
    problem = kernel_tier_problem()
    if problem:
        return problem
    for tool in ("podman", "runc", "debootstrap"):
        if not shutil.which(tool):
            return f"{tool} is not installed (run `make setup`)"
    return None


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": CONTAINERS_CONF}
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, timeout=timeout, env=env)


@pytest.fixture(autouse=True)
def _container_tier():
    require_tier(container_tier_problem())


@pytest.fixture(scope="session")
def image() -> str:
    """Build the image from ./Dockerfile (scripts/image.sh, as `make image` does)."""
    require_tier(container_tier_problem())
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "image.sh")], capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "SHAPER_IMAGE": IMAGE, "CONTAINERS_CONF": CONTAINERS_CONF})
    assert proc.returncode == 0, f"image build failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    print(f"\n{proc.stdout.strip()}")
    return IMAGE


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab


@pytest.fixture
def bpffs(tmp_path):
    """A bpffs of the test's own, bound in as the node's /sys/fs/bpf would be."""
    where = tmp_path / "bpffs"
    where.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def containers():
    """Names for containers; each is removed at the end, whatever happened."""
    made: list[str] = []

    def name() -> str:
        made.append(f"shaper-test-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield name
    for n in made:
        podman("rm", "--force", "--time", "0", n, check=False)
