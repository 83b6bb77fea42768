"""Progress of long commands: on a terminal (a real pty here) stderr says what is happening and
ends with a summary; piped, stderr stays quiet and stdout carries only the result."""

import os
import pty
import time

import pytest
from click.testing import CliRunner

from shaper import cli
from shaper.http import client as client_mod
from shaper.http.api import Api
from shaper.cli import Progress, main
from shaper.datapath.fake import FakeDatapath
from shaper.control.service import Service


@pytest.fixture
def daemon(monkeypatch):
    service = Service(FakeDatapath(), "eth0")
    service.start()
    api = Api(service)

    def transport(self, method, path, headers, body):
        resp = api.handle(method, path, headers, body, "cli")
        return resp.status, resp.body

    monkeypatch.setattr(client_mod.Client, "transport", transport)
    monkeypatch.delenv("SHAPER_SERVER", raising=False)
    monkeypatch.delenv("SHAPER_TOKEN", raising=False)
    monkeypatch.delenv("SHAPER_TOKEN_FILE", raising=False)
    return service


@pytest.fixture
def rules_file(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n" + "".join(f"  - name: r{i}\n    rate: 10mbit\n    dst:\n"
                                         + "".join(f"      - 10.{i}.{j >> 8}.{j & 255}\n" for j in range(300))
                                         for i in range(5)))
    return path


class Pty:
    """A pseudo-terminal: `slave` is a text stream whose isatty() is true; read() drains the master."""

    def __init__(self):
        self.master, slave_fd = pty.openpty()
        self.slave = os.fdopen(slave_fd, "w", buffering=1)

    def read(self) -> str:
        self.slave.flush()
        out = b""
        os.set_blocking(self.master, False)
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            out += chunk
        return out.decode()

    def close(self):
        self.slave.close()
        os.close(self.master)


@pytest.fixture
def term():
    t = Pty()
    yield t
    t.close()


def test_apply_on_a_terminal_shows_progress_and_a_summary(daemon, rules_file, term, monkeypatch, capsys):
    monkeypatch.setattr(Progress, "AFTER_S", 0.0)  # this small file is quick: show from the start
    monkeypatch.setattr("sys.stderr", term.slave)
    main(["apply", "-f", str(rules_file)], standalone_mode=False)
    shown = term.read()
    assert f"parsing {rules_file}" in shown
    assert "applying 5 rules, 1500 prefixes through http://127.0.0.1:2332 ..." in shown
    last = shown.rstrip("\r\n").split("\r")[-1]
    assert last.startswith("\x1b[K5 rules, 1500 prefixes applied in ") and last.endswith("s")
    assert capsys.readouterr().out == "http://127.0.0.1:2332: 5 rule(s) applied\n"  # the result stays on stdout
    assert len(daemon.rules()) == 5


def test_apply_piped_is_quiet(daemon, rules_file, monkeypatch):
    monkeypatch.setattr(Progress, "AFTER_S", 0.0)
    result = CliRunner().invoke(main, ["apply", "-f", str(rules_file)], catch_exceptions=False)
    assert result.exit_code == 0
    assert result.stdout == "http://127.0.0.1:2332: 5 rule(s) applied\n"
    assert result.stderr == ""


def test_quick_work_on_a_terminal_prints_nothing_extra(term):
    progress = Progress(term.slave, after_s=5)
    progress.step("parsing rules.yaml")
    progress.finish("1 rule, 1 prefix applied")
    assert term.read() == ""


def test_progress_appears_once_the_work_is_slow(term):
    progress = Progress(term.slave, after_s=0.05)
    progress.step("parsing big.yaml (2.5 MB)")
    deadline = time.monotonic() + 30
    shown = ""
    while "parsing big.yaml (2.5 MB) ..." not in shown and time.monotonic() < deadline:
        time.sleep(0.02)
        shown += term.read()
    assert "parsing big.yaml (2.5 MB) ..." in shown, f"no progress line within 30 s: {shown!r}"
    progress.step("applying 1 rule, 100000 prefixes on eth0")
    progress.finish("1 rule, 100000 prefixes applied")
    shown = term.read()
    assert "applying 1 rule, 100000 prefixes on eth0 ..." in shown
    assert "1 rule, 100000 prefixes applied in " in shown and shown.endswith("s\r\n")


def test_an_error_starts_on_a_clean_line(daemon, tmp_path, term, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: a\n    dst: [10.0.0.1]\n    dely: 5ms\n")
    monkeypatch.setattr(Progress, "AFTER_S", 0.0)
    monkeypatch.setattr("sys.stderr", term.slave)
    with pytest.raises(SystemExit) as exit_:
        main(["apply", "-f", str(bad)], standalone_mode=False)
    assert exit_.value.code == 2
    shown = term.read()
    # The progress line is cleared, then the reason follows from the first column.
    assert "\r\x1b[K" in shown and shown.split("\r\x1b[K")[-1].startswith("shaper: ")


def test_counted_words():
    assert cli._counted(0, 0) == "0 rules, 0 prefixes"
    assert cli._counted(1, 1) == "1 rule, 1 prefix"
