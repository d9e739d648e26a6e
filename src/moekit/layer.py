"""``moekit.MoE``: a drop-in replacement for a dense FFN. route -> dispatch -> experts -> combine (+ free, + shared).

Shape legend (suffixes on tensor names):
    B batch, S sequence; any leading dims of the input flatten to T tokens
    T tokens in the call        D model dim            F expert hidden dim
    E routed experts (the bank's, then any compute-free ones)
    N (token, expert) pairs     K experts per token (slots) of a top-k grid

The layer is a composition of parts behind the contracts of :mod:`moekit.protocols`: a Router, a Dispatcher, an
ExpertBank, optional FreeExperts beside the bank, optional shared experts, BalancePolicy losses and an optional
selection-bias policy (AuxFree). What a router needs is read once, at construction, from its spec's declarations
(:class:`moekit.routers.base.RouterSpec`); ``forward`` never asks what kind of part it holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .assignment import Assignment
from .balance.aux_free import AuxFree
from .balance.specs import BalanceSpec
from .dispatch.local import Dropless
from .dispatch.plan import DispatchPlan
from .experts.bank import FFN, SwiGLU
from .fused_decode import MAX_TOKENS as FUSED_MAX_TOKENS, fusion_for
from .protocols import RouteContext
from .routers.base import RouterSpec
from .routers.topk import TopK
from .spec import Spec, resolve, spec_from_dict
from .stats import RoutingStats
from .walk import MoELayerBase, moe_layers


@dataclass(frozen=True)
class MoEOutput:
    y: Tensor  # the layer output, the input's shape
    aux_loss: Tensor  # sum of the weighted balance losses (0 when there are none)
    losses: dict[str, Tensor]  # each weighted loss by name ("switch", "z", "cv2", ...)
    stats: RoutingStats  # this call's routing statistics
    assignment: Assignment  # the router's pairs over all E experts, with the plan's counts (``routed_E``)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Everything that defines an MoE layer; ``to_dict`` / ``from_dict`` round-trip it through plain dicts."""

    dim: int  # D, the model dimension
    num_experts: int  # E, experts in the bank (compute-free experts a router adds come on top)
    router: RouterSpec | nn.Module = field(default_factory=TopK)  # who routes: a router spec (or a built router)
    experts: Spec | nn.Module = field(default_factory=SwiGLU)  # the expert bank's spec (SwiGLU, MLP, HeteroFFN, ...)
    shared_experts: FFN | nn.Module | None = None  # an FFN every token passes through (DeepSeekMoE, Qwen-MoE)
    shared_gate: bool = False  # scale the shared output by sigmoid(x w) (Qwen2-MoE's shared_expert_gate)
    dispatch: Spec | nn.Module = field(default_factory=Dropless)  # Dropless() or Capacity(...)
    balance: tuple[Spec, ...] = ()  # balance losses (SwitchLoss, ZLoss, ...) and at most one AuxFree
    check_inputs: bool = False  # raise on NaN / Inf inputs (one reduction per call)

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


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MoE: {name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"MoE: {name} must be >= 1, got {value}")
    return value


def _split_balance(balance: tuple) -> tuple[tuple[BalanceSpec, ...], AuxFree | None]:
    losses, bias_policies = [], []
    for b in balance:
        if isinstance(b, AuxFree):
            bias_policies.append(b)
        elif isinstance(b, BalanceSpec):
            losses.append(b)
        else:
            raise TypeError(f"MoE: balance entries must be balance specs (SwitchLoss, AuxFree, ...), got {b!r}")
    if len(bias_policies) > 1:
        raise ValueError("MoE: at most one AuxFree balance policy")
    return tuple(losses), (bias_policies[0] if bias_policies else None)


class MoE(MoELayerBase):
    """Mixture-of-Experts FFN: called on ``(..., dim)``, returns the same shape.

    Args:
        dim: model dimension D.
        num_experts: routed experts E.
        router: a router spec (``TopK(k=2)``), a registered name (``"topk"``) or a built router module.
        experts: an expert spec (``SwiGLU(hidden_dim=F)``, ``MLP(hidden_dim=F, activation="gelu")``) or name.
        shared_experts: an FFN spec every token passes through (DeepSeekMoE, Qwen-MoE); its ``hidden_dim`` is the
            total hidden size of the shared experts.
        shared_gate: scale the shared output by sigmoid(x w) (Qwen2-MoE's ``shared_expert_gate``).
        dispatch: ``Dropless()`` or ``Capacity(factor=1.25)``; ``weight_at="input"`` on either scales each token by
            its router weight before the experts instead of after (Llama 4).
        balance: one balance spec or a sequence: ``SwitchLoss(coef)``, ``ZLoss(coef)``, ``CV2Loss(coef)``,
            ``AuxFree(rate)``.
        check_inputs: raise on NaN or Inf in the input (costs a reduction per call).

    ``forward`` returns a Tensor; :meth:`forward_with_aux` returns :class:`MoEOutput`. After each call the weighted
    aux loss is also kept on the module (``last_aux_loss``, overwritten per call) for :func:`moekit.aux_loss`.

    Inputs must be floating point with the layer's parameter dtype (cast the layer with ``.to(dtype)`` or the input);
    a mismatch raises a ValueError naming both dtypes.
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
        dim, num_experts = _positive_int("dim", dim), _positive_int("num_experts", num_experts)
        router = resolve("router", router if router is not None else TopK())
        experts = resolve("experts", experts if experts is not None else SwiGLU())
        shared_experts = resolve("experts", shared_experts)
        dispatch = resolve("dispatch", dispatch if dispatch is not None else Dropless())
        if isinstance(balance, (Spec, str, dict)):
            balance = (balance,)
        balance = tuple(resolve("balance", b) for b in balance)
        losses, aux_free = _split_balance(balance)
        is_spec = isinstance(router, RouterSpec)
        if aux_free is not None and is_spec:
            router = router.with_selection_bias()
        if shared_gate and shared_experts is None:
            raise ValueError("MoE: shared_gate=True needs shared_experts")
        self.config = MoEConfig(
            dim=dim, num_experts=num_experts, router=router, experts=experts, shared_experts=shared_experts,
            shared_gate=shared_gate, dispatch=dispatch, balance=balance, check_inputs=check_inputs,
        )
        self.dim, self.num_experts = dim, num_experts
        # what the router declares it reads (a built router module is trusted to read what it is given)
        self.router_spec: RouterSpec | None = router if is_spec else None
        self.task_conditioned = router.task_conditioned if is_spec else True
        self.needs_token_ids = router.needs_token_ids if is_spec else False
        self.needs_prev_logits = router.needs_prev_logits if is_spec else True
        self.reads_experts = router.reads_experts if is_spec else hasattr(router, "bind_experts")

        self.router = router.build(dim, num_experts) if is_spec else router
        self.experts = experts.build(dim, num_experts) if isinstance(experts, Spec) else experts
        self.free_experts = router.build_free_experts(dim) if is_spec else None
        self.shared = shared_experts.build_dense(dim) if isinstance(shared_experts, FFN) else shared_experts
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_gate else None
        self.dispatcher = dispatch.build(num_experts) if isinstance(dispatch, Spec) else dispatch
        if is_spec and self.reads_experts:
            self.router.bind_experts(self.experts)
        if self.free_experts is not None and getattr(self.dispatcher, "weight_at", "output") != "output":
            raise ValueError(
                f"MoE: dispatch weight_at={self.dispatcher.weight_at!r} cannot be combined with compute-free experts "
                f"({type(self.router).__name__}); they weight their outputs, so use weight_at='output'"
            )
        self.losses = losses
        self.aux_free = aux_free
        self.balancer = aux_free.build(num_experts) if aux_free is not None else None
        if aux_free is not None and self.router.bias_E is None:
            raise ValueError(
                f"MoE: AuxFree balancing needs a router with a selection bias (e.g. TopK); "
                f"{type(self.router).__name__} has none"
            )
        self.check_inputs = check_inputs
        self.accumulate_stats = False
        self.stats_total: RoutingStats | None = None
        self.last_aux_loss: Tensor | None = None
        self.routing_log: list[Tensor] | None = None  # set by moekit.replay.record_routing: (T, K) choices per call
        self.replay_queue: list[Tensor] | None = None  # set by moekit.replay.replay_routing: choices to reuse
        self._register_load_state_dict_pre_hook(_free_experts_old_keys)
        self.fuse_decode()

    def fuse_decode(self, enable: bool = True) -> str | None:
        """Run calls of a few tokens outside autograd in eval mode as one native call
        (:mod:`moekit.fused_decode`); on by default where the parts allow it. Returns None when fused, else why
        not. ``enable=False`` turns it off (every call then runs the composed path)."""
        self.decode_fusion, why = fusion_for(self) if enable else (None, "turned off")
        return why

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

    @property
    def pending_counts_E(self) -> Tensor | None:
        """The aux-free policy's pending expert counts (None without AuxFree)."""
        return None if self.balancer is None else self.balancer.pending_counts_E

    # --- forward: plain composition ------------------------------------------------------------------------------
    def forward(self, x: Tensor, *, task: Tensor | int | None = None, prev_logits: Tensor | None = None,
                token_ids: Tensor | None = None, token_mask: Tensor | None = None) -> Tensor:
        if task is None and prev_logits is None and token_ids is None and token_mask is None:
            fusion = self.decode_fusion
            if fusion is not None:
                out = fusion.quick(self, x)  # (None unless the last fused call's parts are all still in place)
                if out is not None:
                    return out[0]
            fused = self._fused(x)
            if fused is not None:
                return fused[0]
        return self.forward_with_aux(x, task=task, prev_logits=prev_logits, token_ids=token_ids,
                                     token_mask=token_mask).y

    def forward_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(self(x), router logits (T, E))``, as one native call where the fused decode path applies (its kernel
        returns the logits it routed on), else from :meth:`forward_with_aux`. For wrappers that must hand the
        logits on (a swapped Hugging Face block)."""
        fusion = self.decode_fusion
        if fusion is not None:
            out = fusion.quick(self, x, logits=True)
            if out is not None:
                return out
        fused = self._fused(x, logits=True)
        if fused is not None:
            return fused
        out = self.forward_with_aux(x)
        return out.y, out.assignment.logits_TE

    def forward_with_aux(self, x: Tensor, *, task: Tensor | int | None = None, prev_logits: Tensor | None = None,
                         token_ids: Tensor | None = None, token_mask: Tensor | None = None) -> MoEOutput:
        """Route, dispatch, run the experts, combine; add compute-free and shared experts; balance losses and stats.

        Args:
            x: (..., D) hidden states.
            task: a task id or one per token, for task-conditioned routers (an error for other routers).
            prev_logits: the previous MoE layer's routing logits (``out.assignment.logits_TE``), for routers with
                gating residuals (MoE++).
            token_ids: (...) vocabulary ids, for routers that hash them (Hash layers).
            token_mask: bool (...), False at padded tokens: balance losses and statistics skip them.
        """
        x_TD = self._tokens(x)
        ctx = self._context(x, x_TD, task, prev_logits, token_ids, token_mask)
        a = self.router(x_TD, ctx)
        if self.routing_log is not None:
            self.routing_log.append(a.expert_N.detach().view(-1, a.num_tokens).t().clone())
        bank, free = a.split_free()  # compute-free pairs never reach the bank
        plan = self.dispatcher.plan(bank, x.shape[-2] if x.dim() >= 3 else None)  # immutable DispatchPlan
        x_ND, handle = self.dispatcher.dispatch(x_TD, plan)
        y_ND = self.experts(x_ND, plan.counts_E, plan.expert_N)
        y_TD = self.dispatcher.combine(y_ND, plan, handle)
        if free is not None:
            y_TD = y_TD + self.free_experts(x_TD, free)
        if self.shared is not None:
            y_TD = y_TD + self._shared(x_TD)

        a = self._counted(a, plan.routed_E, free, ctx.token_mask_T)
        losses = {b.type_name: b.loss(a) for b in self.losses}
        aux = sum(losses.values()) if losses else x_TD.new_zeros(())
        stats = self._stats(a, plan)
        self._record(stats)
        self.last_aux_loss = aux
        return MoEOutput(y_TD.reshape(x.shape), aux, losses, stats, a)

    def _fused(self, x: Tensor, logits: bool = False) -> tuple[Tensor, Tensor | None] | None:
        """The call in one native kernel where a call without per-call arguments may take the fused decode path now
        (the composed path's input checks first): ``(y, logits or None)``, else None. No balance losses or
        statistics (eval mode, where nothing reads them)."""
        fused = self.decode_fusion  # (DecodeFusion.quick repeats these checks, from the layer's __dict__)
        if (fused is None or self.training or self.routing_log is not None or self.replay_queue is not None
                or self.accumulate_stats or torch.compiler.is_compiling()  # (tracing: no guard on the token count)
                or not isinstance(x, Tensor) or x.dim() < 1
                or not 0 < x.numel() <= FUSED_MAX_TOKENS * x.shape[-1]):
            return None
        if x.shape[-1] != self.dim or not x.is_floating_point():
            return None  # (the composed path raises the error)
        if self.check_inputs and not torch.isfinite(x).all():
            raise ValueError("MoE: input contains NaN or Inf")
        # (T, D) as given: no view to build (a decode call is ~0.2 ms of Python after the weights have swept the
        # caches; each object touched costs); the weights' dtype is checked by the fusion, which declines a mismatch
        x_TD = x if x.dim() == 2 else x.reshape(-1, self.dim)
        out = fused.run(self, x_TD, logits)
        if out is None:
            return None
        y_TD, logits_TE = out
        if self.shared is not None:
            y_TD = y_TD + self._shared(x_TD)
        self.last_aux_loss = None
        return (y_TD if x.dim() == 2 else y_TD.reshape(x.shape)), logits_TE

    # --- the steps --------------------------------------------------------------------------------------------------
    def _tokens(self, x: Tensor) -> Tensor:
        """Check the input and flatten it to (T, D)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"MoE: expected a Tensor input, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE: expected input of shape (..., {self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"MoE: input must be floating point, got dtype {x.dtype}; cast it, e.g. x.float()")
        dtype = self.param_dtype()
        if dtype is not None and x.dtype != dtype and not _autocast_on(x):
            raise ValueError(
                f"MoE: input dtype {x.dtype} does not match the layer's parameter dtype {dtype}; cast the input "
                f"(x.to({dtype})) or the layer (layer.to({x.dtype}))"
            )
        if self.check_inputs and not torch.isfinite(x).all():
            raise ValueError("MoE: input contains NaN or Inf")
        return x.reshape(-1, self.dim)

    def param_dtype(self) -> torch.dtype | None:
        """The dtype of the expert bank's first parameter (None for a bank without parameters)."""
        for p in self.experts._parameters.values():  # the bank's own first: what parameters() yields first,
            if p is not None:  # without its recursive walk (a few microseconds per call at decode)
                return p.dtype
        for p in self.experts.parameters():
            return p.dtype
        return None

    def _context(self, x: Tensor, x_TD: Tensor, task: Any, prev_logits: Tensor | None, token_ids: Tensor | None,
                 token_mask: Tensor | None) -> RouteContext:
        if token_ids is None and self.needs_token_ids and isinstance(task, Tensor):
            token_ids, task = task, None  # the older spelling: Hash's token ids passed as task=
        if task is not None and not self.task_conditioned:
            raise ValueError(
                f"MoE: task={task!r} given but the router {type(self.router).__name__} is not task-conditioned and "
                "would ignore it; drop task= or use a task router (MultiGate, TaskEmbedGate, TaskExperts)"
            )
        if prev_logits is not None and not self.needs_prev_logits:
            raise ValueError(
                f"MoE: prev_logits given but the router {type(self.router).__name__} does not read them "
                "(for MoEPP: it was built with gating_residual=False)"
            )
        if token_ids is not None and not self.needs_token_ids:
            raise ValueError(f"MoE: token_ids given but the router {type(self.router).__name__} does not read them")
        T = x_TD.shape[0]
        if token_ids is not None:
            if not isinstance(token_ids, Tensor) or token_ids.numel() != T:
                raise ValueError(f"MoE: token_ids must be a tensor with one id per token ({T}), got "
                                 f"{tuple(token_ids.shape) if isinstance(token_ids, Tensor) else type(token_ids).__name__}")
            token_ids = token_ids.reshape(T)
        if token_mask is not None:
            if not isinstance(token_mask, Tensor) or tuple(token_mask.shape) != tuple(x.shape[:-1]):
                got = tuple(token_mask.shape) if isinstance(token_mask, Tensor) else type(token_mask).__name__
                raise ValueError(f"MoE: token_mask must have the input's leading shape {tuple(x.shape[:-1])}, got {got}")
            token_mask = token_mask.reshape(T).to(device=x_TD.device, dtype=torch.bool)
        replay = None
        if self.replay_queue is not None:
            if not self.replay_queue:
                raise ValueError("MoE: router replay ran out of recorded calls for this layer")
            replay = self.replay_queue.pop(0)
        return RouteContext(task=task, token_ids_T=token_ids, prev_logits_TE=prev_logits, token_mask_T=token_mask,
                            replay_idx_TK=replay)

    def _shared(self, x_TD: Tensor) -> Tensor:
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        return shared_TD

    @staticmethod
    def _counted(a: Assignment, routed_bank_E: Tensor, free: Assignment | None, mask_T: Tensor | None) -> Assignment:
        """The assignment with the plan's counts over all E experts (bank, then compute-free) and the token mask, so
        that balance losses do not recount."""
        routed_E = routed_bank_E if free is None else torch.cat([routed_bank_E, free.counts_E()])
        return a.with_counts(routed_E, mask_T)

    @staticmethod
    def _stats(a: Assignment, plan: DispatchPlan) -> RoutingStats:
        if a.token_mask_T is None:  # counts are integer tensors, so they need no detach (an op per call) as a rule
            return RoutingStats(_detached(plan.kept_E), _detached(plan.routed_E), a.num_tokens)
        nb = a.num_bank_experts  # padded tokens excluded: their pairs are neither routed nor computed load
        routed_E = a.counts_E()[:nb].detach()
        padded_E = plan.routed_E.detach() - routed_E
        return RoutingStats((plan.kept_E.detach() - padded_E).clamp_min(0), routed_E, a.num_real_tokens)

    def _record(self, stats: RoutingStats) -> None:
        record = self.balancer is not None and self.training
        if not (record or self.accumulate_stats):
            return  # nothing to record: no grad-mode switch either (a few microseconds per call at decode)
        with torch.no_grad():
            if record:
                self.balancer.record(stats.routed_per_expert_E)
            if self.accumulate_stats:
                self.stats_total = stats if self.stats_total is None else self.stats_total + stats

    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free step: move the router's selection bias toward balance using the loads seen since the
        last update, then clear them. A no-op for layers without ``AuxFree``."""
        if self.balancer is not None:
            self.balancer.step(self.router.bias_E)


def _detached(t: Tensor) -> Tensor:
    return t.detach() if t.requires_grad else t


def _autocast_on(x: Tensor) -> bool:
    """Whether autocast is on for x's device (mixed dtypes are then intended); False for devices without autocast."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # e.g. the meta device
        return False


def _free_experts_old_keys(state_dict, prefix, *args) -> None:
    """Checkpoints from before compute-free experts became a layer part kept them under ``router.free_experts``."""
    old = prefix + "router.free_experts."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "free_experts." + key[len(old):]] = state_dict.pop(key)


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the weighted aux losses of every MoE layer's last call (0 if there are none)."""
    total: Tensor | float = 0.0
    for _, m in moe_layers(model):
        if m.last_aux_loss is not None:
            total = total + m.last_aux_loss
    return total if isinstance(total, Tensor) else torch.zeros(())


def update_balance_bias(model: nn.Module) -> None:
    """Run the auxiliary-loss-free bias update of every MoE layer; call after ``optimizer.step()``."""
    for _, m in moe_layers(model):
        m.update_bias()


def attach_bias_update(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Register :func:`update_balance_bias` as an optimizer step post-hook; returns the removable handle."""
    return optimizer.register_step_post_hook(lambda *_: update_balance_bias(model))
