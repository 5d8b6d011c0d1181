"""Token shards mapped for random reads, so that a worker's resident memory stays flat.

:class:`~bloomray.data.shards.TokenBlocks` reads blocks at random from shards far larger than
memory. Read-ahead is turned off (it would read pages no block needs), and after each read the
pages it mapped are unmapped again (they stay in the page cache, shared and reclaimable).
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

# How far from a faulting address the kernel maps: the aligned reach of one page table (a PMD:
# 2 MiB with 4 KiB pages and 8-byte entries), up to which a page-cache folio is mapped whole.
FAULT_SPAN = mmap.PAGESIZE * (mmap.PAGESIZE // 8)


def map_for_random_reads(path: Path, dtype: str) -> np.memmap:
    """``path`` mapped read-only, with read-ahead off: blocks are read at random, so the kernel's
    read-around would only read pages no block needs."""
    m = np.memmap(path, dtype=dtype, mode="r")
    if hasattr(mmap, "MADV_RANDOM") and getattr(m, "_mmap", None) is not None:
        m._mmap.madvise(mmap.MADV_RANDOM)
    return m


def release(maps: list[np.memmap], touched: list[tuple[int, int, int]]) -> None:
    """Unmap the pages that reading the ``(map, first, end)`` token ranges of ``maps`` could have
    mapped: each aligned :data:`FAULT_SPAN` of address space the ranges touch, once, and nothing
    of the maps they did not touch.

    The kernel maps a whole page-cache folio (up to 2 MiB) on a fault, so without this the
    resident size of a worker grows toward the size of the corpus as it reads blocks at
    random, although none of it is private memory. Copy the blocks out before this.
    """
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    spans: set[tuple[int, int]] = set()
    for k, first, end in touched:  # a map starts at its array (offset 0), on a page boundary
        base, item, w = maps[k].ctypes.data, maps[k].itemsize, FAULT_SPAN
        spans |= {(k, j) for j in range((base + first * item) // w, (base + end * item - 1) // w + 1)}
    for k, j in sorted(spans):
        m, base = maps[k]._mmap, maps[k].ctypes.data
        if m is not None:
            lo = max(0, j * FAULT_SPAN - base)
            m.madvise(mmap.MADV_DONTNEED, lo, min(len(m), (j + 1) * FAULT_SPAN - base) - lo)
