"""Load balancing across ranks.

- :class:`GlobalBatchSwitchLoss`: the Switch loss with the expert frequencies ``f_e`` counted over the global
  batch (every rank of a group) instead of the rank's micro-batch (Qiu et al. 2025, "Demons in the Detail: On
  Implementing Load Balancing Loss for Training Specialized Mixture-of-Expert Models"). A micro-batch holds few
  sequences, so the micro-batch loss pushes every sequence to spread over all experts; the global-batch loss asks for
  balance over the corpus and lets experts specialise. One extra all-reduce of ``E + 2`` numbers per layer.
- :func:`sync_balance_counts`: sums the auxiliary-loss-free pending counts over the ranks, so that
  :func:`moekit.update_balance_bias` moves the bias identically on every rank (the bias stays equal everywhere).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..assignment import Assignment
from ..balance.losses import _probs_TE
from ..balance.specs import BalanceSpec, SwitchLoss
from ..layer import update_balance_bias
from ..stats import _moe_layers
from .comm import all_reduce_


@dataclasses.dataclass(frozen=True, kw_only=True)
class GlobalBatchSwitchLoss(BalanceSpec):
    """``coef * E * sum_e f_e^global * P_e^rank`` with ``f_e^global`` the fraction of all routed pairs of the group
    that chose ``e`` and ``P_e^rank = (sum of this rank's router probabilities of e) / (T_global / R)``.

    The ``P`` normalisation makes the *mean over ranks* of this loss (what data-parallel gradient averaging
    optimises) equal to the single-process Switch loss on the concatenated batch, for any per-rank batch sizes.
    A runtime object (it holds a process group), installed by :func:`use_global_batch_balance`; the layer's
    serialised config keeps the plain ``SwitchLoss``. Its entry in ``MoEOutput.losses`` is still ``"switch"``.
    """

    type_name: ClassVar[str] = "switch"
    coef: float = 0.01
    group: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __deepcopy__(self, memo) -> "GlobalBatchSwitchLoss":
        return self  # immutable, and its process group cannot be copied

    def loss(self, a: Assignment) -> Tensor:
        probs_TE = _probs_TE(a)
        sums = torch.cat([
            a.counts_E().to(torch.float64),
            torch.tensor([a.num_pairs, a.num_tokens], dtype=torch.float64, device=a.expert_N.device),
        ])
        all_reduce_(sums, self.group, "all_reduce (global-batch balance counts)")
        ranks = dist.get_world_size(self.group)
        counts_E, pairs, tokens = sums[:-2], sums[-2], sums[-1]
        f_E = (counts_E / pairs.clamp_min(1)).to(probs_TE.dtype)
        P_E = probs_TE.sum(0) * (ranks / tokens.clamp_min(1)).to(probs_TE.dtype)
        return self.coef * a.num_experts * (f_E * P_E).sum()


def use_global_batch_balance(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Swap every MoE layer's ``SwitchLoss`` for a :class:`GlobalBatchSwitchLoss` over ``group`` (default: world).
    Returns how many losses were swapped. Call it identically on every rank."""
    group = group if group is not None else dist.group.WORLD
    swapped = 0
    for _, layer in _moe_layers(model):
        new = []
        for b in layer.losses:
            if type(b) is SwitchLoss:
                b = GlobalBatchSwitchLoss(coef=b.coef, group=group)
                swapped += 1
            new.append(b)
        layer.losses = tuple(new)
    return swapped


@torch.no_grad()
def sync_balance_counts(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum every AuxFree layer's pending expert counts over ``group`` (default: world), in place."""
    pending = [layer.pending_counts_E for _, layer in _moe_layers(model) if layer.aux_free is not None]
    if not pending:
        return
    flat = torch.cat(pending)
    all_reduce_(flat, group, "all_reduce (aux-free expert counts)")
    for p, chunk in zip(pending, flat.split([p.numel() for p in pending])):
        p.copy_(chunk)


def update_balance_bias_distributed(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """:func:`sync_balance_counts` then :func:`moekit.update_balance_bias`: the bias moves by the global loads and
    stays identical on every rank. Call after ``optimizer.step()`` on every rank."""
    sync_balance_counts(model, group)
    update_balance_bias(model)


def attach_bias_update_distributed(optimizer: torch.optim.Optimizer, model: nn.Module, group=None):
    """Register :func:`update_balance_bias_distributed` as an optimizer step post-hook; returns the handle."""
    return optimizer.register_step_post_hook(lambda *_: update_balance_bias_distributed(model, group))
