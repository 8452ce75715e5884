"""CPU memory: large results on transparent huge pages, and freed memory kept in the process.

Large tensors that beyondgrad allocates for its results (per-sample rows and gradients, their
per-sample squares, the GGN factor's rows) come from :func:`empty`: on Linux, a
CPU tensor of at least :func:`huge_page_threshold` bytes is advised to the kernel as a
candidate for transparent huge pages (``madvise(MADV_HUGEPAGE)`` on its 2 MiB-aligned
interior) before anything is written to it. The kernel then maps it in 2 MiB pages: one page
fault per 2 MiB instead of per 4 KiB on first touch, and a cheap unmapping when it is freed.
Measured on this project's 2-core CPU (``benchmarks/allocator.py``): the mlp's exact
``SqrtGGN`` (2.4 GB of rows) 440 ms + 175 ms to free -> 77 ms + 8 ms; per-sample gradients of
the mlp 72 -> 16 ms, of the cnn 113 -> 69 ms. Where the kernel has no free huge page at hand,
it compacts memory on the fault (with THP ``defrag`` set to ``madvise``, the common default),
so the first calls of a process can be slower than with small pages (the mlp's ``SqrtGGN``
0.8 s -> 1.8-2.9 s on the first call, then 0.11 s), and a result of gigabytes can stall again
now and then (the cnn's ``SqrtGGN``: 0.79 s per call -> 0.34 s, with one call in five at
1.7-2.0 s). Temporaries freed within the call (the ``[K, ...]`` output gradients of exact
curvature) stay on small pages: interleaved with autograd's own allocations they made the
cnn's exact ``DiagGGN`` stall every few calls (270 ms -> 240-540 ms).
:func:`use_huge_pages` changes the threshold or switches it off (also
``BEYONDGRAD_HUGE_PAGES=0`` in the environment); with the kernel's huge pages disabled
(``/sys/kernel/mm/transparent_hugepage/enabled``: ``never``), on other systems and on other
devices :func:`empty` is ``torch.empty``.

Keeping freed CPU memory in the process (glibc's malloc thresholds), opt-in.

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
import functools
import os
import platform
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

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


#: the size of a transparent huge page on x86-64 and (4 KiB base pages) arm64 Linux
HUGE_PAGE_BYTES = 2 << 20
#: ``madvise``'s advice number for "back this range with transparent huge pages" (Linux)
_MADV_HUGEPAGE = 14
#: the default threshold of :func:`empty` (MiB): below it the page faults cost less than a
#: system call and the compaction the kernel may do for a huge page
DEFAULT_HUGE_PAGE_MIB = 16
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _threshold_from_environment() -> int | None:
    """``BEYONDGRAD_HUGE_PAGES``: ``0``/``off`` switches huge pages off, a number sets the
    threshold in MiB; unset: :data:`DEFAULT_HUGE_PAGE_MIB`."""
    raw = os.environ.get("BEYONDGRAD_HUGE_PAGES", "").strip().lower()
    if raw in ("", "1", "on", "true"):
        return DEFAULT_HUGE_PAGE_MIB << 20
    if raw in ("0", "off", "false", "no"):
        return None
    try:
        return max(1, int(float(raw) * (1 << 20)))
    except ValueError:
        raise ValueError(
            f"BEYONDGRAD_HUGE_PAGES must be 0/off, 1/on or a threshold in MiB, got {raw!r}"
        ) from None


_huge_page_bytes: int | None = _threshold_from_environment()


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """The C library's ``madvise`` where the kernel offers transparent huge pages on
    request (Linux, THP ``always`` or ``madvise``), else None."""
    if platform.system() != "Linux":
        return None
    try:
        with open(_THP_SETTING) as f:
            if "[never]" in f.read():
                return None
    except OSError:
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = getattr(lib, "madvise", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def huge_pages_available() -> bool:
    """Whether :func:`empty` can ask for huge pages here (Linux with THP not ``never``)."""
    return _madvise() is not None


def use_huge_pages(min_mib: float | None = DEFAULT_HUGE_PAGE_MIB) -> bool:
    """Set from which size on :func:`empty` asks for transparent huge pages (process-wide).

    Args:
        min_mib: the smallest tensor (MiB) advised; ``None`` switches huge pages off.

    Returns:
        Whether huge pages are available here (:func:`huge_pages_available`); the setting is
        kept either way.

    Raises:
        ValueError: ``min_mib`` is not positive.
    """
    global _huge_page_bytes
    if min_mib is not None and not min_mib > 0:
        raise ValueError(f"min_mib must be positive or None, got {min_mib!r}")
    _huge_page_bytes = None if min_mib is None else max(1, int(min_mib * (1 << 20)))
    return huge_pages_available()


def huge_page_threshold() -> int | None:
    """The size in bytes from which :func:`empty` asks for huge pages (None: never)."""
    return _huge_page_bytes


def advise_huge_pages(t: Tensor) -> bool:
    """Ask the kernel to back ``t``'s memory with huge pages (its 2 MiB-aligned interior);
    useful only before the memory is first written. True if advised; False for tensors on
    other devices, below the threshold, or where huge pages are unavailable."""
    nbytes = t.untyped_storage().nbytes()
    if _huge_page_bytes is None or t.device.type != "cpu" or nbytes < _huge_page_bytes:
        return False
    fn = _madvise()
    if fn is None:
        return False
    start = t.untyped_storage().data_ptr()
    first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    last = (start + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return last > first and fn(first, last - first, _MADV_HUGEPAGE) == 0


def empty(shape: Sequence[int], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized tensor of ``shape`` on ``like``'s device (``like``'s dtype unless
    ``dtype``), on huge pages where it is large enough (:func:`advise_huge_pages`)."""
    out = torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device)
    advise_huge_pages(out)
    return out


def zeros(shape: Sequence[int], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """:func:`empty`, zero-filled."""
    return empty(shape, like, dtype).zero_()


__all__ = [
    "DEFAULT_HUGE_PAGE_MIB",
    "HUGE_PAGE_BYTES",
    "MAX_MMAP_THRESHOLD_MIB",
    "MAX_TRIM_THRESHOLD_MIB",
    "advise_huge_pages",
    "empty",
    "huge_page_threshold",
    "huge_pages_available",
    "retain_freed_memory",
    "use_huge_pages",
    "zeros",
]
