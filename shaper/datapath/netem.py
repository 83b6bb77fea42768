"""Encoding of netem's TCA_OPTIONS, from a Rule, with no I/O but reading tables.

pyroute2's netem plugin has no delay distribution, no Gilbert-Elliott loss and
no 64-bit latency, so shaper builds the payload itself: struct tc_netem_qopt
followed by netlink attributes (the layout netem_change() parses).

Every `change` sends every attribute: netem keeps the old value of an
attribute that is absent, so leaving one out would keep a stale correlation or
reorder setting.  The delay distribution cannot be removed by a change either,
so jitter always comes with a table; "uniform" is a generated table that gives
the same result as netem's built-in uniform jitter.

The only field read back is `duplicate` (duplicate_of), to explain a refusal;
tests decode the rest with tests/support/netem_decode.py.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path

from shaper.errors import NotSupported
from shaper.core.model import Rule

TCA_NETEM_CORR = 1
TCA_NETEM_DELAY_DIST = 2
TCA_NETEM_REORDER = 3
TCA_NETEM_CORRUPT = 4
TCA_NETEM_LOSS = 5
TCA_NETEM_LATENCY64 = 10
TCA_NETEM_JITTER64 = 11
NETEM_LOSS_GE = 2
NETEM_DIST_SCALE = 8192
NETEM_DIST_MAX = 16384
PSCHED_SHIFT = 6  # netem's legacy u32 latency is in 64 ns ticks
U32_MAX = 0xFFFF_FFFF

# iproute2 installs the delay tables here (Debian multiarch first).
DIST_DIRS = ("/usr/lib/x86_64-linux-gnu/tc", "/usr/lib/aarch64-linux-gnu/tc", "/usr/lib64/tc", "/usr/lib/tc",
             "/usr/share/tc")
QOPT = struct.Struct("=IIIIII")  # latency, limit, loss, gap, duplicate, jitter


def prob(pct: float) -> int:
    """A percentage as netem's u32 probability (100% -> 0xffffffff)."""
    return min(U32_MAX, round(pct / 100.0 * U32_MAX))


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def uniform_table(size: int = 4096) -> tuple[int, ...]:
    """Evenly spread values in (-SCALE, SCALE): jitter uniform in [mu-sigma, mu+sigma]."""
    return tuple(round(-NETEM_DIST_SCALE + 2 * NETEM_DIST_SCALE * (i + 0.5) / size) for i in range(size))


@lru_cache(maxsize=None)
def dist_table(name: str, dirs: tuple[str, ...] = DIST_DIRS) -> tuple[int, ...]:
    """The delay table for a distribution: generated (uniform) or iproute2's file."""
    if name == "uniform":
        return uniform_table()
    for d in dirs:
        path = Path(d) / f"{name}.dist"
        if path.is_file():
            values = []
            for line in path.read_text().splitlines():
                if not line.lstrip().startswith("#"):
                    values += [int(tok) for tok in line.split()]
            if not 0 < len(values) <= NETEM_DIST_MAX:
                raise NotSupported(f"{path}: {len(values)} entries, netem accepts 1..{NETEM_DIST_MAX}")
            return tuple(values)
    raise NotSupported(
        f"the {name} delay distribution table ({name}.dist) is not installed; "
        f"install iproute2 (it ships the tables in one of {', '.join(dirs)})"
    )


def encode_options(rule: Rule, dirs: tuple[str, ...] = DIST_DIRS) -> bytes:
    """TCA_OPTIONS for a netem leaf carrying the rule's impairments."""
    delay_ns = rule.delay_us * 1000
    jitter_ns = rule.jitter_us * 1000
    qopt = QOPT.pack(
        min(U32_MAX, delay_ns >> PSCHED_SHIFT),
        rule.netem_limit(),
        prob(rule.loss_pct),
        rule.gap,
        prob(rule.duplicate_pct),
        min(U32_MAX, jitter_ns >> PSCHED_SHIFT),
    )
    attrs = [
        nla(TCA_NETEM_CORR, struct.pack("=III", prob(rule.delay_corr_pct), prob(rule.loss_corr_pct),
                                        prob(rule.duplicate_corr_pct))),
        nla(TCA_NETEM_REORDER, struct.pack("=II", prob(rule.reorder_pct), prob(rule.reorder_corr_pct))),
        nla(TCA_NETEM_CORRUPT, struct.pack("=II", prob(rule.corrupt_pct), prob(rule.corrupt_corr_pct))),
        nla(TCA_NETEM_LATENCY64, struct.pack("=q", delay_ns)),
        nla(TCA_NETEM_JITTER64, struct.pack("=q", jitter_ns)),
    ]
    if rule.jitter_us:
        table = dist_table(rule.distribution, dirs)
        attrs.append(nla(TCA_NETEM_DELAY_DIST, struct.pack(f"={len(table)}h", *table)))
    if rule.loss_ge:
        ge = rule.loss_ge
        # netem loses in the bad state when a random u32 exceeds h: h = 1 - loss_bad.
        model = struct.pack("=IIII", prob(ge.p_pct), prob(ge.r_pct), prob(100.0 - ge.loss_bad_pct),
                            prob(ge.loss_good_pct))
        attrs.append(nla(TCA_NETEM_LOSS, nla(NETEM_LOSS_GE, model)))
    return qopt + b"".join(attrs)


def duplicate_of(data: bytes) -> int:
    """The duplicate probability (netem's u32) in a netem TCA_OPTIONS payload; 0 if it is too short to say."""
    return QOPT.unpack_from(data)[4] if len(data) >= QOPT.size else 0
