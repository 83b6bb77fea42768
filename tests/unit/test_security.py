"""Security properties checked on the code itself: no shell, no secret echoed."""

import ast
import json
from pathlib import Path

from shaper.http.api import Api
from shaper.datapath.fake import FakeDatapath
from shaper.control.service import Service

PACKAGE = Path(__file__).resolve().parents[2] / "shaper"
# The product runs no command except the loader's one child (`python -m shaper.datapath.loader
# PIN_DIR`, an argv list); test and demo tooling (namespaces, ping, the VM) is lab/, not shipped.


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_shell_and_no_subprocess_outside_the_loader():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node, name in calls(tree):
            assert name not in ("os.system", "os.popen", "os.execl", "os.execlp", "os.spawnl", "eval", "exec"), \
                f"{path.name}:{node.lineno} calls {name}"
            for kw in node.keywords:
                assert not (kw.arg == "shell" and ast.unparse(kw.value) != "False"), f"{path.name}:{node.lineno}"
        imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        if path.name == "loader.py":
            runs = [node for node, name in calls(tree) if name.startswith("subprocess.")]
            assert len(runs) == 1 and isinstance(runs[0].args[0], ast.List), "the loader runs one argv list"
        elif path.name == "discover.py":
            # The agent asks container runtimes (podman, crictl): one subprocess call, through `run`,
            # and every run given a literal argv list whose program is a literal.
            runs = [node for node, name in calls(tree) if name.startswith("subprocess.")]
            assert len(runs) == 1 and ast.unparse(runs[0].args[0]) == "argv", "discover runs argv through _run"
            asked = [node for node, name in calls(tree) if name == "self.run"]
            assert asked and all(isinstance(n.args[0], ast.List) and isinstance(n.args[0].elts[0], ast.Constant)
                                 for n in asked), "every runtime command is a literal argv list"
        else:
            assert "subprocess" not in imported, f"{path.name} imports subprocess"


def test_a_wrong_token_is_not_echoed_and_not_logged(caplog):
    service = Service(FakeDatapath(), "eth0", clock=lambda: 10**12)
    service.start()
    api = Api(service, token="the-real-secret")
    caplog.set_level("DEBUG")
    resp = api.handle("PUT", "/rules/a", {"Authorization": "Bearer leak-me-123"},
                      json.dumps({"dst": ["10.0.0.1"]}).encode())
    assert resp.status == 401 and b"leak-me" not in resp.body and b"the-real-secret" not in resp.body
    ok = api.handle("PUT", "/rules/a", {"Authorization": "Bearer the-real-secret"},
                    json.dumps({"dst": ["10.0.0.1"], "rate": "1mbit"}).encode())
    assert ok.status == 200 and b"the-real-secret" not in ok.body
    assert "the-real-secret" not in caplog.text and "leak-me" not in caplog.text
    assert "rule.put" in caplog.text  # the change itself was logged
