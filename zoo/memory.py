"""Process-wide memory settings for the streaming passes (merge, protect)."""

from __future__ import annotations

def keep_freed_memory() -> None:
    """Let glibc reuse freed tensor memory instead of unmapping it.

    A merge allocates and frees buffers of the same few sizes millions of times; by
    default glibc serves each large one with a fresh mmap, so every chunk pays page
    faults and zero-filling. A fixed mmap threshold and trim threshold keep the freed
    blocks for reuse. Best effort: other C libraries are left alone.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
