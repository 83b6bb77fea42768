"""The compiled-classifier cache without a kernel: map references found and moved, and only an entry
that is this source's, this kernel's and this user's alone is read back."""

import os

import pytest

from shaper.datapath import objcache
from shaper.datapath.objcache import INSN, LD_IMM64


def insn(code: int, src: int = 0, dst: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return INSN.pack(code, src << 4 | dst, off, imm)


def program(*fds: int) -> bytes:
    """r0 = 0; per fd: r1 = map[fd] (ld_imm64, two slots), call map_lookup_elem; exit."""
    out = insn(0xB7, dst=0)  # mov64 r0, 0
    for fd in fds:
        out += insn(LD_IMM64, src=1, dst=1, imm=fd) + insn(0) + insn(0x85, imm=1)
    # A 64-bit constant whose low half looks like an fd: not a map reference (src_reg 0).
    out += insn(LD_IMM64, dst=2, imm=fds[0] if fds else 3) + insn(0)
    return out + insn(0x95)


def test_map_references_are_found_and_only_they():
    assert objcache.map_refs(program(7, 9, 7)) == [(1, 7), (4, 9), (7, 7)]
    assert objcache.map_refs(program()) == []


def test_a_reference_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="src_reg 2"):
        objcache.map_refs(insn(LD_IMM64, src=2, imm=7) + insn(0) + insn(0x95))


def test_fds_are_moved_to_the_maps_of_this_load():
    data = objcache.entry({"classifier": ("classify", program(7, 9))}, {"a": {}, "b": {}}, {7: "a", 9: "b"}, "GPL")
    refs = data["programs"]["classifier"]["maps"]
    assert refs == [[1, "a"], [4, "b"]]
    import base64

    moved = objcache.with_fds(base64.b64decode(data["programs"]["classifier"]["insns"]), refs, {"a": 40, "b": 41})
    assert objcache.map_refs(moved) == [(1, 40), (4, 41)]
    assert moved[:8] == program(7, 9)[:8] and moved[-24:] == program(7, 9)[-24:]  # nothing else changed


def test_an_unknown_fd_or_a_misplaced_reference_is_refused():
    with pytest.raises(ValueError, match="fd 8"):
        objcache.entry({"classifier": ("classify", program(7, 8))}, {"a": {}}, {7: "a"}, "GPL")
    with pytest.raises(ValueError, match="not a map reference"):
        objcache.with_fds(program(7), [(0, "a")], {"a": 1})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    where = tmp_path / "cache"
    monkeypatch.setenv("SHAPER_CACHE_DIR", str(where))
    return where


FLAGS = ["-I/x"]


def test_kept_and_read_back(cache):
    data = objcache.entry({"classifier": ("classify", program(7))}, {"a": {"type": 1}}, {7: "a"}, "GPL")
    objcache.store(FLAGS, data)
    assert oct(os.stat(cache).st_mode & 0o777) == "0o700"
    assert objcache.read(FLAGS) == {**data, "key": objcache.key(FLAGS)}
    assert objcache.read(["-I/y"]) is None  # other flags: another compile


def test_another_kernel_or_source_is_another_entry(cache, monkeypatch):
    objcache.store(FLAGS, objcache.entry({}, {}, {}, "GPL"))
    real = os.uname()
    monkeypatch.setattr(os, "uname", lambda: os.uname_result((real.sysname, real.nodename, "6.6.0-other",
                                                               real.version, real.machine)))
    assert objcache.read(FLAGS) is None


def test_an_entry_others_may_write_is_not_used(cache):
    objcache.store(FLAGS, objcache.entry({}, {}, {}, "GPL"))
    assert objcache.read(FLAGS) is not None
    path = next(cache.iterdir())
    os.chmod(path, 0o666)
    assert objcache.read(FLAGS) is None
    os.chmod(path, 0o600)
    os.chmod(cache, 0o777)
    assert objcache.read(FLAGS) is None


def test_a_damaged_entry_is_no_entry(cache):
    objcache.store(FLAGS, objcache.entry({}, {}, {}, "GPL"))
    next(cache.iterdir()).write_text("{not json")
    assert objcache.read(FLAGS) is None


def test_off_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SHAPER_CACHE_DIR", "off")
    monkeypatch.chdir(tmp_path)
    objcache.store(FLAGS, objcache.entry({}, {}, {}, "GPL"))
    assert objcache.read(FLAGS) is None and list(tmp_path.iterdir()) == []


def test_a_cache_that_cannot_be_written_is_no_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SHAPER_CACHE_DIR", str(blocker / "cache"))
    objcache.store(FLAGS, objcache.entry({}, {}, {}, "GPL"))  # no raise
    assert objcache.read(FLAGS) is None
