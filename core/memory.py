"""What Hearth asks of the C library's allocator: the one place that knows glibc's malloc.

glibc's malloc serves an allocation above its mmap threshold with a private mapping that goes
back to the OS on free; below it, from the heap, where a freed block stays resident as long as a
live block sits above it. By default the threshold grows (up to 32 MB) each time a mapped block
is freed, so after the model load most tensors of a training step land on the heap and the
resident set climbs epoch after epoch through fragmentation. A fixed threshold stops that:
measured on the training benchmark's NF4 PAC job, the peak resident memory while training fell
from 828 to 669 MB. It costs time (every large tensor is a fresh mapping, zeroed by the kernel):
float32 PAC steps ran about 15% slower, so only jobs that chose memory over speed (`--quant`)
set it, before the load (docs/training.md, "Measured"). The setting lasts for the process.
"""

from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3          # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks of 1 MB and more: every weight and activation tensor


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")


def fix_mmap_threshold() -> bool:
    """Set glibc's mmap threshold to a fixed 1 MB (which also turns off its growth). True when
    set; False where the C library is not glibc, which keeps its own allocator's behaviour."""
    try:
        return bool(_libc().mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so the process really
    shrinks after a large free, such as the float32 weights a quantised backbone replaces."""
    import gc

    gc.collect()
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the memory is reused by later allocations instead
