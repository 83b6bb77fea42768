#!/usr/bin/env python3
"""Write README.md's table of rule fields from shaper/core/fields.py (`make readme`).

With --check, change nothing: exit 1 if the table is stale (tests/unit/test_fields.py
checks the same).
"""

import argparse
import sys
from pathlib import Path

from shaper.core.fields import splice_readme

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's table is stale")
    args = parser.parse_args()
    text = README.read_text()
    fresh = splice_readme(text)
    if fresh == text:
        print(f"{README.name}: the rule-field table is current")
        return 0
    if args.check:
        print(f"{README.name}: the rule-field table is stale; run `make readme`", file=sys.stderr)
        return 1
    README.write_text(fresh)
    print(f"{README.name}: rule-field table written from shaper/core/fields.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
