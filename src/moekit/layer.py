"""``moekit.MoE``: a drop-in replacement for a dense FFN. route -> dispatch -> experts -> combine (+ shared)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .assignment import Assignment
from .balance.specs import AuxFree, BalanceSpec, bias_step
from .dispatch.local import Dropless
from .experts.bank import FFN, SwiGLU
from .routers.topk import TopK
from .spec import Spec, resolve, spec_from_dict
from .stats import RoutingStats, _moe_layers


@dataclass(frozen=True)
class MoEOutput:
    y: Tensor
    aux_loss: Tensor  # sum of the weighted balance losses (0 when there are none)
    losses: dict[str, Tensor]  # each weighted loss by name ("switch", "z", "cv2", ...)
    stats: RoutingStats
    assignment: Assignment


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    dim: int
    num_experts: int
    router: Any = field(default_factory=TopK)
    experts: Any = field(default_factory=SwiGLU)
    shared_experts: Any = None
    shared_gate: bool = False
    dispatch: Any = field(default_factory=Dropless)
    balance: tuple = ()
    check_inputs: bool = False

    def to_dict(self) -> dict[str, Any]:
        def ser(name: str, v: Any) -> Any:
            if v is None or isinstance(v, (int, float, bool, str)):
                return v
            if isinstance(v, Spec):
                return v.to_dict()
            if isinstance(v, tuple):
                return [ser(name, x) for x in v]
            raise TypeError(
                f"MoEConfig.{name} is a built {type(v).__name__}, not a spec; a layer built from modules cannot be "
                "serialized. Pass a spec (e.g. TopK(k=2)) to make it serializable."
            )

        return {f.name: ser(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "MoEConfig":
        d = dict(d)
        for key, family in (("router", "router"), ("experts", "experts"), ("shared_experts", "experts"), ("dispatch", "dispatch")):
            if d.get(key) is not None:
                d[key] = spec_from_dict(family, d[key])
        d["balance"] = tuple(spec_from_dict("balance", b) for b in d.get("balance", ()))
        return MoEConfig(**d)


class MoE(nn.Module):
    """Mixture-of-Experts FFN: called on ``(..., dim)``, returns the same shape.

    Args:
        dim: model dimension D.
        num_experts: routed experts E.
        router: a router spec (``TopK(k=2)``), a registered name (``"topk"``) or a built router module.
        experts: an expert spec (``SwiGLU(hidden_dim=F)``, ``MLP(hidden_dim=F, activation="gelu")``) or name.
        shared_experts: an FFN spec every token passes through (DeepSeekMoE, Qwen-MoE); its ``hidden_dim`` is the
            total hidden size of the shared experts.
        shared_gate: scale the shared output by sigmoid(x w) (Qwen2-MoE's ``shared_expert_gate``).
        dispatch: ``Dropless()`` or ``Capacity(factor=1.25)``.
        balance: one balance spec or a sequence: ``SwitchLoss(coef)``, ``ZLoss(coef)``, ``CV2Loss(coef)``,
            ``AuxFree(rate)``.
        check_inputs: raise on NaN or Inf in the input (costs a reduction per call).

    ``forward`` returns a Tensor; :meth:`forward_with_aux` returns :class:`MoEOutput`. After each call the weighted
    aux loss is also kept on the module (``last_aux_loss``, overwritten per call) for :func:`moekit.aux_loss`.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        router: Any = None,
        experts: Any = None,
        shared_experts: Any = None,
        shared_gate: bool = False,
        dispatch: Any = None,
        balance: Any = (),
        check_inputs: bool = False,
    ) -> None:
        super().__init__()
        if dim < 1 or num_experts < 1:
            raise ValueError(f"MoE: dim and num_experts must be >= 1, got dim={dim}, num_experts={num_experts}")
        router = resolve("router", router if router is not None else TopK())
        experts = resolve("experts", experts if experts is not None else SwiGLU())
        shared_experts = resolve("experts", shared_experts)
        dispatch = resolve("dispatch", dispatch if dispatch is not None else Dropless())
        if isinstance(balance, (BalanceSpec, str, dict)):
            balance = (balance,)
        balance = tuple(resolve("balance", b) for b in balance)
        aux_free = [b for b in balance if isinstance(b, AuxFree)]
        if len(aux_free) > 1:
            raise ValueError("MoE: at most one AuxFree balance policy")
        if aux_free and isinstance(router, TopK) and not router.correction_bias:
            router = dataclasses.replace(router, correction_bias=True)
        if shared_gate and shared_experts is None:
            raise ValueError("MoE: shared_gate=True needs shared_experts")
        self.config = MoEConfig(
            dim=dim, num_experts=num_experts, router=router, experts=experts, shared_experts=shared_experts,
            shared_gate=shared_gate, dispatch=dispatch, balance=balance, check_inputs=check_inputs,
        )
        self.dim, self.num_experts = dim, num_experts
        self.router = router.build(dim, num_experts) if isinstance(router, Spec) else router
        self.experts = experts.build(dim, num_experts) if isinstance(experts, Spec) else experts
        self.shared = shared_experts.build_dense(dim) if isinstance(shared_experts, FFN) else shared_experts
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_gate else None
        self.dispatcher = dispatch.build(num_experts) if isinstance(dispatch, Spec) else dispatch
        # a router that reads the expert bank (Autonomy-of-Experts) declares ``bind_experts(bank)``
        bind_experts = getattr(self.router, "bind_experts", None)
        if bind_experts is not None:
            bind_experts(self.experts)
        self.losses = tuple(b for b in balance if not isinstance(b, AuxFree))
        self.aux_free = aux_free[0] if aux_free else None
        if self.aux_free is not None:
            if getattr(self.router, "bias_E", None) is None:
                raise ValueError("MoE: AuxFree balancing needs a router with a bias_E buffer (e.g. TopK)")
            self.register_buffer("pending_counts_E", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.check_inputs = check_inputs
        self.accumulate_stats = False
        self.stats_total: RoutingStats | None = None
        self.last_aux_loss: Tensor | None = None

    @classmethod
    def from_config(cls, config: MoEConfig | dict) -> "MoE":
        if isinstance(config, dict):
            config = MoEConfig.from_dict(config)
        kw = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return cls(**kw)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter and buffer in place as construction does (e.g. after ``to_empty`` from the
        meta device): a fresh layer of the same config is built on the same device and copied in."""
        device = next(self.parameters()).device
        with torch.device(device):
            fresh = MoE.from_config(self.config)
        new = dict(fresh.named_parameters()) | dict(fresh.named_buffers())
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            if name in new and t is not None:
                t.copy_(new[name])

    def _check(self, x: Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE: expected input of shape (..., {self.dim}), got {tuple(x.shape)}")
        if self.check_inputs and not torch.isfinite(x).all():
            raise ValueError("MoE: input contains NaN or Inf")

    def forward(
        self, x: Tensor, *, task: Tensor | int | None = None, prev_logits: Tensor | None = None
    ) -> Tensor:
        return self.forward_with_aux(x, task=task, prev_logits=prev_logits).y

    def forward_with_aux(
        self, x: Tensor, *, task: Tensor | int | None = None, prev_logits: Tensor | None = None
    ) -> MoEOutput:
        """``prev_logits``: the previous MoE layer's routing logits (``out.assignment.logits_TE``) for routers with
        gating residuals (MoE++); passed to the router only when given."""
        self._check(x)
        x_TD = x.reshape(-1, self.dim)
        group_size = x.shape[-2] if x.dim() >= 3 else None

        if prev_logits is None:
            assignment = self.router(x_TD, task=task)
        else:
            assignment = self.router(x_TD, task=task, prev_logits=prev_logits.reshape(x_TD.shape[0], -1))
        # compute-free experts (zero / copy / constant, null) cost no matmul: only bank pairs are dispatched
        routed, free = assignment.split_free()
        plan = self.dispatcher.plan(routed, group_size)
        x_ND = self.dispatcher.dispatch(x_TD, plan)
        y_ND = self.experts(x_ND, plan.counts_E, plan.expert_N)
        y_TD = self.dispatcher.combine(y_ND, plan)
        if free is not None:
            y_TD = y_TD + self.router.free_experts(x_TD, free)

        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD

        losses = {b.type_name: b.loss(assignment) for b in self.losses}
        aux = sum(losses.values()) if losses else x_TD.new_zeros(())
        stats = RoutingStats(plan.kept_E.detach(), plan.routed_E.detach(), assignment.num_tokens)
        self._record(stats)
        self.last_aux_loss = aux
        return MoEOutput(y_TD.reshape(x.shape), aux, losses, stats, assignment)

    @torch.no_grad()
    def _record(self, stats: RoutingStats) -> None:
        if self.aux_free is not None and self.training:
            self.pending_counts_E += stats.routed_per_expert_E.to(self.pending_counts_E.device)
        if self.accumulate_stats:
            self.stats_total = stats if self.stats_total is None else self.stats_total + stats

    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free step: move the router's selection bias toward balance using the loads seen since the
        last update, then clear them. A no-op for layers without ``AuxFree``."""
        if self.aux_free is None or int(self.pending_counts_E.sum()) == 0:
            return
        bias_step(self.router.bias_E, self.pending_counts_E, self.aux_free.rate)
        self.pending_counts_E.zero_()


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the weighted aux losses of every MoE layer's last call (0 if there are none)."""
    total: Tensor | float = 0.0
    for _, m in _moe_layers(model):
        if m.last_aux_loss is not None:
            total = total + m.last_aux_loss
    return total if isinstance(total, Tensor) else torch.zeros(())


def update_balance_bias(model: nn.Module) -> None:
    """Run the auxiliary-loss-free bias update of every MoE layer; call after ``optimizer.step()``."""
    for _, m in _moe_layers(model):
        m.update_bias()


def attach_bias_update(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Register :func:`update_balance_bias` as an optimizer step post-hook; returns the removable handle."""
    return optimizer.register_step_post_hook(lambda *_: update_balance_bias(model))
