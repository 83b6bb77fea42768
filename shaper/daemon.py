"""The daemon (`shaper run`): attach, serve the API and /metrics, clean up on exit.

The main thread owns the signals.  It attaches the classifier, applies the
initial rules, then waits for SIGTERM/SIGINT, waking once a second to remove
rules whose TTL passed; SIGHUP re-reads --rules (ignored, with a log line,
without it); SIGUSR1, SIGUSR2 and SIGALRM are ignored with a log line.  On
exit the server stops accepting, lets requests in flight finish (GRACE_S), and
then removes everything shaper created on the interface, unless --keep-on-exit.
`run` sets that up around `serve` (the attach and the main loop), which takes
the datapath factory as a parameter, so the loop is tested over the fake.
The HTTP server itself is shaper.http.server.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from prometheus_client import disable_created_metrics

from shaper import __version__
from shaper.control.service import Service, audit
from shaper.core.model import Rule
from shaper.datapath.interface import AttachResult, Datapath
from shaper.datapath.tc import netns_path
from shaper.errors import InvalidInput, ShaperError
from shaper.http.api import Api
from shaper.http.client import DEFAULT_PORT
from shaper.http.server import KernelThread, check_exposure, is_loopback, make_server, parse_listen, trim_heap

log = logging.getLogger("shaper")

# Opens the datapath of an interface (name, network namespace): KernelDatapath, or a
# fake in the loop's tests.  Raises InvalidInput while the interface does not exist.
DatapathFactory = Callable[[str, str | None], Datapath]


@dataclass(frozen=True)
class DaemonOptions:
    iface: str
    netns: str | None = None
    listen: str = f":{DEFAULT_PORT}"
    rules: Sequence[Rule] | None = None  # None: keep what an adopted datapath holds
    initial_rules: Sequence[Rule] | None = None  # applied only to a fresh datapath, never fatal
    token: str | None = None
    keep_on_exit: bool = False
    insecure: bool = False  # serve changes to anyone beyond loopback, without a token
    rules_file: str | None = None  # what `rules` came from: SIGHUP reads it again


def load_initial_rules(path: str) -> Sequence[Rule] | None:
    """Rules from a file that may be absent, empty or wrong (the shaper.io/rules annotation seen
    through the downward API): wrong rules are logged, never fatal."""
    from shaper.core.model import parse_ruleset_text

    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("rules.invalid", extra={"fields": {"source": path, "error": exc.strerror,
                                                       "action": "starting with no rules"}})
        return None
    if not text.strip():
        return None
    try:
        return parse_ruleset_text(text, "--initial-rules", path)
    except InvalidInput as exc:
        log.warning("rules.invalid", extra={"fields": {"source": path, "error": str(exc),
                                                       "action": "starting with no rules"}})
        return None


def load_pod_bandwidth(directory: str) -> tuple[Rule, ...]:
    """The whole-pod rules of kubelet's bandwidth annotations, seen through the downward API as
    DIRECTORY/egress-bandwidth and DIRECTORY/ingress-bandwidth (shaper.k8s.bandwidth): a file
    absent or empty is no annotation; a bad value is logged (rules.invalid), never fatal."""
    from shaper.k8s.bandwidth import FILES, bandwidth_rules

    values: dict[str, str | None] = {}
    for direction, name in FILES.items():
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                values[direction] = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            values[direction] = None
        except OSError as exc:
            log.warning("rules.invalid", extra={"fields": {"source": path, "error": exc.strerror,
                                                           "action": "starting without this limit"}})
    found = bandwidth_rules(values)
    for exc in found.errors:
        log.warning("rules.invalid", extra={"fields": {"source": directory, "error": str(exc),
                                                       "action": "starting without this limit"}})
    return found.rules


def initial_rules(path: str | None, bandwidth_dir: str | None) -> Sequence[Rule] | None:
    """--initial-rules and --pod-bandwidth together: the shaper.io/rules annotation's rules and the
    bandwidth annotations' whole-pod rules, each source checked on its own (one wrong does not drop
    the other).  A bandwidth rule that clashes with an --initial-rules rule (its name, or every peer
    in the same direction) is left out with a rules.conflict line: the --initial-rules one is kept."""
    from shaper.k8s.bandwidth import combine

    rules = load_initial_rules(path) if path else None
    extra = load_pod_bandwidth(bandwidth_dir) if bandwidth_dir else ()
    if not extra:
        return rules
    combined, problems = combine(rules or (), extra, source=f"--initial-rules {path}")
    for problem in problems:
        log.warning("rules.conflict", extra={"fields": {"source": bandwidth_dir, "error": problem,
                                                        "action": "starting without this limit"}})
    return combined or None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What a supervisor, a terminal or a stray `kill -HUP` may send: each killed the daemon
# silently (their default action), leaving shaping with no controller.
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


def reload_rules(service: Service, path: str) -> None:
    """SIGHUP: apply --rules again as it is now; a file that is unreadable or wrong changes nothing."""
    from shaper.core.model import parse_ruleset_text

    try:
        with open(path, "rb") as f:
            rules = parse_ruleset_text(f.read(), "--rules", path)
    except OSError as exc:
        log.warning("rules.reload", extra={"fields": {"source": path, "result": "refused", "error": exc.strerror,
                                                      "action": "kept the rules in place"}})
        return
    except InvalidInput as exc:
        log.warning("rules.reload", extra={"fields": {"source": path, "result": "refused", "error": str(exc),
                                                      "action": "kept the rules in place"}})
        return
    try:
        service.replace(rules, who=f"SIGHUP ({path})")
    except ShaperError as exc:  # logged by the service (rules.replace failed/rejected), rolled back
        log.warning("rules.reload", extra={"fields": {"source": path, "result": "failed", "error": str(exc)}})


def dump_stacks_on_abort() -> None:
    """SIGABRT writes every thread's stack to stderr (the log) before the process dies: a daemon
    that does not stop on SIGTERM can be asked where it is stuck (`kill -ABRT`; lab does it
    before it kills one)."""
    faulthandler.enable(all_threads=True)


def run(opts: DaemonOptions) -> None:
    """Run until SIGTERM/SIGINT; raises ShaperError if it cannot start."""
    dump_stacks_on_abort()
    stop = threading.Event()
    caught: list[str] = []
    pending: list[str] = []  # other signals, handled by the main loop (never inside a handler)

    def on_stop(signum: int, _frame: object) -> None:
        caught.append(signal.Signals(signum).name)
        stop.set()

    def on_other(signum: int, _frame: object) -> None:
        pending.append(signal.Signals(signum).name)

    # Before importing bcc, which takes seconds in a slow VM: a SIGTERM then
    # killed the process instead of stopping it.
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_stop)
    for sig in (signal.SIGHUP, *IGNORED_SIGNALS):
        signal.signal(sig, on_other)
    from shaper.datapath.kernel import KernelDatapath, claim_interface, join_host_mounts

    host, port = parse_listen(opts.listen)
    check_exposure(host, opts.token, opts.insecure)
    # The *_created series double the exposition for nothing Prometheus uses.
    disable_created_metrics()
    if stop.is_set():
        audit("daemon.stop", signal=caught[0], before="start")
        return

    # setns() into the host's mounts needs a process with one thread: before the kernel thread.
    join_host_mounts(os.environ.get("SHAPER_BPFFS", "/sys/fs/bpf"))
    kernel = KernelThread()
    dp = kernel.run(KernelDatapath, opts.iface, opts.netns)
    try:
        claim = claim_interface(opts.iface, opts.netns)  # before anything is touched
    except ShaperError:
        kernel.run(dp.close)
        kernel.close()
        raise
    service = Service(dp, opts.iface)
    try:
        httpd = make_server(host, port, Api(service, opts.token), kernel=kernel)
        httpd.start()
    except ShaperError:
        kernel.run(dp.close)
        kernel.close()
        claim.close()
        raise
    bound = httpd.server_address
    audit("daemon.listen", address=f"{bound[0]}:{bound[1]}", auth=bool(opts.token), version=__version__)
    if not opts.token and not is_loopback(host):
        log.warning("api.open", extra={"fields": {"reason": "--insecure: no token, anyone who can reach the port "
                                                            "can change shaping"}})
    try:
        serve(service, opts, kernel, stop, pending, KernelDatapath)
        audit("daemon.stop", signal=caught[0] if caught else None)
    finally:
        httpd.stop()  # requests in flight finish first (a bulk PUT gets its status), still ready
        service.ready = False
        try:
            kernel.run(_exit, service, opts)
        finally:
            kernel.close()
            claim.close()


TICK_S = 1.0  # how often the main loop wakes: signals, TTL expiry, the interface's presence


def serve(service: Service, opts: DaemonOptions, kernel: KernelThread, stop: threading.Event,
          pending: list[str], open_datapath: DatapathFactory, tick_s: float = TICK_S) -> None:
    """Attach the service's datapath, apply the rules, and run the main loop until `stop` is set.

    Each tick handles the signals in `pending`, follows the interface if its link
    went (a new datapath from `open_datapath`, see _follow_interface) and removes
    rules whose TTL passed.  Every datapath access runs on `kernel`.  Raises
    ShaperError if the attach fails, or for an error that retrying cannot help."""
    try:
        how = kernel.run(service.datapath.attach)
    except ShaperError:
        service.instruments.error("attach")
        raise
    if stop.is_set():
        pass  # stopped during the compile: remove what was attached, apply nothing
    elif opts.rules is None and opts.initial_rules and how == "attached":
        try:
            kernel.run(service.start, opts.initial_rules, "initial-rules")
        except ShaperError as exc:
            # Pod annotations are not worth a crash loop: start with none and say why.
            log.warning("rules.refused", extra={"fields": {"source": "initial rules", "error": str(exc),
                                                           "action": "started with no rules"}})
            kernel.run(service.start, None, "startup")
    else:
        kernel.run(service.start, opts.rules, "startup")
    trim_heap()  # the rules file's parse and the start's plan are garbage now
    if not stop.is_set():
        audit("daemon.ready", interface=opts.iface, netns=opts.netns, datapath=how,
              rules=len(kernel.run(service.rules)))
    repair_error: str | None = None
    while not stop.wait(tick_s) or pending:
        while pending:
            _on_signal(pending.pop(0), service, opts, kernel)
        if stop.is_set():
            break
        try:
            present = kernel.run(service.datapath.link_present)
        except ShaperError as exc:
            if not exc.retryable:
                raise
            log.debug("link lookup failed, asking again next tick: %s", exc)
            continue
        if not present:
            if not _follow_interface(service, opts, stop, kernel, open_datapath, tick_s):
                break
            continue
        try:
            kernel.run(service.expire)
        except ShaperError as exc:  # counted and logged by the service; try again next tick
            log.debug("expire failed: %s", exc)
        try:
            kernel.run(service.repair)
            repair_error = None
        except ShaperError as exc:  # an apply failure is counted by the service; try again next tick
            if str(exc) != repair_error:  # said once, not every second
                log.warning("datapath.repair_failed", extra={"fields": {"interface": opts.iface,
                                                                        "error": str(exc)}})
            repair_error = str(exc)


def _on_signal(name: str, service: Service, opts: DaemonOptions, kernel: KernelThread) -> None:
    if name == "SIGHUP" and opts.rules_file and service.ready:
        log.info("signal.reload", extra={"fields": {"signal": name, "rules": opts.rules_file}})
        kernel.run(reload_rules, service, opts.rules_file)
        return
    why = "no --rules file to re-read" if name == "SIGHUP" and not opts.rules_file else \
        "not ready yet" if name == "SIGHUP" else "not used by shaper"
    log.info("signal.ignored", extra={"fields": {"signal": name, "reason": why}})


def _exit(service: Service, opts: DaemonOptions) -> None:
    with service.lock:
        try:
            if opts.keep_on_exit:
                audit("daemon.exit", interface=opts.iface, kept=True)
            else:
                removed = service.datapath.reset()
                audit("daemon.exit", interface=opts.iface, kept=False, removed=removed)
        except ShaperError as exc:
            service.instruments.error("reset")
            audit("daemon.exit", interface=opts.iface, result="failed", error=str(exc))
            raise
        finally:
            service.datapath.close()


STILL_WAITING_S = 30  # ticks between "still waiting" lines while the interface is absent


def _follow_interface(service: Service, opts: DaemonOptions, stop: threading.Event, kernel: KernelThread,
                      open_datapath: DatapathFactory, tick_s: float = TICK_S) -> bool:
    """The interface vanished (a pod's veth deleted, a link recreated): wait for one of
    the same name, attach to it and put the rules back with the TTL they had left.

    Returns False if asked to stop while waiting.  Never raises for a missing
    interface, so a sidecar does not crash-loop; a vanished namespace is fatal.
    A failed attach is retried: a retryable error (EBUSY, EAGAIN, EINTR: the
    kernel was busy) quietly at the next tick, any other with a warning and a
    wait that doubles up to 30 ticks, since someone must first fix what it
    names (another shaper's classifier, a foreign root qdisc).  Opening the
    datapath fails fatally unless the error is retryable or the interface is
    simply not back yet.
    """
    service.ready = False  # /readyz and mutations answer 503 meanwhile
    old = service.datapath
    try:
        rules = kernel.run(service.rules_to_restore)  # the maps are pinned: still readable
    except ShaperError as exc:
        rules = []
        log.warning("interface.rules_lost", extra={"fields": {"interface": opts.iface, "error": str(exc)}})
    audit("interface.gone", interface=opts.iface, rules=len(rules))
    waited = failures = 0
    while not stop.wait(tick_s * min(30, 2 ** failures)):  # 1 tick while absent; backs off while attach fails
        waited += 1
        if opts.netns and not os.path.exists(netns_path(opts.netns)):
            raise ShaperError(f"network namespace {opts.netns} is gone, and {opts.iface} with it")
        try:
            dp = kernel.run(open_datapath, opts.iface, opts.netns)
        except InvalidInput:  # not back yet
            if waited % STILL_WAITING_S == 0:
                audit("interface.waiting", interface=opts.iface, seconds=round(waited * tick_s))
            continue
        except ShaperError as exc:
            if not exc.retryable:
                raise
            log.debug("opening %s failed, trying again next tick: %s", opts.iface, exc)
            continue
        try:
            how = kernel.run(_attach_new, service, dp, rules)
        except ShaperError as exc:
            service.instruments.error("attach")
            kernel.run(_attach_undo, service, old, dp)
            if exc.retryable:
                log.info("interface.attach_retry", extra={"fields": {"interface": opts.iface, "error": str(exc)}})
                continue
            log.warning("interface.attach_failed", extra={"fields": {"interface": opts.iface, "error": str(exc)}})
            failures += 1
            continue
        kernel.run(old.close)
        audit("interface.back", interface=opts.iface, ifindex=dp.ifindex, datapath=how, rules=len(rules))
        return True
    return False


def _attach_new(service: Service, dp: Datapath, rules: list[Rule]) -> AttachResult:
    how = dp.attach()
    service.swap_datapath(dp)
    service.start(rules, who="interface")
    return how


def _attach_undo(service: Service, old: Datapath, dp: Datapath) -> None:
    service.swap_datapath(old)
    dp.close()
