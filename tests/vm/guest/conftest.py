import os

import pytest

from lab import Lab


@pytest.fixture(scope="module")
def lab():
    assert os.path.exists("/sys/module/sch_netem"), "the guest kernel must have sch_netem loaded"
    with Lab() as lab:
        yield lab


@pytest.fixture(autouse=True)
def _stop_daemons_after_each_test(request):
    """The lab lives for a module (one classifier compile); a daemon a failed test left
    running would otherwise hold shp0 and fail the next test too."""
    yield
    if "lab" in request.fixturenames:
        request.getfixturevalue("lab").stop_daemons()
