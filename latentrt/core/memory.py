"""Memory accounting for "will it run?": byte sizes, resident-set readings, and activation tracing.

Activations are measured, not guessed: :func:`trace` runs a network on the ``meta`` device
(shapes only, no data, no memory) under a dispatch mode that follows every tensor an operator
creates until its last reference dies, so the peak of live bytes is the peak the same code
reaches on a real device, and counts the floating-point work of matmuls, convolutions and
attention with ``torch.utils.flop_counter``'s per-operator formulas. What a kernel allocates
inside itself (oneDNN reorders, attention scratch) is invisible there; estimators add it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import resource
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from latentrt.core.errors import InvalidRequest

__all__ = [
    "MMAP_THRESHOLD_MAX",
    "Trace",
    "file_mappings",
    "format_bytes",
    "parse_bytes",
    "peak_rss_bytes",
    "release_file_pages",
    "resident_fraction",
    "return_freed_heap",
    "rss_bytes",
    "trace",
]

MMAP_THRESHOLD_MAX = 32 * 2**20
"""glibc's ``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit systems: allocations this large are always mmapped."""
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``"4GB"``, ``"4g"``, ``"512MiB"``, ``"1.5 GB"`` or plain bytes -> bytes (binary units: 1 GB = 2^30)."""
    match = _SIZE.match(text)
    if match is None:
        raise InvalidRequest(f"memory size {text!r} is not a size: write it like 4GB, 512MB or 1.5G")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def format_bytes(size: float) -> str:
    """Bytes as a short human string in binary units: ``3.42 GB``, ``512 MB``."""
    for unit in ("TB", "GB", "MB", "KB"):
        scale = _UNITS[unit[0]]
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}" if unit in ("TB", "GB") else f"{size / scale:.0f} {unit}"
    return f"{size:.0f} B"


_MADV_DONTNEED = 4
_PAGE = resource.getpagesize()


def file_mappings(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """Address ranges of this process's private mappings of files ending in ``suffix`` (Linux),
    unlinked files included."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                path = fields[5].rstrip().removesuffix(" (deleted)") if len(fields) == 6 else ""
                if fields[1].endswith("p") and path.endswith(suffix):
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    return ranges


def release_file_pages(tensor: torch.Tensor, mappings: Sequence[tuple[int, int]]) -> bool:
    """Drop the whole pages of ``tensor``'s bytes from the resident set, if they lie in one of the
    file ``mappings`` (:func:`file_mappings`); returns whether it did.

    For a memory-mapped checkpoint tensor that was just converted to another dtype or device:
    its file pages would otherwise stay resident while the file is open. Unmodified pages of a
    private file mapping are re-read from the file if touched again, so no data is lost; memory
    that is not a file mapping is never touched.
    """
    if tensor.device.type != "cpu":
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not any(low <= start and end <= high for low, high in mappings):
        return False
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE  # whole pages inside the tensor only
    if last <= first or _libc is None:
        return False
    return bool(_libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0)


def resident_fraction(tensor: torch.Tensor) -> float:
    """Fraction of ``tensor``'s memory pages present in this process's page tables (Linux
    ``/proc/self/pagemap``, bit 63 of each page's entry); 1.0 where that cannot be read."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return 1.0
    start = tensor.data_ptr() // _PAGE
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // _PAGE)
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(start * 8)
            entries = pagemap.read((end - start) * 8)
    except OSError:
        return 1.0
    present = sum(entries[k * 8 + 7] >> 7 for k in range(len(entries) // 8))  # bit 63: page present
    return present / max(1, end - start)


def return_freed_heap() -> bool:
    """Hand the heap's freed pages back to the system (glibc ``malloc_trim(0)``); whether it could.

    glibc keeps freed allocations under ``MMAP_THRESHOLD_MAX`` in its heap, so after many
    medium-sized tensors are freed at once (a network's weights moved to a file mapping) the
    resident set would otherwise stay as if they were still there."""
    trim = getattr(_libc, "malloc_trim", None)
    return bool(trim is not None and trim(0))


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


_libc = _load_libc()


def rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/status``; peak RSS elsewhere)."""
    return _status_bytes("VmRSS:")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: ``VmHWM`` of ``/proc/self/status``.

    Not ``getrusage``'s ``ru_maxrss`` where ``/proc`` exists: the kernel carries the parent's
    resident set at ``fork`` into a child's ``ru_maxrss`` across ``exec``, so a small process
    started by a large one would report the large one's size.
    """
    return _status_bytes("VmHWM:")


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith(field))
        return kib * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class Trace:
    """What one traced call needed: the peak of live tensor bytes it created, and its FLOPs."""

    peak_bytes: int
    flops: int


class _LiveTensors(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts the bytes of every storage an operator returns until its last tensor is freed.

    Views share their base's storage and are counted once; inputs that existed before the
    call (weights, the arguments) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.live = 0
        self.peak = 0
        self.flops = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [tensors alive, bytes]

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func._overloadpacket in _DECOMPOSED:  # counted as the matmuls it decomposes into
            with self:
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        self.flops += _flops(func, args, kwargs, out)
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._hold(value)
        return out

    def _hold(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is None:
            size = storage.nbytes()
            self._storages[key] = [1, size]
            self.live += size
            self.peak = max(self.peak, self.live)
        else:
            entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]


_DECOMPOSED = {torch.ops.aten.linear, torch.ops.aten.matmul, torch.ops.aten.conv2d}
"""Ops counted through their decomposition. Attention is not: decomposed it would be the math
path, which holds the whole ``tokens x tokens`` matrix that the fused kernels never do."""


def _flops(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """FLOPs of one operator call by ``torch.utils.flop_counter``'s formulas (0 for elementwise ops)."""
    packet = func._overloadpacket
    if packet is torch.ops.aten.scaled_dot_product_attention:
        return int(sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape))  # type: ignore[no-untyped-call]
    count = flop_registry.get(packet)
    return 0 if count is None else int(count(*args, **kwargs, out_val=out))


def trace(call: Callable[[], object]) -> Trace:
    """Run ``call`` (a network on meta tensors) and return its peak live activation bytes and FLOPs.

    ``call``'s result is dropped inside the trace, so the peak includes the output.
    """
    with torch.inference_mode(), _LiveTensors() as tracker:
        call()
    return Trace(tracker.peak, tracker.flops)
