"""Read single tensors, or one expert's slice of a stacked tensor, from a directory of safetensors shards.

We parse the safetensors header ourselves and read bytes with ``os.preadv`` (straight into the destination tensor) instead of memory-mapping the shards:
pages of a memory-mapped file that were touched count towards the process's resident set until the kernel reclaims
them, which would make "resident memory stays within the budget" unmeasurable (and untrue in practice for a long
generation). ``pread`` copies exactly the requested expert's bytes into memory we own and account for.

Every problem a checkpoint can have (no shards, unreadable shard, truncated shard, tensor listed in the index but
absent from its shard) raises :class:`CheckpointError` naming the file and the tensor, when the index is built,
i.e. before any generation starts.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served: the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: ``file`` at absolute byte ``offset`` (header included), ``nbytes`` long."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"shard {path} is too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"shard {path}: header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"shard {path} cannot be read: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"shard {path}: header is not valid safetensors JSON ({e})") from e
    return header, 8 + n


class CheckpointIndex:
    """name -> :class:`TensorEntry` for every tensor in a checkpoint directory (``*.safetensors`` shards, with or
    without ``model.safetensors.index.json``). Reads go through one open file descriptor per shard."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"model_dir={str(model_dir)!r} is not a directory")
        shards = sorted(self.dir.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"model_dir={str(model_dir)!r} holds no *.safetensors shard")
        self.entries: dict[str, TensorEntry] = {}
        for shard in shards:
            header, base = _read_header(shard)
            size = shard.stat().st_size
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in _DTYPES:
                    raise CheckpointError(f"shard {shard}, tensor {name!r}: unsupported dtype {meta['dtype']}")
                lo, hi = meta["data_offsets"]
                if base + hi > size:
                    raise CheckpointError(f"shard {shard}, tensor {name!r}: bytes [{base + lo}, {base + hi}) lie "
                                          f"beyond the end of the file ({size} bytes); the shard is truncated")
                self.entries[name] = TensorEntry(shard, _DTYPES[meta["dtype"]], tuple(meta["shape"]), base + lo, hi - lo)
        index_file = self.dir / "model.safetensors.index.json"
        if index_file.exists():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            for name, fname in weight_map.items():
                if name not in self.entries:
                    raise CheckpointError(f"tensor {name!r} is listed in {index_file} (shard {fname}) but absent "
                                          f"from the shards in {self.dir}")
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                try:
                    self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"shard {path} cannot be opened: {e}") from e
            return self._fds[path]

    def _pread_into(self, entry: TensorEntry, offset: int, out: torch.Tensor, name: str) -> None:
        """Read ``out.nbytes`` bytes at ``offset`` straight into ``out`` (contiguous CPU tensor; no zero-fill, no
        intermediate buffer)."""
        nbytes = out.nbytes
        if nbytes == 0:
            return
        if not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"internal: read target for {name!r} must be a contiguous CPU tensor")
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        fd, got = self._fd(entry.file), 0
        while got < nbytes:  # a regular file returns everything at once; loop for signals / odd filesystems
            n = os.preadv(fd, [view[got:]], offset + got)
            if n <= 0:
                raise CheckpointError(f"shard {entry.file}, tensor {name!r}: read {got} of {nbytes} bytes")
            got += n
        with self._lock:
            self.bytes_read += nbytes

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor ``name`` as a fresh CPU tensor (or read into ``out``, a contiguous tensor of its dtype
        and element count)."""
        e = self.entry(name)
        out = self._target(e, name, e.shape, out)
        self._pread_into(e, e.offset, out, name)
        return out

    def read_row(self, name: str, i: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Row ``i`` of the leading dimension of ``name`` (one expert of a stacked ``[E, ...]`` tensor)."""
        e = self.entry(name)
        if not 0 <= i < e.shape[0]:
            raise IndexError(f"tensor {name!r} has {e.shape[0]} rows; asked for row {i}")
        row = e.nbytes // e.shape[0]
        out = self._target(e, name, e.shape[1:], out)
        self._pread_into(e, e.offset + i * row, out, name)
        return out

    @staticmethod
    def _target(e: TensorEntry, name: str, shape: tuple[int, ...], out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            return torch.empty(shape, dtype=e.dtype)
        if out.dtype != e.dtype or out.numel() != torch.Size(shape).numel():
            raise ValueError(f"internal: cannot read {name!r} ({e.dtype}, {shape}) into {out.dtype} {tuple(out.shape)}")
        return out

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.dir}") from None

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):  # best effort; explicit close() is preferred
        try:
            self.close()
        except Exception:
            pass
