"""Distributed checkpoints (``torch.distributed.checkpoint``, DCP) of an expert-parallel, FSDP2-sharded model and
its optimizer, saved at one mesh and loaded at any other (another EP size, another FSDP layout, one process).

DCP reshards a tensor when it knows the tensor's global shape and which part a rank holds, i.e. for DTensors.
FSDP2's parameters are DTensors already; a routed-expert tensor of an EP rank is a plain ``(E/R, ...)`` tensor (or,
under FSDP, a DTensor over the ``dp`` replicas of that block). Before saving and after loading, each expert tensor
(weights and their optimizer moments) is re-described, without a copy, as a slice of the global ``(E, ...)`` tensor
on the ``(ep, dp)`` mesh: ``[Shard(0), Shard(0)]`` under FSDP, ``[Shard(0), Replicate()]`` without. Every other
tensor goes through DCP as it is (``get_state_dict`` / ``set_state_dict`` of ``torch.distributed.checkpoint``).

Layout of a checkpoint root, switched atomically::

    root/latest.json                     {"checkpoint": "step-00000040-1f2e3d", "step": 40, "mesh": ..., "extra": ...}
    root/step-00000040-1f2e3d/           one DCP save (.metadata + one file per rank), a fresh directory per save
    root/step-00000020-9a8b7c/           the previous save (``keep`` saves are kept)

A save writes a new directory; only when every rank has finished (DCP's ``.metadata`` is written last, after a
collective) does global rank 0 replace ``latest.json`` in one ``os.replace``. A crash at any point leaves
``latest.json`` naming the previous complete save, so a loader never mixes two saves. Stale directories of failed
saves are removed by the next successful save.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..stats import _moe_layers
from .groups import ParallelGroups
from .shard import expert_shard

FORMAT = "moekit-dcp"
VERSION = 1
LATEST = "latest.json"


# ------------------------------------------------------------------------------------------ expert re-description

def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _sharded_experts(model: nn.Module) -> dict[str, tuple[nn.Parameter, Any]]:
    """FQN -> (parameter, ExpertShard) of every routed-expert parameter split over more than one EP rank."""
    out = {}
    for lname, layer in _moe_layers(model):
        s = expert_shard(layer)
        if s.size == 1:
            continue
        for pname, p in layer.experts.named_parameters():
            out[f"{lname}.experts.{pname}" if lname else f"experts.{pname}"] = (p, s)
    return out


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _to_global(t: torch.Tensor, shard, pm) -> torch.Tensor:
    """This rank's piece of an EP-sharded expert tensor as a DTensor of the global (E, ...) tensor."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if pm.groups.ep_size != shard.size:
        raise ValueError(f"distributed checkpoint: the model's experts are split over {shard.size} EP ranks but the "
                         f"mesh has ep={pm.groups.ep_size}; pass the groups the model was sharded with")
    if isinstance(t, DTensor):
        if tuple(t.placements) != (Shard(0),) or t.device_mesh.size() != pm.groups.dp_size:
            raise ValueError(f"distributed checkpoint: an expert tensor is a DTensor with placements {t.placements} "
                             "on a mesh of size {t.device_mesh.size()}; expected FSDP2's Shard(0) over the dp ranks")
        local, placements, rest = t.to_local(), [Shard(0), Shard(0)], tuple(t.shape[1:])
    else:
        local, placements, rest = t, [Shard(0), Replicate()], tuple(t.shape[1:])
    shape = (shard.num_experts, *rest)
    return DTensor.from_local(local, pm.experts, placements, run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


def _to_local(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_global`: the loaded global DTensor back in the form of ``like`` (the model's tensor)."""
    from torch.distributed.tensor import DTensor

    local = g.to_local() if isinstance(g, DTensor) else g
    if isinstance(like, DTensor):
        return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                  stride=like.stride())
    return local


def _convert(msd: dict, osd: dict | None, experts: dict, fn, only: list | None = None) -> list:
    """Apply ``fn(tensor, key, shard)`` in place to the expert entries of a model and optimizer state dict: the
    weights and every optimizer tensor shaped like its parameter (or exactly the entries ``only`` lists).
    Returns the entries converted, as ``(key, state name or None)``."""
    done = []
    if osd is not None and "state" in osd:  # get_state_dict may hand out the optimizer's own dicts: copy them
        osd["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in osd["state"].items()}
    for key, (p, s) in experts.items():
        if key in msd and (only is None or (key, None) in only):
            msd[key] = fn(msd[key], key, s)
            done.append((key, None))
        state = (osd or {}).get("state", {}).get(key)
        for name, v in list((state or {}).items()):
            if only is not None:
                hit = (key, name) in only
            else:
                hit = isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == tuple(p.shape)
            if hit:
                state[name] = fn(v, key, s)
                done.append((key, name))
    return done


def _mesh(groups, experts: dict):
    from .fsdp import ParallelMesh, build_mesh

    if not experts:
        return None
    if groups is None:
        raise ValueError("distributed checkpoint: the model's experts are sharded over several ranks; pass its "
                         "ParallelGroups (or ParallelMesh) as groups=")
    return groups if isinstance(groups, ParallelMesh) else build_mesh(groups)


def _state_dicts(model: nn.Module, optimizer, experts: dict, pm):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        msd, osd = get_model_state_dict(model), None
    else:
        msd, osd = get_state_dict(model, optimizer)
    converted = _convert(msd, osd, experts, lambda t, key, s: _to_global(t, s, pm))
    return msd, osd, converted


# ---------------------------------------------------------------------------------------------- the atomic switch

def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        from .comm import collective

        collective("barrier (distributed checkpoint)", None, dist.barrier)


def _write_latest(root: Path, manifest: dict) -> None:
    """Replace ``root/latest.json`` atomically (temporary file, fsync, os.replace, fsync of the directory)."""
    tmp = root / f".{LATEST}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / LATEST)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass


def read_latest(root: str | os.PathLike) -> dict | None:
    """The manifest of the last complete save under ``root`` (``None`` when there is none)."""
    path = Path(root) / LATEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a moekit distributed checkpoint (format {manifest.get('format')!r})")
    return manifest


def _resolve(path: str | os.PathLike) -> tuple[Path, dict]:
    """A checkpoint root (with latest.json) or one save directory (with DCP's .metadata)."""
    path = Path(path)
    manifest = read_latest(path)
    if manifest is not None:
        snap = path / manifest["checkpoint"]
    elif (path / ".metadata").exists():
        snap, manifest = path, {"checkpoint": path.name, "step": None, "extra": {}}
    else:
        raise FileNotFoundError(f"{path} holds no complete distributed checkpoint (no {LATEST} and no .metadata)")
    if not (snap / ".metadata").exists():
        raise FileNotFoundError(f"{snap}: the save that {path / LATEST} names is incomplete (no .metadata)")
    return snap, manifest


def _prune(root: Path, kept: list[str]) -> None:
    """Remove every save directory under ``root`` that is not in ``kept`` (older saves, failed or unswitched ones)."""
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and d.name not in kept:
            shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ public API

def save_dcp(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    root: str | os.PathLike,
    groups: ParallelGroups | Any = None,
    *,
    step: int = 0,
    extra: dict | None = None,
    keep: int = 2,
) -> Path:
    """Save ``model`` (and ``optimizer``'s state) under ``root`` as a new DCP checkpoint and make it the latest.

    A collective: call it on every rank with the same arguments. ``groups``: the :class:`ParallelGroups` (or
    :class:`ParallelMesh`) the model was sharded with (needed when the experts are split over several ranks).
    ``extra``: JSON-serialisable values kept in the manifest (e.g. the data position); ``keep``: how many
    saves to keep (this one and the ``keep - 1`` previous latest ones; saves that never became latest are removed). Returns the directory of this save."""
    import torch.distributed.checkpoint as dcp

    model = _unwrap(model)
    root = Path(root)
    experts = _sharded_experts(model)
    pm = _mesh(groups, experts)
    name = [f"step-{int(step):08d}-{uuid.uuid4().hex[:8]}"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)  # one fresh directory for every rank
    snap = root / name[0]
    if _is_rank0():
        snap.mkdir(parents=True, exist_ok=False)
    _barrier()
    msd, osd, _ = _state_dicts(model, optimizer, experts, pm)
    state = {"model": msd} if osd is None else {"model": msd, "optim": osd}
    dcp.save(state, checkpoint_id=str(snap), no_dist=not dist.is_initialized())  # every rank's files, then .metadata (after a collective)
    _barrier()
    if _is_rank0():
        g = pm.groups if pm is not None else groups
        prev = read_latest(root)
        kept = [snap.name] + [n for n in (prev or {}).get("kept", []) if (root / n).is_dir()][: max(keep - 1, 0)]
        manifest = {
            "format": FORMAT, "version": VERSION, "checkpoint": snap.name, "step": int(step),
            "optimizer": osd is not None, "extra": extra or {}, "kept": kept,
            "mesh": None if g is None else {"world": g.world_size, "ep": g.ep_size, "dp": g.dp_size},
        }
        _switch(root, manifest)
        _prune(root, kept)
    _barrier()
    return snap


def _switch(root: Path, manifest: dict) -> None:
    """Make ``manifest`` the latest save (separate so that tests can simulate a crash before the switch)."""
    _write_latest(root, manifest)


def _check_shapes(snap: Path, state: dict) -> None:
    """Compare the global shape of every tensor to load with the checkpoint's; a clear error instead of DCP's."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = FileSystemReader(str(snap)).read_metadata().state_dict_metadata
    for key, t in state.get("model", {}).items():
        meta = saved.get(f"model.{key}")
        if isinstance(t, torch.Tensor) and isinstance(meta, TensorStorageMetadata):
            if tuple(meta.size) != tuple(t.shape):
                raise ValueError(f"load_dcp: {key} has shape {tuple(meta.size)} in the checkpoint {snap}, "
                                 f"{tuple(t.shape)} in the model (global shapes)")


def load_dcp(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    path: str | os.PathLike,
    groups: ParallelGroups | Any = None,
) -> dict:
    """Load the latest save under ``path`` (or the save directory ``path``) into ``model`` and ``optimizer``,
    resharding to this model's mesh (any EP size dividing E, FSDP2 or not, or one plain process). A collective
    when the world has several ranks. Returns the manifest (``step``, ``extra``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    model = _unwrap(model)
    snap, manifest = _resolve(path)
    if optimizer is not None and manifest.get("optimizer") is False:
        raise ValueError(f"load_dcp: {snap} was saved without optimizer state; pass optimizer=None")
    experts = _sharded_experts(model)
    pm = _mesh(groups, experts)
    msd, osd, converted = _state_dicts(model, optimizer, experts, pm)
    state = {"model": msd} if osd is None else {"model": msd, "optim": osd}
    _check_shapes(snap, state)
    dcp.load(state, checkpoint_id=str(snap), no_dist=not dist.is_initialized())
    msd, osd = state["model"], state.get("optim")
    like = {k: p for k, (p, _) in experts.items()}
    _convert(msd, osd, experts, lambda t, key, s: _to_local(t, like[key]), only=converted)
    if osd is None:
        set_model_state_dict(model, msd)
    else:
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
    return manifest


def consolidate(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load the weights of a distributed checkpoint (saved at any mesh) into a plain, unsharded ``model`` in this
    process (no process group needed): the full model, e.g. to export with :func:`moekit.convert.to_hf` or
    ``save_file(model.state_dict())``. Returns ``model``."""
    import torch.distributed.checkpoint as dcp

    for _, layer in _moe_layers(model):
        if expert_shard(layer).size != 1:
            raise ValueError("consolidate: pass an unsharded model (build it as on one process)")
    snap, _ = _resolve(path)
    msd = {k: v for k, v in model.state_dict().items()}
    _check_shapes(snap, {"model": msd})
    dcp.load({"model": msd}, checkpoint_id=str(snap), no_dist=True)  # reads the full tensors, no collective
    model.load_state_dict(msd)
    return model
