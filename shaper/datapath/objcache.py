"""The compiled classifier, kept so that the next load skips bcc and LLVM.

Compiling bpf/classifier.c is about a second (more on a busy or slow machine) of every first
attach: `shaper apply` on a new interface, a daemon's start, an agent's first shaping of a pod.
What the compile produces depends only on the source, the kernel headers (the running kernel's
release and build) and the flags, so the loader child, after a compile, keeps what it loaded:
each program's instructions, where they refer to a map, and each map's kind and sizes as the
kernel reports them.  The next load in this process or any other creates the maps, puts their
file descriptors into those instructions, and loads them with libbpf: about 0.1 s.  The
kernel's verifier checks them as it checked the compiled ones; anything unexpected (a changed
source, a different kernel, a damaged entry, a refusal) falls back to the compile, whose errors
are the ones users see.

Where: $SHAPER_CACHE_DIR, by default /var/cache/shaper; "off" keeps nothing.  The directory is
made 0700, and an entry is used only if it and its directory belong to this user and nobody else
may write them: an entry is code loaded into the kernel.  `shaper reset` does not remove it (it
is not shaping); deleting the directory is always safe.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import platform
import stat
import struct
import tempfile
from functools import lru_cache
from typing import Any

from shaper.datapath.abi import bpf_dir
from shaper.errors import ShaperError

log = logging.getLogger("shaper")

FORMAT = 1
DEFAULT_DIR = "/var/cache/shaper"
INSN = struct.Struct("<BBhi")  # code, dst_reg:4 | src_reg:4, off, imm
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots, imm in both
PSEUDO_MAP_FD = 1
PROG_TYPE_SCHED_CLS = 3


def directory() -> str | None:
    where = os.environ.get("SHAPER_CACHE_DIR", DEFAULT_DIR)
    return None if where in ("", "off") else where


@lru_cache(maxsize=None)
def _source_digest(src: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(src)):
        if name.endswith((".c", ".h")):
            h.update(name.encode() + b"\0")
            with open(os.path.join(src, name), "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()


def key(cflags: list[str]) -> str:
    """What the compile's output depends on: the source, the kernel (release and build), the flags."""
    uname = os.uname()
    h = hashlib.sha256(json.dumps([FORMAT, platform.machine(), uname.release, uname.version, cflags,
                                   _source_digest(str(bpf_dir()))]).encode())
    return h.hexdigest()[:40]


def _path(cflags: list[str]) -> str | None:
    where = directory()
    return os.path.join(where, f"classifier-{key(cflags)}.json") if where else None


def map_refs(insns: bytes) -> list[tuple[int, int]]:
    """(instruction index, map fd) of every map reference in `insns` (ld_imm64 with BPF_PSEUDO_MAP_FD).
    Raises ValueError for a reference of another kind (a map value, BTF): not something to keep."""
    refs = []
    i, count = 0, len(insns) // INSN.size
    while i < count:
        code, regs, _off, imm = INSN.unpack_from(insns, i * INSN.size)
        if code == LD_IMM64:
            src = regs >> 4
            if src == PSEUDO_MAP_FD:
                refs.append((i, imm))
            elif src:
                raise ValueError(f"instruction {i} refers to something other than a map fd (src_reg {src})")
            i += 2
            continue
        i += 1
    return refs


def with_fds(insns: bytes, refs: list[tuple[int, str]], fds: dict[str, int]) -> bytes:
    """`insns` with each map reference pointing at the fd of its map now."""
    out = bytearray(insns)
    for index, name in refs:
        code, regs, off, _imm = INSN.unpack_from(out, index * INSN.size)
        if code != LD_IMM64 or regs >> 4 != PSEUDO_MAP_FD:
            raise ValueError(f"instruction {index} is not a map reference")
        INSN.pack_into(out, index * INSN.size, code, regs, off, fds[name])
    return bytes(out)


def entry(programs: dict[str, tuple[str, bytes]], maps: dict[str, dict[str, Any]], fd_names: dict[int, str],
          license: str) -> dict:
    """A cache entry: `programs` is pin -> (program name, instructions as loaded), `maps` name -> the
    kernel's map info, `fd_names` the maps' fds at the compile.  ValueError if it cannot be kept."""
    progs = {}
    for pin, (name, insns) in programs.items():
        refs = []
        for index, fd in map_refs(insns):
            if fd not in fd_names:
                raise ValueError(f"{name}: instruction {index} refers to fd {fd}, not one of the maps")
            refs.append([index, fd_names[fd]])
        progs[pin] = {"name": name, "insns": base64.b64encode(insns).decode(), "maps": refs}
    return {"format": FORMAT, "license": license, "maps": maps, "programs": progs}


def store(cflags: list[str], data: dict) -> None:
    """Keep `data` (see entry) for the next load; never raises (a cache that cannot be written is no cache)."""
    path = _path(cflags)
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".classifier-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({**data, "key": key(cflags)}, f)
            os.rename(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        log.debug("classifier cache not written to %s: %s", path, exc)


def _trusted(path: str) -> bool:
    """Ours and writable by nobody else, the entry and its directory (an entry is code for the kernel)."""
    for p in (os.path.dirname(path), path):
        st = os.lstat(p)
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or stat.S_ISLNK(st.st_mode):
            return False
    return True


def read(cflags: list[str]) -> dict | None:
    """The entry for this source, kernel and flags, or None."""
    path = _path(cflags)
    if path is None:
        return None
    try:
        if not _trusted(path):
            log.warning("classifier.cache_ignored", extra={"fields": {
                "path": path, "reason": "not owned by this user or writable by others"}})
            return None
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key(cflags):
        return None
    return data


def load_and_pin(pin_dir: str, cflags: list[str]) -> bool:
    """Load the kept classifier and pin its programs and maps in `pin_dir` as the loader child does;
    False (and nothing left in `pin_dir`) if there is none or it does not load."""
    from shaper.datapath.maps import map_create, obj_pin, prog_load

    data = read(cflags)
    if data is None:
        return False
    fds: dict[str, int] = {}
    progs: dict[str, int] = {}
    pinned: list[str] = []
    made_dir = not os.path.isdir(pin_dir)
    try:
        for name, spec in data["maps"].items():
            fds[name] = map_create(spec["type"], name, spec["key_size"], spec["value_size"], spec["max_entries"],
                                   spec["map_flags"], f"map {name}")
        for pin, prog in data["programs"].items():
            insns = with_fds(base64.b64decode(prog["insns"]), [(i, n) for i, n in prog["maps"]], fds)
            progs[pin] = prog_load(PROG_TYPE_SCHED_CLS, prog["name"], data["license"], insns)
        os.makedirs(pin_dir, exist_ok=True)
        for name, fd in {**progs, **fds}.items():
            obj_pin(fd, os.path.join(pin_dir, name))
            pinned.append(name)
        return True
    except (ShaperError, OSError, KeyError, TypeError, ValueError) as exc:
        for name in pinned:
            try:
                os.unlink(os.path.join(pin_dir, name))
            except OSError:
                pass
        if made_dir:
            try:
                os.rmdir(pin_dir)
            except OSError:
                pass
        log.info("classifier.cache_unused", extra={"fields": {"reason": str(exc), "action": "compiling"}})
        return False
    finally:
        for fd in [*fds.values(), *progs.values()]:
            os.close(fd)
