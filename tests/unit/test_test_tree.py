"""The test tree itself: every tier's modules collect together in one `make test` run."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_two_host_test_modules_share_a_name():
    # tests/ is not a package: pytest imports each module by its basename, and a second
    # module of the same name stops the whole run at collection ("import file mismatch").
    # The guest suite is collected only inside the VM (tests/vm/conftest.py).
    names = Counter(p.name for p in TESTS.rglob("test_*.py") if "guest" not in p.parts)
    assert [n for n, c in names.items() if c > 1] == []
