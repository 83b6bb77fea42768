"""BPF map and pin access for the long-running side: ctypes over libbpf1.

The controller never imports bcc (LLVM alone is ~99 MB RSS): the classifier is
compiled by a short-lived child (loader.py) which pins the program and maps;
this module opens the pins and reads/writes the maps through bpf(2) via
Debian's libbpf.so.1.  Batch updates and deletes are used where the kernel
has them for LPM tries (5.13+), chunked, with a per-element fallback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
from functools import lru_cache
from typing import Iterator

from shaper.errors import KernelError, NotSupported, PermissionDenied

BPF_ANY = 0
BATCH_CHUNK = 4096


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ProgInfo(ctypes.Structure):
    # The head of struct bpf_prog_info: type, id, tag[8].  The kernel fills as
    # much as info_len says, so a prefix of the struct is enough.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8)]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _MapCreateOpts(ctypes.Structure):
    # libbpf 1.x struct bpf_map_create_opts; the kernel-side field shaper sets is map_flags only.
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32)]


@lru_cache(maxsize=None)
def libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        raise NotSupported("libbpf.so.1 not found: install Debian's libbpf1 (apt-get install libbpf1)") from None
    vp, u32p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)
    for fn, args in {
        "bpf_obj_get": [ctypes.c_char_p],
        "bpf_obj_pin": [ctypes.c_int, ctypes.c_char_p],
        "bpf_map_update_elem": [ctypes.c_int, vp, vp, ctypes.c_uint64],
        "bpf_map_lookup_elem": [ctypes.c_int, vp, vp],
        "bpf_map_delete_elem": [ctypes.c_int, vp],
        "bpf_map_get_next_key": [ctypes.c_int, vp, vp],
        "bpf_map_update_batch": [ctypes.c_int, vp, vp, u32p, vp],
        "bpf_map_delete_batch": [ctypes.c_int, vp, u32p, vp],
        "bpf_map_lookup_batch": [ctypes.c_int, vp, vp, vp, vp, u32p, vp],
        "bpf_obj_get_info_by_fd": [ctypes.c_int, vp, u32p],
        "libbpf_num_possible_cpus": [],
        "bpf_map_create": [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, vp],
        "bpf_prog_load": [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, vp, ctypes.c_size_t, vp],
    }.items():
        getattr(lib, fn).argtypes = args
        getattr(lib, fn).restype = ctypes.c_int
    return lib


def _check(ret: int, op: str, obj: str) -> int:
    # libbpf 1.x returns -errno from every call.
    if ret >= 0:
        return ret
    err = -ret
    if err == _errno.EPERM:
        raise PermissionDenied(f"{op} {obj}: operation not permitted; run as root or with CAP_BPF and CAP_NET_ADMIN")
    raise KernelError(op, obj, err)


def possible_cpus() -> int:
    return _check(libbpf().libbpf_num_possible_cpus(), "count", "possible CPUs")


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int, flags: int,
               what: str) -> int:
    """A new map's fd (bpf_map_create); `what` names it in the error."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    return _check(libbpf().bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries,
                                          ctypes.byref(opts)), "create", what)


def prog_load(prog_type: int, name: str, license: str, insns: bytes) -> int:
    """A program's fd (bpf_prog_load, without the verifier's log: a refusal is only its errno)."""
    buf = ctypes.create_string_buffer(insns, len(insns))
    return _check(libbpf().bpf_prog_load(prog_type, name.encode(), license.encode(), buf, len(insns) // 8, None),
                  "load", f"program {name}")


def obj_get(path: str) -> int:
    return _check(libbpf().bpf_obj_get(path.encode()), "open pinned", path)


def obj_pin(fd: int, path: str) -> None:
    _check(libbpf().bpf_obj_pin(fd, path.encode()), "pin", path)


def _prog_info(fd: int) -> _ProgInfo:
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "inspect", "program")
    return info


def prog_id(fd: int) -> int:
    return _prog_info(fd).id


def prog_tag(fd: int) -> str:
    """The kernel's hash of the program's instructions (map references left out), as bpftool shows it."""
    return bytes(_prog_info(fd).tag).hex()


def map_info(fd: int, what: str = "map") -> _MapInfo:
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "inspect", what)
    return info


class Map:
    """One pinned BPF map with fixed key and value sizes."""

    def __init__(self, path: str, key_size: int, value_size: int, *, percpu: bool = False):
        self.path = path
        self.fd = obj_get(path)
        try:
            info = map_info(self.fd, path)
        except BaseException:
            os.close(self.fd)
            raise
        if (info.key_size, info.value_size) != (key_size, value_size):
            os.close(self.fd)
            raise NotSupported(
                f"{path}: key/value sizes {info.key_size}/{info.value_size} differ from "
                f"{key_size}/{value_size}: pinned by another shaper version; run `shaper reset`"
            )
        self.id = info.id
        self.max_entries = info.max_entries
        self.key_size = key_size
        # Per-CPU values come back as one 8-byte-aligned slot per possible CPU.
        self.ncpus = possible_cpus() if percpu else 1
        self.slot_size = (value_size + 7) // 8 * 8 if percpu else value_size
        self.value_size = value_size
        self._batch_ok = True
        self._lookup_batch_ok = True

    @property
    def batch_reads(self) -> bool:
        """False once the kernel refused a batch lookup here (items() then reads one entry at a time)."""
        return self._lookup_batch_ok

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lookup(self, key: bytes) -> bytes | None:
        buf = ctypes.create_string_buffer(self.slot_size * self.ncpus)
        ret = libbpf().bpf_map_lookup_elem(self.fd, key, buf)
        if ret < 0:
            err = -ret
            if err == _errno.ENOENT:
                return None
            _check(ret, "look up in", self.path)
        return buf.raw

    def lookup_percpu(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key) or b""
        return [raw[i * self.slot_size: i * self.slot_size + self.value_size] for i in range(self.ncpus) if raw]

    def update(self, key: bytes, value: bytes) -> None:
        _check(libbpf().bpf_map_update_elem(self.fd, key, value, BPF_ANY), "update", self.path)

    def delete(self, key: bytes) -> bool:
        ret = libbpf().bpf_map_delete_elem(self.fd, key)
        if ret < 0:
            err = -ret
            if err == _errno.ENOENT:
                return False
            _check(ret, "delete from", self.path)
        return True

    def keys(self) -> Iterator[bytes]:
        key = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            ret = libbpf().bpf_map_get_next_key(self.fd, key, nxt)
            if ret < 0:
                err = -ret
                if err == _errno.ENOENT:
                    return
                _check(ret, "iterate", self.path)
            key = nxt.raw
            yield key

    def count(self) -> int:
        """How many entries the map holds (read in batches where the kernel has them)."""
        packed = self.read_packed()
        return len(packed[0]) // self.key_size if packed is not None else sum(1 for _ in self.keys())

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        batched = self._items_batched()
        if batched is not None:
            yield from batched
            return
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def _items_batched(self) -> list[tuple[bytes, bytes]] | None:
        """Every entry as (key, value); None where the kernel has no batch lookup here."""
        packed = self.read_packed()
        if packed is None:
            return None
        keys, values = packed
        ks, vs = self.key_size, self.slot_size * self.ncpus
        return [(keys[i * ks: (i + 1) * ks], values[i * vs: (i + 1) * vs]) for i in range(len(keys) // ks)]

    def read_packed(self) -> tuple[bytes, bytes] | None:
        """Every entry as two packed arrays, every key then every value (a per-CPU value is `ncpus`
        slots), BATCH_CHUNK per bpf(2) call (100,000 trie entries: 0.1 s, not the 1.3 s of a next-key
        and a lookup call each); None where the kernel has no batch lookup here."""
        if not self._lookup_batch_ok:
            return None
        ks, vs = self.key_size, self.slot_size * self.ncpus
        keys = ctypes.create_string_buffer(ks * BATCH_CHUNK)
        values = ctypes.create_string_buffer(vs * BATCH_CHUNK)
        # The position between calls is opaque (a key for tries and arrays, a bucket for hashes):
        # out_batch of one call is in_batch of the next, so two buffers take turns.
        position = [ctypes.create_string_buffer(max(ks, 8)), ctypes.create_string_buffer(max(ks, 8))]
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        out_keys: list[bytes] = []
        out_values: list[bytes] = []
        first = True
        while True:
            count = ctypes.c_uint32(BATCH_CHUNK)
            ret = libbpf().bpf_map_lookup_batch(self.fd, None if first else position[0], position[1], keys, values,
                                                 ctypes.byref(count), ctypes.byref(opts))
            err = -ret if ret < 0 else 0
            if err in (_errno.EINVAL, _errno.EOPNOTSUPP, 524) and first:
                self._lookup_batch_ok = False
                return None
            if err and err != _errno.ENOENT:  # ENOENT: no more entries (count says how many came)
                _check(ret, "read", self.path)
            n = count.value
            out_keys.append(ctypes.string_at(keys, n * ks))
            out_values.append(ctypes.string_at(values, n * vs))
            if err == _errno.ENOENT or n == 0:
                return b"".join(out_keys), b"".join(out_values)
            position.reverse()
            first = False

    def update_packed(self, keys: bytes, values: bytes) -> None:
        """Write the entries of two packed arrays (every key, then every value, back to back):
        batch ops in chunks where the kernel has them, else one by one."""
        ks, vs = self.key_size, self.value_size
        count = len(keys) // ks
        if len(keys) != count * ks or len(values) != count * vs:
            raise ValueError(f"{self.path}: {len(keys)} key bytes and {len(values)} value bytes are not "
                             f"whole {ks}- and {vs}-byte entries of one count")
        for start in range(0, count, BATCH_CHUNK):
            end = min(count, start + BATCH_CHUNK)
            chunk_keys, chunk_values = keys[start * ks: end * ks], values[start * vs: end * vs]
            if self._batch_ok and self._batch_packed(chunk_keys, chunk_values, end - start, update=True):
                continue
            for i in range(end - start):
                self.update(chunk_keys[i * ks: (i + 1) * ks], chunk_values[i * vs: (i + 1) * vs])

    def delete_many(self, keys: list[bytes]) -> None:
        for start in range(0, len(keys), BATCH_CHUNK):
            chunk = keys[start: start + BATCH_CHUNK]
            # Batch delete stops at the first missing key: fall back per element.
            if self._batch_ok and self._batch_packed(b"".join(chunk), b"", len(chunk), update=False):
                continue
            for key in chunk:
                self.delete(key)

    def _batch_packed(self, keys: bytes, values: bytes, n: int, *, update: bool) -> bool:
        count = ctypes.c_uint32(n)
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        if update:
            ret = libbpf().bpf_map_update_batch(self.fd, keys, values, ctypes.byref(count), ctypes.byref(opts))
        else:
            ret = libbpf().bpf_map_delete_batch(self.fd, keys, ctypes.byref(count), ctypes.byref(opts))
        if ret == 0 and count.value == n:
            return True
        err = -ret
        if ret < 0 and err in (_errno.EINVAL, _errno.EOPNOTSUPP, 524):  # 524: ENOTSUPP, no batch ops here
            self._batch_ok = False
        elif ret < 0 and err not in (_errno.ENOENT,):
            _check(ret, "batch update" if update else "batch delete", self.path)
        # Partial progress: redo the chunk element by element (both are idempotent).
        return False
