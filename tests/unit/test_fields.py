"""Each rule field is described once, in shaper.core.fields, and everything else is made from it:
the model's parsing, the OpenAPI rule schema, the CLI's field options, the configuration gauges
and the README's table."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import click
import pytest

from shaper import cli
from shaper.control import metrics
from shaper.core import fields as F
from shaper.core.model import Prefix, Rule, parse_rule, rule_from_record
from shaper.core.stats import RuleCounters
from shaper.core.units import format_percent, parse_percent
from shaper.errors import InvalidInput
from shaper.http import openapi

README = Path(__file__).resolve().parents[2] / "README.md"

# A value of each field the parser takes, in the form to_dict gives back. A new field needs one here.
SAMPLES = {
    "delay": "50ms", "jitter": "5ms", "delay_corr": "25%", "distribution": "pareto", "loss": "1%",
    "loss_corr": "10%", "loss_ge": {"p": "1%", "r": "20%", "loss_bad": "90%", "loss_good": "0.5%"},
    "duplicate": "2%", "duplicate_corr": "5%", "corrupt": "0.1%", "corrupt_corr": "3%", "reorder": "25%",
    "reorder_corr": "50%", "gap": 5, "rate": "10mbit", "burst": "32kb", "limit": 5000, "ttl": "10m",
    "direction": "both", "protocol": "tcp", "ports": [5432, "8000-8100"], "except": ["10.0.0.0/28"],
}
# Parsed by the model itself (prefixes, in bulk), not by a Field.parse.
MODEL_PARSED = {"except": (Prefix.parse("10.0.0.0/28", "except"),)}


def _body_with(spec: F.Field) -> dict:
    """A rule with the field and, recursively, what it needs (loss_ge stands in no need: it excludes loss)."""
    body = {"name": "r", "dst": ["10.0.0.0/24"], spec.key: SAMPLES[spec.key]}
    while spec.needs:
        spec = F.BY_KEY[spec.needs[0]]
        body[spec.key] = SAMPLES[spec.key]
    return body


def test_every_rule_attribute_has_exactly_one_description():
    # src is dst's other name (an ingress rule's peers): the one attribute with two keys.
    assert sorted(f.attr for f in F.FIELDS if f is not F.SRC) == sorted(a.name for a in dataclasses.fields(Rule))
    assert F.SRC.attr == F.DST.attr
    assert len(set(F.FIELD_NAMES)) == len(F.FIELD_NAMES) == len(F.FIELDS)
    defaults = {a.name: a.default for a in dataclasses.fields(Rule)}
    for spec in F.OPTIONAL_FIELDS:
        assert spec.default == defaults[spec.attr], spec.key
        assert (spec.parse or spec.key in MODEL_PARSED) and spec.fmt and spec.option, spec.key
        assert spec.needs is None or spec.needs[0] in F.FIELD_NAMES, spec.key
    assert set(SAMPLES) == {f.key for f in F.OPTIONAL_FIELDS}


@pytest.mark.parametrize("spec", F.OPTIONAL_FIELDS, ids=lambda f: f.key)
def test_the_model_parses_and_formats_each_field_by_its_description(spec):
    body = _body_with(spec)
    rule = parse_rule(body)
    parsed = MODEL_PARSED[spec.key] if spec.parse is None else spec.parse(SAMPLES[spec.key], spec.key)
    assert getattr(rule, spec.attr) == parsed != spec.default
    assert rule.to_dict()[spec.key] == SAMPLES[spec.key]
    if spec.needs:
        alone = {"name": "r", "dst": ["10.0.0.0/24"], spec.key: SAMPLES[spec.key]}
        with pytest.raises(InvalidInput) as err:
            parse_rule(alone)
        assert err.value.field == spec.key and f"needs {spec.needs[0]} to be set too" in str(err.value)


def test_schema_patterns_take_what_the_parsers_take():
    for spec in F.FIELDS:
        value = SAMPLES.get(spec.key, {"name": "db-1.a_b", "dst": ["10.0.0.1"]}.get(spec.key))
        if "pattern" in spec.schema:
            assert re.match(spec.schema["pattern"], value), (spec.key, value)
        if "enum" in spec.schema:
            assert value in spec.schema["enum"]
    assert F.NAME.schema["pattern"] == f"^{F.NAME_RE.pattern}$"
    assert not re.match(F.NAME.schema["pattern"], "x" * (F.NAME_MAX_LEN + 1))
    assert F.BY_KEY["limit"].schema["maximum"] == F.MAX_NETEM_LIMIT


def test_the_api_document_is_made_from_the_fields():
    assert openapi.RULE_FIELDS == {f.key: {**f.schema, "description": f.api_description()} for f in F.FIELDS}
    schemas = openapi.document("x")["components"]["schemas"]
    assert schemas["Rule"]["properties"] == openapi.RULE_FIELDS
    assert schemas["Rule"]["anyOf"] == [{"required": ["dst"]}, {"required": ["src"]}]
    patch = schemas["RulePatch"]["properties"]
    assert {k for k, v in patch.items() if v.get("nullable")} == {f.key for f in F.OPTIONAL_FIELDS}
    # OpenAPI 3.0: no type lists, no "const", and the document is plain JSON.
    json.dumps(openapi.document("x"))
    for v in openapi.RULE_FIELDS.values():
        assert isinstance(v["type"], str) if "type" in v else all(isinstance(o["type"], str) for o in v["oneOf"])


def _options(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if isinstance(p, click.Option)}


@pytest.mark.parametrize("command", [cli.rule_set, cli.rule_patch], ids=["set", "patch"])
def test_the_cli_options_are_made_from_the_fields(command):
    options = _options(command)
    for spec in F.OPTIONAL_FIELDS:
        opt = options[spec.key]
        assert opt.opts == [spec.flag, *spec.option.aliases] and opt.help == spec.help(), spec.key
        assert opt.multiple == spec.option.multiple, spec.key
        if spec.option.metavar:
            assert opt.metavar == spec.option.metavar
        if "enum" in spec.schema:
            assert list(opt.type.choices) == spec.schema["enum"]
        elif spec.schema.get("type") == "integer":
            assert opt.type is click.INT
    assert cli._CLEARABLE == tuple(f.key for f in F.OPTIONAL_FIELDS)
    assert cli._field_values({"loss_ge": "p=1%,r=20%", "gap": 3, "delay": None}) == \
        {"loss_ge": {"p": "1%", "r": "20%"}, "gap": 3}
    # --port and --except may be repeated, and take comma-separated lists: one list either way.
    assert cli._field_values({"ports": ("5432", "8000-8100,9000"), "except": ()}) == \
        {"ports": ["5432", "8000-8100", "9000"]}
    assert _options(command)["ports"].multiple and _options(command)["except"].multiple


def _gauges(rule, monkeypatch=None, fields=None) -> dict[str, tuple[str, float | None]]:
    if fields is not None:
        monkeypatch.setattr(metrics, "FIELDS", fields)
    snap = metrics.Snapshot([metrics.RuleSample("r", "5348:1", RuleCounters(), None, rule)])
    out = {}
    for fam in metrics.KernelCollector("eth0", lambda: snap).collect():
        if fam.type == "gauge" and fam.name.startswith("shaper_rule_"):
            out[fam.name] = (fam.documentation, fam.samples[0].value if fam.samples else None)
            assert all(s.labels == {"interface": "eth0", "rule": "r", "classid": "5348:1", "direction": "egress"}
                       for s in fam.samples)
    return out


def test_the_configuration_gauges_are_made_from_the_fields():
    rule = parse_rule({"name": "r", "dst": ["10.0.0.1"], "delay": "50ms", "jitter": "5ms", "loss": "1%",
                       "rate": "8mbit"})
    # The names, helps and values the daemon exported before they were made from the fields.
    assert _gauges(rule) == {
        "shaper_rule_delay_seconds": ("The rule's configured delay.", 0.05),
        "shaper_rule_jitter_seconds": ("The rule's configured jitter.", 0.005),
        "shaper_rule_loss_ratio": ("The rule's configured random loss, 0 to 1.", 0.01),
        "shaper_rule_rate_bytes_per_second": ("The rule's configured rate (HTB ceiling).", 1_000_000.0),
    }
    assert {f.gauge.metric for f in F.FIELDS if f.gauge} == set(_gauges(rule))
    unset = _gauges(parse_rule({"name": "r", "dst": ["10.0.0.1"], "delay": "1ms"}))
    assert unset["shaper_rule_rate_bytes_per_second"][1] is None  # an unset field has no series


def test_a_rule_shaping_both_directions_has_its_configuration_gauges_in_each():
    rule = parse_rule({"name": "r", "dst": ["10.0.0.1"], "direction": "both", "delay": "50ms"})
    snap = metrics.Snapshot([metrics.RuleSample("r", "5348:1", RuleCounters(), None, rule, d)
                             for d in rule.directions])
    (fam,) = [f for f in metrics.KernelCollector("eth0", lambda: snap).collect()
              if f.name == "shaper_rule_delay_seconds"]
    assert {(s.labels["direction"], s.value) for s in fam.samples} == {("egress", 0.05), ("ingress", 0.05)}


def test_a_new_field_appears_in_every_generated_output(monkeypatch):
    colour = F.Field("colour", "colour_pct", parse_percent, format_percent,
                     {"type": "string", "pattern": F.PERCENT_PATTERN}, "Packets painted", F.PERCENT_FORM, "percent",
                     0.0, needs=("delay", "paint dries"), readme="Only in tests.", option=F.Option("PCT", "Blue."),
                     gauge=F.Gauge("shaper_rule_colour_ratio", "The rule's configured colour.",
                                   lambda r: r.colour_pct / 100))
    assert openapi.rule_fields((*F.FIELDS, colour))["colour"] == {
        "type": "string", "pattern": F.PERCENT_PATTERN,
        "description": "Packets painted (needs delay). " + F.PERCENT_FORM[0].upper() + F.PERCENT_FORM[1:] + "."}

    command = cli.field_options((*F.OPTIONAL_FIELDS, colour))(click.Command("x", callback=lambda **kw: None))
    opt = _options(command)["colour"]
    assert opt.opts == ["--colour"] and opt.metavar == "PCT" and opt.help == "Packets painted (needs delay). Blue."

    rule = SimpleNamespace(**{f.attr: f.default for f in F.FIELDS}, colour_pct=40.0)
    assert _gauges(rule, monkeypatch, (*F.FIELDS, colour))["shaper_rule_colour_ratio"] == \
        ("The rule's configured colour.", 0.4)

    assert "| `colour` | percent | Packets painted (needs delay). Only in tests. |" in \
        F.readme_table((*F.FIELDS, colour)).splitlines()


def test_the_readme_table_is_current():
    text = README.read_text()
    assert text.count(F.README_BEGIN) == 1 and text.count(F.README_END) == 1
    assert F.splice_readme(text) == text, \
        "README.md's rule-field table is stale: run `make readme` (or .venv/bin/python scripts/readme_fields.py)"
    for note in ("IPv4-mapped", "(1 Gbit/s assumed without a rate), at least 1000", "max `30d`", "min 8kbit",
                 "Tables from iproute2", "`r = 100% - p`"):
        assert note in text, note


def test_a_stale_readme_table_is_made_again():
    text = "intro\n" + F.README_BEGIN + "\n| old |\n" + F.README_END + "\noutro\n"
    assert F.splice_readme(text) == "intro\n" + F.readme_block() + "\noutro\n"
    with pytest.raises(ValueError, match="no <!-- rule fields"):
        F.splice_readme("no markers")


def test_stored_records_keep_the_previous_versions_format():
    """rule_meta holds each rule's to_dict() as JSON: a daemon adopts the pins an older one wrote."""
    record = {"name": "db", "delay": "50ms", "jitter": "5ms", "delay_corr": "25%", "distribution": "pareto",
              "loss_ge": {"p": "1%", "r": "20%", "loss_bad": "90%", "loss_good": "0.5%"}, "rate": "10mbit",
              "burst": "32kb", "limit": 5000, "ttl": "10m"}
    rule = rule_from_record(record, (Prefix.parse("10.0.0.5", "dst"),))
    assert rule.rate_bits_per_s == 10_000_000 and rule.burst_bytes == 32 * 1024 and rule.ttl_us == 600_000_000
    assert dataclasses.replace(rule, dst=()).to_dict() == {**record, "dst": []}
