"""Sharded checkpoints: every EP rank writes its own experts; loading into another EP size reshards them.

Layout of a checkpoint directory (one save of :class:`moekit.io.CheckpointWriter`)::

    manifest.json                    the commit point: every file's size and checksum, the save id, and the meta
                                     (format, EP size, the experts' global shapes, each MoE layer's config)
    save-<id>/dense.safetensors      every non-expert tensor of the state dict (written by global rank 0)
    save-<id>/experts-00000-of-00004.safetensors   routed-expert tensors of EP rank 0: global experts [0, E/4)
    ...

Only one replica of each shard writes (DP rank 0), into a fresh ``save-<id>`` directory whose id global rank 0
broadcasts; the ranks gather their files' checksums to rank 0, which commits the save by replacing
``manifest.json`` atomically after a barrier. A crash (of any rank, at any point) leaves the previous save loadable
and never a folder mixing two saves. Loading verifies the files a rank reads (``verify=False`` skips the hashing),
refuses a model whose MoE layers are configured differently (e.g. k=2 saved, k=1 loading), reads only the expert
rows this rank needs (any EP size that divides E, or a plain single-process model) and needs no collective.
Folders from an older moekit (``meta.json`` beside the files, no manifest) load with a warning.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..io import CheckpointError, CheckpointWriter, FileEntry, has_manifest, read_checkpoint
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


class LegacyCheckpointWarning(UserWarning):
    """A sharded checkpoint without a manifest (older moekit): loaded without integrity checks."""


def _tensor_writer(tensors: dict[str, Tensor], metadata: dict[str, str]):
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return lambda path: save_file(tensors, str(path), metadata=metadata)


# the MoEConfig fields that decide what a layer computes from its weights; dispatch, balance losses and input
# checks may differ between the run that saved and the one that loads (e.g. dropless inference of a capacity run)
_COMPUTE_FIELDS = ("dim", "num_experts", "router", "experts", "shared_experts", "shared_gate")


def _layer_configs(model: nn.Module) -> dict[str, object]:
    """Each MoE layer's computation-defining config as JSON (None for a layer built from modules)."""
    out = {}
    for lname, layer in _moe_layers(model):
        try:
            d = json.loads(json.dumps(layer.config.to_dict()))
            out[lname] = {k: d.get(k) for k in _COMPUTE_FIELDS}
        except (TypeError, AttributeError, ValueError):
            out[lname] = None
    return out


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
    save_id = uuid.uuid4().hex if rank == 0 else None
    if distributed:  # one save id for every rank
        box = [save_id]
        dist.broadcast_object_list(box, src=0)
        save_id = box[0]
    mine: list[FileEntry] = []
    writer = None
    if dp_rank == 0 or rank == 0:
        writer = CheckpointWriter(path, kind=FORMAT, save_id=save_id, clean=rank == 0)
    if dp_rank == 0:  # one replica of each shard writes
        experts = {k: v for k, v in state.items() if k in entries}
        meta = {"ep_rank": str(ep_rank), "ep_size": str(ep_size)}
        mine.append(writer.write(_shard_file(ep_rank, ep_size), _tensor_writer(experts, meta)))
    if rank == 0:
        dense = {k: v for k, v in state.items() if k not in entries}
        mine.append(writer.write("dense.safetensors", _tensor_writer(dense, {})))
    everyone = [mine]
    if distributed:  # every shard is on disk (and its checksum known) before rank 0 commits
        everyone = [None] * groups.world_size
        dist.all_gather_object(everyone, mine)
    if rank == 0:
        meta = {
            "format": FORMAT, "version": VERSION, "ep_size": ep_size,
            "experts": {k: {"num_experts": E, "shape": [E, *state[k].shape[1:]], "dtype": str(state[k].dtype)}
                        for k, (E, _, _) in entries.items()},
            "layers": _layer_configs(model),
        }
        writer.commit(meta, entries=[e for es in everyone for e in es], remove=_legacy_files(path))
    if distributed:
        dist.barrier()
    return path


def _legacy_files(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.is_file() and (
        p.name in ("meta.json", "dense.safetensors") or (p.name.startswith("experts-") and p.suffix == ".safetensors"))]


def _open(path: Path, verify: bool = True):
    """``(meta, file name -> path, checkpoint or None)`` of the current save."""
    if has_manifest(path):
        ck = read_checkpoint(path, kind=FORMAT, verify=False)  # sizes now; checksums of the files this rank reads
        return ck.meta, ck.path, ck
    meta_path = Path(path) / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{path} is not a complete moekit sharded checkpoint (no manifest.json, "
                                "no meta.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}")
    warnings.warn(f"{path} has no manifest.json (written by an older moekit): loading it without integrity checks; "
                  "save it again to convert it", LegacyCheckpointWarning, stacklevel=3)
    return meta, (lambda name: Path(path) / name), None


def read_meta(path: str | os.PathLike) -> dict:
    """The checkpoint's meta: format, version, ep_size, experts (global shapes) and layers (configs)."""
    return _open(Path(path))[0]


def load_sharded(model: nn.Module, path: str | os.PathLike, strict: bool = True, *, verify: bool = True) -> nn.Module:
    """Load a sharded checkpoint into ``model`` (sharded at any EP size dividing E, or not sharded). Each rank
    reads only the expert rows it holds, after checking those files' checksums (``verify=False``: sizes only);
    no collective is needed. Raises :class:`moekit.io.CheckpointError` when the model's MoE layers are configured
    differently from the saved ones."""
    from safetensors import safe_open

    model = _unwrap(model)
    path = Path(path)
    meta, file, ck = _open(path)
    saved_ep = int(meta["ep_size"])
    entries = _expert_entries(model)
    opened: set[str] = set()

    def safe(name: str):
        if ck is not None and name not in opened:
            ck.verify([name], checksums=verify)
            opened.add(name)
        return safe_open(str(file(name)), framework="pt")

    state = model.state_dict()
    if strict and set(meta["experts"]) != set(entries):
        diff = sorted(set(meta["experts"]) ^ set(entries))
        raise KeyError(f"load_sharded: expert tensors differ between the checkpoint and the model: {diff}")
    new: dict[str, Tensor] = {}
    dense = safe("dense.safetensors")
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
                shards[r] = safe(_shard_file(r, saved_ep))
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
    saved_layers, layers = meta.get("layers"), _layer_configs(model)
    if saved_layers is not None:
        for name in sorted(set(saved_layers) & set(layers)):
            if None not in (saved_layers[name], layers[name]) and saved_layers[name] != layers[name]:
                diff = sorted(k for k in set(saved_layers[name]) | set(layers[name])
                              if saved_layers[name].get(k) != layers[name].get(k))
                raise CheckpointError(
                    f"load_sharded: MoE layer {name or '<root>'!r} is configured differently from the checkpoint's "
                    f"in {diff}: saved {[saved_layers[name].get(k) for k in diff]}, model "
                    f"{[layers[name].get(k) for k in diff]}"
                )
    model.load_state_dict(new, strict=False)
    return model
