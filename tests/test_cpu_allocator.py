"""``peft_sat.cpu_allocator``: after ``tune_cpu_allocator`` freed tensor memory stays in the process (the next step
reuses it instead of faulting fresh pages in), above 32 MiB only with ``large_blocks_from_heap``, and
``release_free_memory`` hands it back. Run in a fresh interpreter:
the setting is process-wide."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")

SCRIPT = textwrap.dedent(
    """
    import torch
    from peft_sat import cpu_allocator

    def resident_mb():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

    def freed_and_kept(mb):
        before = resident_mb()
        block = torch.ones(mb * 2**18)  # mb MiB of float32, every page touched
        grown = resident_mb() - before
        del block
        return grown, resident_mb() - before  # (growth while alive, growth still resident after the free)

    # glibc's defaults: an 8 MiB block is mapped for itself and unmapped on free
    grown, kept = freed_and_kept(8)
    assert grown > 7 and kept < 2, (grown, kept)
    assert cpu_allocator.tune_cpu_allocator()
    grown, kept = freed_and_kept(24)  # tuned: served from the heap, and the freed memory stays resident
    assert grown > 20 and kept > 20, (grown, kept)
    cpu_allocator.release_free_memory()  # else the heap's free top could be grown to serve the next block
    grown, kept = freed_and_kept(48)  # above glibc's highest mmap threshold: still mapped and unmapped
    assert grown > 44 and kept < 2, (grown, kept)
    assert cpu_allocator.tune_cpu_allocator(large_blocks_from_heap=True)
    cpu_allocator.release_free_memory()
    grown, kept = freed_and_kept(48)  # now from the heap as well
    assert grown > 44 and kept > 44, (grown, kept)
    before = resident_mb()
    assert cpu_allocator.release_free_memory()
    assert resident_mb() < before - 20
    print("ok")
    """
)


THREAD_SCRIPT = textwrap.dedent(
    """
    import ctypes
    import sys
    import threading

    from peft_sat import cpu_allocator

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    BLOCK = 24 << 20  # below the 32 MiB mmap threshold: from the thread arena's 64 MiB heaps

    def resident_mb():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

    def round_grows():  # what five blocks, every page touched, add to the resident size; freed last to first
        before = resident_mb()
        blocks = [libc.malloc(BLOCK) for _ in range(5)]
        for block in blocks:
            ctypes.memset(block, 1, BLOCK)
        grown = resident_mb() - before
        for block in reversed(blocks):
            libc.free(block)
        return grown

    if sys.argv[1] == "tuned":
        assert cpu_allocator.tune_cpu_allocator()
    else:  # the thresholds alone, glibc's default top pad
        libc.mallopt(cpu_allocator.M_MMAP_THRESHOLD, cpu_allocator.MMAP_THRESHOLD)
        libc.mallopt(cpu_allocator.M_TRIM_THRESHOLD, cpu_allocator.TRIM_THRESHOLD)
    grown = []
    thread = threading.Thread(target=lambda: grown.extend(round_grows() for _ in range(3)))
    thread.start()
    thread.join()
    print(*grown)
    """
)


def test_tuned_allocator_keeps_freed_memory_until_released():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_tuned_allocator_keeps_a_threads_freed_heaps():
    """A thread allocates from an arena of its own, whose wholly free heaps glibc unmaps unless the top pad forbids it
    (the recipes' A/B in turns trains each arm in a thread)."""
    grown = {}
    for setting in ("tuned", "thresholds only"):
        result = subprocess.run(
            [sys.executable, "-c", THREAD_SCRIPT, setting], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-2000:]
        grown[setting] = [float(mb) for mb in result.stdout.split()]
    assert all(mb > 100 for mb, _, _ in grown.values()), grown  # the first round faults its 120 MB in
    assert max(grown["tuned"][1:]) < 4, grown  # then the thread's heaps stay, and later rounds reuse their pages
    assert min(grown["thresholds only"][1:]) > 40, grown  # else its wholly free heaps are unmapped, faulted in anew
