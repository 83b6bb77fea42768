"""A classifier compiled ahead, so that a new target's first shaping does not wait for bcc.

Compiling classifier.c (LLVM, in the loader's child) is about a second of a target's first
shaping, and each target needs its own program and maps.  The agent keeps one spare
set loaded and pinned, never attached and with empty maps, under
<bpffs>/shaper/_spare-<agent pid>; a new target's datapath renames it into its own pin
directory (one rename in the bpffs) and a thread loads the next.  A name that does not
start with a digit is neither a target's nor a sidecar's: adoption and the sweeper pass
it by.  (The bpffs refuses names with a ".".)
At start an agent removes the spares of agents no longer running (an upgrade must never
take a classifier an earlier version compiled); on exit it removes its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading

from shaper.agent.discover import listdir
from shaper.errors import ShaperError

log = logging.getLogger("shaper")

PREFIX = "_spare-"
STAGING = "_new"  # the spare while it is loaded: renamed to the spare's name once complete
WAIT_S = 10.0  # a target arriving while the spare is being compiled waits for it this long, then compiles its own


class Spares:
    def __init__(self, bpffs: str):
        self.base = os.path.join(bpffs, "shaper")
        self.dir = os.path.join(self.base, f"{PREFIX}{os.getpid()}")
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        """Remove the spares of agents that are gone, and begin loading this one's."""
        for name in listdir(self.base):
            pid = name[len(PREFIX):].split("_")[0]
            if name.startswith(PREFIX) and pid.isdigit() and (int(pid) == os.getpid() or not _is_agent(int(pid))):
                shutil.rmtree(os.path.join(self.base, name), ignore_errors=True)
        self.refill()

    def refill(self) -> None:
        with self._lock:
            if self._closed or (self._thread is not None and self._thread.is_alive()) or _complete(self.dir):
                return
            self._thread = threading.Thread(target=self._load, name="spare-classifier", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        from shaper.datapath import loader

        staging = self.dir + STAGING
        shutil.rmtree(staging, ignore_errors=True)
        try:
            os.makedirs(self.base, exist_ok=True)
            loader.load_and_pin(staging)
            with self._lock:
                if self._closed:  # the agent is stopping: nobody would take it
                    shutil.rmtree(staging, ignore_errors=True)
                    return
                os.rename(staging, self.dir)
        except (ShaperError, OSError) as exc:  # the next target compiles its own, as a sidecar does
            log.warning("spare.failed", extra={"fields": {"error": str(exc), "consequence":
                                                          "the next new target compiles its classifier itself"}})
            shutil.rmtree(staging, ignore_errors=True)

    def take(self, pin_dir: str) -> bool:
        """Move the spare to `pin_dir` (which must not exist); False if there is none to take."""
        thread = self._thread
        if thread is not None:
            thread.join(WAIT_S)
        try:
            if not _complete(self.dir):
                return False
            os.rename(self.dir, pin_dir)
        except OSError as exc:
            log.warning("spare.unused", extra={"fields": {"error": exc.strerror, "pins": pin_dir}})
            return False
        finally:
            self.refill()
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            thread.join(WAIT_S)
        for path in (self.dir, self.dir + STAGING):
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rmdir(self.base)  # the shared directory goes with its last user, as a reset leaves it
        except OSError:
            pass


def _complete(path: str) -> bool:
    from shaper.datapath.kernel import _pins_complete_in

    return _pins_complete_in(path)


def _is_agent(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"agent" in f.read()
    except OSError:
        return False
