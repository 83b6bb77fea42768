"""SIGTERM at any moment of a daemon's start: it exits 0 and leaves nothing on the interface.

In a slow VM the daemon once died of a SIGTERM that arrived while it imported
bcc, before its handler was installed (exit -15).  The handler now comes first;
only a signal during the interpreter's own start-up (before shaper runs at all,
so before anything is created) may still end it by the default action.
"""

import os
import signal
import time

from shaper.datapath.kernel import netns_id
from lab import POD_IF, Daemon, wait_until


def clean(lab) -> list[str]:
    """What a daemon could have left behind: tc objects and this lab's pins."""
    left = []
    state = lab.tc_state()
    for kind in ("htb", "clsact", "bpf"):
        if kind in state:
            left.append(kind)
    pins = f"/sys/fs/bpf/shaper/{netns_id(lab.pod)}-{POD_IF}"
    if os.path.exists(pins):
        left.append(pins)
    return left


def start(lab) -> Daemon:
    d = Daemon(lab.pod, 2332, ("--rules", "/dev/null"))
    lab.daemons.append(d)
    return d


def test_sigterm_during_the_classifier_compile_stops_cleanly(lab):
    d = start(lab)
    # daemon.listen is logged just before attach (the bcc compile).
    assert wait_until(lambda: '"daemon.listen"' in d.log_text() or d.proc.poll() is not None, 120, 0.01), \
        d.log_text()
    assert d.stop() == 0, d.log_text()
    events = [e["event"] for e in d.logs()]
    assert "daemon.ready" not in events and events[-1] == "daemon.exit", events
    assert clean(lab) == []


def test_sigterm_at_any_moment_of_start_up(lab):
    outcomes = []
    for delay in (0.0, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2):
        d = start(lab)
        time.sleep(delay)
        code = d.stop()
        events = [e["event"] for e in d.logs()]
        outcomes.append((delay, code, events))
        # Once shaper has logged anything its handler is in place: a clean exit.
        assert code == 0 or (code == -signal.SIGTERM and events == []), outcomes
        assert clean(lab) == [], (outcomes, clean(lab))
    print("\nSIGTERM after s: exit, events:", outcomes)
    assert any(code == 0 and "daemon.stop" in events for _, code, events in outcomes)


def test_sigterm_to_the_whole_process_group_during_the_compile(lab):
    """As a terminal's Ctrl-C or a supervisor signalling the group: the loader child (bcc)
    must not die of it, the daemon handles it and cleans up."""
    d = start(lab)
    assert wait_until(lambda: '"daemon.listen"' in d.log_text() or d.proc.poll() is not None, 120, 0.01), \
        d.log_text()
    os.killpg(d.proc.pid, signal.SIGTERM)
    assert d.proc.wait(120) == 0, d.log_text()
    assert clean(lab) == []


def test_a_start_too_slow_is_stopped_and_the_next_one_is_not_refused(lab):
    """One slow start must be one clear failure: the lab stops the daemon it waited for,
    says what it waited for, for how long, with the log; the next start then works."""
    import pytest

    d = lab.daemon(wait=False)
    with pytest.raises(RuntimeError) as err:
        lab.wait_ready(d, timeout=0.01)
    text = str(err.value)
    assert f"GET /readyz on 127.0.0.1:2332 in netns {lab.pod}" in text and "within 0s" in text, text
    assert "--- daemon log" in text
    assert d.proc.poll() is not None  # stopped and reaped, not left holding shp0
    assert clean(lab) == []
    again = lab.daemon()
    assert again.stop() == 0
