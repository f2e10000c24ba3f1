"""The peak resident memory read from the kernel, and its reset (Linux)."""

from __future__ import annotations

import mmap
import sys

import pytest

from hf_softmask.utils.memory import peak_rss_bytes, reset_peak_rss

MB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_peak_rises_with_a_touched_block_and_falls_back_after_reset():
    # A fresh anonymous mapping, not a Python object: late in a suite the allocator can hand out freed pages that
    # are still resident, and the RSS would not rise.
    block = mmap.mmap(-1, 128 * MB)
    assert reset_peak_rss()
    before = peak_rss_bytes()
    page = b"\x01" * MB
    for _ in range(128):
        block.write(page)  # written: every page resident
    peak = peak_rss_bytes()
    assert peak - before >= 120 * MB
    block.close()  # unmapped: its pages leave the RSS
    assert reset_peak_rss()
    assert peak_rss_bytes() <= peak - 120 * MB  # the reset forgets the freed block's pages


def test_the_runners_and_the_benchmarks_read_it_in_one_place():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readers = sorted(
        str(p.relative_to(root))
        for d in ("hf_softmask", "benchmarks", "scripts")
        for p in (root / d).rglob("*.py")
        if "/proc/self/" in p.read_text()
    )
    assert readers == ["hf_softmask/utils/memory.py"]
