"""The map ABI: the key/value codec, built from bpf/shaper.h.

The header is the one definition of the layouts: this module reads its
#defines and structs (a deliberately small grammar, see the header) and turns
each struct into a struct.Struct.  tests/unit/test_layout.py compiles the
header with gcc and checks sizes and offsets agree.  The pure core never
imports this module: it plans `plan.Entry` values and this module encodes them;
the core's limits (model.MAX_RULES, MAX_PREFIXES) are checked against the
header here, at import.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from shaper.core.model import DEFAULT_MAX_PREFIXES, MAX_RULES
from shaper.core.plan import Entry, Inline, PortEntry, PortKey

_TYPES = {"__u8": "B", "__u16": "H", "__u32": "I", "__u64": "Q"}


def bpf_dir() -> Path:
    """Where classifier.c and shaper.h are: $SHAPER_BPF_DIR, the source tree, or the package."""
    env = os.environ.get("SHAPER_BPF_DIR")
    package = Path(__file__).resolve().parent.parent  # shaper/
    for candidate in ([Path(env)] if env else []) + [package.parent / "bpf", package / "bpf"]:
        if (candidate / "shaper.h").is_file():
            return candidate
    raise FileNotFoundError("bpf/shaper.h not found: set SHAPER_BPF_DIR to the directory holding it")


@dataclass(frozen=True)
class CStruct:
    name: str
    fields: tuple[tuple[str, str, int], ...]  # (name, struct code, array length or 0)
    codec: struct.Struct

    @property
    def size(self) -> int:
        return self.codec.size

    def offset(self, field: str) -> int:
        off = 0
        for name, code, count in self.fields:
            if name == field:
                return off
            off += struct.calcsize(code) * max(count, 1)
        raise KeyError(field)


def _parse(text: str) -> tuple[dict[str, int], dict[str, CStruct]]:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    consts: dict[str, int] = {}
    for name, value in re.findall(r"^#define\s+(SHAPER_\w+)\s+(\w+)\s*$", text, flags=re.M):
        consts[name] = int(value, 0)
    structs: dict[str, CStruct] = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\};", text, flags=re.S):
        flds = []
        fmt = "="
        for line in body.strip().splitlines():
            m = re.fullmatch(r"\s*(__u8|__u16|__u32|__u64)\s+(\w+)(?:\[(\w+)\])?;\s*", line)
            if not m:
                raise ValueError(f"shaper.h: struct {name}: cannot parse {line.strip()!r}")
            ctype, fname, count = m.groups()
            n = (consts[count] if count in consts else int(count, 0)) if count else 0
            code = _TYPES[ctype]
            align = struct.calcsize(code)
            if struct.calcsize(fmt) % align:
                raise ValueError(f"shaper.h: struct {name}.{fname} would need padding before it")
            flds.append((fname, code, n))
            fmt += f"{n}s" if code == "B" and n else code * max(n, 1)
        codec = struct.Struct(fmt)
        widest = max(struct.calcsize(code) for _, code, _ in flds)
        if codec.size % widest:
            raise ValueError(f"shaper.h: struct {name} would need tail padding")
        structs[name] = CStruct(name, tuple(flds), codec)
    return consts, structs


CONSTANTS, STRUCTS = _parse((bpf_dir() / "shaper.h").read_text())

LPM_KEY = STRUCTS["shaper_lpm_key"].codec  # prefixlen, addr
HOST_KEY = STRUCTS["shaper_host_key"].codec  # addr: a host hash's key, the trie key's address
LPM_VAL = STRUCTS["shaper_lpm_val"].codec  # classid, slot, expires_ns, prefixlen, group, flags
PORT_KEY = STRUCTS["shaper_port_key"].codec  # prefixlen, group, proto, port_hi, port_lo, pad
PORT_VAL = STRUCTS["shaper_port_val"].codec  # classid, slot, expires_ns
INGRESS_CFG = STRUCTS["shaper_ingress_cfg"].codec  # ifb_ifindex, pad
RULE_STATS = STRUCTS["shaper_rule_stats"].codec  # packets, bytes
RULE_META = STRUCTS["shaper_rule_meta"].codec  # len, json
META_LEN = CONSTANTS["SHAPER_META_LEN"]
HTB_MAJOR = CONSTANTS["SHAPER_HTB_MAJOR"]
F_DERIVED = CONSTANTS["SHAPER_F_DERIVED"]
F_PORT = CONSTANTS["SHAPER_F_PORT"]
PORT_KEY_BASE_BITS = 32 + 8  # a port key's prefixlen counts the group and the protocol, then port bits


for _name, _value in (("SHAPER_MAX_RULES", MAX_RULES), ("SHAPER_MAX_PREFIXES", DEFAULT_MAX_PREFIXES)):
    if CONSTANTS[_name] != _value:
        raise ImportError(f"bpf/shaper.h: {_name} is {CONSTANTS[_name]}, shaper.core.model says {_value}")


def pack_entry(entry: Entry) -> bytes:
    """A trie value: the slot's class (skb->priority as is; 0 for slot 0), the slot, the deadline,
    the prefix length to fall back from, the port group, the flags and the inline port rule."""
    one = entry.inline
    flags = (F_DERIVED if entry.derived else 0) | (F_PORT if one is not None else 0)
    if one is None:
        return LPM_VAL.pack(classid(entry.slot) if entry.slot else 0, entry.slot, entry.expires_ns, entry.prefixlen,
                            entry.group, flags, 0, 0, 0, 0, 0, 0)
    return LPM_VAL.pack(classid(entry.slot) if entry.slot else 0, entry.slot, entry.expires_ns, entry.prefixlen,
                        entry.group, flags, one.expires_ns, one.slot, one.proto, one.plen, one.port >> 8,
                        one.port & 0xFF)


def unpack_entry(data: bytes) -> Entry:
    (_classid, slot, expires_ns, prefixlen, group, flags, port_expires, port_slot, proto, plen, hi,
     lo) = LPM_VAL.unpack(data)
    one = Inline(port_slot, port_expires, proto, hi << 8 | lo, plen) if flags & F_PORT else None
    return Entry(slot, expires_ns, prefixlen, group, bool(flags & F_DERIVED), one)


def pack_port_key(key: PortKey) -> bytes:
    """A port trie key: the group, the protocol, the block's first port big-endian (see shaper.h)."""
    if not 0 <= key.plen <= 16 or key.port & ((1 << (16 - key.plen)) - 1):
        raise ValueError(f"port key {key}: port {key.port} is not the first port of a /{key.plen} block")
    return PORT_KEY.pack(PORT_KEY_BASE_BITS + key.plen, key.group, key.proto, key.port >> 8, key.port & 0xFF, 0)


def unpack_port_key(data: bytes) -> PortKey:
    prefixlen, group, proto, hi, lo, _pad = PORT_KEY.unpack(data)
    return PortKey(group, proto, hi << 8 | lo, prefixlen - PORT_KEY_BASE_BITS)


def pack_port_entry(entry: PortEntry) -> bytes:
    return PORT_VAL.pack(classid(entry.slot), entry.slot, entry.expires_ns)


def unpack_port_entry(data: bytes) -> PortEntry:
    _classid, slot, expires_ns = PORT_VAL.unpack(data)
    return PortEntry(slot, expires_ns)


def pack_key(prefixlen: int, addr: bytes) -> bytes:
    return LPM_KEY.pack(prefixlen, addr)


def unpack_key(data: bytes) -> tuple[int, bytes]:
    prefixlen, addr = LPM_KEY.unpack(data)
    return prefixlen, addr


def pack_meta(payload: bytes) -> bytes:
    if len(payload) > META_LEN:
        raise ValueError(f"rule record of {len(payload)} bytes exceeds {META_LEN}")
    return RULE_META.pack(len(payload), payload)


def unpack_meta(data: bytes) -> bytes:
    length, payload = RULE_META.unpack(data)
    return payload[: min(length, META_LEN)]


def classid(slot: int) -> int:
    return (HTB_MAJOR << 16) | slot


@functools.lru_cache(maxsize=None)  # at most 65,535 slots; a scrape of 10,000 rules asks for each
def classid_text(slot: int) -> str:
    """A slot's HTB class as tc writes it: '5348:1'."""
    return f"{HTB_MAJOR:x}:{slot:x}"
