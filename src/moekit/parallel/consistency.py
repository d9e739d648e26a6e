"""Cross-rank consistency: before the first collective, every rank checks that it built the same model.

Expert parallelism and data parallelism assume that every rank holds the same layer configurations (E, dim, k,
expert size, dispatch, balance policies), the same parameter shapes and dtypes, and the same initial weights (the
dense replicas and the expert shards are sliced from identically seeded copies). When one of these differs the job
either trains silently wrong (k, expert size, seed, dispatch) or dies in a transport error that blames a dead peer
(E, dim: the all-to-all splits disagree). :func:`verify_consistent` gathers a small fingerprint from every rank
(one ``all_gather_object``) and raises the same :class:`ConsistencyError` on every rank, naming the field, the
values and the ranks that hold each value. :func:`apply_expert_parallel` calls it by default.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..stats import _moe_layers
from .comm import collective


class ConsistencyError(ValueError):
    """Ranks disagree on a model field that every rank must share; raised identically on every rank."""


def _plain(v: Any) -> Any:
    """A comparable, picklable form of a config value (specs as their dict, built modules by class and repr)."""
    if v is None or isinstance(v, (int, float, bool, str)):
        return v
    to_dict = getattr(v, "to_dict", None)
    if callable(to_dict):
        try:
            return to_dict()
        except TypeError:
            pass
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, nn.Module):
        return f"{type(v).__name__}({v.extra_repr()})"
    return repr(v)


def _flatten(prefix: str, v: Any, out: dict[str, Any]) -> None:
    if isinstance(v, dict):
        for k, x in v.items():
            _flatten(f"{prefix}.{k}", x, out)
    elif isinstance(v, list) and any(isinstance(x, dict) for x in v):
        for i, x in enumerate(v):
            _flatten(f"{prefix}[{i}]", x, out)
    else:
        out[prefix] = v


def _digest(t: torch.Tensor) -> str:
    t = t.detach()
    full = getattr(t, "full_tensor", None)  # a DTensor: compare its local shard (each replica holds the same one)
    if full is not None:
        t = t.to_local()
    b = t.cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.blake2b(b, digest_size=12).hexdigest()


def model_fingerprint(model: nn.Module, *, seed: int | None = None, values: bool = True) -> dict[str, Any]:
    """Field -> value of what must agree across ranks: every MoE layer's configuration (flattened to dotted names:
    ``moe.router.k``, ``moe.experts.hidden_dim``, ``moe.dispatch.type``), every parameter's shape and dtype, the
    ``seed`` when given, and (``values=True``) a digest of every parameter's values."""
    fp: dict[str, Any] = {}
    if seed is not None:
        fp["seed"] = int(seed)
    for lname, layer in _moe_layers(model):
        base = lname or "<root>"
        shard = getattr(layer, "expert_shard", None)
        fp[f"{base}.num_experts"] = layer.num_experts
        fp[f"{base}.dim"] = layer.dim
        if shard is not None:
            fp[f"{base}.expert_parallel_size"] = shard.size
        cfg = layer.config
        for f in ("router", "experts", "shared_experts", "shared_gate", "dispatch", "balance"):
            _flatten(f"{base}.{f}", _plain(getattr(cfg, f)), fp)
    for name, p in model.named_parameters():
        fp[f"{name} (shape)"] = tuple(p.shape)
        fp[f"{name} (dtype)"] = str(p.dtype)
    if values:
        for name, p in model.named_parameters():
            fp[f"{name} (values)"] = _digest(p)
    return fp


_MISSING = "<absent>"


def _mismatches(fps: list[dict[str, Any]], ranks: list[int]) -> list[str]:
    keys: list[str] = []
    seen = set()
    for fp in fps:
        for k in fp:
            if k not in seen:
                seen.add(k)
                keys.append(k)
    lines = []
    for k in keys:
        by_value: dict[str, list[int]] = {}
        for r, fp in enumerate(fps):
            by_value.setdefault(repr(fp.get(k, _MISSING)), []).append(ranks[r])
        if len(by_value) > 1:
            parts = "; ".join(f"{v} on rank{'s' if len(rs) > 1 else ''} {rs}" for v, rs in by_value.items())
            lines.append(f"{k}: {parts}")
    return lines


def verify_consistent(
    model: nn.Module,
    group: dist.ProcessGroup | None = None,
    *,
    seed: int | None = None,
    values: bool = True,
    max_lines: int = 8,
) -> dict[str, Any]:
    """Check that every rank of ``group`` (default: the world) holds the same model fingerprint
    (:func:`model_fingerprint`). A collective: call it on every rank, before any expert-parallel forward.

    Raises :class:`ConsistencyError` on every rank when a field differs, e.g.
    ``moe.router.k: 2 on ranks [0, 1]; 3 on rank [2]``. ``values=False`` skips the weight digests (when the
    weights are broadcast or loaded afterwards). Returns this rank's fingerprint.
    """
    fp = model_fingerprint(model, seed=seed, values=values)
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return fp
    gathered: list = [None] * dist.get_world_size(group)
    collective("all_gather_object (model fingerprints)", group, lambda: dist.all_gather_object(gathered, fp, group=group))
    ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(len(gathered))]
    lines = _mismatches(gathered, ranks)
    if lines:
        shown = lines[:max_lines] + ([f"... and {len(lines) - max_lines} more"] if len(lines) > max_lines else [])
        hint = ""
        if all(" (values):" in line for line in lines):
            hint = ("\nThe initial weights differ: build the model with the same torch.manual_seed on every rank, "
                    "or skip this check (check_values=False) and call broadcast_parameters or load a checkpoint afterwards.")
        raise ConsistencyError(
            f"moekit.parallel: the {len(gathered)} ranks built different models (global ranks listed per value; "
            f"rank {dist.get_rank()} reporting):\n  " + "\n  ".join(shown) + hint
        )
    return fp
