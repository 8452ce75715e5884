"""Keeping freed CPU memory in the process (glibc's malloc thresholds), opt-in.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc returns memory to the
operating system when a large block is freed (blocks above ``M_MMAP_THRESHOLD`` are separate
mappings; free space above ``M_TRIM_THRESHOLD`` at the top of the heap is trimmed), so a loop
that allocates and frees the same large temporaries every call touches fresh pages every call:
a page fault per 4 KiB, each about a microsecond or more, on top of the arithmetic. beyondgrad's
per-step work keeps more tensors alive than a plain backward pass (captured output gradients,
per-sample rows, Kronecker factors), so its peak lies above the plain step's and that extra
memory is the part trimmed and faulted in again. Measured on this project's 2-core CPU in
fresh processes (``benchmarks/allocator.py``, ``benchmarks/results/allocator_cpu.md``), glibc's
defaults -> :func:`retain_freed_memory`: the benchmarks' cnn, a plain forward+backward 43.0 ->
32.6 ms (8,285 -> 0 page faults per call), ``bg.compute(..., bg.KFAC(fisher_type="mc"))`` 90 ->
81 ms, a Cockpit economy step 59.8 -> 55.4 ms; the transformer task unchanged (its blocks are
reused anyway). How much a process pays depends on its allocation history (the thresholds
adapt), so the same call can cost more in one program than in another.

:func:`retain_freed_memory` raises both thresholds for the whole process, so freed blocks stay
in the heap for the next call: the resident set then stays near the largest peak so far instead
of shrinking between calls (the trade the CUDA caching allocator makes on GPUs). It changes
nothing else; environment variables ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` set
before Python starts do the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
#: glibc's upper limit for ``M_MMAP_THRESHOLD`` on 64-bit systems (larger values are refused)
MAX_MMAP_THRESHOLD_MIB = 32
#: the largest trim threshold ``mallopt`` can take (its value is a C ``int`` of bytes)
MAX_TRIM_THRESHOLD_MIB = 2047


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (Linux), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") else None


def retain_freed_memory(
    trim_threshold_mib: int = 1024,
    mmap_threshold_mib: int = MAX_MMAP_THRESHOLD_MIB,
    large_blocks: bool = True,
) -> bool:
    """Keep freed CPU memory in the process instead of returning it to the system (glibc).

    Process-wide and not undone: call it once, at the start of a program that repeats the
    same large CPU work (training loops, benchmarks). Blocks up to ``mmap_threshold_mib`` are
    then served from the heap, and up to ``trim_threshold_mib`` of free heap top is kept, so
    a repeated call reuses already mapped pages instead of faulting fresh ones.

    Args:
        trim_threshold_mib: free memory at the top of the heap kept before trimming (MiB,
            1 to :data:`MAX_TRIM_THRESHOLD_MIB`).
        mmap_threshold_mib: blocks up to this size come from the heap, not from separate
            mappings (MiB, 1 to :data:`MAX_MMAP_THRESHOLD_MIB`, glibc's 64-bit limit).
        large_blocks: False: no block gets its own mapping, whatever its size (glibc's
            ``M_MMAP_MAX = 0``), so that blocks above 32 MiB are kept and reused too, e.g. the
            ``[K, ...]`` output gradients of exact curvature (the cnn's exact ``DiagGGN``
            288 -> 266 ms with the default True, 230 ms with False; ``KFAC(fisher_type=
            "type-2")`` 226 -> 205 / 176 ms). The heap then grows to the largest peak and
            keeps up to ``trim_threshold_mib`` of it free.

    Returns:
        True if glibc accepted every setting; False where the C library is not glibc (macOS,
        Windows, musl), where it has no effect to offer.

    Raises:
        ValueError: for thresholds outside the ranges above.
    """
    if not 1 <= trim_threshold_mib <= MAX_TRIM_THRESHOLD_MIB:
        raise ValueError(
            f"trim_threshold_mib must be in 1..{MAX_TRIM_THRESHOLD_MIB} (mallopt takes a C "
            f"int of bytes), got {trim_threshold_mib}"
        )
    if not 1 <= mmap_threshold_mib <= MAX_MMAP_THRESHOLD_MIB:
        raise ValueError(
            f"mmap_threshold_mib must be in 1..{MAX_MMAP_THRESHOLD_MIB} (glibc's limit), "
            f"got {mmap_threshold_mib}"
        )
    lib = _glibc()
    if lib is None:
        return False
    ok = lib.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold_mib) << 20)
    ok &= lib.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold_mib) << 20)
    if not large_blocks:
        ok &= lib.mallopt(_M_MMAP_MAX, 0)
    return bool(ok)


__all__ = ["MAX_MMAP_THRESHOLD_MIB", "MAX_TRIM_THRESHOLD_MIB", "retain_freed_memory"]
