"""The CLI's client commands with click's CliRunner, against an in-process API over the fake datapath."""

import json

import pytest
import yaml
from click.testing import CliRunner

from shaper import client as client_mod
from shaper.api import Api
from shaper.cli import main
from shaper.fake import FakeDatapath
from shaper.service import Service

TOKEN = "tok-123"


@pytest.fixture
def daemon(monkeypatch):
    """Route the CLI's HTTP requests to an Api over a FakeDatapath; record what reached it."""
    fake = FakeDatapath()
    service = Service(fake, "eth0", clock=lambda: 10**12)
    service.start()
    api = Api(service, token=TOKEN)
    seen = []

    def transport(self, method, path, headers, body):
        seen.append((self.server, method, path, headers.get("Authorization")))
        resp = api.handle(method, path, headers, body, "cli")
        return resp.status, resp.body

    monkeypatch.setattr(client_mod.Client, "transport", transport)
    monkeypatch.setenv("SHAPER_TOKEN", TOKEN)
    monkeypatch.delenv("SHAPER_SERVER", raising=False)
    monkeypatch.delenv("SHAPER_TOKEN_FILE", raising=False)
    return fake, seen


def run(*args, env=None):
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output, result.stderr if hasattr(result, "stderr") else ""


def test_rule_set_get_list_del(daemon):
    fake, seen = daemon
    code, out, _ = run("rule", "set", "db", "--dst", "10.0.0.5", "--dst", "fd00::5", "--delay", "50ms",
                       "--jitter", "5ms", "--distribution", "normal", "--loss-ge", "p=1%,r=20%", "--rate", "2mbit",
                       "--gap", "2", "--reorder", "1%", "--ttl", "1h")
    assert code == 0, out
    assert out.split("\n")[0].split() == ["NAME", "DST", "IMPAIRMENT", "TTL"]
    assert "db" in out and "delay=50ms" in out and "1h" in out
    assert seen[-1] == ("http://127.0.0.1:2332", "PUT", "/rules/db", f"Bearer {TOKEN}")
    rule = fake.observe().rules["db"].rule
    assert rule.delay_us == 50_000 and rule.loss_ge.p_pct == 1 and rule.gap == 2 and rule.rate_bits == 2_000_000
    code, out, _ = run("rule", "get", "db", "-o", "json")
    assert code == 0 and json.loads(out)["loss_ge"] == {"p": "1%", "r": "20%", "loss_bad": "100%",
                                                       "loss_good": "0%"}
    code, out, _ = run("rule", "list", "-o", "yaml")
    assert code == 0 and [r["name"] for r in yaml.safe_load(out)["rules"]] == ["db"]
    code, out, _ = run("rule", "del", "db")
    assert code == 0 and out.strip() == "deleted db"
    assert run("rule", "list") == (0, "no rules\n", "")


def test_exit_codes_and_one_line_reasons(daemon):
    fake, _ = daemon
    code, out, err = run("rule", "set", "db", "--dst", "10.0.0.5", "--delay", "50 parsecs")
    assert code == 2 and err.count("\n") == 1 and err.startswith("shaper: delay: ")
    code, out, err = run("rule", "set", "db", "--dst", "10.0.0.5", "--loss-ge", "nonsense")
    assert code == 2 and "--loss-ge" in err
    code, out, err = run("rule", "del", "missing")
    assert code == 1 and err == "shaper: no rule named 'missing'\n"
    code, out, err = run("rule", "get", "missing")
    assert code == 1
    code, _, err = run("rule", "set", "db", "--dst", "10.0.0.5", "--delay", "5ms", env={"SHAPER_TOKEN": "wrong"})
    assert code == 1 and "Authorization" in err
    code, _, err = run("rule", "set", "db", "--delay", "5ms")  # click's own usage error
    assert code == 2 and "--dst" in err
    assert not fake.executed


def test_token_file_and_server_from_the_environment(daemon, tmp_path):
    _, seen = daemon
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    code, out, err = run("rule", "list", env={"SHAPER_TOKEN": None, "SHAPER_TOKEN_FILE": str(token_file),
                                              "SHAPER_SERVER": "http://10.1.2.3:9999"})
    assert code == 0, err
    assert seen[-1] == ("http://10.1.2.3:9999", "GET", "/rules", f"Bearer {TOKEN}")
    code, _, err = run("rule", "list", "--token-file", str(tmp_path / "absent"))
    assert code == 2 and "--token-file" in err
    code, _, err = run("rule", "list", "--server", "ftp://x")
    assert code == 2 and "--server" in err


def test_apply_and_reset_through_the_daemon(daemon, tmp_path):
    fake, seen = daemon
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: a, dst: [10.0.0.1], delay: 5ms}\n  - {name: b, dst: [10.0.0.2], "
                     "rate: 1mbit}\n")
    code, out, err = run("apply", "-f", str(rules), "--dry-run")
    assert code == 0 and "Would create class slot 1 (a)" in out and not fake.executed
    code, out, err = run("apply", "-f", str(rules))
    assert code == 0 and out == "http://127.0.0.1:2332: 2 rule(s) applied\n"
    assert seen[-1][1:3] == ("PUT", "/rules") and sorted(fake.observe().rules) == ["a", "b"]
    # One bad rule: exit 2, nothing changed (checked before anything is sent).
    rules.write_text("rules:\n  - {name: a, dst: [10.0.0.1], delay: 5ms}\n  - {name: c, dst: [10.0.0.3], "
                     "rate: quick}\n")
    sent = len(seen)
    code, out, err = run("apply", "-f", str(rules))
    assert code == 2 and "rules[1].rate" in err and len(seen) == sent
    assert run("apply", "-f", str(rules), "--netns", "x")[0] == 2
    code, out, err = run("reset")
    assert code == 0 and out == "http://127.0.0.1:2332: deleted 2 rule(s)\n" and not fake.observe().rules


def test_status_and_watch(daemon, monkeypatch):
    fake, _ = daemon
    run("rule", "set", "a", "--dst", "10.0.0.0/24", "--delay", "5ms")
    from shaper.model import Prefix

    for _ in range(4):
        fake.count(Prefix.parse("10.0.0.9", "x").addr, 10**12, nbytes=50)
    code, out, _ = run("status")
    assert code == 0
    header, row = out.strip().split("\n")
    assert header.split()[:3] == ["NAME", "CLASSID", "DST"] and "4p/200B" in row
    code, out, _ = run("status", "-o", "json")
    assert json.loads(out)["rules"][0]["matched_bytes"] == 200
    monkeypatch.setattr("time.sleep", lambda s: None)
    code, out, _ = run("status", "--watch", "--count", "3", "--interval", "0.5")
    assert code == 0 and out.count("every 0.5s") == 3


def test_unreachable_daemon_is_exit_1_with_a_hint(monkeypatch):
    import http.client

    class Refused(http.client.HTTPConnection):
        def connect(self):
            raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(http.client, "HTTPConnection", Refused)
    monkeypatch.delenv("SHAPER_SERVER", raising=False)
    code, _, err = run("rule", "list")
    assert code == 1
    assert err == ("shaper: cannot reach the shaper daemon at http://127.0.0.1:2332: Connection refused "
                   "(is `shaper run` running? set --server or SHAPER_SERVER)\n")


def test_every_command_has_help():
    from shaper.cli import main as group

    def walk(cmd, path):
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, path + [name])

    for path in walk(group, []):
        code, out, _ = run(*path, "--help")
        assert code == 0 and "Usage:" in out and len(out.split("\n")) > 3, path


def test_rule_names_complete_from_the_daemon(daemon):
    run("rule", "set", "db", "--dst", "10.0.0.5", "--delay", "5ms")
    run("rule", "set", "dns", "--dst", "10.0.0.53", "--delay", "5ms")
    run("rule", "set", "cache", "--dst", "10.0.0.6", "--delay", "5ms")
    from shaper.cli import _complete_rule_name

    ctx = main.make_context("shaper", ["rule", "get", "x"], resilient_parsing=True)
    assert _complete_rule_name(ctx, None, "d") == ["db", "dns"]
