"""The CLI's client commands with click's CliRunner, against an in-process API over the fake datapath."""

import json

import click
import pytest
import yaml
from click.testing import CliRunner

from shaper.http import client as client_mod
from shaper.http.api import Api
from shaper.cli import main
from shaper.datapath.fake import FakeDatapath
from shaper.control.service import Service

TOKEN = "tok-123"


@pytest.fixture
def clock():
    """The daemon's CLOCK_MONOTONIC in ns; a test moves it forward by changing clock[0]."""
    return [10**12]


@pytest.fixture
def daemon(monkeypatch, clock):
    """Route the CLI's HTTP requests to an Api over a FakeDatapath; record what reached it."""
    fake = FakeDatapath()
    service = Service(fake, "eth0", clock=lambda: clock[0])
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
    assert "db" in out and "delay=50ms" in out and "1h0m0s left" in out
    assert seen[-1] == ("http://127.0.0.1:2332", "PUT", "/rules/db", f"Bearer {TOKEN}")
    rule = fake.observe().rules["db"].rule
    assert rule.delay_us == 50_000 and rule.loss_ge.p_pct == 1 and rule.gap == 2 and rule.rate_bits_per_s == 2_000_000
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
    assert seen[-1] == ("http://10.1.2.3:9999", "GET", "/stats", f"Bearer {TOKEN}")
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
    assert code == 0 and "+ a (created): dst 10.0.0.1/32, delay 5ms" in out and "slot" not in out
    assert not fake.executed
    code, out, err = run("apply", "-f", str(rules))
    assert code == 0 and out == "http://127.0.0.1:2332: 2 rule(s) applied\n"
    assert seen[-1][1:3] == ("PUT", "/rules") and sorted(fake.observe().rules) == ["a", "b"]
    # One bad rule: exit 2, nothing changed; the daemon's refusal names the file's line, as a local one does.
    rules.write_text("rules:\n  - {name: a, dst: [10.0.0.1], delay: 5ms}\n  - {name: c, dst: [10.0.0.3], "
                     "rate: quick}\n")
    executed = len(fake.executed)
    code, out, err = run("apply", "-f", str(rules))
    assert code == 2 and err.startswith(f"shaper: {rules}:3: rules[1].rate: cannot parse 'quick'"), err
    assert len(fake.executed) == executed and sorted(fake.observe().rules) == ["a", "b"]
    assert run("apply", "-f", str(rules), "--netns", "x")[0] == 2
    code, out, err = run("reset")
    assert code == 0 and out == "http://127.0.0.1:2332: deleted 2 rule(s)\n" and not fake.observe().rules


def test_apply_sends_the_file_as_written_and_checks_here_what_json_cannot_carry(daemon, tmp_path, monkeypatch):
    """A rules file shaped as a document goes to the daemon as written (it validates every body); one
    that is not, or holds a YAML value JSON has no form for (a date), is checked here: nothing is sent
    and the error names its line."""
    fake, seen = daemon
    bodies = []
    inner = client_mod.Client.transport

    def recording(self, method, path, headers, body):
        bodies.append(body)
        return inner(self, method, path, headers, body)

    monkeypatch.setattr(client_mod.Client, "transport", recording)
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: a\n    dst: 10.0.0.1\n    delay: 5ms\n")
    code, out, err = run("apply", "-f", str(rules))
    assert code == 0, err
    assert json.loads(bodies[-1]) == {"rules": [{"name": "a", "dst": "10.0.0.1", "delay": "5ms"}]}
    assert fake.observe().rules["a"].rule.delay_us == 5000
    sent = len(seen)
    rules.write_text("rules:\n  - name: a\n    dst: 10.0.0.1\n    ttl: 2026-12-03\n")
    code, out, err = run("apply", "-f", str(rules))
    assert code == 2 and err.startswith(f"shaper: {rules}:4: rules[0].ttl"), err
    rules.write_text("rules:\n  - name: a\n    dst: &x [x, x, x, x]\n    except: [*x, *x, *x, *x]\n")  # aliases
    code, out, err = run("apply", "-f", str(rules))
    assert code == 2 and err.startswith(f"shaper: {rules}:3: rules[0].dst[0]: "), err
    rules.write_text("- name: a\n  dst: 10.0.0.1\n")  # a list, not a document
    code, out, err = run("apply", "-f", str(rules))
    assert code == 2 and "expected a mapping" in err and len(seen) == sent
    rules.write_text("rules:\n")  # no rules: every rule removed, as before
    code, out, err = run("apply", "-f", str(rules))
    assert code == 0 and json.loads(bodies[-1]) == {"rules": []} and not fake.observe().rules


def test_apply_asks_for_a_minimal_answer_and_reads_either(daemon, tmp_path, monkeypatch):
    """`apply -f` asks the daemon for the names only (Prefer: return=minimal); a daemon from before
    that ignores the header and writes every rule back is counted the same."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: a, dst: [10.0.0.1], delay: 5ms}\n  - {name: b, dst: [10.0.0.2], "
                     "rate: 1mbit}\n")
    inner, answers = client_mod.Client.transport, []

    def recording(self, method, path, headers, body, strip=False):
        if strip:
            headers = {k: v for k, v in headers.items() if k != "Prefer"}
        status, raw = inner(self, method, path, headers, body)
        answers.append((headers.get("Prefer"), json.loads(raw)))
        return status, raw

    monkeypatch.setattr(client_mod.Client, "transport", recording)
    code, out, _ = run("apply", "-f", str(rules))
    assert code == 0 and out == "http://127.0.0.1:2332: 2 rule(s) applied\n"
    assert answers[-1] == ("return=minimal", {"names": ["a", "b"]})
    monkeypatch.setattr(client_mod.Client, "transport", lambda *a: recording(*a, strip=True))
    code, out, _ = run("apply", "-f", str(rules))
    assert code == 0 and out == "http://127.0.0.1:2332: 2 rule(s) applied\n"
    assert answers[-1][0] is None and [r["name"] for r in answers[-1][1]["rules"]] == ["a", "b"]


def test_status_and_watch(daemon, monkeypatch):
    fake, _ = daemon
    run("rule", "set", "a", "--dst", "10.0.0.0/24", "--delay", "5ms")
    from shaper.core.model import Prefix

    for _ in range(4):
        fake.count(Prefix.parse("10.0.0.9", "x").addr, 10**12, nbytes=50)
    code, out, _ = run("status")
    assert code == 0
    header, row = out.strip().split("\n")
    assert header.split() == ["NAME", "DST", "IMPAIRMENT", "TTL", "MATCHED", "SENT", "DROPS", "BACKLOG", "CLASSID"]
    assert "4p/200 B" in row
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


def names(out):
    return [line.split()[0] for line in out.strip().split("\n")[1:]]


def test_rules_are_listed_in_natural_order_and_filtered_by_glob(daemon):
    for i, name in enumerate(("rule-10", "rule-2", "db", "Rule-1", "rule-1")):
        assert run("rule", "set", name, "--dst", f"10.0.0.{i}", "--delay", "5ms")[0] == 0
    code, out, _ = run("rule", "list")
    assert code == 0 and names(out) == ["db", "Rule-1", "rule-1", "rule-2", "rule-10"]
    code, out, _ = run("status")
    assert code == 0 and names(out) == ["db", "Rule-1", "rule-1", "rule-2", "rule-10"]
    code, out, _ = run("rule", "list", "--rule", "rule-*", "-o", "yaml")
    assert [r["name"] for r in yaml.safe_load(out)["rules"]] == ["rule-1", "rule-2", "rule-10"]
    code, out, _ = run("status", "--rule", "db", "--rule", "*-10", "-o", "json")
    assert [r["name"] for r in json.loads(out)["rules"]] == ["db", "rule-10"]
    assert run("status", "--rule", "nothing*") == (0, "no rule matches nothing*\n", "")


def test_the_ttl_column_is_the_time_left_everywhere(daemon, clock):
    code, out, _ = run("rule", "set", "a", "--dst", "10.0.0.1", "--delay", "5ms", "--ttl", "10m")
    assert code == 0 and out.split("\n")[1].split()[-2:] == ["10m0s", "left"]
    run("rule", "set", "b", "--dst", "10.0.0.2", "--delay", "5ms")
    clock[0] += 2 * 10**9
    for args in (("rule", "list"), ("status",), ("rule", "get", "a")):
        code, out, _ = run(*args)
        header, *rows = out.strip().split("\n")
        col = header.index("TTL")
        assert rows[0][col:].startswith("9m58s left"), (args, out)
        if len(rows) > 1:
            assert rows[1][col:].split()[0] == "-"
    code, out, _ = run("rule", "get", "a", "-o", "json")
    assert json.loads(out)["ttl"] == "10m"  # the machine-readable form stays the rule's own field


def test_status_fits_the_terminal_width(daemon):
    run("rule", "set", "wide", *[a for i in range(40) for a in ("--dst", f"10.1.0.{i}")], "--delay", "50ms",
        "--jitter", "5ms", "--loss", "1%", "--rate", "10mbit")
    code, out, _ = run("status", env={"COLUMNS": "200"})
    row = out.split("\n")[1]
    assert "10.1.0.0/32,10.1.0.1/32" in row and ",+" in row and max(map(len, out.split("\n"))) <= 200
    code, out, _ = run("status", env={"COLUMNS": "90"})
    assert code == 0 and max(map(len, out.split("\n"))) <= 90
    assert "10.1.0.0/32,+39" in out and "wide" in out and "5348:1" in out
    code, out, _ = run("rule", "list", env={"COLUMNS": "60"})
    assert max(map(len, out.split("\n"))) <= 60 and "10.1.0.0/32" in out


def _traffic(monkeypatch, fake, clock_s, per_tick, direction="egress"):
    """Each sleep of the watch loop moves time on and sends per_tick (bytes, drops) through class 1 of a direction
    (the other direction's classes are the fake's, idle)."""
    from shaper.core.stats import ClassStats

    sent = {"bytes": 0, "drops": 0}
    idle = fake.class_stats

    def sleep(seconds):
        clock_s[0] += seconds
        sent["bytes"] += per_tick[0]
        sent["drops"] += per_tick[1]

    monkeypatch.setattr("time.sleep", sleep)
    monkeypatch.setattr("time.monotonic", lambda: clock_s[0])
    def class_stats(d="egress", leaves=True):
        if d != direction:
            return idle(d, leaves)
        return {1: ClassStats(0x53480001, bytes=sent["bytes"], packets=sent["bytes"] // 1000, drops=sent["drops"],
                              leaf="netem")}

    monkeypatch.setattr(fake, "class_stats", class_stats)


def test_status_watch_piped_repeats_blocks_with_per_second_rates(daemon, monkeypatch):
    fake, _ = daemon
    run("rule", "set", "a", "--dst", "10.0.0.0/24", "--delay", "5ms")
    _traffic(monkeypatch, fake, [100.0], (2_500_000, 30))
    code, out, _ = run("status", "--watch", "--count", "3", "--interval", "2")
    assert code == 0 and "\x1b" not in out  # piped: no cursor movement
    blocks = out.split("\n\n")
    assert len(blocks) == 3 and all(b.split("\n")[0].count("every 2s  1 rules") == 1 for b in blocks)
    header = blocks[0].split("\n")[1].split()
    assert header[:6] == ["NAME", "DST", "IMPAIRMENT", "TTL", "SENT/S", "DROPS/S"]
    first, second = (b.split("\n")[2] for b in blocks[:2])
    assert first.split()[4:6] == ["-", "-"]  # no rate before a second sample
    # 2.5 MB every 2 s is 10 Mbit/s; 30 drops every 2 s is 15/s.
    assert "10 Mbit/s" in second and second.split()[6] == "15"


def test_status_watch_on_a_terminal_redraws_in_place_and_keeps_to_its_size(daemon, monkeypatch):
    fake, _ = daemon
    for i in range(1, 13):
        run("rule", "set", f"r{i}", "--dst", f"10.0.0.{i}", "--delay", "5ms")
    _traffic(monkeypatch, fake, [0.0], (1000, 0))
    monkeypatch.setattr("shaper.cli._is_tty", lambda: True)
    code, out, _ = run("status", "--watch", "--count", "2", "--interval", "1", "--rule", "r1*",
                       env={"COLUMNS": "100", "LINES": "6"})
    assert code == 0
    frames = out.split("\x1b[H")[1:]
    assert len(frames) == 2 and frames[0].startswith("\x1b[2J") and not frames[1].startswith("\x1b[2J")
    lines = frames[1].rstrip("\x1b[J").split("\x1b[K\n")[:-1]
    assert "4 of 12 rules" in lines[0] and lines[1].startswith("NAME")  # the header stays on top
    assert len(lines) == 5 and "2 more rule(s)" in lines[-1]  # LINES=6: one line left for the cursor
    assert [line.split()[0] for line in lines[2:4]] == ["r1", "r10"]
    assert "8 kbit/s" in lines[2] and all(len(line) <= 100 for line in lines)


def test_dry_run_speaks_of_rules_and_values(daemon, clock, tmp_path):
    fake, _ = daemon
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n"
                     "  - {name: cache, dst: [10.0.0.6], rate: 2mbit, loss: 1%}\n"
                     "  - {name: old, dst: [10.0.0.9], delay: 5ms}\n"
                     "  - {name: same, dst: [10.0.0.7], delay: 5ms}\n")
    assert run("apply", "-f", str(rules))[0] == 0
    rules.write_text("rules:\n"
                     "  - {name: cache, dst: [10.0.0.6, 10.0.0.60], rate: 5mbit}\n"
                     "  - {name: db, dst: [10.0.0.5], delay: 50ms}\n"
                     "  - {name: same, dst: [10.0.0.7], delay: 5ms}\n")
    before = fake.observe()
    code, out, _ = run("apply", "-f", str(rules), "--dry-run")
    assert code == 0 and fake.observe() == before
    assert out == ("dry run: http://127.0.0.1:2332 would change 3 rule(s), nothing was changed:\n"
                   "~ cache: loss 1% -> (unset), rate 2mbit -> 5mbit, dst +10.0.0.60/32\n"
                   "+ db (created): dst 10.0.0.5/32, delay 50ms\n"
                   "- old (deleted)\n"
                   "(1 rule(s) unchanged)\n")
    run("apply", "-f", str(rules))
    assert run("apply", "-f", str(rules), "--dry-run")[1] == (
        "dry run: nothing would change on http://127.0.0.1:2332 (3 rule(s) unchanged)\n")


def test_rule_patch_changes_one_field_and_keeps_the_others(daemon):
    fake, seen = daemon
    run("rule", "set", "db", "--dst", "10.0.0.5", "--delay", "50ms", "--jitter", "5ms", "--loss", "1%")
    code, out, _ = run("rule", "patch", "db", "--delay", "20ms", "--clear", "loss")
    assert code == 0, out
    assert seen[-1][1:3] == ("PATCH", "/rules/db")
    rule = fake.observe().rules["db"].rule
    assert (rule.delay_us, rule.jitter_us, rule.loss_pct, rule.dst[0].prefixlen) == (20_000, 5_000, 0, 128)
    code, out, _ = run("rule", "patch", "db", "--add-dst", "10.0.0.6", "--add-dst", "fd00::6", "-o", "json")
    assert code == 0 and json.loads(out)["rules"][0]["dst"] == ["10.0.0.5/32", "10.0.0.6/32", "fd00::6/128"]
    code, out, _ = run("rule", "patch", "db", "--remove-dst", "10.0.0.5", "-o", "json")
    assert code == 0 and json.loads(out)["rules"][0]["dst"] == ["10.0.0.6/32", "fd00::6/128"]
    assert json.loads(out)["rules"][0]["delay"] == "20ms"


@pytest.mark.parametrize("args,code,words", [
    ((), 2, "nothing to change"),
    (("--clear", "dely"), 2, "did you mean 'delay'?"),
    (("--delay", "5ms", "--clear", "delay"), 2, "both set and cleared"),
    (("--dst", "10.0.0.1", "--add-dst", "10.0.0.2"), 2, "cannot be combined"),
    (("--remove-dst", "10.9.9.9"), 2, "not a destination"),
    (("--remove-dst", "10.0.0.5"), 2, "without destinations"),
    (("--clear", "delay"), 2, "jitter: needs delay"),
])
def test_rule_patch_refusals(daemon, args, code, words):
    fake, _ = daemon
    run("rule", "set", "db", "--dst", "10.0.0.5", "--delay", "50ms", "--jitter", "5ms")
    before = fake.observe()
    got, _, err = run("rule", "patch", "db", *args)
    assert got == code and words in err and err.count("\n") == 1, err
    assert fake.observe() == before
    assert run("rule", "patch", "absent", "--delay", "5ms")[0] == 1


def test_a_bytes_per_second_rate_warns_once(daemon, monkeypatch, caplog, tmp_path):
    from shaper.core import units

    monkeypatch.setattr(units, "_warned_byte_rate", False)
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: a, dst: [10.0.0.1], rate: 10Mbps}\n  - {name: b, dst: [10.0.0.2], "
                     "rate: 2mbps}\n")
    assert run("apply", "-f", str(rules))[0] == 0
    assert run("rule", "set", "c", "--dst", "10.0.0.3", "--rate", "1kbps")[0] == 0
    warned = [r.getMessage() for r in caplog.records if "tc's units" in r.getMessage()]
    assert warned == ["rate '10Mbps' is 10 megabytes per second in tc's units (80 Mbit/s), not megabits as "
                      "tcconfig reads it; for 10 megabits per second write 10mbit (this warning is shown once)"]
    assert run("rule", "get", "a", "-o", "json")[1].count('"rate": "80mbit"') == 1
    monkeypatch.setattr(units, "_warned_byte_rate", False)
    caplog.clear()
    run("rule", "set", "d", "--dst", "10.0.0.4", "--rate", "10mbit")
    assert not [r for r in caplog.records if "tc's units" in r.getMessage()]


def test_rules_file_errors_name_the_line_and_the_closest_field(daemon, tmp_path):
    fake, seen = daemon
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: db\n    dst: [10.0.0.5]\n    dely: 50ms\n")
    code, _, err = run("apply", "-f", str(rules))
    assert code == 2 and err.startswith(f"shaper: {rules}:4: rules[0].dely: unknown field; did you mean 'delay'?")
    rules.write_text("rules:\n  - name: db\n    dst: [10.0.0.5]\n  - name: cache\n    dst:\n      - 10.0.0.6\n"
                     "      - 10.0.0.5\n")
    code, _, err = run("apply", "-f", str(rules))
    assert code == 2 and err.startswith(f"shaper: {rules}:5: rules[cache].dst: 10.0.0.5/32 is already")
    rules.write_text("rules:\n  - name: db\n    dst: [10.0.0.5, 10.0.0.300]\n")
    code, _, err = run("apply", "-f", str(rules))
    assert code == 2 and err.startswith(f"shaper: {rules}:3: rules[0].dst[1]: ")
    rules.write_text("rules:\n  - name: db\n    dst: [10.0.0.5\n")
    code, _, err = run("apply", "-f", str(rules))
    assert code == 2 and "line 4, column 1" in err and not fake.executed


def _refuse(monkeypatch, make):
    import shaper.datapath.kernel

    class Refusing:
        def __init__(self, *args, **kwargs):
            raise make()

    monkeypatch.setattr(shaper.datapath.kernel, "KernelDatapath", Refusing)


@pytest.mark.parametrize("make", [
    lambda: PermissionError(13, "Permission denied", "/sys/fs/bpf/shaper"),
    lambda: __import__("shaper.errors").errors.KernelError("create", "qdisc clsact", 1),
    lambda: __import__("pyroute2").NetlinkError(1, "Operation not permitted"),
])
@pytest.mark.parametrize("args", [("show", "--iface", "eth9"), ("reset", "--iface", "eth9")])
def test_local_commands_refused_by_the_kernel_say_run_as_root(monkeypatch, make, args):
    _refuse(monkeypatch, make)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    code, _, err = run(*args)
    assert code == 1 and err.count("\n") == 1 and "run as root" in err, err
    monkeypatch.setattr("os.geteuid", lambda: 0)  # root refused: the cause is elsewhere, no such advice
    code, _, err = run(*args)
    assert code == 1 and "run as root" not in err, err


def test_help_says_what_each_command_does_with_an_example_where_it_helps():
    for path in (("rule", "patch"), ("rule", "set"), ("status",), ("rule", "list"), ("show",)):
        code, out, _ = run(*path, "--help")
        assert code == 0, path
        assert "--rule GLOB" in out or path[-1] in ("patch", "set")
    code, out, _ = run("rule", "patch", "--help")
    assert "--clear FIELD" in out and "shaper rule patch db --delay 20ms" in out
    code, out, _ = run("status", "--help")
    assert "SENT/S" in out and "rule-2 before rule-10" in out


@pytest.fixture
def local(monkeypatch):
    """Local commands (--iface) over one FakeDatapath standing in for the interface's kernel state."""
    import shaper.datapath.kernel

    fake = FakeDatapath()
    fake.attached = False

    class Local:
        def __init__(self, iface, netns):
            self.iface = iface

        def __getattr__(self, name):
            return getattr(fake, name)

        def is_attached(self):
            return fake.attached

        def attach(self):
            fake.attached = True

        def open_maps(self):
            pass

        def check_accounted(self):
            # A test makes the interface hold a classifier shaper cannot account for by setting this.
            getattr(fake, "unaccounted", lambda: None)()

        def close(self):
            pass

    class Claim:
        def close(self):
            pass

    monkeypatch.setattr(shaper.datapath.kernel, "KernelDatapath", Local)
    monkeypatch.setattr(shaper.datapath.kernel, "claim_interface", lambda iface, netns: Claim())
    return fake


def test_local_dry_run_and_show_speak_of_rules(local, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: rule-10, dst: [10.0.0.10], delay: 5ms}\n"
                     "  - {name: rule-2, dst: [10.0.0.2], rate: 2mbit, ttl: 10m}\n")
    code, out, _ = run("apply", "--iface", "veth9", "-f", str(rules), "--dry-run")
    assert code == 0 and not local.executed
    assert out == ("dry run: shaper would attach to veth9\n"
                   "dry run: veth9 would change 2 rule(s), nothing was changed:\n"
                   "+ rule-2 (created): dst 10.0.0.2/32, rate 2mbit, ttl 10m\n"
                   "+ rule-10 (created): dst 10.0.0.10/32, delay 5ms\n")
    assert run("apply", "--iface", "veth9", "-f", str(rules))[0] == 0 and local.attached
    rules.write_text("rules:\n  - {name: rule-10, dst: [10.0.0.10], delay: 5ms}\n"
                     "  - {name: rule-2, dst: [10.0.0.2], rate: 5mbit, ttl: 10m}\n")
    executed = len(local.executed)
    code, out, _ = run("apply", "--iface", "veth9", "-f", str(rules), "--dry-run")
    assert code == 0 and len(local.executed) == executed
    assert out == ("dry run: veth9 would change 1 rule(s), nothing was changed:\n"
                   "~ rule-2: rate 2mbit -> 5mbit (its TTL restarts)\n"
                   "(1 rule(s) unchanged)\n")
    code, out, _ = run("show", "--iface", "veth9")
    assert code == 0 and names(out) == ["rule-2", "rule-10"] and " left " in out
    code, out, _ = run("show", "--iface", "veth9", "--rule", "*-10", "-o", "json")
    assert [r["name"] for r in json.loads(out)["rules"]] == ["rule-10"]


def test_every_option_of_every_command_says_what_it_does():
    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, path + [name])

    for path, cmd in walk(main, []):
        assert cmd.help and len(cmd.help.split("\n")[0]) > 15, path
        for param in cmd.params:
            if isinstance(param, click.Option):
                assert param.help, (path, param.name)


def test_local_commands_tell_a_non_root_user_what_they_cannot_see(local, monkeypatch):
    from shaper.errors import Conflict

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    code, out, _ = run("show", "--iface", "veth9")
    assert code == 0 and out == ("shaper is not attached to veth9 (as seen by a non-root user, who cannot read "
                                 "shaper's pins: run as root)\n")
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert run("show", "--iface", "veth9")[1] == "shaper is not attached to veth9\n"

    def unaccounted():
        raise Conflict("veth9 has a classifier at shaper's pref that is not the one pinned here")

    monkeypatch.setattr(local, "unaccounted", unaccounted, raising=False)
    for euid, hinted in ((1000, True), (0, False)):
        monkeypatch.setattr("os.geteuid", lambda: euid)
        code, _, err = run("show", "--iface", "veth9")
        assert code == 1 and err.count("\n") == 1 and ("run as root" in err) == hinted, err


def test_a_narrow_terminal_keeps_rates_and_rules_and_drops_totals_first(daemon, monkeypatch):
    fake, _ = daemon
    run("rule", "set", "db", "--dst", "10.0.0.2", "--dst", "10.0.0.3", "--delay", "5ms", "--jitter", "1ms",
        "--loss", "1%", "--ttl", "1h")
    _traffic(monkeypatch, fake, [0.0], (1000, 0))
    headers = {}
    for columns in (200, 100, 80, 72):
        code, out, _ = run("status", "--watch", "--count", "1", env={"COLUMNS": str(columns)})
        lines = out.strip().split("\n")
        assert code == 0 and all(len(line) <= columns for line in lines), out
        headers[columns] = lines[1].split()
    assert headers[200][-1] == "CLASSID" and "MATCHED" in headers[200]
    assert "CLASSID" not in headers[100] and "MATCHED" not in headers[100] and "DROPS" in headers[100]
    assert headers[80] == ["NAME", "DST", "IMPAIRMENT", "TTL", "SENT/S", "DROPS/S", "DROPS"]
    assert headers[72] == ["NAME", "DST", "IMPAIRMENT", "TTL", "SENT/S", "DROPS/S"]


def _peer(text):
    from shaper.core.model import Prefix

    return Prefix.parse(text, "x").addr


def _directions(fake):
    """pg shapes both directions of tcp 5432 and 8000-8100, in only ingress, plain only egress; pg's peer sent
    three packets out and one in."""
    assert run("rule", "set", "pg", "--dst", "10.0.0.0/24", "--direction", "both", "--protocol", "tcp",
               "--ports", "5432,8000-8100", "--delay", "50ms")[0] == 0
    assert run("rule", "set", "in", "--src", "10.0.1.0/24", "--rate", "2mbit")[0] == 0
    assert run("rule", "set", "plain", "--dst", "10.0.2.0/24", "--rate", "10mbit")[0] == 0
    for _ in range(3):
        fake.count(_peer("10.0.0.9"), 10**12, 100, "egress", 6, 5432)
    fake.count(_peer("10.0.0.9"), 10**12, 100, "ingress", 6, 8001)


def _table(out):
    """A table's header and its rows as {column: cell}, cut where the header's columns start."""
    header, *lines = out.strip().split("\n")
    cols = header.split()
    starts = [header.index(f"{c}  " if i < len(cols) - 1 else c) for i, c in enumerate(cols)]
    bounds = list(zip(starts, [*starts[1:], None]))
    return cols, [{c: line[a:b].strip() for c, (a, b) in zip(cols, bounds)} for line in lines]


def test_status_has_a_line_per_rule_and_direction_and_what_it_matches(daemon):
    fake, _ = daemon
    _directions(fake)
    code, out, _ = run("status")
    assert code == 0
    cols, rows = _table(out)
    assert cols == ["NAME", "DIR", "PEERS", "MATCH", "IMPAIRMENT", "TTL", "MATCHED", "SENT", "DROPS", "BACKLOG",
                    "CLASSID"]
    assert [(r["NAME"], r["DIR"], r["MATCH"]) for r in rows] == [
        ("in", "ingress", "-"), ("pg", "egress", "tcp/5432,8000-8100"), ("pg", "ingress", "tcp/5432,8000-8100"),
        ("plain", "egress", "-")]
    pg_out, pg_in = rows[1:3]
    assert pg_out["MATCHED"] == "3p/300 B" and pg_in["MATCHED"] == "1p/100 B"
    assert pg_out["CLASSID"] == pg_in["CLASSID"] == "5348:1"  # one rule, one slot, a class in each tree
    # -o json/yaml: the rows as GET /stats gives them, each with its direction.
    code, out, _ = run("status", "--rule", "pg", "-o", "json")
    rows = json.loads(out)["rules"]
    assert [(r["direction"], r["protocol"], r["ports"], r["matched_packets"]) for r in rows] == [
        ("egress", "tcp", [5432, "8000-8100"], 3), ("ingress", "tcp", [5432, "8000-8100"], 1)]
    assert [r["direction"] for r in yaml.safe_load(run("status", "-o", "yaml")[1])["rules"]] == \
        ["ingress", "egress", "ingress", "egress"]
    # A rule is one line where counters do not matter: rule list and rule get say "both".
    cols, rows = _table(run("rule", "list")[1])
    assert cols == ["NAME", "DIR", "PEERS", "MATCH", "IMPAIRMENT", "TTL"]
    assert [(r["NAME"], r["DIR"]) for r in rows] == [("in", "ingress"), ("pg", "both"), ("plain", "egress")]
    cols, rows = _table(run("rule", "get", "pg")[1])
    assert [(r["NAME"], r["DIR"], r["MATCH"]) for r in rows] == [("pg", "both", "tcp/5432,8000-8100")]


def test_the_direction_and_match_columns_appear_only_when_a_rule_needs_them(daemon):
    run("rule", "set", "a", "--dst", "10.0.0.1", "--delay", "5ms")
    assert _table(run("status")[1])[0][:4] == ["NAME", "DST", "IMPAIRMENT", "TTL"]
    run("rule", "set", "dns", "--dst", "10.0.0.53", "--protocol", "udp", "--ports", "53", "--delay", "5ms")
    run("rule", "set", "web", "--dst", "10.0.0.80", "--ports", "80,443", "--delay", "5ms")
    run("rule", "set", "ping", "--dst", "10.0.0.2", "--protocol", "icmp", "--delay", "5ms")
    cols, rows = _table(run("status")[1])
    assert cols[:5] == ["NAME", "DST", "MATCH", "IMPAIRMENT", "TTL"]  # all egress: no DIR, the peers are DST
    # Ports without a protocol: tcp, udp and sctp alike.
    assert {r["NAME"]: r["MATCH"] for r in rows} == {"a": "-", "dns": "udp/53", "ping": "icmp",
                                                     "web": "port 80,443"}


def test_status_watch_rates_are_per_direction(daemon, monkeypatch):
    fake, _ = daemon
    run("rule", "set", "pg", "--dst", "10.0.0.0/24", "--direction", "both", "--delay", "5ms")
    _traffic(monkeypatch, fake, [100.0], (2_500_000, 30), direction="ingress")
    code, out, _ = run("status", "--watch", "--count", "2", "--interval", "2")
    assert code == 0
    second = out.split("\n\n")[1].split("\n")
    assert "every 2s  1 rules" in second[0]  # one rule, two lines
    cols = second[1].split()
    assert cols[:7] == ["NAME", "DIR", "PEERS", "IMPAIRMENT", "TTL", "SENT/S", "DROPS/S"]
    egress, ingress = (line.split() for line in second[2:4])
    assert egress[1] == "egress" and egress[5:8] == ["0", "bit/s", "0"]
    assert ingress[1] == "ingress" and " ".join(ingress[5:8]) == "10 Mbit/s 15"


def test_lines_per_direction_fit_the_terminal(daemon, monkeypatch):
    fake, _ = daemon
    run("rule", "set", "wide", *[a for i in range(40) for a in ("--dst", f"10.1.0.{i}")], "--direction", "both",
        "--protocol", "tcp", "--ports", ",".join(str(p) for p in range(1000, 1064, 2)), "--delay", "50ms",
        "--jitter", "5ms", "--loss", "1%", "--rate", "10mbit")
    run("rule", "set", "in", "--src", "10.2.0.0/16", "--delay", "5ms", "--ttl", "1h")
    for columns in (200, 120, 90, 72):
        for args in (("status",), ("rule", "list")):
            code, out, _ = run(*args, env={"COLUMNS": str(columns)})
            lines = out.strip().split("\n")
            assert code == 0 and all(len(line) <= columns for line in lines), (columns, out)
            assert lines[0].split()[:3] == ["NAME", "DIR", "PEERS"], (columns, out)
    code, out, _ = run("status", env={"COLUMNS": "120"})
    cols, rows = _table(out)
    # A long port list gives way, not the counters a wide terminal has room for.
    assert "MATCHED" in cols and "SENT" in cols
    assert rows[2]["MATCH"].startswith("tcp/1000,") and rows[2]["MATCH"].endswith("..")
    _traffic(monkeypatch, fake, [0.0], (1000, 0), direction="egress")
    code, out, _ = run("status", "--watch", "--count", "1", env={"COLUMNS": "80"})
    assert code == 0 and all(len(line) <= 80 for line in out.strip().split("\n"))
    assert out.strip().split("\n")[1].split()[:3] == ["NAME", "DIR", "PEERS"]


def test_show_has_a_line_per_direction(local, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: pg, dst: [10.0.0.0/24], direction: both, protocol: tcp, ports: [5432], "
                     "delay: 5ms}\n")
    assert run("apply", "--iface", "veth9", "-f", str(rules))[0] == 0
    local.count(_peer("10.0.0.9"), 0, 100, "ingress", 6, 5432)
    cols, rows = _table(run("show", "--iface", "veth9")[1])
    assert cols[:4] == ["NAME", "DIR", "PEERS", "MATCH"]
    assert [(r["NAME"], r["DIR"], r["MATCH"], r["MATCHED"]) for r in rows] == [
        ("pg", "egress", "tcp/5432", "0p/0 B"), ("pg", "ingress", "tcp/5432", "1p/100 B")]
    rows = json.loads(run("show", "--iface", "veth9", "-o", "json")[1])["rules"]
    assert [(r["direction"], r["matched_packets"]) for r in rows] == [("egress", 0), ("ingress", 1)]


def test_target_sends_every_client_command_to_a_node_agents_target(daemon, tmp_path):
    _, seen = daemon
    code, out, _ = run("rule", "list", "--target", "10.0.0.7")
    assert seen[-1][1] == "GET" and seen[-1][2].startswith("/targets/10.0.0.7/")
    assert code == 1 and "is no node agent" in out and ":2333" in out  # the daemon has no /targets
    run("status", "--target", "container:web")
    assert seen[-1][2] == "/targets/container%3Aweb/stats"
    run("rule", "del", "db", env={"SHAPER_TARGET": "pid:42"})
    assert seen[-1][1:3] == ("DELETE", "/targets/pid%3A42/rules/db")
    run("target", "list")
    assert seen[-1][1:3] == ("GET", "/targets")
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    code, out, _ = run("apply", "--iface", "eth0", "-f", str(rules), "--target", "10.0.0.7")
    assert code == 2 and "goes with --server, not with --iface" in out
