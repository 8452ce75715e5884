"""Large CPU results on recycled memory mappings (a caching allocator for CPU results).

A fresh CPU tensor of hundreds of MB costs more to map than to compute: the kernel faults it in
4 KiB page by 4 KiB page on first touch (about a microsecond each) and tears the mapping down
when it is freed, every call. beyondgrad's large results (per-sample gradients and rows, their
per-sample squares, the GGN factor's rows) come from :func:`empty` instead: a private anonymous
mapping that, once every tensor viewing it is gone, is kept for the next result of the same
size, already mapped (no page fault at all), as the CUDA caching allocator does on GPUs. The
pool keeps at most ``keep_mib`` of free mappings (default: a quarter of the physical memory),
the least recently freed unmapped first, and nothing while less than an eighth of the physical
memory is available (a freed mapping is then unmapped, and a miss unmaps the rest; the
engine's memory guard for many backpropagated vectors releases the pool before it refuses);
:func:`release` unmaps them all. Tensors from the pool
are ordinary tensors in every respect but one: their storage cannot be resized (``resize_`` to
a larger size raises).

Measured on this project's 2-core CPU (fresh processes, 2 threads, steady state after the
first call, ``benchmarks/allocator.py``): per-sample gradients of the mlp 70 -> 11 ms, of the
cnn 112 -> 68 ms; the exact ``SqrtGGN`` (2.4 GB of rows) of the mlp 590 -> 75 ms. The first
call of a size maps fresh memory as before.

``huge_pages=True`` also advises new mappings for transparent huge pages (Linux,
``madvise(MADV_HUGEPAGE)``: a page fault per 2 MiB). Off by default: where the kernel has no
free huge page at hand it compacts memory on the fault, and on this project's (virtual) machine
the first call then took longer (the mlp's ``SqrtGGN`` 0.56 s -> 3.0 s; afterwards 75 -> 50
ms). Without the pool, advised results made the kernel compact memory every few calls (the
cnn's ``SqrtGGN`` 0.34 s per call, one call in five 1.7-2.0 s).

Temporaries freed within a call (the ``[K, ...]`` output gradients of exact curvature) stay
with PyTorch's allocator. :func:`configure` sets the threshold (default 16 MiB), the memory
kept and the advice, or switches the pool off (also ``BEYONDGRAD_RESULT_POOL=0`` in the
environment, or a threshold in MiB; ``BEYONDGRAD_HUGE_PAGES=1`` advises). On other systems
and devices :func:`empty` is ``torch.empty``.
"""

from __future__ import annotations

import math
import mmap
import os
import platform
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

#: the default threshold (MiB): smaller results come from PyTorch's allocator
DEFAULT_MIN_MIB = 16
#: the mappings' granularity: a transparent huge page on x86-64 and arm64 (4 KiB base pages)
HUGE_PAGE_BYTES = 2 << 20


def _threshold_from_environment() -> int | None:
    """``BEYONDGRAD_RESULT_POOL``: ``0``/``off`` switches the pool off, a number sets the
    threshold in MiB; unset: :data:`DEFAULT_MIN_MIB`."""
    raw = os.environ.get("BEYONDGRAD_RESULT_POOL", "").strip().lower()
    if raw in ("", "1", "on", "true"):
        return DEFAULT_MIN_MIB << 20
    if raw in ("0", "off", "false", "no"):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(
            f"BEYONDGRAD_RESULT_POOL must be 0/off, 1/on or a threshold in MiB, got {raw!r}"
        )
    return max(1, int(value * (1 << 20)))


def _huge_pages_from_environment() -> bool:
    """``BEYONDGRAD_HUGE_PAGES=1``: advise new mappings for huge pages (default off)."""
    return os.environ.get("BEYONDGRAD_HUGE_PAGES", "").strip().lower() in ("1", "on", "true")


def _physical_bytes() -> int | None:
    """The physical memory, or None where the system does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes() -> int | None:
    """The memory available now without swapping (Linux ``MemAvailable``: free pages plus the
    page cache the kernel can drop; the free pages alone elsewhere), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _default_keep_bytes() -> int:
    """A quarter of the physical memory (1 GiB where the system does not say)."""
    total = _physical_bytes()
    return 1 << 30 if total is None else total // 4


def _memory_is_short(extra: int) -> bool:
    """Whether mapping ``extra`` more bytes would leave less than an eighth of the physical
    memory available: then the pool keeps nothing (it must not hold memory others need)."""
    total, available = _physical_bytes(), available_bytes()
    return total is not None and available is not None and available - extra < total // 8


def _huge_pages_offered() -> bool:
    """Whether the kernel gives transparent huge pages on request (THP not ``never``)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


class _Pool:
    """Free anonymous mappings by size, least recently freed first; thread-safe (mappings
    come back from ``weakref.finalize`` callbacks, which run wherever the last view dies)."""

    def __init__(self) -> None:
        self.min_bytes: int | None = _threshold_from_environment()
        self.keep_bytes = _default_keep_bytes()
        self.supported = platform.system() == "Linux" and hasattr(mmap, "MAP_PRIVATE")
        self.advise = _huge_pages_from_environment()
        self._free: OrderedDict[int, mmap.mmap] = OrderedDict()  # id -> mapping, oldest first
        self._free_bytes = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> mmap.mmap:
        """A mapping of ``size`` bytes (a multiple of :data:`HUGE_PAGE_BYTES`): a free one of
        that size, else a new one (advised for huge pages where asked and offered)."""
        with self._lock:
            for key, m in reversed(self._free.items()):  # the most recently freed first
                if len(m) == size:
                    del self._free[key]
                    self._free_bytes -= size
                    return m
        if self._free and _memory_is_short(size):  # a miss under pressure: drop the rest
            self.release()
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)  # shared memory would get no huge
        # pages (shmem) and would be shared with forked children
        if self.advise and hasattr(mmap, "MADV_HUGEPAGE") and _huge_pages_offered():
            m.madvise(mmap.MADV_HUGEPAGE)
        return m

    def give_back(self, m: mmap.mmap) -> None:
        """Keep ``m`` for reuse; unmapped at once if it alone exceeds ``keep_bytes`` or memory
        is short (less than an eighth of the physical memory available)."""
        if len(m) > self.keep_bytes or _memory_is_short(0):
            m.close()
            return
        with self._lock:
            self._free[id(m)] = m
            self._free_bytes += len(m)
        self.trim()

    def trim(self) -> None:
        """Unmap the least recently freed mappings beyond ``keep_bytes``."""
        dropped = []
        with self._lock:
            while self._free and self._free_bytes > self.keep_bytes:
                _, old = self._free.popitem(last=False)
                self._free_bytes -= len(old)
                dropped.append(old)
        for old in dropped:
            old.close()

    def release(self) -> int:
        """Unmap every free mapping; returns the bytes released."""
        with self._lock:
            free, self._free, released = list(self._free.values()), OrderedDict(), self._free_bytes
            self._free_bytes = 0
        for m in free:
            m.close()
        return released

    @property
    def free_bytes(self) -> int:
        """Bytes held in free mappings."""
        return self._free_bytes


_POOL = _Pool()


def configure(
    min_mib: float | None = DEFAULT_MIN_MIB,
    keep_mib: float | None = None,
    huge_pages: bool | None = None,
) -> bool:
    """Set which CPU results come from the pool of recycled mappings (process-wide).

    Args:
        min_mib: the smallest result (MiB) taken from the pool; ``None`` switches it off
            (every result from ``torch.empty``; the free mappings are released).
        keep_mib: the most memory (MiB) the pool keeps in free mappings for reuse; ``None``:
            unchanged (initially a quarter of the physical memory); ``0``: none.
        huge_pages: advise new mappings for transparent huge pages; ``None``: unchanged
            (initially off, or ``BEYONDGRAD_HUGE_PAGES=1``).

    Returns:
        Whether the pool is available here (Linux); the settings are kept either way.

    Raises:
        ValueError: ``min_mib`` not positive, or ``keep_mib`` negative.
    """
    if min_mib is not None and not min_mib > 0:
        raise ValueError(f"min_mib must be positive or None, got {min_mib!r}")
    if keep_mib is not None and not keep_mib >= 0:
        raise ValueError(f"keep_mib must be >= 0 or None, got {keep_mib!r}")
    _POOL.min_bytes = None if min_mib is None else max(1, int(min_mib * (1 << 20)))
    if keep_mib is not None:
        _POOL.keep_bytes = int(keep_mib * (1 << 20))
    if huge_pages is not None:
        _POOL.advise = bool(huge_pages)
    if min_mib is None:
        _POOL.release()
    _POOL.trim()
    return _POOL.supported


def release() -> int:
    """Unmap the pool's free mappings (memory back to the system); returns the bytes freed."""
    return _POOL.release()


def settings() -> dict[str, int | bool | None]:
    """The pool's state: ``min_bytes`` (None: off), ``keep_bytes``, ``free_bytes`` (held in
    free mappings now), ``supported`` and ``huge_pages`` (whether new mappings are advised)."""
    return {
        "min_bytes": _POOL.min_bytes,
        "keep_bytes": _POOL.keep_bytes,
        "free_bytes": _POOL.free_bytes,
        "supported": _POOL.supported,
        "huge_pages": _POOL.advise,
    }


def empty(shape: Sequence[int], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized tensor of ``shape`` on ``like``'s device (``like``'s dtype unless
    ``dtype``): from the pool where it is a CPU tensor of at least the threshold, else
    ``torch.empty``."""
    dtype = dtype or like.dtype
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    limit = _POOL.min_bytes
    if limit is None or not _POOL.supported or like.device.type != "cpu" or nbytes < limit:
        return torch.empty(shape, dtype=dtype, device=like.device)
    size = -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    m = _POOL.take(size)
    view = memoryview(m)
    out = torch.frombuffer(view, dtype=dtype, count=numel).view(shape)
    # the storage holds the memoryview; when the last tensor on it dies, so does the view.
    # Not at exit: tensors still alive then keep their mapping (closing it would fail).
    weakref.finalize(view, _POOL.give_back, m).atexit = False
    return out


def zeros(shape: Sequence[int], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """:func:`empty`, zero-filled."""
    return empty(shape, like, dtype).zero_()


__all__ = [
    "DEFAULT_MIN_MIB",
    "HUGE_PAGE_BYTES",
    "available_bytes",
    "configure",
    "empty",
    "release",
    "settings",
    "zeros",
]
