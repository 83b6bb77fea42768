"""SHAPER_MAX_PREFIXES: the tries' size, checked, set for the whole process, and compiled in."""

import pytest

from shaper.core import model, plan
from shaper.datapath import loader, objcache
from shaper.errors import InvalidInput


@pytest.mark.parametrize("text, want", [("", 262144), ("1048576", 1048576), ("1_000_000", 1_000_000),
                                        (" 1024 ", 1024), (str(1 << 24), 1 << 24)])
def test_sizes_read(text, want):
    assert model.max_prefixes_from({"SHAPER_MAX_PREFIXES": text} if text else {}) == want


@pytest.mark.parametrize("text, problem", [("1M", "not a number"), ("1023", "out of range"),
                                           (str((1 << 24) + 1), "out of range"), ("-5", "out of range")])
def test_bad_sizes_are_named(text, problem):
    with pytest.raises(InvalidInput, match=problem) as info:
        model.max_prefixes_from({"SHAPER_MAX_PREFIXES": text})
    assert info.value.field == "SHAPER_MAX_PREFIXES" and "1048576 for a million" in str(info.value)


@pytest.fixture
def sized(monkeypatch):
    monkeypatch.setattr(model, "MAX_PREFIXES", model.MAX_PREFIXES)
    monkeypatch.setattr(plan, "MAX_PREFIXES", plan.MAX_PREFIXES)
    return plan.set_max_prefixes


def test_one_size_for_the_checks_and_the_compile(sized):
    default_flags = loader.cflags()
    assert not any(f.startswith("-DSHAPER_MAX_PREFIXES") for f in default_flags)
    sized(2000)
    assert model.MAX_PREFIXES == plan.MAX_PREFIXES == 2000
    assert "-DSHAPER_MAX_PREFIXES=2000" in loader.cflags()
    assert objcache.key(loader.cflags()) != objcache.key(default_flags)  # another compile, another entry
    def addrs(start, n):
        return [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(start, start + n)]

    with pytest.raises(InvalidInput, match="2001 destinations exceed 2000"):
        model.parse_rule({"name": "big", "dst": addrs(0, 2001), "rate": "1mbit"})
    rules = [model.parse_rule({"name": "a", "dst": addrs(0, 1001), "rate": "1mbit"}),
             model.parse_rule({"name": "b", "dst": addrs(1001, 1000), "rate": "1mbit"})]
    with pytest.raises(InvalidInput, match="2001 destinations exceed the maximum 2000"):
        model.validate_ruleset(rules)
    sized(262144)
    model.validate_ruleset(rules)


def test_the_cli_refuses_a_bad_size_before_anything():
    from click.testing import CliRunner

    from shaper.cli import main

    out = CliRunner().invoke(main, ["status"], env={"SHAPER_MAX_PREFIXES": "lots"})
    assert out.exit_code == 2 and "SHAPER_MAX_PREFIXES" in out.output and "not a number" in out.output
