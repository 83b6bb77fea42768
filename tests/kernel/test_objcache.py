"""The compiled-classifier cache against the kernel: what it loads is what bcc loaded (the kernel's
tags of the programs, its view of the maps), without a compile; an entry the kernel refuses is
compiled again and leaves nothing behind."""

import base64
import json
import logging
import os
import shutil
import time

import pytest

from shaper.datapath import loader, objcache
from shaper.datapath.maps import map_info, obj_get, prog_tag

BPFFS = "/sys/fs/bpf"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    where = tmp_path / "cache"
    monkeypatch.setenv("SHAPER_CACHE_DIR", str(where))
    return where


@pytest.fixture
def pins():
    made = []

    def pin_dir(name: str) -> str:
        path = os.path.join(BPFFS, f"shaper-test-objcache-{os.getpid()}-{name}")
        made.append(path)
        return path

    yield pin_dir
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
    assert not any(os.path.exists(p) for p in made)


def loaded(pin_dir: str) -> dict:
    """What the kernel says of each pinned object: program tags, map kind, sizes, flags and name."""
    out = {}
    for name in sorted(os.listdir(pin_dir)):
        fd = obj_get(os.path.join(pin_dir, name))
        try:
            if name in loader.PROGRAMS:
                out[name] = prog_tag(fd)
            else:
                i = map_info(fd)
                out[name] = (i.type, i.key_size, i.value_size, i.max_entries, i.map_flags, i.name)
        finally:
            os.close(fd)
    return out


def no_compile(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("compiled although the cache holds this classifier")
    monkeypatch.setattr(loader.subprocess, "run", refuse)


def test_the_kept_classifier_is_the_compiled_one(cache, pins, monkeypatch):
    compiled, kept = pins("compiled"), pins("kept")
    t0 = time.perf_counter()
    loader.load_and_pin(compiled)
    compile_s = time.perf_counter() - t0
    assert len(list(cache.iterdir())) == 1
    with monkeypatch.context() as m:
        no_compile(m)
        t0 = time.perf_counter()
        loader.load_and_pin(kept)
        cached_s = time.perf_counter() - t0
    want = sorted([*loader.PROGRAMS, *loader.MAP_NAMES, *loader.HOST_MAPS])
    assert sorted(loaded(kept)) == want
    assert loaded(kept) == loaded(compiled)  # same instructions (tags), same maps
    print(f"classifier: compiled and loaded {compile_s:.2f} s, from the cache {cached_s:.3f} s")


def test_an_entry_the_kernel_refuses_is_compiled_again(cache, pins, caplog):
    first, second = pins("first"), pins("second")
    loader.load_and_pin(first)
    entry = next(cache.iterdir())
    data = json.loads(entry.read_text())
    # `exit` with r0 never set: the verifier refuses it ("R0 !read_ok").
    data["programs"][loader.PROG_IN_PIN]["insns"] = base64.b64encode(objcache.INSN.pack(0x95, 0, 0, 0)).decode()
    data["programs"][loader.PROG_IN_PIN]["maps"] = []
    entry.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="shaper"):
        assert not objcache.load_and_pin(second, loader.cflags())
    assert not os.path.exists(second)  # the maps and the program that loaded were not left pinned
    assert any(r.msg == "classifier.cache_unused" for r in caplog.records)
    loader.load_and_pin(second)  # compiles, and keeps a good entry again
    assert loaded(second) == loaded(first)
    assert objcache.load_and_pin(pins("third"), loader.cflags())
