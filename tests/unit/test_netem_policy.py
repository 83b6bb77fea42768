"""What shaper says when the kernel refuses a netem leaf (EINVAL), per the probed
duplicate policy; and the demo's loss interval and ping percentiles.  No root."""

import errno

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from shaper.datapath import netem, tc
from lab.demo import wilson
from shaper.errors import KernelError, NotSupported
from lab import parse_ping
from shaper.core.model import Prefix, Rule


def bare_tc() -> tc.Tc:
    t = object.__new__(tc.Tc)
    t.ifname = "shp0"
    return t


def refusal(monkeypatch, policy: str, duplicate_pct: float = 50.0, duplicating: tuple[int, ...] = ()) -> Exception:
    monkeypatch.setattr(tc, "_dup_policy", [policy])
    rule = Rule(name="dup" if duplicate_pct else "plain", dst=(Prefix.parse("10.0.0.1", "dst"),), delay_us=1000,
                duplicate_pct=duplicate_pct)
    return bare_tc()._netem_refusal(NetlinkError(errno.EINVAL), rule, duplicating)


def test_a_kernel_that_refuses_duplicates_is_named_as_such(monkeypatch):
    exc = refusal(monkeypatch, tc.DUP_REFUSED)
    assert isinstance(exc, NotSupported) and "This kernel refuses `duplicate`" in str(exc) and "'dup'" in str(exc)


def test_a_kernel_that_allows_duplicates_reports_the_kernel_error_not_the_restriction(monkeypatch):
    exc = refusal(monkeypatch, tc.DUP_ALLOWED)
    assert isinstance(exc, KernelError) and "duplicate" not in str(exc) and "EINVAL" in str(exc)


def test_an_unprobed_kernel_gets_the_hedged_reason(monkeypatch):
    exc = refusal(monkeypatch, tc.DUP_UNKNOWN)
    assert isinstance(exc, NotSupported) and "Kernels with the 2025 netem restriction refuse" in str(exc)


def test_a_rule_that_does_not_duplicate_is_not_told_about_duplicate(monkeypatch):
    def no_probe():
        raise AssertionError("no duplication involved: nothing to probe")

    monkeypatch.setattr(tc, "_dup_policy", [])
    monkeypatch.setattr(tc, "_probe_duplicate", no_probe)
    exc = bare_tc()._netem_refusal(NetlinkError(errno.EINVAL), Rule(name="plain", dst=(), delay_us=1000))
    assert isinstance(exc, KernelError) and "duplicate" not in str(exc) and "EINVAL" in str(exc)
    assert "'plain'" in str(exc)


def test_a_plain_netem_beside_a_duplicating_one_is_told_which_class_duplicates(monkeypatch):
    exc = refusal(monkeypatch, tc.DUP_REFUSED, duplicate_pct=0.0, duplicating=(3,))
    assert isinstance(exc, NotSupported) and "'plain'" in str(exc)
    assert "This kernel refuses any netem joining a qdisc tree that holds a duplicating one" in str(exc)
    assert "the netem of class 5348:3 duplicates" in str(exc) and "refuses `duplicate`" not in str(exc)
    hedged = refusal(monkeypatch, tc.DUP_UNKNOWN, duplicate_pct=0.0, duplicating=(3, 10))
    assert "Kernels with the 2025 netem restriction refuse any netem" in str(hedged)
    assert "classes 5348:3, 5348:a duplicate" in str(hedged)
    allowed = refusal(monkeypatch, tc.DUP_ALLOWED, duplicate_pct=0.0, duplicating=(3,))
    assert isinstance(allowed, KernelError) and "duplicate" not in str(allowed)


class _Qdisc(dict):
    """What Tc.qdiscs() yields, as far as _duplicating_leaves reads it."""

    def __init__(self, parent: int, kind: str, options: object = None):
        super().__init__(parent=parent)
        self.attrs = {"TCA_KIND": kind, "TCA_OPTIONS": options}

    def get_attr(self, name: str):
        return self.attrs.get(name)


def test_the_duplicating_leaves_are_read_from_the_netem_options_in_the_tree():
    dst = (Prefix.parse("10.0.0.1", "dst"),)
    dup = netem.encode_options(Rule(name="d", dst=dst, delay_us=1000, duplicate_pct=1.0))
    plain = netem.encode_options(Rule(name="p", dst=dst, delay_us=1000))
    t = bare_tc()
    t.qdiscs = lambda: [_Qdisc(0xFFFFFFFF, "htb"), _Qdisc(tc.ROOT | 2, "netem", plain),
                        _Qdisc(tc.ROOT | 5, "netem", dup), _Qdisc(tc.ROOT | 7, "netem", dup),
                        _Qdisc(tc.ROOT | 9, "pfifo"), _Qdisc(0x10002, "netem", dup)]  # not under shaper's root
    assert t._duplicating_leaves(slot=7) == [5]  # the leaf being set is not its own neighbour
    assert t._duplicating_leaves(slot=2) == [5, 7]

    def broken():
        raise NetlinkError(errno.EBUSY)

    t.qdiscs = broken
    assert t._duplicating_leaves(slot=2) == []


def test_wilson_interval_covers_the_rate_and_narrows_with_more_pings():
    lo, hi = wilson(30, 3000)
    assert lo < 0.01 < hi and hi - lo < 0.01
    lo40, hi40 = wilson(0, 40)  # the old demo's 40 pings: 0 lost says little about 1%
    assert lo40 == 0 and hi40 > 0.08


def test_ping_median_ignores_one_stall():
    replies = "".join(f"64 bytes from 10.0.0.1: icmp_seq={i} ttl=64 time={50.2 if i != 3 else 180.0} ms\n"
                      for i in range(1, 11))
    out = parse_ping(replies + "10 packets transmitted, 10 received, 0% packet loss, time 9ms\n"
                     "rtt min/avg/max/mdev = 50.200/63.180/180.000/38.9 ms\n")
    assert out["avg"] == pytest.approx(63.18) and out["median"] == 50.2 and out["p95"] == 180.0
