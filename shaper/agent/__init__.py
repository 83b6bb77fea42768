"""`shaper agent`: the node-level daemon (see shaper.agent.agent), its API and its main loop."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

from prometheus_client import disable_created_metrics

from shaper import __version__
from shaper.control.service import audit
from shaper.daemon import IGNORED_SIGNALS, STOP_SIGNALS, TICK_S, dump_stacks_on_abort
from shaper.http.client import DEFAULT_AGENT_PORT

log = logging.getLogger("shaper")



@dataclass(frozen=True)
class AgentOptions:
    iface: str = "eth0"
    listen: str = f":{DEFAULT_AGENT_PORT}"
    token: str | None = None
    insecure: bool = False
    reset_on_exit: bool = False


PROC_PID_INIT_INO = 0xEFFFFFFC  # the initial PID namespace's inode (include/linux/proc_ns.h)


def check_host_pids() -> None:
    """Refuse to run in a PID namespace of its own: the sweeper would see no pod's processes and take
    every namespace for gone (and remove the pins of every sidecar on the node)."""
    from shaper.errors import NotSupported

    if os.stat("/proc/self/ns/pid").st_ino != PROC_PID_INIT_INO:
        raise NotSupported("shaper agent needs the node's PIDs (hostPID: true, podman run --pid=host): in a PID "
                           "namespace of its own it cannot tell which network namespaces are still in use")


def run(opts: AgentOptions) -> None:
    """Run until SIGTERM/SIGINT; raises ShaperError if it cannot start."""
    from shaper.agent.agent import Agent
    from shaper.agent.api import AgentApi
    from shaper.agent.spares import Spares
    from shaper.datapath.kernel import ensure_bpffs, join_host_mounts
    from shaper.http.server import KernelThread, check_exposure, is_loopback, make_server, parse_listen

    dump_stacks_on_abort()
    stop = threading.Event()
    caught: list[str] = []

    def on_stop(signum: int, _frame: object) -> None:
        caught.append(signal.Signals(signum).name)
        stop.set()

    def on_other(signum: int, _frame: object) -> None:
        log.info("signal.ignored", extra={"fields": {"signal": signal.Signals(signum).name,
                                                     "reason": "not used by the agent"}})

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_stop)
    for sig in (signal.SIGHUP, *IGNORED_SIGNALS):
        signal.signal(sig, on_other)
    host, port = parse_listen(opts.listen)
    check_exposure(host, opts.token, opts.insecure)
    check_host_pids()
    disable_created_metrics()
    agent = Agent(opts.iface)
    join_host_mounts(agent.bpffs)  # under `ip netns exec`: one thread yet, as setns() into mounts needs
    ensure_bpffs(agent.bpffs)
    agent.spares = Spares(agent.bpffs)
    agent.spares.start()  # compiles in the background while the agent adopts and starts serving
    kernel = KernelThread()
    try:
        httpd = make_server(host, port, AgentApi(agent, opts.token), kernel=kernel)
        httpd.start()
    except BaseException:
        kernel.close()
        agent.spares.close()  # a failed start leaves no classifier pinned
        raise
    bound = httpd.server_address
    audit("agent.listen", address=f"{bound[0]}:{bound[1]}", auth=bool(opts.token), interface=opts.iface,
          pid=os.getpid(), version=__version__)
    if not opts.token and not is_loopback(host):
        log.warning("api.open", extra={"fields": {"reason": "--insecure: no token, anyone who can reach the port "
                                                            "can change shaping"}})
    try:
        kernel.run(agent.adopt_all)
        audit("agent.ready", targets=len(agent.targets), adopted=sorted(t.name for t in agent.targets.values()))
        while not stop.wait(TICK_S):
            try:
                kernel.run(agent.tick)
            except Exception:  # a bug: say so, keep the agent (and every target's shaping) alive
                log.exception("agent.tick_failed")
        audit("agent.stop", signal=caught[0] if caught else None)
    finally:
        httpd.stop()
        try:
            kernel.run(agent.close, opts.reset_on_exit)
            audit("agent.exit", kept=not opts.reset_on_exit)
        finally:
            kernel.close()
