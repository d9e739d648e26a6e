"""Expert parallelism composed with FSDP2 (``torch.distributed.fsdp.fully_shard``) on a ``DeviceMesh``.

The world is the 2-D mesh ``(dp, ep)`` of :func:`moekit.parallel.group_layout` (EP-major: rank = dp_rank * ep + ep_rank):

- the routed experts are split over the ``ep`` dimension by :func:`apply_expert_parallel` (tokens move by
  all-to-all); each EP shard is then either FSDP-sharded over the ``dp`` dimension (its replicas), or kept
  replicated there and reduced by :func:`reduce_expert_gradients`;
- every other (dense) parameter is FSDP-sharded over the whole world (``dense="fsdp"``), or HSDP: sharded over the
  ``ep`` dimension and replicated over ``dp`` (``dense="hsdp"``; with EP inside a node that keeps the dense
  all-gathers on the fast link), or left replicated (``dense="replicate"``, reduce with :func:`reduce_gradients`).

Gradient semantics are those of :mod:`moekit.parallel.grads`: a dense gradient is the mean over the world (FSDP's
reduce-scatter mean does it), an expert gradient the sum over its DP group divided by the *world* size (its FSDP
module gets ``set_gradient_divide_factor(world_size)``, since the all-to-all backward already summed over EP).

    groups = init_distributed(ep_size=2)
    model = build_model()                         # same seed everywhere (checked by apply_expert_parallel)
    apply_expert_parallel(model, groups)
    plan = apply_fsdp(model, groups, dense="fsdp", experts="fsdp")
    opt = torch.optim.AdamW(model.parameters())   # after apply_fsdp: the parameters are DTensors now
    ...; loss.backward(); plan.reduce_gradients(); opt.step()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..stats import _moe_layers
from .groups import ParallelGroups
from .shard import expert_parameters

DENSE_MODES = ("fsdp", "hsdp", "replicate")
EXPERT_MODES = ("fsdp", "replicate")


def _device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


@dataclass(frozen=True)
class ParallelMesh:
    """The device meshes of one EP x DP layout, built from a :class:`ParallelGroups` (so they share its process
    groups and their timeout). ``mesh``: ``(dp, ep)``; ``world``: 1-D over every rank; ``experts``: ``(ep, dp)``,
    the order in which a routed-expert tensor is split (EP blocks first, then FSDP inside a block), used for
    distributed checkpoints."""

    groups: ParallelGroups
    mesh: object  # DeviceMesh ("dp", "ep")
    world: object  # DeviceMesh ("world",)
    experts: object  # DeviceMesh ("ep", "dp")

    @property
    def dp(self):
        return self.mesh["dp"]

    @property
    def ep(self):
        return self.mesh["ep"]


def build_mesh(groups: ParallelGroups) -> ParallelMesh:
    """Device meshes over ``groups``' ranks (a collective-free wrap of the existing groups; call on every rank)."""
    from torch.distributed.device_mesh import DeviceMesh

    dt = _device_type()
    layout = torch.arange(groups.world_size).view(groups.dp_size, groups.ep_size)
    mesh = DeviceMesh.from_group([groups.dp, groups.ep], dt, mesh=layout, mesh_dim_names=("dp", "ep"))
    world = DeviceMesh.from_group(groups.world, dt, mesh=torch.arange(groups.world_size), mesh_dim_names=("world",))
    experts = DeviceMesh.from_group([groups.ep, groups.dp], dt, mesh=layout.t().contiguous(),
                                    mesh_dim_names=("ep", "dp"))
    return ParallelMesh(groups, mesh, world, experts)


@dataclass
class FSDPPlan:
    """What :func:`apply_fsdp` did, and the gradient reduction it still needs (:meth:`reduce_gradients`)."""

    mesh: ParallelMesh
    dense: str
    experts: str
    fsdp_modules: list = field(default_factory=list, repr=False)
    model: nn.Module | None = field(default=None, repr=False)

    def reduce_gradients(self) -> None:
        """The reduction FSDP does not do: replicated experts over their DP group (sum / world), replicated dense
        parameters over the world (mean). A no-op when both are FSDP-sharded. Call after ``backward()``."""
        from .grads import reduce_dense_gradients, reduce_expert_gradients

        if self.experts == "replicate":
            reduce_expert_gradients(self.model, self.mesh.groups)
        if self.dense == "replicate":
            reduce_dense_gradients(self.model, self.mesh.groups)


def apply_fsdp(
    model: nn.Module,
    groups: ParallelGroups | ParallelMesh,
    *,
    dense: str = "fsdp",
    experts: str = "fsdp",
    blocks: Iterable[nn.Module] = (),
    reshard_after_forward: bool = True,
    mp_policy=None,
) -> FSDPPlan:
    """Shard an expert-parallel ``model`` (after :func:`apply_expert_parallel`) with FSDP2, in place.

    Args:
        dense: ``"fsdp"`` (shard over the world), ``"hsdp"`` (shard over ``ep``, replicate over ``dp``) or
            ``"replicate"`` (no FSDP for dense parameters).
        experts: ``"fsdp"`` (each EP shard sharded over its ``dp`` replicas) or ``"replicate"``.
        blocks: extra submodules to wrap as their own FSDP units (e.g. transformer blocks), wrapped before the MoE
            layers and the root; fewer, larger units mean fewer collectives, more units lower peak memory.
        reshard_after_forward: free the gathered parameters after forward (ZeRO-3) or keep them to backward.
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` for every unit (dense and experts).

    With a one-rank ``dp`` dimension (``ep_size == world``) ``experts="fsdp"`` has nothing to shard and becomes
    ``"replicate"`` (``plan.experts`` says which was used).

    Build the optimizer after this call (the parameters become DTensors). Every MoE layer's ``forward_with_aux``
    is registered with FSDP, so calling it directly gathers the parameters too.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if dense not in DENSE_MODES:
        raise ValueError(f"apply_fsdp: dense={dense!r}; expected one of {DENSE_MODES}")
    if experts not in EXPERT_MODES:
        raise ValueError(f"apply_fsdp: experts={experts!r}; expected one of {EXPERT_MODES}")
    pm = groups if isinstance(groups, ParallelMesh) else build_mesh(groups)
    g = pm.groups
    layers = [m for _, m in _moe_layers(model)]
    if not layers:
        raise ValueError("apply_fsdp: the model has no moekit.MoE layer")
    for layer in layers:
        if getattr(layer, "expert_shard", None) is None and g.ep_size > 1:
            raise ValueError("apply_fsdp: call apply_expert_parallel(model, groups) first (the MoE layers are not "
                             f"sharded over the EP group of {g.ep_size} ranks)")
    mp = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    if experts == "fsdp" and g.dp_size == 1:
        experts = "replicate"  # a one-rank dp dimension has nothing to shard (and FSDP would skip the division)
    plan = FSDPPlan(pm, dense, experts, model=model)
    expert_params = {p for _, p in expert_parameters(model)}
    if experts == "fsdp":
        for layer in layers:
            fully_shard(layer.experts, mesh=pm.dp, reshard_after_forward=reshard_after_forward, mp_policy=mp)
            # FSDP averages over the dp replicas; the EP exchange already summed the EP group's tokens
            layer.experts.set_gradient_divide_factor(float(g.world_size))
            if dist.get_backend() == "gloo":  # gloo has no PREMUL_SUM (what FSDP would use in fp32): sum, then divide
                layer.experts.set_force_sum_reduction_for_comms(True)
            plan.fsdp_modules.append(layer.experts)
    if dense != "replicate":
        dense_mesh = pm.world if dense == "fsdp" else pm.mesh
        ignored = expert_params if experts == "replicate" else None
        for unit in [*blocks, *layers, model]:
            if unit is model and any(unit is u for u in plan.fsdp_modules):
                continue
            fully_shard(unit, mesh=dense_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp,
                        ignored_params=ignored)
            plan.fsdp_modules.append(unit)
    if dense != "replicate":
        for layer in layers:
            register_fsdp_forward_method(layer, "forward_with_aux")
    return plan


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def memory_per_rank(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds for the parameters and the optimizer state (the local shards of DTensors): what
    FSDP2 and EP divide, deterministic (activations and communication buffers are not counted)."""
    params = sum(_local_bytes(p) for p in model.parameters())
    optim = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            optim += sum(_local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"param_bytes": params, "optim_bytes": optim}
