"""Marks each test with its tier's marker (pyproject declares them), so a tier can be selected or left
out by marker as well as by path: `pytest tests -m "not kernel and not vm"` runs what needs no root."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Tier directory -> markers. The container and fresh tiers run as root on this kernel too, so they
# carry `kernel` as well as their own marker; tests/unit carries none.
TIER_MARKERS = {
    "kernel": ("kernel",),
    "container": ("kernel", "container"),
    "fresh": ("kernel", "fresh"),
    "vm": ("vm",),
}

# The compiled-classifier cache (shaper.datapath.objcache) of this run: one compile serves every
# daemon the tests start, and the host's /var/cache/shaper is neither read nor left written.
# A pytest run inside one (the VM tier's guests, the fresh tier) uses its parent's.
_OWN_CACHE = None if os.environ.get("SHAPER_CACHE_DIR") else tempfile.mkdtemp(prefix="shaper-test-cache-")
if _OWN_CACHE:
    os.environ["SHAPER_CACHE_DIR"] = _OWN_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(items):
    # A hook in a tier's own conftest would see every tier's items too, so the table lives here.
    for item in items:
        parts = Path(item.path).resolve().relative_to(TESTS).parts
        for name in TIER_MARKERS.get(parts[0], ()) if len(parts) > 1 else ():
            item.add_marker(getattr(pytest.mark, name))
