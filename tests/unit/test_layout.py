"""The Python codec and the C header must agree: compile the header and compare."""

import shutil
import struct
import subprocess

import pytest

from shaper.core.plan import Entry, Inline, PortEntry, PortKey
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
    assert abi.LPM_KEY.size == 20 and abi.LPM_VAL.size == 40
    assert abi.RULE_STATS.size == 16 and abi.RULE_META.size == 4 + abi.META_LEN
    assert abi.PORT_KEY.size == 12 and abi.PORT_VAL.size == 16 and abi.INGRESS_CFG.size == 8


def test_lpm_value_starts_as_the_first_version_did():
    # group and flags took the first version's zero pad, and the inline port rule follows: an entry
    # without them starts with the first version's bytes and ends in zeros.
    first_version = struct.Struct("=IIQII")
    packed = abi.pack_entry(Entry(7, 5, 120))
    assert packed[:24] == first_version.pack(0x53480007, 7, 5, 120, 0) and packed[24:] == bytes(16)
    assert abi.unpack_entry(first_version.pack(0x53480007, 7, 5, 120, 0) + bytes(16)) == Entry(7, 5, 120)


def test_codec_round_trip():
    v = Entry(7, 123456789, 120)
    assert abi.unpack_entry(abi.pack_entry(v)) == v
    # What the classifier reads: skb->priority's classid, the slot for rule_stats, zero padding.
    assert abi.LPM_VAL.unpack(abi.pack_entry(v)) == (0x53480007, 7, 123456789, 120, 0, 0, 0, 0, 0, 0, 0, 0)
    # A port group and an `except` entry: slot 0 has no class (classid 0), the flag marks it derived.
    for entry in (Entry(3, 0, 104, group=9), Entry(0, 0, 0, group=0, derived=True), Entry(0, 0, 96, 65535, True)):
        assert abi.unpack_entry(abi.pack_entry(entry)) == entry
    assert abi.LPM_VAL.unpack(abi.pack_entry(Entry(0, 0, 0, derived=True)))[:6] == (0, 0, 0, 0, 0, abi.F_DERIVED)
    assert abi.LPM_VAL.unpack(abi.pack_entry(Entry(4, 0, 128, group=2)))[:6] == (0x53480004, 4, 0, 128, 2, 0)
    # The key's one port rule in the value: tcp port 5432 (a /16 block) and udp protocol-only.
    for one in (Inline(9, 77, 6, 5432, 16), Inline(3, 0, 17, 0, 0), Inline(2, 0, 6, 8064, 11)):
        entry = Entry(4, 0, 128, inline=one)
        assert abi.unpack_entry(abi.pack_entry(entry)) == entry
    assert abi.LPM_VAL.unpack(abi.pack_entry(Entry(0, 0, 128, inline=Inline(9, 77, 6, 5432, 16)))) == \
        (0, 0, 0, 128, 0, abi.F_PORT, 77, 9, 6, 16, 5432 >> 8, 5432 & 0xFF)
    key = abi.pack_key(120, bytes(range(16)))
    assert abi.unpack_key(key) == (120, bytes(range(16)))
    assert abi.unpack_meta(abi.pack_meta(b'{"a":1}')) == b'{"a":1}'
    with pytest.raises(ValueError):
        abi.pack_meta(b"x" * (abi.META_LEN + 1))
    assert abi.classid(1) == 0x53480001


def test_port_codec():
    # prefixlen counts data bits: 32 (group) + 8 (protocol) + the port's leading bits; the port is big-endian.
    key = abi.pack_port_key(PortKey(group=5, proto=6, port=8000, plen=13))
    assert abi.PORT_KEY.unpack(key) == (40 + 13, 5, 6, 8000 >> 8, 8000 & 0xFF, 0)
    assert key[8:11] == bytes([6]) + (8000).to_bytes(2, "big")
    for k in (PortKey(1, 17, 53, 16), PortKey(2, 1, 0, 0), PortKey(65535, 132, 0x8000, 1)):
        assert abi.unpack_port_key(abi.pack_port_key(k)) == k
    with pytest.raises(ValueError, match="first port"):
        abi.pack_port_key(PortKey(1, 6, 8001, 13))  # not the start of a 8-port block
    with pytest.raises(ValueError):
        abi.pack_port_key(PortKey(1, 6, 0, 17))
    value = abi.pack_port_entry(PortEntry(12, 99))
    assert abi.PORT_VAL.unpack(value) == (0x5348000C, 12, 99)
    assert abi.unpack_port_entry(value) == PortEntry(12, 99)


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
