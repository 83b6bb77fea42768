import pytest

from lab import Lab
from tests.support.tiers import kernel_tier_problem, require_tier


@pytest.fixture(autouse=True)
def _kernel_tier():
    require_tier(kernel_tier_problem())


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab
