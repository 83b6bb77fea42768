import os

import pytest

from shaper.lab import Lab


@pytest.fixture(scope="module")
def lab():
    assert os.path.exists("/sys/module/sch_netem"), "the guest kernel must have sch_netem loaded"
    with Lab() as lab:
        yield lab
