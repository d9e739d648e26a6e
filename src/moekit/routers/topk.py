"""Token-choice top-k routing: Switch (k=1), GShard/Mixtral (k=2, renormalised), Qwen-MoE (not renormalised),
DeepSeek-V3 (sigmoid scores, group-limited selection, a score-correction bias used only for selection).

References: Shazeer et al. 2017 (noisy top-k gating), Lepikhin et al. 2020 (GShard), Fedus et al. 2021 (Switch),
DeepSeek-AI 2024 (DeepSeek-V3: sigmoid affinities, node/group-limited routing, auxiliary-loss-free bias).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..assignment import Assignment
from ..numerics import HALF_DTYPES, as_dtype, renormalize
from ..spec import register_spec
from ..protocols import RouteContext
from .base import Router, RouterSpec

_SCORES = ("softmax", "sigmoid")
_DTYPES = ("float16", "bfloat16", "float32", "float64")


@register_spec("topk", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class TopK(RouterSpec):
    """Token-choice top-k.

    Args:
        k: experts per token (k=1 is Switch).
        score: ``"softmax"`` over all experts or per-expert ``"sigmoid"`` (DeepSeek-V3).
        normalize: renormalise the k selected scores to sum to one (Mixtral, DeepSeek-V3); if False the weight is
            the raw score (Switch, Qwen2-MoE default).
        scale: multiply the combine weights (DeepSeek-V3 ``routed_scaling_factor``).
        jitter: Switch multiplicative jitter on the router input, U(1-jitter, 1+jitter), training only.
        noise_std: additive Gaussian noise N(0, noise_std^2) on the logits, training only (V-MoE / M3ViT).
        noisy_gating: Shazeer's learned noise, logits + eps * softplus(x W_noise), training only.
        n_group, topk_group: group-limited selection (DeepSeek-V3): experts are split in ``n_group`` groups, each
            group scored by ``group_score`` and only the best ``topk_group`` groups are eligible.
        group_score: ``"top2sum"`` (DeepSeek-V3) or ``"max"`` (DeepSeek-V2).
        correction_bias: keep a ``bias_E`` buffer added to the scores for *selection only* (DeepSeek-V3). Turned on
            automatically when the layer's balance includes :class:`moekit.AuxFree`.
        router_bias: a bias on the router's linear map.
        fp32: compute the router in at least float32 when the input is half precision.
        logits_dtype: compute the logits in this dtype whatever the input dtype (overrides ``fp32``; Hugging Face
            DeepSeek-V3 and SwitchTransformers route in ``"float32"``).
        score_dtype: apply the score function, selection and renormalisation in this dtype (Hugging Face Mixtral,
            Qwen-MoE and OLMoE take the softmax of input-dtype logits in ``"float32"``); the combine weights are
            cast back to the input dtype. ``None``: the logits' dtype.
    """

    supports_replay = True
    k: int = 2
    score: str = "softmax"
    normalize: bool = True
    scale: float = 1.0
    jitter: float = 0.0
    noise_std: float = 0.0
    noisy_gating: bool = False
    n_group: int | None = None
    topk_group: int | None = None
    group_score: str = "top2sum"
    correction_bias: bool = False
    router_bias: bool = False
    fp32: bool = True
    logits_dtype: str | None = None
    score_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"TopK: k must be >= 1, got {self.k}")
        if self.score not in _SCORES:
            raise ValueError(f"TopK: unknown score function {self.score!r}; valid choices: {', '.join(_SCORES)}")
        if self.group_score not in ("top2sum", "max"):
            raise ValueError(f"TopK: group_score must be 'top2sum' or 'max', got {self.group_score!r}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"TopK: jitter must be in [0, 1), got {self.jitter}")
        if self.noise_std < 0:
            raise ValueError(f"TopK: noise_std must be >= 0, got {self.noise_std}")
        for name in ("logits_dtype", "score_dtype"):
            value = getattr(self, name)
            if value not in (None, *_DTYPES):
                raise ValueError(f"TopK: {name} must be None or one of {', '.join(_DTYPES)}, got {value!r}")
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError("TopK: n_group and topk_group must be given together")

    def validate(self, num_experts: int) -> None:
        if self.k > num_experts:
            raise ValueError(f"TopK: k={self.k} is larger than the number of experts ({num_experts})")
        if self.n_group is not None:
            if num_experts % self.n_group:
                raise ValueError(f"TopK: n_group={self.n_group} does not divide num_experts={num_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"TopK: topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
            # k may exceed the topk_group * E/n_group eligible experts: as in Hugging Face DeepSeek-V3, the rest of
            # the k choices then come from the masked groups (their selection score is masked, not their weight).

    @property
    def has_selection_bias(self) -> bool:
        return self.correction_bias

    def with_selection_bias(self) -> "TopK":
        return self if self.correction_bias else dataclasses.replace(self, correction_bias=True)

    def flops_per_token(self, dim: int, num_experts: int, *, experts=None, task=None) -> float:
        return float(dim * num_experts * (2 if self.noisy_gating else 1))

    def build(self, dim: int, num_experts: int) -> "TopKRouter":
        self.validate(num_experts)
        return TopKRouter(dim, num_experts, self)


class TopKRouter(Router):
    def __init__(self, dim: int, num_experts: int, spec: TopK) -> None:
        super().__init__()
        self.spec = spec
        self.dim = dim
        self.num_experts = num_experts
        self.gate = nn.Linear(dim, num_experts, bias=spec.router_bias)
        self.noise = nn.Linear(dim, num_experts, bias=False) if spec.noisy_gating else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)
        if spec.correction_bias:
            self.register_buffer("bias_E", torch.zeros(num_experts))
        else:
            self.bias_E = None

    def logits(self, x_TD: Tensor) -> Tensor:
        s = self.spec
        if s.logits_dtype is not None:
            x_TD = x_TD.to(getattr(torch, s.logits_dtype))
            weight, bias = self.gate.weight, self.gate.bias
        elif s.fp32 and x_TD.dtype in HALF_DTYPES:
            x_TD = x_TD.float()
            weight = self.gate.weight.float()
            bias = None if self.gate.bias is None else self.gate.bias.float()
        else:
            weight, bias = self.gate.weight, self.gate.bias
        if self.training and s.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - s.jitter, 1.0 + s.jitter)
        logits_TE = F.linear(x_TD, as_dtype(weight, x_TD.dtype), None if bias is None else as_dtype(bias, x_TD.dtype))
        if self.training and s.noise_std > 0:
            logits_TE = logits_TE + s.noise_std * torch.randn_like(logits_TE)
        if self.training and self.noise is not None:
            noise_scale = F.softplus(F.linear(x_TD, self.noise.weight.to(x_TD.dtype)))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_scale
        return logits_TE

    def select(self, scores_TE: Tensor) -> Tensor:
        """Indices (T, k) of the chosen experts; the correction bias and group limits apply here only."""
        s = self.spec
        choice_TE = scores_TE.detach()
        if self.bias_E is not None:
            choice_TE = choice_TE + self.bias_E.to(choice_TE.dtype)
        if s.n_group is not None:
            T, E = choice_TE.shape
            grouped_TGS = choice_TE.view(T, s.n_group, E // s.n_group)
            if s.group_score == "top2sum":
                group_TG = grouped_TGS.topk(min(2, E // s.n_group), dim=-1).values.sum(-1)
            else:
                group_TG = grouped_TGS.amax(-1)
            keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_TG.topk(s.topk_group, dim=-1).indices, True)
            keep_TE = keep_TG.repeat_interleave(E // s.n_group, dim=1)
            choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
        return choice_TE.topk(s.k, dim=-1).indices

    def _plain_top(self, ctx: RouteContext) -> bool:
        """A plain top-k of the scores: no replayed choices, no selection bias, no group limit, ``select`` not
        overridden (the chosen scores then include each row's largest)."""
        return (ctx.replay_idx_TK is None and self.bias_E is None and self.spec.n_group is None
                and type(self).select is TopKRouter.select)

    def top(self, scores_TE: Tensor, ctx: RouteContext, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """``(idx_TK, scores_TE at idx_TK)``: the chosen experts (:meth:`select`, or the replayed choices) and their
        scores, differentiable. Without a selection bias or group limits the choice is a plain top-k, whose values
        are the gathered scores (one op fewer per call)."""
        if self._plain_top(ctx):
            values_TK, idx_TK = scores_TE.topk(self.spec.k, dim=-1)
            return idx_TK, values_TK
        if ctx.replay_idx_TK is not None:
            idx_TK = self._replayed(ctx.replay_idx_TK, x_TD)
        else:
            idx_TK = self.select(scores_TE)
        return idx_TK, scores_TE.gather(1, idx_TK)

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        s = self.spec
        logits_TE = self.logits(x_TD)
        z_TE = logits_TE if s.score_dtype is None else logits_TE.to(getattr(torch, s.score_dtype))
        scores_TE = z_TE.softmax(-1) if s.score == "softmax" else z_TE.sigmoid()
        idx_TK, weight_TK = self.top(scores_TE, ctx, x_TD)
        if s.normalize:
            # a plain top-k of a softmax holds each row's largest score (>= 1/E): its sum cannot be zero, so no eps
            # (one op fewer per call, as HF's Mixtral and Qwen-MoE routers)
            positive = s.score == "softmax" and self._plain_top(ctx)
            weight_TK = renormalize(weight_TK, eps=0.0 if positive else 1e-20)
        if s.scale != 1.0:
            weight_TK = weight_TK * s.scale
        return Assignment.from_topk(idx_TK, as_dtype(weight_TK, x_TD.dtype), self.num_experts, scores_TE, logits_TE)

    def _replayed(self, idx_TK: Tensor, x_TD: Tensor) -> Tensor:
        expected = (x_TD.shape[0], self.spec.k)
        if tuple(idx_TK.shape) != expected:
            raise ValueError(f"TopK replay: recorded choices have shape {tuple(idx_TK.shape)}, expected {expected}")
        return idx_TK.to(device=x_TD.device, dtype=torch.long)

    def extra_repr(self) -> str:
        s = self.spec
        return f"k={s.k}, score={s.score}, normalize={s.normalize}"


