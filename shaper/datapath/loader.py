"""Compile and load the classifier with bcc, in a short-lived child process.

`load_and_pin(pin_dir)` runs `python -m shaper.datapath.loader PIN_DIR`: the child
imports bcc (LLVM: ~99 MB RSS), compiles bpf/classifier.c, loads its two
SCHED_CLS programs (egress and ingress, sharing every map), pins them and
their maps in PIN_DIR and exits, so
the long-running controller never holds LLVM.  Kernel headers are checked
first so their absence is named, not buried in a clang error.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from shaper.errors import NotSupported, PermissionDenied, ShaperError
from shaper.datapath.abi import bpf_dir

PROG_PIN = "classifier"  # classify, at clsact egress
PROG_IN_PIN = "classifier_in"  # classify_ingress, at clsact ingress
PROGRAMS = {PROG_PIN: "classify", PROG_IN_PIN: "classify_ingress"}
MAP_NAMES = ("dst_lpm", "rule_stats", "rule_meta", "src_lpm", "port_lpm", "rule_stats_in", "ingress_cfg")
# dst_lpm's host entries again, by whole address (bpf/shaper.h): pinned and kept with the
# rest, but not required of pins an earlier shaper made, whose classifier does not read
# it (kernel.py writes it where it is pinned).
HOST_MAPS = ("dst_host",)
# What the first version pinned: a directory holding these and none of the rest is an
# earlier shaper's (kernel.py refuses it, naming `shaper reset`).
FIRST_VERSION_PINS = (PROG_PIN, "dst_lpm", "rule_stats", "rule_meta")
EXIT_NO_BCC, EXIT_NO_HEADERS, EXIT_EPERM, EXIT_FAILED = 3, 4, 5, 6


def headers_problem(release: str | None = None) -> str | None:
    """Why bcc cannot find kernel headers here, or None if it can."""
    release = release or platform.release()
    build = Path(f"/lib/modules/{release}/build")
    if (build / "include").is_dir() or Path("/sys/kernel/kheaders.tar.xz").exists():
        return None
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return None
    return (
        f"bcc needs the kernel headers of the running kernel ({release}) and found none at {build}. "
        f"Install them (Debian/Ubuntu: apt-get install linux-headers-{release}), or in a container mount the "
        f"node's /lib/modules and /usr/src read-only, or load the kheaders module (CONFIG_IKHEADERS)"
    )


CAP_SYS_ADMIN, CAP_PERFMON = 21, 38


def _has_capability(cap: int) -> bool:
    """Whether this process has `cap` in its effective set (from /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return True  # unknown: do not blame a capability


def _die_with_parent() -> bool:
    """Be killed when the process that started this one dies (PR_SET_PDEATHSIG): a controller killed
    with SIGKILL must not leave a loader to pin a classifier after it, for nobody.  False if it
    has died already."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    parent = os.environ.get("SHAPER_LOADER_PARENT", "")
    return not parent.isdigit() or os.getppid() == int(parent)


def _child(pin_dir: str, flags: list[str]) -> int:
    if not _die_with_parent():
        print("the process that started the loader is gone: nothing loaded", file=sys.stderr)
        return EXIT_FAILED
    problem = headers_problem()
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_NO_HEADERS
    try:
        from bcc import BPF  # noqa: PLC0415 - only the child may pay for LLVM
        from bcc.libbcc import lib
    except ImportError:
        print("bcc's Python module is missing: install Debian's python3-bpfcc (never PyPI's 'bcc', an unrelated "
              "package), and run shaper with an interpreter that sees /usr/lib/python3/dist-packages",
              file=sys.stderr)
        return EXIT_NO_BCC
    src = bpf_dir()
    try:
        bpf = BPF(src_file=str(src / "classifier.c").encode(), cflags=flags)
        fns = {pin: bpf.load_func(name.encode(), BPF.SCHED_CLS) for pin, name in PROGRAMS.items()}
    except Exception as exc:  # bcc raises bare Exception for compile and load errors
        text = str(exc)
        if "Operation not permitted" in text or os.geteuid() != 0:
            print(f"loading the classifier was refused ({text}): run as root or with CAP_BPF, CAP_NET_ADMIN "
                  f"and CAP_PERFMON (CAP_SYS_ADMIN on kernels before 5.8)", file=sys.stderr)
            return EXIT_EPERM
        if "Permission denied" in text and not _has_capability(CAP_PERFMON) and not _has_capability(CAP_SYS_ADMIN):
            # EACCES from the verifier: with CAP_BPF but not CAP_PERFMON it treats the
            # program as unprivileged and refuses its packet-pointer arithmetic.
            print(f"the kernel's verifier refused the classifier as unprivileged ({text}): it needs CAP_BPF, "
                  f"CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN)", file=sys.stderr)
            return EXIT_EPERM
        print(f"compiling/loading the classifier failed: {text}", file=sys.stderr)
        return EXIT_FAILED
    os.makedirs(pin_dir, exist_ok=True)
    pins = {pin: fn.fd for pin, fn in fns.items()}
    for name in MAP_NAMES + HOST_MAPS:
        pins[name] = bpf.get_table(name).map_fd
    for name, fd in pins.items():
        ret = lib.bpf_obj_pin(fd, os.path.join(pin_dir, name).encode())
        if ret < 0:
            print(f"pinning {name} in {pin_dir} failed ({os.strerror(abs(ret))})", file=sys.stderr)
            return EXIT_FAILED
    _keep(bpf, lib, flags)
    print(json.dumps({"pinned": sorted(pins)}))
    return 0


def _keep(bpf: Any, lib: Any, flags: list[str]) -> None:
    """Keep what was loaded for the next load (objcache): each program's instructions as bcc loaded
    them, and each map as the kernel has it."""
    import ctypes

    from shaper.datapath import objcache
    from shaper.datapath.maps import map_info

    try:
        fd_names = {bpf.get_table(name).map_fd: name for name in MAP_NAMES + HOST_MAPS}
        maps = {}
        for fd, name in fd_names.items():
            info = map_info(fd)
            maps[name] = {"type": info.type, "key_size": info.key_size, "value_size": info.value_size,
                          "max_entries": info.max_entries, "map_flags": info.map_flags}
        license = ctypes.string_at(lib.bpf_module_license(bpf.module)).decode()
        programs = {pin: (name, bpf.dump_func(name.encode())) for pin, name in PROGRAMS.items()}
        objcache.store(flags, objcache.entry(programs, maps, fd_names, license))
    except Exception as exc:  # a cache not kept costs the next load a compile, nothing more
        print(f"the compiled classifier was not kept: {exc}", file=sys.stderr)


def cflags() -> list[str]:
    """What the classifier is compiled with: its headers, and the tries' size where not the default."""
    from shaper.core import model

    size = model.MAX_PREFIXES
    return [f"-I{bpf_dir()}", *([f"-DSHAPER_MAX_PREFIXES={size}"] if size != model.DEFAULT_MAX_PREFIXES else [])]


def load_and_pin(pin_dir: str) -> None:
    """Load and pin the classifier and its maps in `pin_dir`: the one compiled last time for this
    source and kernel (objcache, about 0.1 s), else compiled by bcc in a child."""
    from shaper.datapath import objcache

    flags = cflags()  # this process's: the child does not read the settings (the tries' size) itself
    if objcache.load_and_pin(pin_dir, flags):
        return
    proc = subprocess.run(
        [sys.executable, "-m", "shaper.datapath.loader", pin_dir, *flags],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
             "SHAPER_LOADER_PARENT": str(os.getpid())},
        check=False,
        # Out of our process group: a Ctrl-C or a group-wide SIGTERM is the daemon's to
        # handle (it removes what it attached); killed mid-load, the child made it exit 1.
        start_new_session=True,
    )
    if proc.returncode == 0:
        return
    detail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    # The child's last line is its reason: put it first, where one-line reports (the CLI,
    # a pod's termination message) show it; the lines before it (bcc, the verifier) follow.
    reason = detail[-1] if detail else f"the loader exited with status {proc.returncode}"
    text = "\n".join([reason] + detail[-15:-1])
    if proc.returncode in (EXIT_NO_BCC, EXIT_NO_HEADERS):
        raise NotSupported(text)
    if proc.returncode == EXIT_EPERM:
        raise PermissionDenied(text)
    raise ShaperError(f"loading the classifier failed: {text}")


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2:]))
