"""What shaper says when the kernel refuses a netem leaf (EINVAL), per the probed
duplicate policy; and the demo's loss interval and ping percentiles.  No root."""

import errno

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from shaper.datapath import tc
from lab.demo import wilson
from shaper.errors import KernelError, NotSupported
from lab import parse_ping
from shaper.core.model import Prefix, Rule


def refusal(monkeypatch, policy: str) -> Exception:
    monkeypatch.setattr(tc, "_dup_policy", [policy])
    t = object.__new__(tc.Tc)
    t.ifname = "shp0"
    rule = Rule(name="dup", dst=(Prefix.parse("10.0.0.1", "dst"),), duplicate_pct=50.0)
    return t._netem_refusal(NetlinkError(errno.EINVAL), rule)


def test_a_kernel_that_refuses_duplicates_is_named_as_such(monkeypatch):
    exc = refusal(monkeypatch, tc.DUP_REFUSED)
    assert isinstance(exc, NotSupported) and "This kernel refuses `duplicate`" in str(exc) and "'dup'" in str(exc)


def test_a_kernel_that_allows_duplicates_reports_the_kernel_error_not_the_restriction(monkeypatch):
    exc = refusal(monkeypatch, tc.DUP_ALLOWED)
    assert isinstance(exc, KernelError) and "duplicate" not in str(exc) and "EINVAL" in str(exc)


def test_an_unprobed_kernel_gets_the_hedged_reason(monkeypatch):
    exc = refusal(monkeypatch, tc.DUP_UNKNOWN)
    assert isinstance(exc, NotSupported) and "Kernels with the 2025 netem restriction refuse" in str(exc)


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
