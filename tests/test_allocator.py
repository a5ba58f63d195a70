"""allocator.py: after keep_freed_memory, a tensor the size of a training step's logits comes
from glibc's heap (not a fresh mmap) and its memory is reused once freed; release_freed_memory
hands it back to the kernel. Read from glibc's own accounting (mallinfo2) and the resident
pages (/proc/self/statm), in a fresh process so that no earlier setting of this one's interferes."""

import subprocess
import sys
import textwrap

import pytest

from promptdistill.allocator import _glibc

PROBE = textwrap.dedent("""
    import ctypes
    from promptdistill.allocator import _glibc, keep_freed_memory, release_freed_memory

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = _glibc()
    libc.mallinfo2.restype = Mallinfo2
    keep = __import__("sys").argv[1] == "keep"
    if keep:
        keep_freed_memory()
    import torch

    def resident() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    block = torch.ones(200 * 2**20, dtype=torch.uint8)  # touched: resident
    mmapped = libc.mallinfo2().hblkhd
    del block
    free_after, before_release = libc.mallinfo2().fordblks, resident()
    release_freed_memory()
    print(mmapped, free_after, before_release - resident())
""")


def probe(mode: str) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    return tuple(int(x) for x in out.split())


@pytest.mark.skipif(_glibc() is None or not hasattr(_glibc(), "mallinfo2"), reason="glibc 2.33+ only")
def test_freed_logits_stay_in_the_heap_and_are_released_between_stages():
    size = 200 * 2**20
    mmapped, free_after, _ = probe("default")
    assert mmapped >= size and free_after < size  # glibc's default: its own mmap, unmapped when freed
    mmapped, free_after, released = probe("keep")
    assert mmapped < size  # from the heap
    assert free_after >= size  # freed, kept resident for the next step's tensor
    assert released >= size * 0.9  # and given back to the kernel after the stage
