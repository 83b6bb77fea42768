"""The test tree itself: tests/ is one package, so every tier's modules collect together in one
`make test` run and import shared helpers as `tests.support.<module>`."""

import ast
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def python_dirs() -> set[Path]:
    return {p.parent for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts}


def test_every_directory_of_python_files_is_a_package():
    # Two tiers may each have a test_api.py only because pytest imports them as tests.unit.test_api
    # and tests.vm.guest.test_api. A directory without __init__.py would be imported by basename
    # again (a clash stops the whole run at collection: "import file mismatch"), and its modules
    # could not import tests.support without a sys.path edit.
    assert sorted(str(d.relative_to(TESTS)) for d in python_dirs() if not (d / "__init__.py").is_file()) == []
    assert (TESTS / "support" / "__init__.py").is_file()


def test_no_test_module_edits_sys_path():
    edits = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr in {"insert", "append"}
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "path"
                    and isinstance(node.value.value, ast.Name) and node.value.value.id == "sys"):
                edits.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert edits == []


def test_not_kernel_and_not_vm_selects_exactly_the_unit_tier():
    # The markers come from tests/conftest.py by directory; this is what a machine without root can run.
    proc = subprocess.run([sys.executable, "-m", "pytest", str(TESTS), "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "not kernel and not vm"], capture_output=True, text=True, cwd=TESTS.parent, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    selected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    unit = {str(p.relative_to(TESTS.parent)) for p in (TESTS / "unit").glob("test_*.py")}
    assert selected == unit
    assert re.search(r"\d+/\d+ tests collected \((\d+) deselected\)", proc.stdout), proc.stdout[-500:]
