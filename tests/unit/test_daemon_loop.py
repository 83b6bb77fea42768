"""The daemon's main loop (shaper.daemon.serve) over the fake datapath, without root: readiness
before and after the attach, the interface gone and back (the rules put back on the new
datapath), TTL expiry, and which errors the loop retries (`retryable`)."""

import errno
import logging
import threading
import time

import pytest

from shaper.control.service import Service
from shaper.core.model import parse_rule
from shaper.daemon import DaemonOptions, initial_rules, serve
from shaper.datapath.fake import FakeDatapath
from shaper.errors import Conflict, InvalidInput, KernelError
from shaper.http.server import KernelThread

NOW = 10**12
TICK = 0.01  # the loop's tick in these tests (1 s in the daemon)


def wait_for(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(TICK / 2)


class Daemon:
    """serve() on a thread, with a clock the test moves and an interface the test removes and brings back."""

    def __init__(self, rules=None, dp: FakeDatapath | None = None):
        self.now = NOW
        self.dp = dp or FakeDatapath(attached=False)
        self.service = Service(self.dp, "fake0", clock=lambda: self.now)
        self.kernel = KernelThread()
        self.stop = threading.Event()
        self.pending: list[str] = []
        self.back = False  # whether an interface named fake0 exists again
        self.opened: list[FakeDatapath] = []
        self.next_attach_errors: list[Exception] = []  # raised by the next attaches, one each
        self.error: BaseException | None = None
        self.opts = DaemonOptions(iface="fake0", rules=rules)
        self.thread = threading.Thread(target=self._run, name="serve")

    def open_datapath(self, ifname: str, netns: str | None) -> FakeDatapath:
        assert (ifname, netns) == ("fake0", None)
        if not self.back:
            raise InvalidInput("iface", "no interface named 'fake0'", "an interface listed by `ip link`")
        dp = FakeDatapath(ifname=ifname, ifindex=100 + len(self.opened), attached=False,
                          before_attach=self._attach_hook)
        self.opened.append(dp)
        return dp

    def _attach_hook(self) -> None:
        if self.next_attach_errors:
            raise self.next_attach_errors.pop(0)

    def _run(self) -> None:
        try:
            serve(self.service, self.opts, self.kernel, self.stop, self.pending, self.open_datapath, tick_s=TICK)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def __enter__(self) -> "Daemon":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        self.kernel.close()
        assert not self.thread.is_alive(), "serve() did not return after stop was set"

    def ready(self) -> bool:
        return self.service.is_ready()


def refuse(exc: Exception):
    def hook() -> None:
        raise exc
    return hook


def rule(name: str, dst: str, **more) -> object:
    return parse_rule({"name": name, "dst": dst, "delay": "5ms", **more})


def names(dp: FakeDatapath) -> set[str]:
    return {r.name for r, _ in dp.records.values()}


def audited(caplog, event: str) -> list[dict]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == event]


def test_not_ready_before_the_attach_and_ready_after_with_the_rules_applied():
    gate = threading.Event()
    dp = FakeDatapath(attached=False, before_attach=lambda: gate.wait(10))
    d = Daemon(rules=[rule("a", "10.0.0.1")], dp=dp)
    assert not d.ready()  # before serve() runs at all
    with d:
        wait_for(lambda: d.kernel.busy, "the attach to start")
        assert not d.ready() and d.dp.records == {}  # attaching: not ready, nothing applied
        gate.set()
        wait_for(d.ready, "readiness after the attach")
        assert d.dp.attached and names(d.dp) == {"a"} and len(d.dp.classes) == 1
        # Someone removed the classifier: readiness says so, though the service was started.
        d.dp.attached = False
        assert d.service.ready and not d.ready()
    assert d.error is None


def test_a_failed_attach_stops_the_daemon_unready_and_counted():
    dp = FakeDatapath(attached=False, before_attach=refuse(Conflict("foreign classifier")))
    d = Daemon(rules=[rule("a", "10.0.0.1")], dp=dp)
    with d:
        d.thread.join(10)
    assert isinstance(d.error, Conflict) and not d.ready() and dp.records == {}
    assert d.service.registry.get_sample_value("shaper_errors_total", {"interface": "fake0", "op": "attach"}) == 1


def test_the_interface_gone_and_back_gets_its_rules_on_the_new_datapath(caplog):
    caplog.set_level(logging.INFO, logger="shaper")
    d = Daemon(rules=[rule("a", "10.0.0.1"), rule("b", "10.0.0.2", ttl="1h")])
    with d:
        wait_for(d.ready, "readiness")
        before = {n: o.expires_ns for n, o in d.dp.observe().rules.items()}
        assert before == {"a": 0, "b": NOW + 3600 * 10**9}
        d.now += 60 * 10**9  # a minute later the link goes
        d.dp.present = False
        wait_for(lambda: audited(caplog, "interface.gone"), "the loop to see the link gone")
        assert audited(caplog, "interface.gone") == [{"interface": "fake0", "rules": 2}]
        assert not d.ready()
        time.sleep(20 * TICK)  # twenty ticks without an interface: still waiting, still not ready
        assert not d.ready() and d.opened == [] and d.service.datapath is d.dp and not d.dp.closed
        d.back = True
        wait_for(lambda: audited(caplog, "interface.back"), "the loop to follow the interface back")
        assert d.ready()
        new = d.service.datapath
        assert d.opened == [new] and new is not d.dp and new.attached and d.dp.closed
        # The same rules, b with the TTL it had left (an hour from its creation, not from now).
        assert {n: o.expires_ns for n, o in new.observe().rules.items()} == before
        assert len(new.classes) == 2 and len(new.entries) == 2
        assert audited(caplog, "interface.back") == [{"interface": "fake0", "ifindex": 100, "datapath": "attached",
                                                      "rules": 2}]
    assert d.error is None


def test_expiry_in_the_loop_removes_a_rule_whose_ttl_passed():
    d = Daemon(rules=[rule("keep", "10.0.0.1"), rule("brief", "10.0.0.2", ttl="10s")])
    with d:
        wait_for(d.ready, "readiness")
        time.sleep(10 * TICK)
        assert names(d.dp) == {"keep", "brief"}  # ten ticks, no time on the clock: nothing expires
        d.now += 10 * 10**9 + 1
        wait_for(lambda: names(d.dp) == {"keep"}, "the expired rule to be removed")
        assert len(d.dp.classes) == 1 and len(d.dp.entries) == 1 and d.ready()
        assert d.service.registry.get_sample_value("shaper_rule_changes_total",
                                                   {"interface": "fake0", "change": "expired"}) == 1
    assert d.error is None


def test_a_busy_kernel_is_retried_quietly_and_a_refusal_with_a_warning(caplog):
    caplog.set_level(logging.DEBUG, logger="shaper")
    d = Daemon(rules=[rule("a", "10.0.0.1")])
    with d:
        wait_for(d.ready, "readiness")
        d.next_attach_errors = [KernelError("attach the classifier to", "fake0", errno.EBUSY)]
        d.back, d.dp.present = True, False
        wait_for(d.ready, "readiness after a busy kernel")
        assert len(d.opened) == 2 and names(d.service.datapath) == {"a"}
        assert [r.levelno for r in caplog.records if r.getMessage().startswith("interface.attach")] == [logging.INFO]
        assert d.opened[0].closed  # the datapath whose attach failed was let go

        caplog.clear()
        d.next_attach_errors = [Conflict("another shaper's classifier")]
        d.service.datapath.present = False
        wait_for(lambda: len(d.opened) == 4 and d.ready(), "readiness after a refused attach")
        assert [r.levelno for r in caplog.records if r.getMessage().startswith("interface.attach")] == \
               [logging.WARNING]
        assert names(d.service.datapath) == {"a"}
        assert d.service.registry.get_sample_value("shaper_errors_total", {"interface": "fake0", "op": "attach"}) == 2
    assert d.error is None


def test_a_retryable_link_lookup_error_is_asked_again_and_another_stops_the_loop():
    d = Daemon(rules=[rule("a", "10.0.0.1")])
    with d:
        wait_for(d.ready, "readiness")
        errors = [KernelError("look up", "fake0", errno.EAGAIN)]

        def flaky() -> bool:
            if errors:
                raise errors.pop(0)
            return True

        d.dp.link_present = flaky
        wait_for(lambda: not errors, "the failing lookup")
        time.sleep(5 * TICK)
        assert d.thread.is_alive() and d.ready() and d.error is None
        errors.append(KernelError("look up", "fake0", errno.EPERM))
        d.thread.join(10)
        assert isinstance(d.error, KernelError) and d.error.errno == errno.EPERM


@pytest.mark.parametrize("signal_name", ["SIGUSR1", "SIGHUP"])
def test_other_signals_are_logged_and_change_nothing(caplog, signal_name):
    caplog.set_level(logging.INFO, logger="shaper")
    d = Daemon(rules=[rule("a", "10.0.0.1")])
    with d:
        wait_for(d.ready, "readiness")
        d.pending.append(signal_name)
        wait_for(lambda: audited(caplog, "signal.ignored"), f"{signal_name} to be handled")
        assert names(d.dp) == {"a"} and d.ready()


def test_pod_bandwidth_rules_are_initial_rules_in_both_directions(tmp_path, caplog):
    # The sidecar's downward API directory: shaper.io/rules and kubelet's two bandwidth annotations.
    (tmp_path / "rules").write_text("rules:\n  - {name: db, dst: [10.0.0.0/8], delay: 5ms}\n")
    (tmp_path / "egress-bandwidth").write_text("10M")
    (tmp_path / "ingress-bandwidth").write_text("20Mi")
    d = Daemon()
    d.opts = DaemonOptions(iface="fake0", initial_rules=initial_rules(str(tmp_path / "rules"), str(tmp_path)))
    with caplog.at_level(logging.INFO, logger="shaper"), d:
        wait_for(d.ready, "readiness after the attach")
        assert names(d.dp) == {"db", "k8s-egress-bandwidth", "k8s-ingress-bandwidth"}
        # The egress limit is a class of the interface, the ingress one of the ifb's tree.
        rates = {(r.name, r.direction): r.rate_bits_per_s for r, _ in d.dp.records.values()}
        assert rates[("k8s-egress-bandwidth", "egress")] == 10**7
        assert rates[("k8s-ingress-bandwidth", "ingress")] == 20 * 2**20
        assert len(d.dp.classes) == 2 and len(d.dp.ingress_classes) == 1
        # The service is ready a moment before the daemon logs it: stopping first would skip the line.
        wait_for(lambda: audited(caplog, "daemon.ready"), "the daemon.ready line")
    assert d.error is None
    assert audited(caplog, "daemon.ready")[0]["rules"] == 3


def test_a_pod_bandwidth_clash_is_reported_and_the_sidecar_starts(tmp_path, caplog):
    (tmp_path / "rules").write_text("rules:\n  - {name: all, dst: ['::/0'], rate: 5mbit}\n")
    (tmp_path / "egress-bandwidth").write_text("10M")
    (tmp_path / "ingress-bandwidth").write_text("")  # no annotation
    with caplog.at_level(logging.INFO, logger="shaper"):
        d = Daemon()
        d.opts = DaemonOptions(iface="fake0", initial_rules=initial_rules(str(tmp_path / "rules"), str(tmp_path)))
        with d:
            wait_for(d.ready, "readiness after the attach")
            assert names(d.dp) == {"all"}
    assert d.error is None
    [conflict] = audited(caplog, "rules.conflict")
    assert "kubernetes.io/egress-bandwidth ignored" in conflict["error"] and "'all'" in conflict["error"]


def test_the_loop_puts_back_an_ingress_set_up_removed_by_hand_and_its_classes(caplog):
    caplog.set_level(logging.INFO, logger="shaper")
    d = Daemon(rules=[rule("in", "10.0.0.1", direction="ingress"), rule("out", "10.0.0.2")])
    with d:
        wait_for(d.ready, "readiness")
        assert set(d.dp.ingress_classes) == {1} and set(d.dp.classes) == {2}
        # Someone deleted the ifb: the classes on it went too.
        d.dp.ingress_classes.clear()
        d.dp.ingress_leaves.clear()
        d.dp.broken = ["ifb shpin1"]
        wait_for(lambda: audited(caplog, "datapath.repaired"), "the loop to repair")
        wait_for(lambda: set(d.dp.ingress_classes) == {1}, "the ingress class to be made again")
        assert audited(caplog, "datapath.repaired") == [{"interface": "fake0", "put_back": ["ifb shpin1"]}]
        assert set(d.dp.classes) == {2} and names(d.dp) == {"in", "out"} and d.ready()
        time.sleep(10 * TICK)
        assert len(audited(caplog, "datapath.repaired")) == 1  # intact again: nothing more to do
    assert d.error is None
