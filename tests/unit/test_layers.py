"""The package's layers, checked on its imports: each module imports only its own layer or lower.

errors <- core <- datapath <- control <- http <- k8s <- daemon, agent, cli (README, "How it works").
A change that needs an upward import belongs in a higher layer, or needs an interface
(shaper.datapath.interface is how control reaches the kernel).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "shaper"
LAYERS = {"shaper.errors": 0, "shaper.core": 1, "shaper.datapath": 2, "shaper.control": 3, "shaper.http": 4,
          "shaper.k8s": 5, "shaper.daemon": 6, "shaper.agent": 6, "shaper.cli": 6, "shaper.__main__": 7, "shaper": 0}
# The pure core parses and plans; it never reaches the kernel, the network, files or processes.
CORE_MAY_IMPORT = {"__future__", "contextlib", "dataclasses", "itertools", "operator", "typing", "difflib", "gc",
                   "ipaddress", "json", "logging", "math", "re", "socket", "struct", "yaml", "zlib", "fnmatch",
                   "collections", "functools", "enum", "shaper"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (imports are absolute, to show the layer)"
            base = node.module or ""
            if base == "shaper":  # from shaper import __version__ / from shaper import daemon
                out += [(node.lineno, f"shaper.{a.name}" if a.name != "__version__" else "shaper") for a in node.names]
            else:
                out.append((node.lineno, base))
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_only_run_downward(path: Path):
    here = module_name(path)
    for lineno, name in imports(path):
        if name.split(".")[0] in ("lab", "tests", "bench"):
            pytest.fail(f"{path.name}:{lineno} imports {name}: test tooling is not part of the product")
        if name == "shaper" or name.startswith("shaper."):
            assert layer(name) <= layer(here), \
                f"{here} (layer {layer(here)}) imports {name} (layer {layer(name)}) at line {lineno}: an upward import"


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").glob("*.py")), ids=lambda p: p.name)
def test_the_core_does_no_io(path: Path):
    for lineno, name in imports(path):
        assert name.split(".")[0] in CORE_MAY_IMPORT, f"core/{path.name}:{lineno} imports {name}"
        assert not name.startswith("shaper.") or layer(name) <= 1, f"core/{path.name}:{lineno} imports {name}"


def test_the_check_sees_an_upward_import(tmp_path: Path):
    """The checks above can fail: a core module importing the datapath is refused."""
    assert layer("shaper.core.plan") == 1 and layer("shaper.datapath.abi") == 2
    assert layer("shaper.http.server") > layer("shaper.control.service") > layer("shaper.datapath.kernel")
    bad = PACKAGE / "core" / "model.py"
    assert module_name(bad) == "shaper.core.model"
    fake = tmp_path / "x.py"
    fake.write_text("from shaper.datapath import abi\nimport subprocess\n")
    found = imports(fake)
    assert (1, "shaper.datapath") in found and (2, "subprocess") in found
    assert layer("shaper.datapath") > layer(module_name(bad)) and "subprocess" not in CORE_MAY_IMPORT


def test_every_module_has_a_layer():
    for path in MODULES:
        name = module_name(path)
        assert any(name == k or name.startswith(k + ".") for k in LAYERS if k != "shaper") or name == "shaper", name
