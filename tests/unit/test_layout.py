"""The Python codec and the C header must agree: compile the header and compare."""

import shutil
import subprocess

import pytest

from shaper.core.plan import Entry
from shaper.datapath import abi


def _c_layout(tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.fail("gcc is needed to check bpf/shaper.h against the Python codec (apt-get install gcc)")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/types.h>', '#include "shaper.h"',
             "int main(void) {"]
    for name, st in abi.STRUCTS.items():
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for fld, _, _ in st.fields:
            lines.append(f'printf("{name}.{fld} %zu\\n", offsetof(struct {name}, {fld}));')
    for const in abi.CONSTANTS:
        lines.append(f'printf("{const} %lld\\n", (long long)({const}));')
    lines.append("return 0; }")
    src = tmp_path / "probe.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "probe"
    subprocess.run([cc, f"-I{abi.bpf_dir()}", str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return dict(line.rsplit(" ", 1) for line in out.splitlines())


def test_sizes_offsets_and_constants_match_gcc(tmp_path):
    c = _c_layout(tmp_path)
    for name, st in abi.STRUCTS.items():
        assert int(c[name]) == st.size, name
        for fld, _, _ in st.fields:
            assert int(c[f"{name}.{fld}"]) == st.offset(fld), f"{name}.{fld}"
    for const, value in abi.CONSTANTS.items():
        assert int(c[const]) == value


def test_expected_structs_present():
    assert abi.LPM_KEY.size == 20 and abi.LPM_VAL.size == 24
    assert abi.RULE_STATS.size == 16 and abi.RULE_META.size == 4 + abi.META_LEN


def test_codec_round_trip():
    v = Entry(7, 123456789, 120)
    assert abi.unpack_entry(abi.pack_entry(v)) == v
    # What the classifier reads: skb->priority's classid, the slot for rule_stats, zero padding.
    assert abi.LPM_VAL.unpack(abi.pack_entry(v)) == (0x53480007, 7, 123456789, 120, 0)
    key = abi.pack_key(120, bytes(range(16)))
    assert abi.unpack_key(key) == (120, bytes(range(16)))
    assert abi.unpack_meta(abi.pack_meta(b'{"a":1}')) == b'{"a":1}'
    with pytest.raises(ValueError):
        abi.pack_meta(b"x" * (abi.META_LEN + 1))
    assert abi.classid(1) == 0x53480001


def test_header_grammar_is_enforced():
    with pytest.raises(ValueError, match="padding"):
        abi._parse("struct bad {\n__u8 a;\n__u32 b;\n};")
    with pytest.raises(ValueError, match="cannot parse"):
        abi._parse("struct bad {\nint a;\n};")


def test_largest_rule_record_fits():
    import json
    from shaper.core.model import parse_rule
    r = parse_rule({"name": "n" * 63, "dst": ["10.0.0.1"], "delay": "3599999999us",
                    "jitter": "3599999999us", "delay_corr": "99.999999%", "distribution": "paretonormal",
                    "loss_ge": {"p": "99.999999%", "r": "99.999999%", "loss_bad": "99.999999%",
                                "loss_good": "99.999999%"},
                    "duplicate": "99.999999%", "duplicate_corr": "99.999999%", "corrupt": "99.999999%",
                    "corrupt_corr": "99.999999%", "reorder": "99.999999%", "reorder_corr": "99.999999%",
                    "gap": 2**31 - 1, "rate": "9999999999999bit", "burst": 2**30 - 1, "limit": 999999,
                    "ttl": "2591999999999us"})
    record = r.to_dict()
    del record["dst"]
    payload = json.dumps({"rule": record, "expires_ns": 2**63}, separators=(",", ":"), sort_keys=True).encode()
    abi.pack_meta(payload)  # raises if it does not fit
