"""Reading back netem options, for tests: the product only ever encodes them (shaper.datapath.netem).

`decode_options` parses a TCA_OPTIONS payload into its fields; `netem_options` reads the
payload of a slot's netem leaf from the kernel (the VM tier, where sch_netem exists).
"""

from __future__ import annotations

import struct

from shaper.datapath.netem import (NETEM_LOSS_GE, PSCHED_SHIFT, QOPT, TCA_NETEM_CORR, TCA_NETEM_CORRUPT,
                                   TCA_NETEM_DELAY_DIST, TCA_NETEM_JITTER64, TCA_NETEM_LATENCY64, TCA_NETEM_LOSS,
                                   TCA_NETEM_REORDER)
from shaper.datapath.tc import ROOT, Tc


def decode_options(data: bytes) -> dict[str, object]:
    """The fields of a netem TCA_OPTIONS payload, as the kernel echoes what netem.encode_options built."""
    latency, limit, loss, gap, duplicate, jitter = QOPT.unpack_from(data)
    out: dict[str, object] = {"limit": limit, "loss": loss, "gap": gap, "duplicate": duplicate,
                              "latency_ns": latency << PSCHED_SHIFT, "jitter_ns": jitter << PSCHED_SHIFT}
    off = QOPT.size
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        if length < 4:
            break
        body = data[off + 4: off + length]
        if kind == TCA_NETEM_CORR:
            out["delay_corr"], out["loss_corr"], out["dup_corr"] = struct.unpack("=III", body)
        elif kind == TCA_NETEM_REORDER:
            out["reorder"], out["reorder_corr"] = struct.unpack("=II", body)
        elif kind == TCA_NETEM_CORRUPT:
            out["corrupt"], out["corrupt_corr"] = struct.unpack("=II", body)
        elif kind == TCA_NETEM_LATENCY64:
            (out["latency_ns"],) = struct.unpack("=q", body)
        elif kind == TCA_NETEM_JITTER64:
            (out["jitter_ns"],) = struct.unpack("=q", body)
        elif kind == TCA_NETEM_DELAY_DIST:
            out["dist_size"] = len(body) // 2
        elif kind == TCA_NETEM_LOSS:
            _, sub = struct.unpack_from("=HH", body)
            if sub == NETEM_LOSS_GE:
                out["ge"] = struct.unpack_from("=IIII", body, 4)
        off += length + (-length % 4)
    return out


def netem_options(tc: Tc, slot: int) -> bytes | None:
    """The raw TCA_OPTIONS of the netem leaf of a slot, or None if it has none."""
    for q in tc.qdiscs():
        if q["parent"] == ROOT | slot and q.get_attr("TCA_KIND") == "netem":
            raw = q.get_attr("TCA_OPTIONS")
            return raw if isinstance(raw, bytes) else None
    return None
