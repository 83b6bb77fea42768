"""The `shaper` command line (click): a thin layer over the controller and the API.

Three kinds of command:
- the daemon: `shaper run --iface IF` serves the HTTP API and /metrics;
- client commands (`rule ...`, `status`, and `apply`/`reset` without --iface)
  talk to a daemon at --server / $SHAPER_SERVER;
- local commands (`apply`/`reset`/`show` with --iface) drive the kernel directly.
Commands parse input into the model and turn errors into exit codes: 0 ok,
2 bad input, 1 any other failure, with a one-line reason on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import click
import yaml

from . import plan as P
from .client import DEFAULT_PORT, DEFAULT_SERVER, Client, read_token
from .errors import InvalidInput, ShaperError
from .model import FIELD_NAMES, parse_ruleset_text
from .openapi import RULE_FIELDS

OUTPUT_FORMATS = click.Choice(["table", "json", "yaml"])


def _fail(exc: ShaperError) -> None:
    click.echo(f"shaper: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
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
    from .kernel import KernelDatapath, claim_interface  # kernel access only for commands that need it

    dp = KernelDatapath(iface, netns)
    claim = None
    try:
        if attach:
            claim = claim_interface(iface, netns)  # refused while a daemon controls it
            dp.attach()
        elif dp.is_attached():
            dp.open_maps()
        else:
            dp.check_accounted()  # "not attached" only when nothing at shaper's pref says otherwise
            yield None
            return
        yield dp
    finally:
        dp.close()
        if claim is not None:
            claim.close()


def load_rules_file(path: str):
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise InvalidInput("-f", f"cannot read {path}: {exc.strerror}", "a readable YAML rules file") from None
    return parse_ruleset_text(text, "-f", path)


iface_option = click.option("--iface", "-i", required=True, help="Interface to shape (egress), e.g. eth0.")
netns_option = click.option("--netns", default=None, help="Network namespace of the interface (a name from `ip netns list`).")
local_iface_option = click.option(
    "--iface", "-i", default=None,
    help="Drive this interface's kernel state directly, without a daemon. Leave it out to ask the daemon.")
output_option = click.option("-o", "--output", type=OUTPUT_FORMATS, default="table", show_default=True,
                             help="Output format.")


def client_options(fn):
    """--server and --token-file, shared by every command that talks to a daemon."""
    fn = click.option("--token-file", envvar="SHAPER_TOKEN_FILE", show_envvar=True, default=None,
                      type=click.Path(dir_okay=False),
                      help="File holding the daemon's bearer token (or set SHAPER_TOKEN).")(fn)
    return click.option("--server", envvar="SHAPER_SERVER", show_envvar=True, default=DEFAULT_SERVER,
                        show_default=True, help="URL of the shaper daemon.")(fn)


def _client(server: str, token_file: str | None) -> Client:
    return Client(server, read_token(token_file))


def _complete_rule_name(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of rule names, asked of the daemon (quietly nothing if it is not there)."""
    server = ctx.params.get("server") or os.environ.get("SHAPER_SERVER") or DEFAULT_SERVER
    try:
        names = [r["name"] for r in Client(server, read_token(ctx.params.get("token_file")), timeout=2).rules()]
    except (ShaperError, KeyError, TypeError):
        return []
    return [n for n in names if n.startswith(incomplete)]


@click.group(context_settings={"auto_envvar_prefix": "SHAPER", "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shaper")
def main() -> None:
    """Per-destination network shaping: eBPF LPM classifier -> HTB -> netem.

    Rules say what to do to traffic towards given destinations (delay,
    jitter, loss, duplicate, corrupt, reorder, rate, TTL); everything else
    leaves the interface untouched.

    Run the daemon with `shaper run --iface IF`, then drive it with
    `shaper rule ...`, `shaper apply -f`, `shaper status`. Shell completion:
    eval "$(_SHAPER_COMPLETE=bash_source shaper)" (zsh_source, fish_source).
    """
    logging.basicConfig(format="shaper: %(message)s", level=logging.WARNING)


# -- the daemon ----------------------------------------------------------------------------------------------
@main.command()
@iface_option
@netns_option
@click.option("--listen", default=f":{DEFAULT_PORT}", show_default=True,
              help="Where the API and /metrics listen: ADDR:PORT, :PORT (every address, v4 and v6), [V6ADDR]:PORT.")
@click.option("--rules", "rules_file", default=None, type=click.Path(dir_okay=False),
              help="YAML rules to apply at start (they replace rules adopted from a previous run).")
@click.option("--initial-rules", "initial_rules_file", default=None, type=click.Path(dir_okay=False),
              help="YAML rules to apply when nothing is adopted; the file may be absent or empty, and bad rules "
                   "are logged (rules.invalid) instead of stopping the daemon. For the shaper.io/rules pod "
                   "annotation.")
@click.option("--token-file", envvar="SHAPER_TOKEN_FILE", show_envvar=True, default=None,
              type=click.Path(dir_okay=False),
              help="File holding a bearer token; requests that change state must send it (or set SHAPER_TOKEN).")
@click.option("--keep-on-exit", is_flag=True,
              help="On exit leave the shaping in place (pinned), for the next start to adopt.")
@click.option("--insecure", is_flag=True,
              help="Allow listening beyond loopback without a token (anyone who reaches the port can change "
                   "shaping).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Lowest level logged (JSON lines on stderr).")
def run(iface: str, netns: str | None, listen: str, rules_file: str | None, initial_rules_file: str | None,
        token_file: str | None, keep_on_exit: bool, insecure: bool, log_level: str) -> None:
    """Run the daemon: attach to IFACE and serve the HTTP API and /metrics.

    Runs until SIGTERM or SIGINT, then removes everything it created on
    IFACE (unless --keep-on-exit). Rules whose TTL passed are removed as
    they expire. Logs one JSON line per change. Listening beyond loopback
    needs a token (--token-file or SHAPER_TOKEN) or --insecure.
    """
    from . import server

    with _errors():
        rules = load_rules_file(rules_file) if rules_file else None
        token = read_token(token_file)
        server.configure_logging(log_level)
        initial = server.load_initial_rules(initial_rules_file) if initial_rules_file else None
        server.run(server.DaemonOptions(iface=iface, netns=netns, listen=listen, rules=rules, token=token,
                                        keep_on_exit=keep_on_exit, insecure=insecure, initial_rules=initial))


# -- rules on a daemon ---------------------------------------------------------------------------------------
@main.group()
def rule() -> None:
    """Create, show and delete single rules on a running daemon."""


def _field_options(fn):
    """One option per rule field (--delay, --loss, ...), described as in the API document."""
    for key in reversed(FIELD_NAMES):
        if key in ("name", "dst"):
            continue
        spec = RULE_FIELDS[key]
        help_text = spec.get("description", "")
        kind: object = str
        if spec.get("type") == "integer":
            kind, metavar = int, "N"
        elif "enum" in spec:
            kind, metavar = click.Choice(spec["enum"]), None
        elif spec.get("pattern", "").endswith("%$"):
            metavar = "PCT"
        else:
            metavar = {"rate": "RATE", "burst": "SIZE", "loss_ge": "P=PCT,..."}.get(key, "DURATION")
        if key == "loss_ge":
            help_text += " Written p=1%,r=20%[,loss_bad=100%,loss_good=0%]."
        elif key.endswith("_corr") and "needs" not in help_text:
            help_text = f"Correlation of successive {key[:-5]} decisions (needs {key[:-5]})."
        fn = click.option("--" + key.replace("_", "-"), key, type=kind, metavar=metavar, default=None,
                          help=help_text)(fn)
    return fn


def _parse_loss_ge(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise InvalidInput("--loss-ge", f"cannot parse {text!r}", "p=1%,r=20%[,loss_bad=100%,loss_good=0%]")
        out[key.strip()] = value.strip()
    return out


@rule.command("set")
@click.argument("name", shell_complete=_complete_rule_name)
@click.option("--dst", multiple=True, required=True, metavar="CIDR",
              help="A destination address or CIDR (IPv4 or IPv6); repeat for more.")
@_field_options
@output_option
@client_options
def rule_set(name: str, dst: tuple[str, ...], output: str, server: str, token_file: str | None, **fields) -> None:
    """Create or replace rule NAME (PUT /rules/NAME).

    The rule becomes exactly what the options say: an option left out is not
    set, even if an older version of the rule had it. Setting a rule again
    restarts its --ttl.
    """
    with _errors():
        data: dict = {"dst": list(dst)}
        for key, value in fields.items():
            if value is not None:
                data[key] = _parse_loss_ge(value) if key == "loss_ge" else value
        stored = _client(server, token_file).put(name, data)
        _emit({"rules": [stored]}, output, lambda: _rules_table([stored]))


@rule.command("get")
@click.argument("name", shell_complete=_complete_rule_name)
@output_option
@client_options
def rule_get(name: str, output: str, server: str, token_file: str | None) -> None:
    """Show rule NAME as the daemon holds it."""
    with _errors():
        found = _client(server, token_file).rule(name)
        _emit(found, output, lambda: _rules_table([found]))


@rule.command("del")
@click.argument("name", shell_complete=_complete_rule_name)
@client_options
def rule_del(name: str, server: str, token_file: str | None) -> None:
    """Delete rule NAME (exit 1 if there is none)."""
    with _errors():
        _client(server, token_file).delete(name)
        click.echo(f"deleted {name}")


@rule.command("list")
@output_option
@client_options
def rule_list(output: str, server: str, token_file: str | None) -> None:
    """List the daemon's rules."""
    with _errors():
        rules = _client(server, token_file).rules()
        _emit({"rules": rules}, output, lambda: _rules_table(rules) if rules else "no rules")


@main.command()
@click.option("-w", "--watch", is_flag=True, help="Refresh until interrupted.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--count", type=click.IntRange(min=0), default=0,
              help="With --watch, stop after this many refreshes (0: until Ctrl-C).")
@output_option
@client_options
def status(watch: bool, interval: float, count: int, output: str, server: str, token_file: str | None) -> None:
    """Per-rule statistics from the daemon: matches, class bytes, drops, backlog."""
    with _errors():
        client = _client(server, token_file)
        shown = 0
        try:
            while True:
                data = client.stats()
                if watch and output == "table":
                    click.clear()
                    click.echo(f"{server}  {data['interface']}  {time.strftime('%H:%M:%S')}  every {interval:g}s")
                _emit(data, output, lambda: _stats_table(data["rules"]) if data["rules"] else "no rules")
                shown += 1
                if not watch or (count and shown >= count):
                    return
                time.sleep(interval)
        except KeyboardInterrupt:
            return


# -- commands that work with a daemon or on the kernel directly ------------------------------------------------
@main.command()
@local_iface_option
@netns_option
@click.option("-f", "--file", "rules_file", required=True, type=click.Path(dir_okay=False, allow_dash=False),
              help="YAML rules file: {rules: [{name, dst, delay, ...}]}.")
@click.option("--dry-run", is_flag=True, help="Print what would change, change nothing.")
@client_options
def apply(iface: str | None, netns: str | None, rules_file: str, dry_run: bool, server: str,
          token_file: str | None) -> None:
    """Make the shaping equal the rules in a file: all or nothing, only differences change.

    Without --iface the daemon does it (PUT /rules); with --iface shaper
    changes that interface's kernel state itself.
    """
    from .controller import Controller

    with _errors():
        rules = load_rules_file(rules_file)
        if iface is None:
            _no_netns_without_iface(netns)
            result = _client(server, token_file).replace({"rules": [r.to_dict() for r in rules]}, dry_run)
            if dry_run:
                for change in result["changes"]:
                    click.echo(f"Would {change}")
            else:
                click.echo(f"{server}: {len(result['rules'])} rule(s) applied")
            return
        with _datapath(iface, netns, attach=not dry_run) as dp:
            if dry_run:
                if dp is None:
                    click.echo(f"Would attach to {iface} and create {len(rules)} rule(s)")
                    return
                for op in Controller(dp).plan(rules):
                    click.echo(f"Would {P.describe(op)}")
                return
            ops = Controller(dp).apply(rules)
        click.echo(f"{iface}: {len(rules)} rule(s), {len(ops)} change(s)")


@main.command()
@local_iface_option
@netns_option
@client_options
def reset(iface: str | None, netns: str | None, server: str, token_file: str | None) -> None:
    """Remove shaping.

    Without --iface: delete every rule on the daemon (DELETE /rules); the
    daemon stays attached. With --iface: remove everything shaper created on
    that interface (filter, HTB tree, pins) and nothing else.
    """
    with _errors():
        if iface is None:
            _no_netns_without_iface(netns)
            deleted = _client(server, token_file).clear()
            click.echo(f"{server}: deleted {len(deleted)} rule(s)")
            return
        from .kernel import KernelDatapath, claim_interface

        dp = KernelDatapath(iface, netns)
        try:
            with claim_interface(iface, netns):  # the socket is the claim; closing it lets go
                removed = dp.reset()
        finally:
            dp.close()
        click.echo(f"{iface}: removed {', '.join(removed)}" if removed else f"{iface}: nothing of shaper's to remove")


def _no_netns_without_iface(netns: str | None) -> None:
    if netns:
        raise InvalidInput("--netns", "only applies with --iface", "--iface IF --netns NS")


@main.command()
@iface_option
@netns_option
@output_option
def show(iface: str, netns: str | None, output: str) -> None:
    """Show IFACE's rules with their counters, read from the kernel (no daemon needed)."""
    with _errors(), _datapath(iface, netns, attach=False) as dp:
        rows = [] if dp is None else _status_rows(dp)
        if dp is None and output == "table":
            click.echo(f"shaper is not attached to {iface}")
        else:
            _emit({"rules": rows}, output, lambda: _stats_table(rows))


# -- the admission webhook -------------------------------------------------------------------------------------
@main.command()
@click.option("--listen", default=":8443", show_default=True, help="Where HTTPS is served (ADDR:PORT, :PORT).")
@click.option("--tls-cert", required=True, type=click.Path(dir_okay=False),
              help="PEM certificate for the webhook Service's DNS name (reloaded when the file changes).")
@click.option("--tls-key", required=True, type=click.Path(dir_okay=False), help="PEM private key of --tls-cert.")
@click.option("--image", required=True, help="The shaper image the sidecar runs.")
@click.option("--namespace", envvar="POD_NAMESPACE", show_envvar=True, default="shaper-system", show_default=True,
              help="The webhook's own namespace: pods there are never injected (nor in kube-system).")
@click.option("--sidecar", type=click.Choice(["native", "container"]), default="native", show_default=True,
              help="native: an init container with restartPolicy Always, up before the app (Kubernetes >= 1.29); "
                   "container: an ordinary container, for older clusters.")
@click.option("--token-secret", default="shaper-token", show_default=True,
              help="Secret (in the pod's namespace) whose key --token-key holds the API token.")
@click.option("--token-key", default="token", show_default=True)
@click.option("--interface", default="eth0", show_default=True,
              help="Pod interface to shape (a pod's shaper.io/interface annotation overrides it).")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port of the sidecar's API and /metrics (named shaper-metrics).")
@click.option("--pull-policy", type=click.Choice(["IfNotPresent", "Always", "Never"]), default="IfNotPresent",
              show_default=True)
@click.option("--sys-admin", is_flag=True,
              help="Also give the sidecar CAP_SYS_ADMIN: for kernels before 5.8 (no CAP_BPF) or nodes whose "
                   "/sys/fs/bpf is not a bpffs mount.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def webhook(listen: str, tls_cert: str, tls_key: str, image: str, namespace: str, sidecar: str, token_secret: str,
            token_key: str, interface: str, port: int, pull_policy: str, sys_admin: bool, log_level: str) -> None:
    """Serve the mutating admission webhook that adds the shaper sidecar to pods (POST /inject).

    Deployed from deploy/ (see README, "Kubernetes"): pods of namespaces
    labelled shaper-injection=enabled get the sidecar unless annotated
    shaper.io/inject: "false"; elsewhere, pods annotated "true" get it.
    Never twice, never in its own namespace or kube-system, CREATE only.
    """
    from . import server, webhook as wh

    with _errors():
        server.configure_logging(log_level)
        cfg = wh.SidecarConfig(image=image, namespace=namespace, native=sidecar == "native",
                               token_secret=token_secret, token_key=token_key, interface=interface, port=port,
                               pull_policy=pull_policy, sys_admin=sys_admin)
        wh.serve(cfg, listen, tls_cert, tls_key)


# -- output ----------------------------------------------------------------------------------------------------
def _status_rows(dp) -> list[dict]:
    from .controller import Controller

    now = time.monotonic_ns()
    return [s.to_dict(now) for s in Controller(dp).stats()]


def _emit(data: object, output: str, table: Callable[[], str]) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)
    else:
        click.echo(table())


_IMPAIRMENTS = ("delay", "jitter", "distribution", "loss", "duplicate", "corrupt", "reorder", "rate")


def _impairment(r: dict) -> str:
    text = " ".join(f"{k}={r[k]}" for k in _IMPAIRMENTS if k in r)
    if "loss_ge" in r:
        text += " loss_ge=" + "/".join(r["loss_ge"].values())
    return text.strip() or "-"


def _dst(r: dict) -> str:
    return ",".join(r["dst"][:3]) + (f",+{len(r['dst']) - 3}" if len(r["dst"]) > 3 else "")


def _format(header: tuple[str, ...], lines: list[tuple]) -> str:
    lines = [header, *lines]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _rules_table(rules: list[dict]) -> str:
    return _format(("NAME", "DST", "IMPAIRMENT", "TTL"),
                   [(r["name"], _dst(r), _impairment(r), r.get("ttl", "-")) for r in rules])


def _stats_table(rows: list[dict]) -> str:
    return _format(
        ("NAME", "CLASSID", "DST", "IMPAIRMENT", "TTL", "MATCHED", "DROPS", "BACKLOG"),
        [(r["name"], r["classid"], _dst(r), _impairment(r), r.get("expires_in", "-"),
          f"{r['matched_packets']}p/{r['matched_bytes']}B", str(r.get("drops", "-")),
          f"{r.get('backlog_packets', 0)}p") for r in rows],
    )


if __name__ == "__main__":
    main()
