"""Expert weights on transparent huge pages (Linux), for decode that reads them at the memory's speed.

A decode step streams every touched expert's weights from DRAM once. On 4 KiB pages that stream crosses a page
boundary every 4 KiB: one TLB miss and page walk per page (the page tables of the weights stream through the caches
beside them), and the hardware prefetcher, which does not cross pages, starts again on each. On 2 MiB pages both
go away. Measured on the 2-core EPYC of the benchmarks (docs/performance.md): the native decode kernel on one
token's two experts (34 MiB) went from ~1.35x to ~1.03x the time of a plain streaming read of the same bytes.

PyTorch can do this for every large allocation of a process (``THP_MEM_ALLOC_ENABLE=1``, read once at start-up).
:func:`to_hugepages` does it for one model, at any time: each large parameter, buffer or tensor attribute of the
module is copied into an anonymous mapping advised ``MADV_HUGEPAGE``, and every tensor of the module that shares
that storage (a transposed view, a fused bank sharing a Hugging Face weight) is re-pointed at the copy, so sharing
survives. Nothing else changes: values, dtypes, shapes, strides, ``requires_grad`` and the Parameter objects
(optimizers keep their references). Where the kernel offers no transparent huge pages (not Linux, or
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``never``), it moves nothing and says so.
"""

from __future__ import annotations

import mmap
import platform
from dataclasses import dataclass

import torch
from torch import Tensor, nn

HUGE_PAGE = 2 * 2**20
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str:
    """The kernel's transparent huge page mode: ``always``, ``madvise`` or ``never`` (``never`` where it cannot be
    read or the platform has none)."""
    if platform.system() != "Linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return "never"
    try:
        with open(_THP_SETTING) as f:
            text = f.read()
    except OSError:
        return "never"
    for mode in ("always", "madvise", "never"):
        if f"[{mode}]" in text:
            return mode
    return "never"


def available() -> bool:
    """Whether :func:`to_hugepages` can place memory on huge pages here."""
    return thp_mode() in ("always", "madvise")


def _huge_bytes(num_bytes: int) -> tuple[Tensor, int]:
    """A uint8 tensor over an anonymous mapping advised ``MADV_HUGEPAGE``, ``num_bytes`` plus slack, and the offset
    in it of the first 2 MiB boundary (the tensor keeps the mapping alive, and so does every tensor set on its
    storage)."""
    mm = mmap.mmap(-1, num_bytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(mm, dtype=torch.uint8)
    return raw, (-raw.data_ptr()) % HUGE_PAGE


def empty(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialised contiguous CPU tensor on huge-page memory (``torch.empty`` where :func:`available` is
    False)."""
    if not available():
        return torch.empty(*shape, dtype=dtype)
    n = 1
    for d in shape:
        n *= d
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw, offset = _huge_bytes(n * itemsize)
    return torch.empty(0, dtype=dtype).set_(raw.untyped_storage(), offset // itemsize, shape)


def _slots(module: nn.Module):
    """(owner, kind, name, tensor) for every parameter, buffer and plain tensor attribute of every submodule."""
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                yield mod, "param", name, p
        for name, b in mod._buffers.items():
            if b is not None:
                yield mod, "buffer", name, b
        for name, v in vars(mod).items():
            if isinstance(v, Tensor) and not isinstance(v, nn.Parameter):
                yield mod, "attr", name, v


@dataclass(frozen=True)
class HugePageReport:
    """What :func:`to_hugepages` did: storages and bytes moved, the bytes the kernel backs with huge pages
    afterwards (summed from ``/proc/self/smaps`` over the new mappings; None where it cannot be read), and the
    kernel's THP mode."""

    storages: int
    bytes_moved: int
    huge_bytes: int | None
    mode: str

    def __str__(self) -> str:
        huge = "unknown" if self.huge_bytes is None else f"{self.huge_bytes / 2**20:.0f} MiB"
        return (f"{self.storages} storages, {self.bytes_moved / 2**20:.0f} MiB moved to huge-page memory "
                f"(THP mode {self.mode}; backed by huge pages: {huge})")


def to_hugepages(module: nn.Module, min_bytes: int = HUGE_PAGE) -> HugePageReport:
    """Move every CPU storage of ``module`` of at least ``min_bytes`` (parameters, buffers, tensor attributes) onto
    transparent huge pages, in place; tensors sharing a storage keep sharing it. Returns a :class:`HugePageReport`.
    Moves nothing where :func:`available` is False. Call it on an inference model after loading (and again after
    anything that re-allocates the weights, e.g. ``.to(dtype)``)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"to_hugepages: expected an nn.Module, got {type(module).__name__}")
    if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
        raise ValueError(f"to_hugepages: min_bytes must be a non-negative int, got {min_bytes!r}")
    mode = thp_mode()
    if mode == "never":
        return HugePageReport(0, 0, None, mode)
    groups: dict[int, list] = {}
    storages: dict[int, torch.UntypedStorage] = {}
    for slot in _slots(module):
        t = slot[3]
        if t.device.type != "cpu" or t.is_sparse or t.layout != torch.strided:
            continue
        st = t.untyped_storage()
        if st.nbytes() < min_bytes:
            continue
        key = st.data_ptr()
        storages[key] = st
        groups.setdefault(key, []).append(slot)
    moved, spans = 0, []
    with torch.no_grad():
        for key, slots in groups.items():
            old = storages[key]
            n = old.nbytes()
            raw, offset = _huge_bytes(n)
            raw[offset:offset + n].copy_(torch.empty(0, dtype=torch.uint8).set_(old))
            new = raw.untyped_storage()
            spans.append((raw.data_ptr() + offset, n))
            for mod, kind, name, t in slots:
                itemsize = t.element_size()
                moved_t = torch.empty(0, dtype=t.dtype).set_(new, offset // itemsize + t.storage_offset(),
                                                             t.shape, t.stride())
                if kind == "param":
                    t.data = moved_t
                elif kind == "buffer":
                    mod._buffers[name] = moved_t
                else:
                    t.data = moved_t  # keeps the attribute's tensor object (others may hold it)
            moved += n
    return HugePageReport(len(groups), moved, huge_bytes(spans), mode)


def huge_bytes(spans: list[tuple[int, int]]) -> int | None:
    """Bytes of the address ranges ``(start, length)`` that the kernel backs with huge pages now (the
    ``AnonHugePages`` of the mappings that hold them, from ``/proc/self/smaps``); None where that cannot be read."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total, lo, hi = 0, 0, 0
    hit = False
    for line in lines:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            a, _, b = head.partition("-")
            try:
                lo, hi = int(a, 16), int(b, 16)
            except ValueError:
                continue
            hit = any(start < hi and start + n > lo for start, n in spans)
        elif hit and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total
