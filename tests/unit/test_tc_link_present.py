"""Tc.link_present, which the daemon calls every second, keeps nothing per call.

It only reads (RTM_GETLINK of the loopback, in this process's own namespace): no root needed,
nothing changed.  pyroute2's get_links() left each reply's trailing ACK in its socket's queue
for good: ~80 bytes a call, the daemon's only steady growth in a soak (issue 12)."""

import gc
import tracemalloc

import pytest

from shaper.datapath.tc import Tc

CALLS = 1000


@pytest.fixture
def tc():
    t = Tc("lo")
    yield t
    t.close()


def test_link_present_keeps_no_memory_per_call(tc):
    # Traced from the start: what a call replaces (pyroute2 keeps its 256 most recent sequence
    # numbers) then nets out instead of counting as growth.
    tracemalloc.start()
    try:
        for _ in range(600):  # those lists and pyroute2's parsers and buffers reach their size
            assert tc.link_present()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(CALLS):
            assert tc.link_present()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # A kept ACK is a 36-byte message in a bytes object and a queue slot: ~130 kB for 1,000 calls.
    assert grown < 16 * 1024, f"{grown} bytes kept after {CALLS} calls ({grown / CALLS:.1f} a call)"


def test_link_present_says_false_for_a_vanished_ifindex(tc):
    tc.ifindex = 2**31 - 1  # no interface has it: the kernel answers ENODEV
    assert tc.link_present() is False
