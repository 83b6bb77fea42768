"""The `shaper` command line (click): a thin layer over the controller.

Commands parse input into the model, call the controller and turn errors into
exit codes: 0 ok, 2 bad input, 1 any other failure, with a one-line reason on
stderr.  Every option can also come from the environment (SHAPER_IFACE, ...).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import click
import yaml

from .errors import InvalidInput, ShaperError
from .model import parse_ruleset
from .units import format_duration_us

OUTPUT_FORMATS = click.Choice(["table", "json", "yaml"])


def _fail(exc: ShaperError) -> None:
    click.echo(f"shaper: {exc}".splitlines()[0] if isinstance(exc, InvalidInput) else f"shaper: {exc}", err=True)
    sys.exit(exc.exit_code)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except ShaperError as exc:
        _fail(exc)


@contextmanager
def _datapath(iface: str, netns: str | None, *, attach: bool) -> Iterator:
    """The interface's datapath, attached if asked; None if shaper is not attached and not asked to."""
    from .kernel import KernelDatapath  # kernel access only for commands that need it

    dp = KernelDatapath(iface, netns)
    try:
        if attach:
            dp.attach()
        elif dp.is_attached():
            dp.open_maps()
        else:
            yield None
            return
        yield dp
    finally:
        dp.close()


def load_rules_file(path: str):
    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise InvalidInput("-f", f"cannot read {path}: {exc.strerror}", "a readable YAML rules file") from None
    except yaml.YAMLError as exc:
        raise InvalidInput("-f", f"{path} is not valid YAML: {str(exc).splitlines()[0]}", "a YAML rules file") from None
    return parse_ruleset(data)


iface_option = click.option("--iface", "-i", required=True, help="Interface to shape (egress), e.g. eth0.")
netns_option = click.option("--netns", default=None, help="Network namespace of the interface (a name from `ip netns list`).")


@click.group(context_settings={"auto_envvar_prefix": "SHAPER", "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shaper")
def main() -> None:
    """Per-destination network shaping: eBPF LPM classifier -> HTB -> netem.

    Rules say what to do to traffic towards given destinations (delay,
    jitter, loss, duplicate, corrupt, reorder, rate, TTL); everything else
    leaves the interface untouched.
    """
    logging.basicConfig(format="shaper: %(message)s", level=logging.WARNING)


@main.command()
@iface_option
@netns_option
@click.option("-f", "--file", "rules_file", required=True, type=click.Path(dir_okay=False, allow_dash=False),
              help="YAML rules file: {rules: [{name, dst, delay, ...}]}.")
@click.option("--dry-run", is_flag=True, help="Print what would change, change nothing.")
def apply(iface: str, netns: str | None, rules_file: str, dry_run: bool) -> None:
    """Make IFACE's shaping equal the rules in a file (atomic; only differences change)."""
    from .controller import Controller

    with _errors():
        rules = load_rules_file(rules_file)
        with _datapath(iface, netns, attach=not dry_run) as dp:
            if dry_run:
                if dp is None:
                    click.echo(f"Would attach to {iface} and create {len(rules)} rule(s)")
                    return
                for op in Controller(dp).plan(rules):
                    click.echo(f"Would {_describe(op)}")
                return
            ops = Controller(dp).apply(rules)
        click.echo(f"{iface}: {len(rules)} rule(s), {len(ops)} change(s)")


def _describe(op) -> str:
    name = type(op).__name__
    slot = getattr(op, "slot", None)
    if hasattr(op, "entries"):
        return f"write {len(op.entries)} destination entr(ies)"
    if hasattr(op, "prefixes"):
        return f"remove {len(op.prefixes)} destination entr(ies)"
    rule = getattr(op, "rule", None)
    return f"{name} slot {slot}" + (f" ({rule.name})" if rule else "")


def _status_rows(dp) -> list[dict]:
    from .controller import Controller

    statuses = Controller(dp).status()
    counters = dp.counters([s.slot for s in statuses])
    classes = dp.class_stats()
    now = time.monotonic_ns()
    rows = []
    for s in statuses:
        row = s.rule.to_dict()
        cs = classes.get(s.slot)
        row["classid"] = s.classid
        if s.expires_ns:
            left_us = max(0, (s.expires_ns - now) // 1000)
            row["expires_in"] = "expired" if s.expired else format_duration_us(left_us - left_us % 1_000_000)
        row["matched_packets"] = counters[s.slot].packets
        row["matched_bytes"] = counters[s.slot].bytes
        if cs:
            row.update(class_bytes=cs.bytes, class_packets=cs.packets, drops=cs.drops, overlimits=cs.overlimits,
                       backlog_bytes=cs.backlog_bytes, backlog_packets=cs.backlog_packets, leaf=cs.leaf)
        rows.append(row)
    return rows


_IMPAIRMENTS = ("delay", "jitter", "distribution", "loss", "loss_ge", "duplicate", "corrupt", "reorder", "rate")


def _table(rows: list[dict]) -> str:
    header = ("NAME", "CLASSID", "DST", "IMPAIRMENT", "TTL", "MATCHED", "DROPS", "BACKLOG")
    lines = [header]
    for r in rows:
        imp = " ".join(f"{k}={r[k]}" for k in _IMPAIRMENTS if k in r and not isinstance(r[k], dict))
        if "loss_ge" in r:
            imp += " loss_ge=" + "/".join(r["loss_ge"].values())
        dst = ",".join(r["dst"][:3]) + (f",+{len(r['dst']) - 3}" if len(r["dst"]) > 3 else "")
        lines.append((r["name"], r["classid"], dst, imp or "-", r.get("expires_in", "-"),
                      f"{r['matched_packets']}p/{r['matched_bytes']}B", str(r.get("drops", "-")),
                      f"{r.get('backlog_packets', 0)}p"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


@main.command()
@iface_option
@netns_option
@click.option("-o", "--output", type=OUTPUT_FORMATS, default="table", show_default=True, help="Output format.")
def show(iface: str, netns: str | None, output: str) -> None:
    """Show IFACE's rules with their per-rule and per-class counters."""
    with _errors(), _datapath(iface, netns, attach=False) as dp:
        rows = [] if dp is None else _status_rows(dp)
        if output == "json":
            click.echo(json.dumps({"rules": rows}, indent=2))
        elif output == "yaml":
            click.echo(yaml.safe_dump({"rules": rows}, sort_keys=False), nl=False)
        elif dp is None:
            click.echo(f"shaper is not attached to {iface}")
        else:
            click.echo(_table(rows))


@main.command()
@iface_option
@netns_option
def reset(iface: str, netns: str | None) -> None:
    """Remove everything shaper created on IFACE (filter, HTB tree, pins), nothing else."""
    from .kernel import KernelDatapath

    with _errors():
        dp = KernelDatapath(iface, netns)
        try:
            removed = dp.reset()
        finally:
            dp.close()
        click.echo(f"{iface}: removed {', '.join(removed)}" if removed else f"{iface}: nothing of shaper's to remove")


if __name__ == "__main__":
    main()
