"""One map lookup's cost in BPF: an LPM trie of host keys against a hash of the same keys.

`python -m bench.lookup_cost [N...]` (root): for each size N, four small tc programs are
loaded with bcc and run by BPF_PROG_TEST_RUN, in turns.  Each run makes 256 lookups of
keys read from an array (spread evenly over the N hosts for "hit", outside them for
"miss") into:

- trie: an LPM trie holding N /128 keys (IPv4-mapped hosts, shaper's key layout);
- hash: a hash of the same N addresses (16-byte keys);
- hash then trie: the hash, and the trie only where the hash has no entry: what the
  classifier's dst_host hash in front of dst_lpm costs;

less a base program that reads the same keys and looks nothing up.  Prints nanoseconds
per lookup, median of the rounds.  This is the lookup alone, on keys the repeats keep in
cache; section 7 of docs/benchmarks.md measures the whole classifier on real traffic.
It was written to weigh the exact-match hash lever of issue 16 before it was built
(bpf/shaper.h: dst_host).
"""

from __future__ import annotations

import ctypes
import os
import socket
import statistics
import struct
import sys

from shaper.core.model import Prefix

SOURCE = r"""
struct key { u32 prefixlen; u8 addr[16]; };
struct hkey { u8 addr[16]; };
BPF_LPM_TRIE(trie, struct key, u32, 1048576);
BPF_HASH(hash, struct hkey, u32, 1048576);
BPF_ARRAY(keys, struct key, 256);

int run(struct __sk_buff *skb)
{
    u32 sum = 0;

    for (u32 i = 0; i < 256; i++) {
        u32 j = i;
        struct key *k = keys.lookup(&j);
        u32 *v;

        if (!k)
            return 0;
#if MODE == 0
        v = &k->prefixlen;
#else
        struct key tk = *k;
        struct hkey hk = {};

        __builtin_memcpy(hk.addr, k->addr, 16);
#if MODE == 1
        v = trie.lookup(&tk);
#elif MODE == 2
        v = hash.lookup(&hk);
#else
        v = hash.lookup(&hk);
        if (!v)
            v = trie.lookup(&tk);
#endif
#endif
        if (v)
            sum += *v;
    }
    return sum & 1;
}
"""
MODES = {0: "base", 1: "trie", 2: "hash", 3: "hash then trie"}
LOOKUPS = 256


class TestRunOpts(ctypes.Structure):
    """libbpf's struct bpf_test_run_opts (its sz field says how much of it this caller knows)."""

    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


def host(i: int) -> bytes:
    """The i-th host of 10.0.0.0/8 as the 16 bytes of shaper's key (IPv4-mapped, by the model)."""
    return Prefix.parse(socket.inet_ntoa(struct.pack("!I", (10 << 24) + i)), "dst").addr


def _key(table, addr: bytes, prefixlen: int | None = None):
    """A map key of `table`'s type holding addr: a trie's (prefixlen, then addr) or a hash's (addr alone)."""
    key = table()
    if prefixlen is not None:
        key.prefixlen = prefixlen
    ctypes.memmove(ctypes.addressof(key) + (0 if prefixlen is None else 4), addr, 16)
    return key


def measure(n: int, hit: bool, repeat: int = 4000, rounds: int = 5) -> dict[str, float]:
    """Nanoseconds per lookup over the base program, per mode, at size n."""
    import bcc

    lib = ctypes.CDLL(bcc.libbcc.lib._name)
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(TestRunOpts)]
    packet = ctypes.create_string_buffer(b"\x00" * 12 + b"\x08\x00\x45" + b"\x00" * 49, 64)
    step = max(1, n // LOOKUPS)
    wanted = [host(i * step % n) if hit else host(n + 1000 + i) for i in range(LOOKUPS)]
    progs = {m: bcc.BPF(text=SOURCE, cflags=[f"-DMODE={m}"]) for m in MODES}
    try:
        for mode, prog in progs.items():
            trie, hashed, keys = prog["trie"], prog["hash"], prog["keys"]
            if mode in (1, 3):
                for i in range(n):
                    trie[_key(trie.Key, host(i), 128)] = trie.Leaf(1)
            if mode in (2, 3):
                for i in range(n):
                    hashed[_key(hashed.Key, host(i))] = hashed.Leaf(1)
            for i, addr in enumerate(wanted):
                keys[ctypes.c_int(i)] = _key(keys.Leaf, addr, 128)
        fds = {m: p.load_func("run", p.SCHED_CLS).fd for m, p in progs.items()}
        runs: dict[int, list[float]] = {m: [] for m in MODES}
        for _ in range(rounds):
            for mode, fd in fds.items():
                opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts), data_in=ctypes.addressof(packet),
                                   data_size_in=len(packet), repeat=repeat)
                rc = lib.bpf_prog_test_run_opts(fd, ctypes.byref(opts))
                if rc != 0:  # libbpf returns -errno
                    raise OSError(-rc, f"BPF_PROG_TEST_RUN failed: {os.strerror(-rc)}")
                runs[mode].append(opts.duration / LOOKUPS)
    finally:
        for prog in progs.values():
            prog.cleanup()
    base = statistics.median(runs[0])
    return {"base": base, **{MODES[m]: statistics.median(runs[m]) - base for m in (1, 2, 3)}}


def main(argv: list[str]) -> int:
    for n in [int(a) for a in argv] or [1, 1000, 100000]:
        for hit in (True, False):
            r = measure(n, hit)
            print(f"N={n:>7,} {'hit ' if hit else 'miss'}: "
                  + ", ".join(f"{name} {r[name]:6.1f}" for name in list(MODES.values())[1:])
                  + f" ns per lookup (base {r['base']:.1f} ns)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
