"""The fresh-machine tier: does `make setup` on a fresh Debian 12 (debootstrap minbase) install every program
that shaper, its tests, the bench and the scripts run? (A fresh machine once lacked busybox-static, and the VM
tier failed there while every developer's machine stayed green.) Needs root for debootstrap; the root
filesystem is made once (about a minute) and kept in /var/cache/shaper-fresh."""


import pytest

from tests.support.fresh_machine import (INDIRECT, ROOT, check, fresh_rootfs, host_providers, installed,
                                         pip_programs, repo_uses, setup_closure, setup_packages, unknown_packages)
from tests.support.tiers import require_tier, root_and_programs_problem


def fresh_tier_problem() -> str | None:
    return root_and_programs_problem("debootstrap", ("debootstrap", "apt-get", "apt-cache", "dpkg-query"))


@pytest.fixture(scope="module")
def rootfs():
    require_tier(fresh_tier_problem())
    return fresh_rootfs(log=lambda line: print(f"\n{line}"))


@pytest.fixture(scope="module")
def packages():
    return setup_packages((ROOT / "scripts" / "setup.sh").read_text())


def test_the_root_filesystem_is_a_fresh_minbase(rootfs):
    fresh = installed(rootfs)
    # A cache that something installed into would hide exactly what this tier looks for.
    assert {"dpkg", "apt", "coreutils", "bash"} <= fresh, sorted(fresh)
    assert not fresh & {"python3-minimal", "procps", "make", "busybox", "busybox-static", "iproute2"}, sorted(fresh)


def test_setup_installs_every_program_the_code_runs(rootfs, packages):
    fresh = installed(rootfs)
    added = setup_closure(rootfs, packages)
    report = check(repo_uses(), INDIRECT, host_providers, pip_programs(), fresh, added)
    print(f"\n{len(report.programs)} programs run by the code; minbase has {len(fresh)} packages, "
          f"setup's {len(packages)} add {len(added)}")
    for prog, how in sorted(report.satisfied.items()):
        print(f"  {prog:24} {how}")
    assert not report.problems, "\n".join(report.problems)
    assert report.satisfied["busybox"] == "busybox-static (setup)"


def test_every_package_setup_installs_exists_in_bookworm(packages):
    require_tier(fresh_tier_problem())
    assert "busybox-static" in packages, "virtme-ng needs a statically linked busybox"
    assert len(packages) == len(set(packages)), sorted(p for p in packages if packages.count(p) > 1)
    assert unknown_packages(packages) == [], "apt has no candidate for these in the configured bookworm sources"


def test_a_package_bookworm_lacks_is_found():
    require_tier(fresh_tier_problem())
    assert unknown_packages(["busybox-static", "no-such-package-shaper"]) == ["no-such-package-shaper"]


def test_a_package_setup_lacks_is_named(rootfs, packages):
    """The real lists, with one package taken out of setup's: the check names it and the code that needs it."""
    fresh = installed(rootfs)
    added = setup_closure(rootfs, [p for p in packages if p != "busybox-static"])
    report = check(repo_uses(), INDIRECT, host_providers, pip_programs(), fresh, added)
    assert any(p.startswith("busybox (run by lab/__init__.py run_in_vm") and "add busybox-static to PKGS" in p
               for p in report.problems), report.problems
