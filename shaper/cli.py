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

import contextvars
import errno
import fnmatch
import functools
import json
import logging
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import click
import yaml

from shaper.core.changes import changes_from, describe as describe_change, natural_key, rule_changes
from shaper.http.client import DEFAULT_AGENT_PORT, DEFAULT_PORT, DEFAULT_SERVER, Client, read_token
from shaper.errors import ApiError, Conflict, InvalidInput, KernelError, PermissionDenied, ShaperError
from shaper.core.fields import OPTIONAL_FIELDS, Field, unknown_field
from shaper.core.model import (gc_paused, load_ruleset_text, max_prefixes_from, parse_loaded_ruleset, parse_rule,
                               with_line)
from shaper.core.plan import set_max_prefixes
from shaper.core.stats import format_remaining
from shaper.core.units import format_bits_per_s, format_bytes, format_count, parse_duration_us

OUTPUT_FORMATS = click.Choice(["table", "json", "yaml"])


def _fail(exc: ShaperError) -> None:
    click.echo(f"shaper: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
    sys.exit(exc.exit_code)


_PRIVILEGE_ERRNOS = (errno.EPERM, errno.EACCES)


def _root_hint(text: str) -> str:
    """A refusal's text, telling a non-root user what to do (as root, the refusal has another cause)."""
    if os.geteuid() == 0 or "root" in text:
        return text
    return f"{text}; run as root (sudo shaper ...) or with CAP_NET_ADMIN and CAP_BPF"


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (PermissionDenied, KernelError) as exc:
        if isinstance(exc, PermissionDenied) or exc.errno in _PRIVILEGE_ERRNOS:
            exc.args = (_root_hint(str(exc).splitlines()[0]),)
        _fail(exc)
    except Conflict as exc:
        # To a non-root user shaper's own classifier looks unaccounted for: its pins are unreadable.
        exc.args = (str(exc).splitlines()[0] + _unseen_hint(),)
        _fail(exc)
    except ShaperError as exc:
        _fail(exc)
    except PermissionError as exc:  # a file, bpffs or /proc path the kernel refused to this user
        _fail(ShaperError(_root_hint(f"{exc.filename or 'the kernel'}: {exc.strerror}")))
    except Exception as exc:
        # pyroute2's NetlinkError (imported only by local commands) carries the errno as .code.
        if type(exc).__name__ != "NetlinkError" or getattr(exc, "code", None) not in _PRIVILEGE_ERRNOS:
            raise
        _fail(ShaperError(_root_hint(f"netlink: {os.strerror(exc.code)}")))


@contextmanager
def _datapath(iface: str, netns: str | None, *, attach: bool) -> Iterator:
    """The interface's datapath, attached if asked; None if shaper is not attached and not asked to."""
    from shaper.datapath.kernel import KernelDatapath, claim_interface  # kernel access only for commands that need it

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


def load_rules_file(path: str, progress: "Progress | None" = None):
    text, data = read_rules_file(path, progress)
    return parse_loaded_ruleset(data, text, path)


def read_rules_file(path: str, progress: "Progress | None" = None) -> tuple[bytes, object]:
    """A rules file's text and its YAML, loaded but not validated."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise InvalidInput("-f", f"cannot read {path}: {exc.strerror}", "a readable YAML rules file") from None
    if progress is not None:
        progress.step(f"parsing {path} ({len(text) / 1e6:.1f} MB)" if len(text) >= 100_000 else f"parsing {path}")
    return text, load_ruleset_text(text, "-f", path)


def _as_written(data: object, text: bytes, path: str) -> tuple[bytes, int, int]:
    """A loaded rules file as the body of PUT /rules, with its rule and prefix counts.

    The daemon validates every document it is sent, so a file shaped like one ({rules: [mapping,
    ...]}) goes as written, without building and writing back every rule here first (for
    1,000,000 prefixes that was 2.8 s of the command); its refusal names the line (model.with_line).
    Anything else is validated here, which says what is wrong with it and where, or turns it into
    rules (a YAML value JSON has no form for is refused here, by the field that holds it), and so
    is a file with aliases: YAML shares an aliased node where JSON would write it out each time,
    so a few lines of aliases could make a body of gigabytes (an alias needs a '*')."""
    items = data.get("rules") if isinstance(data, dict) and list(data) == ["rules"] and b"*" not in text else None
    if isinstance(items, list) and all(isinstance(r, dict) for r in items):
        try:
            body = json.dumps(data, allow_nan=False).encode()
        except (TypeError, ValueError):  # a date, binary, a set, NaN...: validated below
            pass
        else:
            return body, len(items), sum(_peer_count(r) for r in items)
    with gc_paused():
        rules = parse_loaded_ruleset(data, text, path)
        body = json.dumps({"rules": [r.to_dict() for r in rules]}).encode()
    return body, len(rules), sum(len(r.dst) for r in rules)


def _peer_count(item: dict) -> int:
    peers = item.get("dst") if item.get("dst") is not None else item.get("src")
    return len(peers) if isinstance(peers, list) else 1


class Progress:
    """What a long command is doing, on one stderr line that changes as it goes.

    Only on a terminal (piped or redirected, stderr gets nothing extra) and only once the
    work has taken `after_s`: a quick command prints just its result.  A timer thread
    puts the line up, because the step that crosses the second is often one long call
    (libyaml parsing a big file)."""

    AFTER_S = 1.0

    def __init__(self, stream=None, after_s: float | None = None):
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.enabled = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.enabled = False
        self.started = time.monotonic()
        self.text = ""
        self.shown = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        after_s = self.AFTER_S if after_s is None else after_s
        if self.enabled and after_s <= 0:
            self.shown = True
        elif self.enabled:
            self._timer = threading.Timer(after_s, self._show)
            self._timer.daemon = True
            self._timer.start()

    def step(self, text: str) -> None:
        with self._lock:
            self.text = text
            if self.shown:
                self._write(f"{text} ...")

    def finish(self, summary: str) -> None:
        """The summary, with the time taken, in place of the progress line (if it was shown)."""
        self._stop()
        with self._lock:
            if self.shown:
                self._write(f"{summary} in {time.monotonic() - self.started:.1f}s\n")
                self.shown = False

    def close(self) -> None:
        """Clear the progress line, so what follows (an error) starts on a clean line."""
        self._stop()
        with self._lock:
            if self.shown:
                self._write("")
                self.shown = False

    def _show(self) -> None:
        with self._lock:
            self.shown = True
            if self.text:
                self._write(f"{self.text} ...")

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _write(self, text: str) -> None:
        try:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: the work goes on
            pass


@contextmanager
def _progress() -> Iterator[Progress]:
    progress = Progress()
    try:
        yield progress
    finally:
        progress.close()


def _counted(rules: int, prefixes: int) -> str:
    return f"{rules} rule{'' if rules == 1 else 's'}, {prefixes} prefix{'' if prefixes == 1 else 'es'}"


iface_option = click.option("--iface", "-i", required=True, metavar="IFACE",
                            help="Interface whose egress shaper shapes, e.g. eth0.")
netns_option = click.option("--netns", default=None, metavar="NS",
                            help="Network namespace of the interface: a name from `ip netns list`, or a "
                                 "namespace file such as /proc/PID/ns/net.")
local_iface_option = click.option(
    "--iface", "-i", default=None, metavar="IFACE",
    help="Drive this interface's kernel state directly, without a daemon. Leave it out to ask the daemon.")
output_option = click.option("-o", "--output", type=OUTPUT_FORMATS, default="table", show_default=True,
                             help="Output format.")
rule_filter_option = click.option(
    "--rule", "rule_patterns", multiple=True, metavar="GLOB",
    help="Only rules whose name matches this shell pattern (e.g. 'db*'); repeat for more.")


_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)


def client_options(fn):
    """--server, --token-file and --target, shared by every command that talks to a daemon."""
    @functools.wraps(fn)
    def with_target(*args, target: str | None = None, **kwargs):
        _TARGET.set(target)
        return fn(*args, **kwargs)

    cmd = click.option("--target", envvar="SHAPER_TARGET", show_envvar=True, default=None, metavar="TARGET",
                       help="With --server at a node agent (shaper agent): the pod or container to act on, e.g. "
                            "10.244.1.7, container:web, pid:4242 (see `shaper agent --help`).")(with_target)
    cmd = click.option("--token-file", envvar="SHAPER_TOKEN_FILE", show_envvar=True, default=None,
                       type=click.Path(dir_okay=False),
                       help="File holding the daemon's bearer token (or set SHAPER_TOKEN).")(cmd)
    return click.option("--server", envvar="SHAPER_SERVER", show_envvar=True, default=DEFAULT_SERVER,
                        show_default=True, metavar="URL", help="URL of the shaper daemon.")(cmd)


def _client(server: str, token_file: str | None) -> Client:
    return Client(server, read_token(token_file), target=_TARGET.get())


def _complete_rule_name(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of rule names, asked of the daemon (quietly nothing if it is not there)."""
    server = ctx.params.get("server") or os.environ.get("SHAPER_SERVER") or DEFAULT_SERVER
    try:
        names = [r["name"] for r in Client(server, read_token(ctx.params.get("token_file")), timeout=2,
                                           target=ctx.params.get("target")).rules()]
    except (ShaperError, KeyError, TypeError):
        return []
    return sorted((n for n in names if n.startswith(incomplete)), key=natural_key)


@click.group(context_settings={"auto_envvar_prefix": "SHAPER", "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shaper")
def main() -> None:
    """Per-destination network shaping: eBPF LPM classifier -> HTB -> netem.

    Rules say what to do to traffic towards given destinations (delay,
    jitter, loss, duplicate, corrupt, reorder, rate, TTL); everything else
    leaves the interface untouched.

    Run the daemon with `shaper run --iface IF`, then drive it with
    `shaper rule ...`, `shaper apply -f`, `shaper status`. Without a daemon,
    `shaper apply/show/reset --iface IF` drive the kernel directly (as
    root). Every command has --help. Shell completion:
    eval "$(_SHAPER_COMPLETE=bash_source shaper)" (zsh_source, fish_source).
    """
    logging.basicConfig(format="shaper: %(message)s", level=logging.WARNING)
    try:
        set_max_prefixes(max_prefixes_from(os.environ))
    except InvalidInput as exc:
        click.echo(f"shaper: {exc}", err=True)
        sys.exit(exc.exit_code)


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
@click.option("--pod-bandwidth", "pod_bandwidth_dir", default=None, type=click.Path(file_okay=False),
              help="Directory holding kubelet's pod bandwidth annotations as files egress-bandwidth and "
                   "ingress-bandwidth (Kubernetes quantities in bits/s, e.g. 10M); each becomes a whole-pod rate "
                   "rule applied with --initial-rules, under the same policy. Absent or empty files: none.")
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
        pod_bandwidth_dir: str | None, token_file: str | None, keep_on_exit: bool, insecure: bool,
        log_level: str) -> None:
    """Run the daemon: attach to IFACE and serve the HTTP API and /metrics.

    Runs until SIGTERM or SIGINT, then removes everything it created on
    IFACE (unless --keep-on-exit). SIGHUP applies the --rules file again
    (without --rules it is ignored, with a log line); SIGUSR1, SIGUSR2 and
    SIGALRM are ignored. Rules whose TTL passed are removed as
    they expire. Logs one JSON line per change. Listening beyond loopback
    needs a token (--token-file or SHAPER_TOKEN) or --insecure.
    """
    from shaper import daemon
    from shaper.http.server import configure_logging

    with _errors():
        rules = load_rules_file(rules_file) if rules_file else None
        token = read_token(token_file)
        configure_logging(log_level)
        initial = daemon.initial_rules(initial_rules_file, pod_bandwidth_dir)
        daemon.run(daemon.DaemonOptions(iface=iface, netns=netns, listen=listen, rules=rules, token=token,
                                        keep_on_exit=keep_on_exit, insecure=insecure, initial_rules=initial,
                                        rules_file=rules_file))


@main.command()
@click.option("--iface", "-i", default="eth0", show_default=True, metavar="IFACE",
              help="The interface shaped in each target's network namespace (a pod's eth0).")
@click.option("--listen", default=f":{DEFAULT_AGENT_PORT}", show_default=True,
              help="Where the API and /metrics are served (ADDR:PORT, :PORT); on a node, its hostIP.")
@click.option("--token-file", envvar="SHAPER_TOKEN_FILE", show_envvar=True, default=None,
              type=click.Path(dir_okay=False), help="File holding the bearer token changes need (or SHAPER_TOKEN).")
@click.option("--reset-on-exit", is_flag=True,
              help="Remove every target's shaping on exit. By default it stays, and a restarted agent adopts it.")
@click.option("--insecure", is_flag=True,
              help="Serve beyond loopback without a token: anyone who can reach the port can change shaping.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Lowest level logged (JSON lines on stderr).")
def agent(iface: str, listen: str, token_file: str | None, reset_on_exit: bool, insecure: bool,
          log_level: str) -> None:
    """Run the node agent: shape other pods' and containers' network namespaces, no sidecar needed.

    One per node (a DaemonSet with hostNetwork and hostPID, see deploy/agent/).
    Each target gets the datapath a sidecar would build on its IFACE, pinned
    per target; a target is named in the URL, /targets/TARGET/rules[/NAME],
    or with --target on the client commands, as one of:

    \b
      10.244.1.7 or fd00::7     the pod holding that address
      pid:4242                  the namespace of a process (the node's PIDs)
      netns:NAME                a name from `ip netns list`
      netns:/proc/PID/ns/net    a namespace file (or /run/netns/NAME)
      inode:4026532301          a namespace by its inode (GET /targets: netns)
      container:NAME_OR_ID      asked of podman and crictl, and of containerd's
                                and CRI-O's state
      podman:NAME, cri:NAME     asked of that runtime only

    The first PUT of a rule starts shaping a target; DELETE /targets/TARGET
    removes it. Looking up a target not shaped yet needs the token. A target
    whose namespace is gone is swept (its pins too), as are the pins dead
    sidecars left. On SIGTERM the shaping stays and the next agent adopts it
    (--reset-on-exit removes it). Needs the node's PIDs (hostPID).
    """
    from shaper import agent as node_agent
    from shaper.http.server import configure_logging

    with _errors():
        token = read_token(token_file)
        configure_logging(log_level)
        node_agent.run(node_agent.AgentOptions(iface=iface, listen=listen, token=token, insecure=insecure,
                                               reset_on_exit=reset_on_exit))


@main.group()
def target() -> None:
    """The targets of a node agent (shaper agent): list them, or remove one's shaping.

    Every client command (rule ..., status, apply, reset) acts on one target
    with --target, e.g. `shaper rule set db --dst 10.0.0.5 --delay 50ms
    --server http://NODE:2333 --target 10.244.1.7`.
    """


@target.command("list")
@output_option
@client_options
def target_list(output: str, server: str, token_file: str | None) -> None:
    """The targets the agent shapes, with their rules and what it knows of them."""
    with _errors():
        rows = _client(server, token_file).targets()
        _emit({"targets": rows}, output, lambda: _format(
            ("TARGET", "NETNS", "PID", "POD", "RULES", "SINCE"),
            [(r["target"], str(r["netns"]), str(r.get("pid") or "-"),
              f"{r['namespace']}/{r['pod']}" if r.get("pod") else r.get("container") or "-",
              str(r.get("rules") if r.get("rules") is not None else "-"), r.get("since", "-")) for r in rows]))


@target.command("rm")
@click.argument("name", metavar="TARGET")
@client_options
def target_rm(name: str, server: str, token_file: str | None) -> None:
    """Remove everything shaper made in a target, and let go of it."""
    with _errors():
        done = _client(server, token_file).remove_target(name)
        click.echo(f"{server}: {done['deleted']}: removed {', '.join(done['removed']) or 'nothing'}")


# -- rules on a daemon ---------------------------------------------------------------------------------------
@main.group()
def rule() -> None:
    """Create, show, change and delete single rules on a running daemon.

    The daemon is at --server (or $SHAPER_SERVER); changes need its token
    when it has one (--token-file, or $SHAPER_TOKEN).
    """


def field_options(fields: tuple[Field, ...]) -> Callable:
    """A decorator adding one option per rule field (--delay, --loss, ...), as shaper.core.fields describes it."""
    def decorate(fn):
        for spec in reversed(fields):
            kind: object = str
            if spec.schema.get("type") == "integer":
                kind = int
            elif "enum" in spec.schema:
                kind = click.Choice(spec.schema["enum"])
            fn = click.option(spec.flag, *spec.option.aliases, spec.key, type=kind, metavar=spec.option.metavar,
                              multiple=spec.option.multiple, default=() if spec.option.multiple else None,
                              help=spec.help())(fn)
        return fn
    return decorate


_field_options = field_options(OPTIONAL_FIELDS)


def _field_values(fields: dict) -> dict:
    """The rule fields given as options, in the API's form."""
    out = {}
    for spec in OPTIONAL_FIELDS:
        value = fields.get(spec.key)
        if spec.option.multiple:  # repeated: one list, as if written comma-separated
            value = ",".join(value) if value else None
        if value is not None:
            out[spec.key] = spec.option.to_json(value) if spec.option.to_json else value
    return out


def _stored_table(stored: dict) -> str:
    """A rule just PUT: its TTL has restarted, so all of it is left."""
    row = dict(stored)
    if "ttl" in stored:
        row["expires_in"] = format_remaining(parse_duration_us(stored["ttl"], "ttl", max_us=2**62))
    return _rules_table([row], _terminal_width())


@rule.command("set")
@click.argument("name", shell_complete=_complete_rule_name)
@click.option("--dst", multiple=True, metavar="CIDR",
              help="A peer address or CIDR (IPv4 or IPv6): the destination on egress, the source on ingress; "
                   "repeat for more.")
@click.option("--src", multiple=True, metavar="CIDR",
              help="The peers of an ingress rule (instead of --dst; the direction becomes ingress); repeat for more.")
@_field_options
@output_option
@client_options
def rule_set(name: str, dst: tuple[str, ...], src: tuple[str, ...], output: str, server: str,
             token_file: str | None, **fields) -> None:
    """Create or replace rule NAME (PUT /rules/NAME).

    The rule becomes exactly what the options say: an option left out is not
    set, even if an older version of the rule had it (to change some fields
    and keep the others, use `shaper rule patch`). Setting a rule again
    restarts its --ttl.

    \b
    Example:
      shaper rule set db --dst 10.0.0.5 --dst fd00::5 --delay 50ms --jitter 5ms --ttl 10m
      shaper rule set pg --dst 10.0.0.5 --protocol tcp --port 5432 --direction both --delay 50ms
      shaper rule set from-cache --src 10.0.0.7 --rate 2mbit
    """
    with _errors():
        if not dst and not src:
            raise InvalidInput("--dst", "is required (or --src for an ingress rule)", "--dst CIDR, repeated")
        data: dict = {"src": list(src)} if src and not dst else {"dst": list(dst)}
        if src and dst:
            data["src"] = list(src)  # the parser names the clash
        data.update(_field_values(fields))
        parse_rule(data, name=name)  # bad input is exit 2 before anything is sent, and warns here
        stored = _client(server, token_file).put(name, data)
        _emit({"rules": [stored]}, output, lambda: _stored_table(stored))


_CLEARABLE = tuple(spec.key for spec in OPTIONAL_FIELDS)


@rule.command("patch")
@click.argument("name", shell_complete=_complete_rule_name)
@click.option("--dst", multiple=True, metavar="CIDR",
              help="Replace the destinations with these; repeat for more.")
@click.option("--add-dst", multiple=True, metavar="CIDR", help="Add a destination; repeat for more.")
@click.option("--remove-dst", multiple=True, metavar="CIDR", help="Remove a destination; repeat for more.")
@_field_options
@click.option("--clear", "clear", multiple=True, metavar="FIELD",
              help=f"Remove FIELD from the rule (e.g. --clear loss); repeat for more. One of: {', '.join(_CLEARABLE)}.")
@output_option
@client_options
def rule_patch(name: str, dst: tuple[str, ...], add_dst: tuple[str, ...], remove_dst: tuple[str, ...],
               clear: tuple[str, ...], output: str, server: str, token_file: str | None, **fields) -> None:
    """Change some fields of rule NAME and keep the others (PATCH /rules/NAME).

    Only what the options say changes; --clear FIELD removes a field. The
    daemon merges and applies the change in one step, and the rule's TTL
    restarts as with `rule set`. --add-dst and --remove-dst read the rule's
    destinations first (a change between the read and the patch is lost).

    \b
    Examples:
      shaper rule patch db --delay 20ms
      shaper rule patch cache --rate 5mbit --clear loss
      shaper rule patch db --add-dst 10.0.0.6
    """
    with _errors():
        patch = _field_values(fields)
        for key in clear:
            key = key.replace("-", "_")
            if key not in _CLEARABLE:
                raise unknown_field("--clear", key, _CLEARABLE)
            if key in patch:
                raise InvalidInput("--clear", f"{key} is both set and cleared", "a field set or cleared, not both")
            patch[key] = None
        if dst and (add_dst or remove_dst):
            raise InvalidInput("--dst", "replaces the destinations; it cannot be combined with --add-dst or "
                               "--remove-dst", "--dst alone, or --add-dst/--remove-dst")
        if dst:
            patch["dst"] = list(dst)
        client = _client(server, token_file)
        if add_dst or remove_dst:
            patch["dst"] = _edit_dst(client.rule(name)["dst"], add_dst, remove_dst)
        if not patch:
            raise InvalidInput("rule patch", "nothing to change",
                               "at least one field option (e.g. --delay 20ms), --dst, --add-dst, --remove-dst "
                               "or --clear FIELD")
        stored = client.patch(name, patch)
        _emit({"rules": [stored]}, output, lambda: _stored_table(stored))


def _edit_dst(current: list[str], add: tuple[str, ...], remove: tuple[str, ...]) -> list[str]:
    from shaper.core.model import Prefix

    have = {Prefix.parse(d, "dst"): d for d in current}
    for i, d in enumerate(remove):
        prefix = Prefix.parse(d, f"--remove-dst[{i}]")
        if have.pop(prefix, None) is None:
            raise InvalidInput("--remove-dst", f"{prefix} is not a destination of this rule", "one of " +
                               ", ".join(current[:10]) + (", ..." if len(current) > 10 else ""))
    for i, d in enumerate(add):
        have.setdefault(Prefix.parse(d, f"--add-dst[{i}]"), d)
    if not have:
        raise InvalidInput("--remove-dst", "would leave the rule without destinations",
                           "at least one destination (delete the rule with `shaper rule del`)")
    return [str(p) for p in sorted(have)]


@rule.command("get")
@click.argument("name", shell_complete=_complete_rule_name)
@output_option
@client_options
def rule_get(name: str, output: str, server: str, token_file: str | None) -> None:
    """Show rule NAME as the daemon holds it (TTL: the time it has left)."""
    with _errors():
        client = _client(server, token_file)
        found = client.rule(name)
        if output == "table":
            rows = [r for r in client.stats()["rules"] if r["name"] == name] or [found]  # one per direction
            click.echo(_rules_table(rows, _terminal_width()))
            return
        _emit(found, output, str)


@rule.command("del")
@click.argument("name", shell_complete=_complete_rule_name)
@client_options
def rule_del(name: str, server: str, token_file: str | None) -> None:
    """Delete rule NAME (exit 1 if there is none)."""
    with _errors():
        _client(server, token_file).delete(name)
        click.echo(f"deleted {name}")


@rule.command("list")
@rule_filter_option
@output_option
@client_options
def rule_list(rule_patterns: tuple[str, ...], output: str, server: str, token_file: str | None) -> None:
    """List the daemon's rules, by name (rule-2 before rule-10).

    TTL is the time each rule has left, as in `shaper status`. With -o json
    or yaml the rules are in the form `shaper apply -f` takes back.
    """
    with _errors():
        client = _client(server, token_file)
        if output == "table":  # the time left is in GET /stats, not in the rules themselves
            rows = _select(client.stats()["rules"], rule_patterns)
            click.echo(_rules_table(rows, _terminal_width()) if rows else _none(rule_patterns))
            return
        _emit({"rules": _select(client.rules(), rule_patterns)}, output, str)


@main.command()
@click.option("-w", "--watch", is_flag=True,
              help="Refresh until interrupted, with per-second throughput (SENT/S) and drops (DROPS/S) "
                   "between refreshes. On a terminal the table is redrawn in place; piped, each refresh is a "
                   "block of its own.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--count", type=click.IntRange(min=0), default=0,
              help="With --watch, stop after this many refreshes (0: until Ctrl-C).")
@rule_filter_option
@output_option
@client_options
def status(watch: bool, interval: float, count: int, rule_patterns: tuple[str, ...], output: str, server: str,
           token_file: str | None) -> None:
    """Per-rule statistics from the daemon (GET /stats).

    For each rule: its destinations, impairment, the time its TTL has left,
    packets and bytes the classifier matched (MATCHED), sent through its
    class (SENT), dropped (netem loss included) and queued now (BACKLOG).
    Rules are listed by name, rule-2 before rule-10; the table fits the
    terminal, long destination lists shortened to "+N". Once a rule shapes
    ingress, a DIR column says which direction each line counts (a rule
    with direction both has a line for each, egress first) and PEERS
    replaces DST; once a rule selects a protocol or ports, MATCH says
    which (tcp/5432,8000-8100, udp, -).
    """
    with _errors():
        client = _client(server, token_file)
        rates = _Rates()
        tty = watch and output == "table" and _is_tty()
        shown = 0
        try:
            while True:
                data = client.stats()
                rows = _select(data["rules"], rule_patterns)
                per_second = rates.update(rows, time.monotonic()) if watch else None
                if watch and output == "table":
                    _watch_frame(data, rows, per_second, server, interval, redraw=tty, first=shown == 0)
                else:
                    table = lambda: _stats_table(rows, _terminal_width()) if rows else _none(rule_patterns)
                    _emit({**data, "rules": rows}, output, table)
                shown += 1
                if not watch or (count and shown >= count):
                    return
                time.sleep(interval)
        except KeyboardInterrupt:
            return


def _none(patterns: tuple[str, ...]) -> str:
    return f"no rule matches {' '.join(patterns)}" if patterns else "no rules"


def _watch_frame(data: dict, rows: list[dict], rates: dict, server: str, interval: float, *, redraw: bool,
                 first: bool) -> None:
    """One refresh of `status --watch`: a header line, then the table.

    On a terminal the frame overwrites the previous one from the top-left
    corner (clearing the screen each time flickers) and keeps to the
    terminal's size; piped, frames follow each other, a blank line apart."""
    selected, total = len({r["name"] for r in rows}), len({r["name"] for r in data["rules"]})  # a line per direction
    shown = f"{selected} of {total} rules" if selected != total else f"{selected} rules"
    lines = [f"{server}  {data['interface']}  {time.strftime('%H:%M:%S')}  every {interval:g}s  {shown}"
             + ("  (rates from the next refresh)" if first and rows else "")]
    width = _terminal_width()
    if width is not None:
        lines[0] = _cut(lines[0], width)
    lines += (_stats_table(rows, width, rates) if rows else _none(())).split("\n")
    if not redraw:
        click.echo(("" if first else "\n") + "\n".join(lines))
        return
    height = shutil.get_terminal_size().lines
    if len(lines) > height - 1:
        hidden = len(lines) - (height - 2)
        lines = lines[:height - 2] + [f"... {hidden} more rule(s): narrow them with --rule GLOB"]
    # Home, each line then clear to its end, then clear below: no flicker, no scrolling.
    out = ("\x1b[H\x1b[2J" if first else "\x1b[H") + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J"
    click.echo(out, nl=False, color=True)  # click strips escape sequences it does not know to be wanted


# -- commands that work with a daemon or on the kernel directly ------------------------------------------------
@main.command()
@local_iface_option
@netns_option
@click.option("-f", "--file", "rules_file", required=True, type=click.Path(dir_okay=False, allow_dash=False),
              help="YAML rules file: {rules: [{name, dst, delay, ...}]}.")
@click.option("--dry-run", is_flag=True,
              help="Print what would change, rule by rule (+ created, ~ changed with old -> new values, "
                   "- deleted), and change nothing.")
@client_options
def apply(iface: str | None, netns: str | None, rules_file: str, dry_run: bool, server: str,
          token_file: str | None) -> None:
    """Make the shaping equal the rules in a file: all or nothing, only differences change.

    Without --iface the daemon does it (PUT /rules); with --iface shaper
    changes that interface's kernel state itself (as root). Rules not in the
    file are deleted; an empty `rules: []` deletes them all.

    \b
    Examples:
      shaper apply -f rules.yaml --dry-run
      shaper apply --iface eth0 -f rules.yaml
    """
    from shaper.control.controller import Controller

    with _errors(), _progress() as progress:
        if iface is None:
            _no_netns_without_iface(netns)
            text, data = read_rules_file(rules_file, progress)
            body, nrules, nprefixes = _as_written(data, text, rules_file)
            del data
            counted = _counted(nrules, nprefixes)
            progress.step(f"{'planning' if dry_run else 'applying'} {counted} through {server}")
            try:
                result = _client(server, token_file).replace(body, dry_run, minimal=True)
            except ApiError as exc:
                raise with_line(exc, text, rules_file) from None
            progress.finish(counted + (" planned" if dry_run else " applied"))
            if dry_run:
                _print_dry_run(server, result.get("rule_changes"), nrules, result["changes"])
            else:
                click.echo(f"{server}: {len(result.get('names', result.get('rules', ())))} rule(s) applied")
            return
        rules = load_rules_file(rules_file, progress)
        counted = _counted(len(rules), sum(len(r.dst) for r in rules))
        _no_target_with_iface()
        progress.step(f"{'reading' if dry_run else 'attaching to'} {iface}")
        with _datapath(iface, netns, attach=not dry_run) as dp:
            progress.step(f"{'planning' if dry_run else 'applying'} {counted} on {iface}")
            if dry_run:
                changed = rule_changes([], rules) if dp is None else changes_from(dp.observe(), rules,
                                                                                   time.monotonic_ns())
                progress.finish(f"{counted} planned")  # before the output, not across it
                if dp is None:
                    click.echo(f"dry run: shaper would attach to {iface}")
                _print_dry_run(iface, changed, len(rules))
                return
            with gc_paused():  # see model.gc_paused
                ops = Controller(dp).apply(rules).ops
        progress.finish(f"{counted} applied")
        click.echo(f"{iface}: {len(rules)} rule(s), {len(ops)} change(s)")


@main.command()
@local_iface_option
@netns_option
@client_options
def reset(iface: str | None, netns: str | None, server: str, token_file: str | None) -> None:
    """Remove shaping: every rule on the daemon, or all of shaper on an interface.

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
        _no_target_with_iface()
        from shaper.datapath.kernel import KernelDatapath, claim_interface

        dp = KernelDatapath(iface, netns)
        try:
            with claim_interface(iface, netns):  # the socket is the claim; closing it lets go
                removed = dp.reset()
        finally:
            dp.close()
        click.echo(f"{iface}: removed {', '.join(removed)}" if removed
                   else f"{iface}: nothing of shaper's to remove" + _unseen_hint())


def _print_dry_run(target: str, changes: list[dict] | None, total: int, ops: list[str] = ()) -> None:
    """A dry run in the rules' own words: '+ db (created)', '~ cache: rate 2mbit -> 5mbit', '- old (deleted)'."""
    if changes is None:  # a daemon from before rule_changes: its kernel operations are all there is
        for op in ops:
            click.echo(f"Would {op}")
        return
    unchanged = total - sum(1 for c in changes if c["change"] != "deleted")
    if not changes:
        click.echo(f"dry run: nothing would change on {target} ({unchanged} rule(s) unchanged)")
        return
    click.echo(f"dry run: {target} would change {len(changes)} rule(s), nothing was changed:")
    for change in changes:
        click.echo(describe_change(change))
    if unchanged:
        click.echo(f"({unchanged} rule(s) unchanged)")


def _unseen_hint() -> str:
    """What a non-root user is told when shaper finds nothing: its pins may be out of this user's sight."""
    return "" if os.geteuid() == 0 else " (as seen by a non-root user, who cannot read shaper's pins: run as root)"


def _no_target_with_iface() -> None:
    if _TARGET.get():
        raise InvalidInput("--target", "names a node agent's target: it goes with --server, not with --iface",
                           "--target with --server URL-OF-THE-AGENT, or --iface (and --netns) alone")


def _no_netns_without_iface(netns: str | None) -> None:
    if netns:
        raise InvalidInput("--netns", "only applies with --iface", "--iface IF --netns NS")


@main.command()
@iface_option
@netns_option
@rule_filter_option
@output_option
def show(iface: str, netns: str | None, rule_patterns: tuple[str, ...], output: str) -> None:
    """Show IFACE's rules with their counters, read from the kernel (no daemon needed).

    The same table as `shaper status` (TTL: the time each rule has left; a
    line per direction a rule shapes). Needs root, as every local command does.
    """
    with _errors(), _datapath(iface, netns, attach=False) as dp:
        rows = [] if dp is None else _select(_status_rows(dp), rule_patterns)
        if dp is None and output == "table":
            click.echo(f"shaper is not attached to {iface}" + _unseen_hint())
        else:
            _emit({"rules": rows}, output, lambda: _stats_table(rows, _terminal_width()) if rows else _none(rule_patterns))


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
@click.option("--token-key", default="token", show_default=True, help="Key of --token-secret holding the token.")
@click.option("--interface", default="eth0", show_default=True,
              help="Pod interface to shape (a pod's shaper.io/interface annotation overrides it).")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port of the sidecar's API and /metrics (named shaper-metrics).")
@click.option("--pull-policy", type=click.Choice(["IfNotPresent", "Always", "Never"]), default="IfNotPresent",
              show_default=True, help="The sidecar's imagePullPolicy.")
@click.option("--sys-admin", is_flag=True,
              help="Also give the sidecar CAP_SYS_ADMIN: for kernels before 5.8 (no CAP_BPF) or nodes whose "
                   "/sys/fs/bpf is not a bpffs mount.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Lowest level logged (JSON lines on stderr).")
def webhook(listen: str, tls_cert: str, tls_key: str, image: str, namespace: str, sidecar: str, token_secret: str,
            token_key: str, interface: str, port: int, pull_policy: str, sys_admin: bool, log_level: str) -> None:
    """Serve the mutating admission webhook that adds the shaper sidecar to pods (POST /inject).

    Deployed from deploy/ (see README, "Kubernetes"): pods of namespaces
    labelled shaper-injection=enabled get the sidecar unless annotated
    shaper.io/inject: "false"; elsewhere, pods annotated "true" get it.
    Never twice, never in its own namespace or kube-system, CREATE only.
    """
    from shaper.http import server
    from shaper.k8s import webhook as wh

    with _errors():
        server.configure_logging(log_level)
        cfg = wh.SidecarConfig(image=image, namespace=namespace, native=sidecar == "native",
                               token_secret=token_secret, token_key=token_key, interface=interface, port=port,
                               pull_policy=pull_policy, sys_admin=sys_admin)
        wh.serve(cfg, listen, tls_cert, tls_key)


# -- output ----------------------------------------------------------------------------------------------------
def _status_rows(dp) -> list[dict]:
    from shaper.control.controller import Controller

    now = time.monotonic_ns()
    return [s.to_dict(now) for s in Controller(dp).stats()]


def _emit(data: object, output: str, table: Callable[[], str]) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)
    else:
        click.echo(table())


def _select(rows: list[dict], patterns: tuple[str, ...] = ()) -> list[dict]:
    """Rows whose name matches any of the glob patterns (all without patterns), rule-2 before rule-10."""
    if patterns:
        rows = [r for r in rows if any(fnmatch.fnmatchcase(r["name"], p) for p in patterns)]
    return sorted(rows, key=lambda r: natural_key(r["name"]))


_IMPAIRMENTS = ("delay", "jitter", "distribution", "loss", "duplicate", "corrupt", "reorder", "rate")


def _impairment(r: dict) -> str:
    text = " ".join(f"{k}={r[k]}" for k in _IMPAIRMENTS if k in r)
    if "loss_ge" in r:
        text += " loss_ge=" + "/".join(r["loss_ge"].values())
    return text.strip() or "-"


def _dst(dst: list[str], width: int | None = None) -> str:
    """The destinations in at most `width` characters: as many as fit, then how many more."""
    if width is None:
        return ",".join(dst[:3]) + (f",+{len(dst) - 3}" if len(dst) > 3 else "")
    text = ""
    for i, d in enumerate(dst):
        more = f",+{len(dst) - i - 1}" if i < len(dst) - 1 else ""
        candidate = (text + "," if text else "") + d
        if len(candidate + more) > width and text:
            return text + f",+{len(dst) - i}"
        text = candidate
    return _cut(text, width)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(1, width - 2)] + ".."


def _ttl_left(row: dict) -> str:
    """The TTL column of every table: the time the rule has left, as GET /stats counts it."""
    left = row.get("expires_in")
    if left is None:
        return "-"
    return left if left == "expired" else f"{left} left"


def _direction(row: dict) -> str:
    return row.get("direction", "egress")


def _match(row: dict) -> str:
    """What a rule selects beyond its peers, in the MATCH column: "tcp/5432,8000-8100", "udp", "port 53",
    "except 10.9.0.0/16", "-"."""
    proto = row.get("protocol")
    ports = ",".join(str(p) for p in row.get("ports", ()))
    if proto is not None and ports:
        text = f"{proto}/{ports}"
    elif ports:  # tcp, udp and sctp alike
        text = f"port {ports}"
    else:
        text = "" if proto is None else str(proto)
    if row.get("except"):
        text = " ".join(x for x in (text, "except " + ",".join(row["except"])) if x)
    return text or "-"


def _rule_columns(rows: list[dict]) -> tuple[tuple[str, ...], Callable[[dict], tuple]]:
    """NAME, then DIR once a row is not egress, the peers (DST, or PEERS once a row's are sources), MATCH once
    a rule selects a protocol or ports or carves prefixes out, IMPAIRMENT and TTL: the header and each row's cells.  A table of
    egress rules on any protocol reads as it did before rules had directions and ports."""
    directions = any(_direction(r) != "egress" for r in rows)
    ports = any("protocol" in r or "ports" in r or "except" in r for r in rows)
    header = ("NAME",) + (("DIR", "PEERS") if directions else ("DST",)) + (("MATCH",) if ports else ()) + \
        ("IMPAIRMENT", "TTL")

    def cells(r: dict) -> tuple:
        return ((r["name"],) + ((_direction(r),) if directions else ()) + (r["dst"],)
                + ((_match(r),) if ports else ()) + (_impairment(r), _ttl_left(r)))

    return header, cells


# Columns whose cells give way to fit the terminal, and the narrowest they get (DST/PEERS: one peer and "+N").
_PEERS = ("DST", "PEERS")
_NARROWEST = {"DST": 18, "PEERS": 18, "IMPAIRMENT": 16, "MATCH": 16}


def _format(header: tuple[str, ...], lines: list[tuple], width: int | None = None) -> str:
    """Columns; with a width, the DST (or PEERS), MATCH and IMPAIRMENT columns give way so that lines fit it."""
    dst_col = next((header.index(c) for c in _PEERS if c in header), None)
    imp_col = header.index("IMPAIRMENT") if "IMPAIRMENT" in header else None
    match_col = header.index("MATCH") if "MATCH" in header else None

    def cells(dst_width: int | None, imp_width: int | None, match_width: int | None = None) -> list[tuple]:
        out = []
        for line in lines:
            row = list(line)
            if dst_col is not None:
                row[dst_col] = _dst(row[dst_col], dst_width)
            if imp_col is not None and imp_width is not None:
                row[imp_col] = _cut(row[imp_col], imp_width)
            if match_col is not None and match_width is not None:
                row[match_col] = _cut(row[match_col], match_width)
            out.append(tuple(str(c) for c in row))
        return out

    rows = cells(None, None)
    widths = _widths(header, rows)
    if width is not None and sum(widths) + 2 * (len(widths) - 1) > width:
        flexible = {c for c in (dst_col, imp_col, match_col) if c is not None}
        room = width - sum(w for i, w in enumerate(widths) if i not in flexible) - 2 * (len(widths) - 1)
        match_width = None
        if match_col is not None:
            # Which traffic a rule takes gives way after where it goes (down to one peer and "+N")
            # and before what it does to it.
            rest = (16 if dst_col is not None else 0) + (widths[imp_col] if imp_col is not None else 0)
            match_width = max(_NARROWEST["MATCH"], min(widths[match_col], room - rest))
            room -= match_width
        if dst_col is not None and imp_col is not None:
            # What a rule does reads better whole; one destination and "+N" say enough of where.
            imp_width = max(10, min(widths[imp_col], room - 16))
            rows = cells(max(12, room - imp_width), imp_width, match_width)
        elif dst_col is not None:
            rows = cells(max(12, room), None, match_width)
        elif imp_col is not None:
            rows = cells(None, max(10, room), match_width)
        widths = _widths(header, rows)
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows])
    if width is not None:  # whatever still does not fit is cut, never wrapped (a redraw in place would scroll)
        text = "\n".join(_cut(line, width) for line in text.split("\n"))
    return text


def _widths(header: tuple[str, ...], rows: list[tuple]) -> list[int]:
    return [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]


def _terminal_width() -> int | None:
    """Columns to fit: the terminal's, or $COLUMNS; None when piped (nothing is cut)."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    return shutil.get_terminal_size().columns if _is_tty() else None


def _is_tty() -> bool:
    return sys.stdout.isatty()


def _one_per_rule(rows: list[dict]) -> list[dict]:
    """GET /stats rows (one per rule and direction) as one per rule: a rule with an egress and an ingress row
    is direction both again.  Rules as the API returns them pass through unchanged."""
    out: dict[str, dict] = {}
    for r in rows:
        seen = out.get(r["name"])
        if seen is None:
            out[r["name"]] = r
        elif _direction(seen) != _direction(r):
            out[r["name"]] = {**seen, "direction": "both"}
    return list(out.values())


def _rules_table(rules: list[dict], width: int | None = None) -> str:
    rules = _one_per_rule(rules)
    header, cells = _rule_columns(rules)
    return _format(header, [cells(r) for r in rules], width)


def _pkts_bytes(packets: int | None, nbytes: int | None) -> str:
    if packets is None:
        return "-"
    return f"{format_count(packets)}p/{format_bytes(nbytes or 0)}"


def _stats_table(rows: list[dict], width: int | None = None, rates: dict | None = None) -> str:
    """GET /stats rows, a line per rule and direction; with `rates` (from a watch), per-second throughput and
    drops first."""
    header, cells = _rule_columns(rows)
    if rates is not None:
        header += ("SENT/S", "DROPS/S")
    header += ("MATCHED", "SENT", "DROPS", "BACKLOG", "CLASSID")
    lines = []
    for r in rows:
        line: tuple = cells(r)
        if rates is not None:
            rate = rates.get(_Rates.key(r))
            line += ("-", "-") if rate is None else (format_bits_per_s(rate[0]), format_count(rate[1]))
        line += (_pkts_bytes(r["matched_packets"], r["matched_bytes"]),
                 _pkts_bytes(r.get("class_packets"), r.get("class_bytes")),
                 format_count(r["drops"]) if "drops" in r else "-",
                 _pkts_bytes(r.get("backlog_packets"), r.get("backlog_bytes")), r["classid"])
        lines.append(line)
    # Columns that give way, in this order, before the table is cut to the terminal's width:
    # totals and the classid matter less while watching than the rates and the rules themselves.
    for column in ("CLASSID", "MATCHED", "BACKLOG", "SENT", "DROPS"):
        if width is None or _narrowest(header, lines) <= width:
            break
        i = header.index(column)
        header = header[:i] + header[i + 1:]
        lines = [line[:i] + line[i + 1:] for line in lines]
    return _format(header, lines, width)


def _narrowest(header: tuple[str, ...], lines: list[tuple]) -> int:
    """The width of the table with its DST (PEERS), MATCH and IMPAIRMENT columns as narrow as _format makes them."""
    total = 2 * (len(header) - 1)
    for i, name in enumerate(header):
        cells = [_dst(line[i]) if name in _PEERS else str(line[i]) for line in lines]
        natural = max(len(c) for c in [name, *cells])
        total += min(natural, _NARROWEST.get(name, natural))
    return total


class _Rates:
    """Per-second rates between successive GET /stats samples, per rule and direction.

    A rule whose class changed (deleted and created again) or whose counters
    went backwards has no rate until its next sample."""

    def __init__(self) -> None:
        self.last: dict[tuple[str, str], tuple[str, float, int, int]] = {}

    @staticmethod
    def key(row: dict) -> tuple[str, str]:
        """A line of the table: a rule in one direction (each has its own class and counters)."""
        return row["name"], _direction(row)

    def update(self, rows: list[dict], now: float) -> dict[tuple[str, str], tuple[float, float]]:
        out: dict[tuple[str, str], tuple[float, float]] = {}
        current = {}
        for r in rows:
            sent = r.get("class_bytes", r["matched_bytes"])
            drops = r.get("drops", 0)
            key = self.key(r)
            current[key] = (r["classid"], now, sent, drops)
            prev = self.last.get(key)
            if prev is None or prev[0] != r["classid"] or now <= prev[1] or sent < prev[2] or drops < prev[3]:
                continue
            dt = now - prev[1]
            out[key] = ((sent - prev[2]) * 8 / dt, (drops - prev[3]) / dt)
        self.last = current
        return out


if __name__ == "__main__":
    main()
