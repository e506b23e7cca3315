"""Memory pages the daemon and model processes give back: to the kernel, and to the heap.

``release_pages`` punches a hole in a FREE region of a shared mapping (the RAM tier's memfd) so its
pages stop counting in RAM and in the memory cgroup (the next write there faults them in again);
``limit_heap_retention`` makes glibc hand freed buffers back.
The memory-pressure relief (``pressure.py``) and the RAM tier call these; the monitor (``monitor.py``)
only measures.
"""

from __future__ import annotations

import mmap

PAGE = mmap.PAGESIZE


def _inner_span(mm: mmap.mmap, offset: int, length: int) -> tuple[int, int]:
    if offset < 0 or length < 0 or offset + length > len(mm):
        raise ValueError(f"span [{offset}, {offset + length}) is outside the mapping of {len(mm)} bytes")
    start = -(-offset // PAGE) * PAGE
    end = (offset + length) // PAGE * PAGE
    return start, max(start, end)


def limit_heap_retention(threshold: int = 1 << 20) -> bool:
    """Have glibc give freed memory back: allocations of ``threshold`` bytes and more get their own
    mapping, unmapped on free, and what the heap holds free now is trimmed.

    By default glibc raises that threshold as large blocks are freed (up to 32 MiB), so a forward's
    activation buffers end up in a heap that never shrinks: on the 0.5B bench model a streaming
    generate grew the process by ~200 MiB of free heap that a memory cgroup still counts. The daemon
    calls this at start (its chunk buffers are the same story), and so does
    ``tierd_integration.from_pretrained`` before it builds a streaming model, which exists to keep
    the model process small. Call it before the heap grows: glibc takes a request from a free chunk
    of the heap before it considers mmap, so a heap that grew first (building Qwen3-VL-2B on the
    meta device allocates and frees every parameter: 2.9 GB of heap, 2.75 GB of it free) hands its
    chunks to later temporaries, which keep them resident (the trim here only returns pages that
    are resident now). ``bind`` raises it to 32 MiB once a streaming model is built, for the
    forwards (a temporary over the threshold is mapped and faulted in anew each time). Returns
    False where it does not apply (not glibc).
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3
    ok = bool(mallopt(m_mmap_threshold, int(threshold)))
    trim(0)
    return ok


def release_pages(mm: mmap.mmap, offset: int, length: int) -> int:
    """Give the physical pages of a FREE region back to the kernel; returns the bytes released.

    Only whole pages inside ``[offset, offset + length)`` go (the partial pages at the ends may hold
    a neighbour's bytes); a span with no whole page inside is a no-op returning 0.
    ``madvise(MADV_REMOVE)`` punches a hole in the memfd itself: every mapping of it, the clients'
    too, reads zeros there afterwards, and the pages stop counting in RAM and in the cgroup. So the
    span must be free in the allocator and unleased. ``mm`` must be a MAP_SHARED, writable mapping.
    The next write faults pages in again, at first-touch speed.
    """
    start, end = _inner_span(mm, offset, length)
    if end == start:
        return 0
    mm.madvise(mmap.MADV_REMOVE, start, end - start)
    return end - start
