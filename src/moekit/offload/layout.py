"""Where an HF experts module's weights live in a checkpoint, and how to read one expert in the module's layout.

transformers' experts modules (classes decorated with ``use_experts_implementation``) hold stacked parameters
``gate_up_proj [E, 2I, D]`` (or ``[E, D, 2I]`` when ``is_transposed``), ``down_proj``, optionally ``up_proj`` (no
gate) and ``*_bias``. Checkpoints store them either fused the same way (transformers 5.x models such as gpt-oss) or
per expert as the original releases did and as ``save_pretrained`` writes them back
(``...experts.3.gate_proj.weight``; Mixtral's ``block_sparse_moe.experts.3.w1.weight``).
:func:`find_source` recognises both and returns an :class:`ExpertSource` that reads expert ``e`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reader import CheckpointError, CheckpointIndex

# model-path renames applied to look a module up in a checkpoint (transformers' conversion mapping does these on load)
PATH_RENAMES: tuple[tuple[str, str], ...] = ((".mlp.", ".block_sparse_moe."),)
# per-expert linear names (gate, up, down) of gated experts, and (up, down) of non-gated ones
GATED_NAMES: tuple[tuple[str, str, str], ...] = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
PLAIN_NAMES: tuple[tuple[str, str], ...] = (("up_proj", "down_proj"), ("fc1", "fc2"), ("w1", "w2"))


def checkpoint_prefixes(path: str) -> list[str]:
    out = [path]
    for a, b in PATH_RENAMES:
        if a in f".{path}.":
            out.append(f".{path}.".replace(a, b)[1:-1])
    return out


@dataclass
class ExpertSource:
    """Reads expert ``e`` of one experts module. ``params``: parameter name -> per-expert shape in module layout."""

    index: CheckpointIndex
    module_path: str
    params: dict[str, tuple[int, ...]]
    num_experts: int
    fused: dict[str, str] | None = None              # param -> checkpoint tensor name ([E, ...])
    per_expert: tuple[str, tuple[str, ...]] | None = None  # (prefix, linear names)
    is_transposed: bool = False
    is_concatenated: bool = True
    has_gate: bool = True

    def tensor_names(self, e: int) -> list[str]:
        if self.fused is not None:
            return list(self.fused.values())
        prefix, names = self.per_expert
        out = [f"{prefix}.{e}.{n}.weight" for n in names]
        out += [f"{prefix}.{e}.{n}.bias" for n in names if f"{prefix}.{e}.{n}.bias" in self.index]
        return out

    def read(self, e: int, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """Expert ``e``'s tensors in the module's layout (``gate_up_proj`` is ``[2I, D]`` etc.), cast to ``dtype``,
        and the number of bytes read from disk."""
        if self.fused is not None:
            out = {p: self.index.read_row(name, e) for p, name in self.fused.items()}
        else:
            out = self._read_per_expert(e)
        for p, t in out.items():
            if tuple(t.shape) != self.params[p]:
                raise CheckpointError(f"{self.module_path}: expert {e} {p} has shape {tuple(t.shape)} in the "
                                      f"checkpoint, the model expects {self.params[p]}")
        nread = sum(t.nbytes for t in out.values())
        if dtype is not None:
            out = {p: t if t.dtype == dtype else t.to(dtype) for p, t in out.items()}
        return out, nread

    def _read_per_expert(self, e: int) -> dict[str, torch.Tensor]:
        prefix, names = self.per_expert
        r = self.index.read
        if self.has_gate and self.is_concatenated and not self.is_transposed and "gate_up_proj" in self.params:
            # [gate; up] rows are two contiguous halves of gate_up_proj: read each straight into its half (no cat)
            g, u, d = names
            ge, ue = self.index.entry(f"{prefix}.{e}.{g}.weight"), self.index.entry(f"{prefix}.{e}.{u}.weight")
            if ge.dtype == ue.dtype and ge.shape == ue.shape and (2 * ge.shape[0], *ge.shape[1:]) == self.params["gate_up_proj"]:
                gu = torch.empty(self.params["gate_up_proj"], dtype=ge.dtype)
                r(f"{prefix}.{e}.{g}.weight", out=gu[: ge.shape[0]])
                r(f"{prefix}.{e}.{u}.weight", out=gu[ge.shape[0]:])
                out = {"gate_up_proj": gu, "down_proj": r(f"{prefix}.{e}.{d}.weight")}
                for n, p in ((g, "gate_up_proj_bias"), (d, "down_proj_bias")):
                    if p in self.params and f"{prefix}.{e}.{n}.bias" in self.index:
                        out[p] = (torch.cat([r(f"{prefix}.{e}.{g}.bias"), r(f"{prefix}.{e}.{u}.bias")])
                                  if n == g else r(f"{prefix}.{e}.{d}.bias"))
                return {p: t for p, t in out.items() if p in self.params}
        w = {n: r(f"{prefix}.{e}.{n}.weight") for n in names}
        b = {n: r(f"{prefix}.{e}.{n}.bias") for n in names if f"{prefix}.{e}.{n}.bias" in self.index}
        out: dict[str, torch.Tensor] = {}
        if self.has_gate:
            g, u, d = names
            out["gate_up_proj"] = self._join(w[g], w[u], dim=0)  # [2I, D] Linear layout
            if g in b:
                out["gate_up_proj_bias"] = self._join(b[g], b[u], dim=0)
        else:
            u, d = names
            out["up_proj"] = w[u]
            if u in b:
                out["up_proj_bias"] = b[u]
        out["down_proj"] = w[d]
        if d in b:
            out["down_proj_bias"] = b[d]
        if self.is_transposed:
            for p in ("gate_up_proj", "up_proj", "down_proj"):
                if p in out:
                    out[p] = out[p].t().contiguous()
        return {p: t for p, t in out.items() if p in self.params}

    def _join(self, gate: torch.Tensor, up: torch.Tensor, dim: int) -> torch.Tensor:
        if self.is_concatenated:
            return torch.cat([gate, up], dim=dim)
        return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)  # g0 u0 g1 u1 ...


def expert_params(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The experts module's own stacked parameters (leading dim = num_experts) -> per-expert shape."""
    E = module.num_experts
    return {n: tuple(p.shape[1:]) for n, p in module.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == E}


def find_source(index: CheckpointIndex, module_path: str, module: torch.nn.Module) -> ExpertSource:
    """Locate ``module``'s experts in the checkpoint (fused or per expert) and check every tensor of every expert is
    there, so a checkpoint with a missing expert fails here, naming the tensor, before anything runs."""
    params = expert_params(module)
    E = module.num_experts
    flags = dict(is_transposed=getattr(module, "is_transposed", False),
                 is_concatenated=getattr(module, "is_concatenated", True), has_gate=getattr(module, "has_gate", True))
    for prefix in checkpoint_prefixes(module_path):
        if all(f"{prefix}.{p}" in index for p in params):
            fused = {p: f"{prefix}.{p}" for p in params}
            for p, name in fused.items():
                shape = index.entry(name).shape
                if shape[0] != E:
                    raise CheckpointError(f"tensor {name!r} in {index.entry(name).file} has {shape[0]} experts, "
                                          f"the model expects {E}")
            return ExpertSource(index, module_path, params, E, fused=fused, **flags)
        for names in GATED_NAMES if flags["has_gate"] else PLAIN_NAMES:
            if f"{prefix}.0.{names[0]}.weight" in index or f"{prefix}.{E - 1}.{names[0]}.weight" in index:
                for e in range(E):
                    for n in names:
                        name = f"{prefix}.{e}.{n}.weight"
                        if name not in index:
                            raise CheckpointError(f"checkpoint {index.dir} lacks expert tensor {name!r} (experts "
                                                  f"module {module_path}, expert {e} of {E})")
                return ExpertSource(index, module_path, params, E, per_expert=(prefix, names), **flags)
    tried = ", ".join(f"{p}.{{{','.join(params)}}} / {p}.<e>.<gate|up|down>.weight" for p in checkpoint_prefixes(module_path))
    raise CheckpointError(f"checkpoint {index.dir} has no expert tensors for {module_path} (looked for {tried})")
