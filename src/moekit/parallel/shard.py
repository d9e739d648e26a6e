"""Turn a built single-process MoE into an expert-parallel one: keep this rank's slice of the routed experts and
replace the dispatcher by the all-to-all one. Router, shared experts and gates stay whole (dense, replicated)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import torch.distributed as dist
from torch import nn

from ..layer import MoE
from ..stats import _moe_layers
from .dispatcher import AllToAllDispatcher
from .groups import ParallelGroups


@dataclass(frozen=True)
class ExpertShard:
    """Which routed experts a layer holds: global experts ``[start, stop)`` of ``num_experts``."""

    rank: int
    size: int
    num_experts: int

    @property
    def num_local(self) -> int:
        return self.num_experts // self.size

    @property
    def start(self) -> int:
        return self.rank * self.num_local

    @property
    def stop(self) -> int:
        return self.start + self.num_local


def expert_shard(layer: MoE) -> ExpertShard:
    """The layer's shard; an unsharded layer holds all experts (rank 0 of 1)."""
    return getattr(layer, "expert_shard", None) or ExpertShard(0, 1, layer.num_experts)


def _slice_experts(experts: nn.Module, num_experts: int, start: int, stop: int) -> nn.Module:
    local = copy.deepcopy(experts)
    for mod_name, mod in local.named_modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dim() == 0 or p.shape[0] != num_experts:
                where = f"{mod_name}.{name}" if mod_name else name
                raise ValueError(
                    f"shard_experts: expert parameter {where!r} has shape {tuple(p.shape)}; every parameter of the "
                    f"expert module must have the expert axis first (size {num_experts}) to be sharded"
                )
            setattr(mod, name, nn.Parameter(p.detach()[start:stop].clone(), requires_grad=p.requires_grad))
    if hasattr(local, "num_experts"):
        local.num_experts = stop - start
    return local


def shard_experts(layer: MoE, group: dist.ProcessGroup | ParallelGroups) -> MoE:
    """In place: keep this rank's ``E / ep_size`` routed experts and exchange tokens over ``group`` (the EP group).

    All ranks must hold the same layer (same weights) when they call this; the easiest way is to build it with the
    same seed everywhere, or load a checkpoint. Raises ``ValueError`` when ``E`` is not divisible by the group size.
    """
    if isinstance(group, ParallelGroups):
        group = group.ep
    if not isinstance(layer, MoE):
        raise TypeError(f"shard_experts expects a moekit.MoE, got {type(layer).__name__}")
    if getattr(layer, "expert_shard", None) is not None:
        raise ValueError("shard_experts: this layer is already expert-parallel")
    if layer.reads_experts:
        raise ValueError(
            f"shard_experts: the router {type(layer.router).__name__} reads the expert weights of every expert "
            "(e.g. Autonomy-of-Experts), so its experts cannot be sharded over ranks"
        )
    size, rank, E = dist.get_world_size(group), dist.get_rank(group), layer.num_experts
    if E % size:
        raise ValueError(
            f"shard_experts: {E} experts cannot be split evenly over an expert-parallel group of {size} ranks; "
            f"choose an EP size that divides {E} (valid: {[d for d in range(1, E + 1) if E % d == 0]})"
        )
    shard = ExpertShard(rank, size, E)
    layer.experts = _slice_experts(layer.experts, E, shard.start, shard.stop)
    layer.dispatcher = AllToAllDispatcher(layer.dispatcher, group, E)
    layer.expert_shard = shard
    return layer


def apply_expert_parallel(
    model: nn.Module,
    groups: ParallelGroups | dist.ProcessGroup,
    *,
    global_balance: bool = False,
    balance_group: dist.ProcessGroup | None = None,
    verify: bool = True,
    check_values: bool = True,
    seed: int | None = None,
) -> nn.Module:
    """Shard every MoE layer of ``model`` over the EP group (in place; returns ``model``).

    Args:
        groups: a :class:`ParallelGroups` (EP group used for experts) or the EP process group itself.
        global_balance: replace each layer's ``SwitchLoss`` by :class:`GlobalBatchSwitchLoss`, whose expert
            frequencies are summed over ``balance_group`` (default: the whole world, i.e. every rank that sees
            different data) before the loss is computed ("Demons in the Detail", Qiu et al. 2025).
        verify: first check that every rank of the world built the same model (configs, parameter shapes and
            dtypes, ``seed`` when given, and with ``check_values`` the initial weights): a mismatch raises
            :class:`moekit.parallel.ConsistencyError` on every rank, naming the field and the ranks. A collective
            when the world has more than one rank. ``check_values=False`` when the weights are broadcast
            (:func:`broadcast_parameters`) or loaded after this call.
    """
    from .balance import use_global_batch_balance
    from .consistency import verify_consistent

    ep = groups.ep if isinstance(groups, ParallelGroups) else groups
    layers = [m for _, m in _moe_layers(model)]
    if not layers:
        raise ValueError("apply_expert_parallel: the model has no moekit.MoE layer")
    if verify and dist.is_initialized():
        verify_consistent(model, dist.group.WORLD, seed=seed, values=check_values)
    for layer in layers:
        shard_experts(layer, ep)
    if global_balance:
        use_global_batch_balance(model, balance_group if balance_group is not None else dist.group.WORLD)
    return model


def expert_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every routed-expert parameter of every MoE layer (sharded or not)."""
    ids = set()
    for lname, layer in _moe_layers(model):
        for pname, p in layer.experts.named_parameters():
            if id(p) not in ids:
                ids.add(id(p))
                yield (f"{lname}.experts.{pname}" if lname else f"experts.{pname}"), p


def dense_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every parameter that is not a routed expert (replicated on all ranks)."""
    ids = {id(p) for _, p in expert_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) not in ids:
            yield name, p
