"""Sharded checkpoints: every EP rank writes its own experts; loading into another EP size reshards them.

Layout of a checkpoint directory::

    meta.json                        format, EP size, the experts' global shapes (written last: marks completeness)
    dense.safetensors                every non-expert tensor of the state dict (written by global rank 0)
    experts-00000-of-00004.safetensors   routed-expert tensors of EP rank 0: global experts [0, E/4) of each layer
    ...

Only one replica of each shard writes (DP rank 0). Files are written to a temporary name and renamed, so a crash
never leaves a half-written file under the final name. Loading reads only the expert rows this rank needs (any EP
size that divides E, or a plain single-process model) and needs no collective.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..io import atomic_write
from ..stats import _moe_layers
from .shard import expert_shard

FORMAT = "moekit-expert-sharded"
VERSION = 1


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _expert_entries(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """state-dict key -> (global experts, first global expert held here, one past the last)."""
    out = {}
    for lname, layer in _moe_layers(model):
        s = expert_shard(layer)
        for key in layer.experts.state_dict():
            full = f"{lname}.experts.{key}" if lname else f"experts.{key}"
            out[full] = (s.num_experts, s.start, s.stop)
    return out


def _save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _shard_file(rank: int, size: int) -> str:
    return f"experts-{rank:05d}-of-{size:05d}.safetensors"


def save_sharded(model: nn.Module, path: str | os.PathLike, groups=None) -> Path:
    """Write ``model``'s state dict as a sharded checkpoint. A collective when ``groups`` (a
    :class:`ParallelGroups`) is given: call it on every rank. Without groups (one process) it writes EP size 1."""
    model = _unwrap(model)
    path = Path(path)
    rank = groups.rank if groups is not None else 0
    ep_rank, ep_size = (groups.ep_rank, groups.ep_size) if groups is not None else (0, 1)
    dp_rank = groups.dp_rank if groups is not None else 0
    distributed = groups is not None and groups.world_size > 1
    entries = _expert_entries(model)
    for key, (E, start, stop) in entries.items():
        if (stop - start) * ep_size != E or start != ep_rank * (E // ep_size):
            raise ValueError(f"save_sharded: {key} holds experts [{start}, {stop}) of {E}, which is not EP rank "
                             f"{ep_rank} of {ep_size}; pass the ParallelGroups the model was sharded with")
    state = model.state_dict()
    path.mkdir(parents=True, exist_ok=True)
    if dp_rank == 0:  # one replica of each shard writes
        experts = {k: v for k, v in state.items() if k in entries}
        meta = {"ep_rank": str(ep_rank), "ep_size": str(ep_size)}
        _save_tensors(path / _shard_file(ep_rank, ep_size), experts, meta)
    if rank == 0:
        _save_tensors(path / "dense.safetensors", {k: v for k, v in state.items() if k not in entries}, {})
    if distributed:
        dist.barrier()  # every shard is on disk before meta.json marks the checkpoint complete
    if rank == 0:
        meta = {
            "format": FORMAT, "version": VERSION, "ep_size": ep_size,
            "experts": {k: {"num_experts": E, "shape": [E, *state[k].shape[1:]], "dtype": str(state[k].dtype)}
                        for k, (E, _, _) in entries.items()},
        }
        atomic_write(path / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    if distributed:
        dist.barrier()
    return path


def read_meta(path: str | os.PathLike) -> dict:
    meta_path = Path(path) / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} is not a complete moekit sharded checkpoint (no meta.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def load_sharded(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a sharded checkpoint into ``model`` (sharded at any EP size dividing E, or not sharded). Each rank
    reads only the expert rows it holds; no collective is needed."""
    from safetensors import safe_open

    model = _unwrap(model)
    path = Path(path)
    meta = read_meta(path)
    saved_ep = int(meta["ep_size"])
    entries = _expert_entries(model)
    state = model.state_dict()
    if strict and set(meta["experts"]) != set(entries):
        diff = sorted(set(meta["experts"]) ^ set(entries))
        raise KeyError(f"load_sharded: expert tensors differ between the checkpoint and the model: {diff}")
    new: dict[str, Tensor] = {}
    dense = safe_open(str(path / "dense.safetensors"), framework="pt")
    for key in dense.keys():
        if key in state:
            new[key] = dense.get_tensor(key)
        elif strict:
            raise KeyError(f"load_sharded: checkpoint tensor {key!r} is not in the model")
    shards = {}
    for key, (E, start, stop) in entries.items():
        info = meta["experts"].get(key)
        if info is None:
            continue
        if info["num_experts"] != E:
            raise ValueError(f"load_sharded: {key} has {info['num_experts']} experts in the checkpoint, {E} in the model")
        per = E // saved_ep  # experts per saved shard
        pieces = []
        for r in range(start // per, (stop - 1) // per + 1):  # the saved shards overlapping [start, stop)
            if r not in shards:
                shards[r] = safe_open(str(path / _shard_file(r, saved_ep)), framework="pt")
            lo, hi = max(start, r * per) - r * per, min(stop, (r + 1) * per) - r * per
            pieces.append(shards[r].get_slice(key)[lo:hi])
        new[key] = torch.cat(pieces)
    if strict:
        absent = sorted(set(state) - set(new))
        if absent:
            raise KeyError(f"load_sharded: model tensors not in the checkpoint: {absent}")
    for key, value in new.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(f"load_sharded: {key} has shape {tuple(value.shape)} in the checkpoint, "
                             f"{tuple(state[key].shape)} in the model")
    model.load_state_dict(new, strict=False)
    return model
