"""SMEAR: Soft Merging of Experts with Adaptive Routing (Muqeeth, Liu & Raffel, 2023), and its baselines.

For each example b the router gives ``p_b = softmax(logits_b)`` over E experts; SMEAR averages the expert
*parameters* with those weights and runs the single merged expert:

    W1_b = sum_e p_be W1_e,  b1_b = sum_e p_be b1_e,  W2_b = sum_e p_be W2_e, ...      y_b = A(x_b; W_b)

It costs about one expert plus the merge, is fully differentiable and needs no auxiliary loss. The experts are an
ordinary :class:`moekit.experts.ExpertBank` (``w13_E2FD`` or ``w1_EFD``, ``w2_EDF`` and biases). The baselines of the
paper are options of the same module (``routing=``):

- ``"tag"``: the expert is the example's task/domain id (metadata routing); ``task`` is required.
- ``"top1"``: ``e* = argmax p``; ``y = p_e* A_e*(x)`` (Switch-style probability scaling).
- ``"st_gumbel"``: ``y~ = softmax((logits + g) / tau)``, ``e* = argmax y~``, ``y = A_e*(x) (1 - sg(y~_e*) + y~_e*)``;
  ``tau = max(tau0 exp(-tau_decay step), tau_min)``; set the step with :func:`set_step`. At eval ``e* = argmax``.
- ``"reinforce"``: ``e ~ Cat(p)`` in training (argmax at eval), ``y = A_e(x)``; a learned baseline predicts the
  per-example loss. The training loop adds :func:`moekit.merging.reinforce_loss`.
- ``"ensemble"``: ``y = sum_e p_e A_e(x)`` (runs all E experts: E times the compute).

Expert dropout (training only, rate ``expert_dropout``): each p_e is zeroed with that probability and p is
renormalised as ``(p + 1e-10) / sum(p + 1e-10)``; it applies to ``smear``, ``top1``, ``reinforce`` and ``ensemble``.

The module maps ``(B, D)`` (one vector per example) or ``(B, L, D)`` to the same shape. It is the expert block
only: add your own residual (the paper uses ``x + LN(A(x))``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts.bank import FFN, MLP, ExpertBank
from ..spec import Spec, register_spec, resolve
from .router import ExampleRouter

ROUTINGS = ("smear", "tag", "top1", "st_gumbel", "reinforce", "ensemble")
_LEARNED = ("smear", "top1", "st_gumbel", "reinforce", "ensemble")


@register_spec("smear", "merging")
@dataclass(frozen=True, kw_only=True)
class SMEARConfig(Spec):
    """Hyperparameters of :class:`SMEAR` (defaults: the authors' DomainNet/T5 settings where they exist).

    Args:
        routing: one of ``smear``, ``tag``, ``top1``, ``st_gumbel``, ``reinforce``, ``ensemble``.
        normalize_router: per-expert-column LayerNorm of the routing matrix, gain initialised to 1e-2.
        router_bias: a bias on the router logits (cvl: none).
        router_input_norm: LayerNorm on the mean-pooled router input.
        expert_dropout: probability of zeroing each p_e in training (0.1 for DomainNet SMEAR and Top-k).
        tau0, tau_min, tau_decay: ST-Gumbel temperature ``max(tau0 * exp(-tau_decay * step), tau_min)``.
        baseline_reduction: REINFORCE baseline MLP width is ``dim // baseline_reduction`` (at least 1).
    """

    routing: str = "smear"
    normalize_router: bool = True
    router_bias: bool = False
    router_input_norm: bool = True
    expert_dropout: float = 0.0
    tau0: float = 10.0
    tau_min: float = 0.5
    tau_decay: float = 1e-4
    baseline_reduction: int = 8

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"SMEAR: unknown routing {self.routing!r}; valid choices: {', '.join(ROUTINGS)}")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise ValueError(f"SMEAR: expert_dropout must be in [0, 1), got {self.expert_dropout}")
        if not (self.tau0 > 0 and self.tau_min > 0 and self.tau_decay >= 0):
            raise ValueError(
                f"SMEAR: need tau0 > 0, tau_min > 0, tau_decay >= 0; got {self.tau0}, {self.tau_min}, {self.tau_decay}"
            )
        if self.baseline_reduction < 1:
            raise ValueError(f"SMEAR: baseline_reduction must be >= 1, got {self.baseline_reduction}")


@dataclass(frozen=True)
class SMEARRouting:
    """What the last forward decided, per example (kept on the module as ``last``)."""

    probs_BE: Tensor | None  # router probabilities after expert dropout (None for tag routing)
    expert_B: Tensor | None  # the expert each example ran (None for smear and ensemble)
    log_prob_B: Tensor | None = None  # REINFORCE: log p of the sampled expert
    baseline_B: Tensor | None = None  # REINFORCE: the baseline's loss prediction


class SMEAR(nn.Module):
    """Per-example parameter merging of an expert bank by router weights, or one of the paper's baselines.

    Args:
        dim: model dimension D.
        num_experts: E.
        experts: an FFN spec for the bank (default ``MLP(hidden_dim=max(1, dim // 32), activation="silu")``, the
            paper's bottleneck adapter ``swish(x W_d + b_d) W_u``; note the bank also has an output bias).
        config: a :class:`SMEARConfig`; keyword arguments override its fields.

    Call as ``layer(x, task=None, mask=None, router_input=None)``: ``task`` (B,) ids for tag routing; ``mask``
    (B, L) marks real positions for the mean-pool; ``router_input`` (B, L', D) routes on another tensor (the
    paper's decoder adapters route on the encoder output).
    """

    def __init__(self, dim: int, num_experts: int, *, experts: Any = None, config: SMEARConfig | None = None, **kw):
        super().__init__()
        if dim < 1 or num_experts < 1:
            raise ValueError(f"SMEAR: dim and num_experts must be >= 1, got dim={dim}, num_experts={num_experts}")
        config = dataclasses.replace(config or SMEARConfig(), **kw)
        experts = resolve("experts", experts if experts is not None else MLP(hidden_dim=max(1, dim // 32), activation="silu"))
        if not isinstance(experts, FFN):
            raise ValueError(f"SMEAR: experts must be an FFN spec (SwiGLU, MLP), got {type(experts).__name__}")
        self.config, self.dim, self.num_experts = config, dim, num_experts
        self.experts: ExpertBank = experts.build(dim, num_experts)
        self.router = None
        if config.routing != "tag":
            self.router = ExampleRouter(
                dim, num_experts, normalize_columns=config.normalize_router, bias=config.router_bias,
                input_norm=config.router_input_norm,
            )
        self.baseline = None
        if config.routing == "reinforce":
            hidden = max(1, dim // config.baseline_reduction)
            self.baseline = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=True)
        self.last: SMEARRouting | None = None

    # ----------------------------------------------------------------------------------------------- pieces
    @property
    def temperature(self) -> float:
        c = self.config
        return max(c.tau0 * math.exp(-c.tau_decay * int(self.step)), c.tau_min)

    def _bank(self) -> list[Tensor | None]:
        b = self.experts
        return [b.w_in, b.w2_EDF, b.b_in, b.b2_ED]  # w_in: fused gate/up w13_E2FD (GLU) or w1_EFD

    def merged_weights(self, p_BE: Tensor) -> list[Tensor | None]:
        """Per-example parameters ``sum_e p_be theta_e`` for every tensor of the bank."""
        return [None if w is None else torch.einsum("be,e...->b...", p_BE.to(w.dtype), w) for w in self._bank()]

    def selected_weights(self, expert_B: Tensor) -> list[Tensor | None]:
        """Per-example parameters of one expert each (tag / top-1 / sampled routing)."""
        return [None if w is None else w[expert_B] for w in self._bank()]

    def apply_weights(self, x_BLD: Tensor, weights: list[Tensor | None]) -> Tensor:
        """Run one expert per example with per-example weights (B, ...) on all of that example's positions."""
        w_in, w2, b_in, b2 = weights
        h_BLF = torch.einsum("bld,bfd->blf", x_BLD, w_in)  # (B, L, 2F) for GLU experts: gate then up
        if b_in is not None:
            h_BLF = h_BLF + b_in.unsqueeze(1)
        if self.experts.spec.glu:
            g_BLF, u_BLF = h_BLF.split(self.experts.hidden_dim, dim=-1)
            h_BLF = self.experts.act(g_BLF) * u_BLF
        else:
            h_BLF = self.experts.act(h_BLF)
        y_BLD = torch.einsum("blf,bdf->bld", h_BLF, w2)
        return y_BLD if b2 is None else y_BLD + b2.unsqueeze(1)

    def merged_forward(self, x_BLD: Tensor, p_BE: Tensor) -> Tensor:
        """SMEAR's computation for given routing weights: merge, then run the merged expert."""
        return self.apply_weights(x_BLD, self.merged_weights(p_BE))

    def ensemble_forward(self, x_BLD: Tensor, p_BE: Tensor) -> Tensor:
        """``sum_e p_be A_e(x_b)``: every expert on every position."""
        B, L, D = x_BLD.shape
        x_ND = x_BLD.reshape(1, B * L, D).expand(self.num_experts, B * L, D).reshape(-1, D)
        counts_E = torch.full((self.num_experts,), B * L, dtype=torch.long, device=x_BLD.device)
        y_EBLD = self.experts(x_ND, counts_E).reshape(self.num_experts, B, L, D)
        return torch.einsum("be,ebld->bld", p_BE.to(y_EBLD.dtype), y_EBLD)

    def _expert_dropout(self, p_BE: Tensor) -> Tensor:
        rho = self.config.expert_dropout
        if not (self.training and rho > 0):
            return p_BE
        keep_BE = (torch.rand_like(p_BE) >= rho).to(p_BE.dtype)
        p_BE = p_BE * keep_BE + 1e-10
        return p_BE / p_BE.sum(-1, keepdim=True)

    def _gumbel(self, like_BE: Tensor) -> Tensor:
        u = torch.rand_like(like_BE).clamp_(1e-20, 1.0)
        return -torch.log(-torch.log(u) + 1e-20)

    def _task_ids(self, task: Tensor | int | None, batch: int, device) -> Tensor:
        if task is None:
            raise ValueError("SMEAR(routing='tag') needs task ids: call layer(x, task=task_B) with one id per example")
        task_B = torch.as_tensor(task, device=device, dtype=torch.long)
        if task_B.dim() == 0:
            task_B = task_B.expand(batch)
        if task_B.shape != (batch,):
            raise ValueError(f"SMEAR: task must be an int or shape ({batch},), got shape {tuple(task_B.shape)}")
        if batch and (int(task_B.min()) < 0 or int(task_B.max()) >= self.num_experts):
            raise ValueError(f"SMEAR: task ids must be in [0, {self.num_experts}), got {task_B.tolist()}")
        return task_B

    # ----------------------------------------------------------------------------------------------- forward
    def forward(
        self, x: Tensor, *, task: Tensor | int | None = None, mask: Tensor | None = None, router_input: Tensor | None = None
    ) -> Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.dim:
            raise ValueError(f"SMEAR: expected input (B, {self.dim}) or (B, L, {self.dim}), got {tuple(x.shape)}")
        x_BLD = x.unsqueeze(1) if x.dim() == 2 else x
        routing = self.config.routing

        if routing == "tag":
            task_B = self._task_ids(task, x_BLD.shape[0], x.device)
            self.last = SMEARRouting(None, task_B)
            y_BLD = self.apply_weights(x_BLD, self.selected_weights(task_B))
            return y_BLD.reshape(x.shape)

        if router_input is None:
            u_BD = self.router.pool(x_BLD, mask)
        else:
            r = router_input.unsqueeze(1) if router_input.dim() == 2 else router_input
            if r.shape[0] != x_BLD.shape[0] or r.shape[-1] != self.dim:
                raise ValueError(f"SMEAR: router_input must be (B, L', {self.dim}) with B={x_BLD.shape[0]}, got {tuple(r.shape)}")
            u_BD = self.router.pool(r, mask)
        logits_BE = self.router(u_BD)

        if routing == "st_gumbel":
            if self.training:
                soft_BE = ((logits_BE + self._gumbel(logits_BE)) / self.temperature).softmax(-1)
                expert_B = soft_BE.argmax(-1)
                y_sel = soft_BE.gather(1, expert_B[:, None]).squeeze(1)
                scale_B = 1.0 - y_sel.detach() + y_sel  # value 1, gradient of the relaxed sample
            else:
                soft_BE = logits_BE.softmax(-1)
                expert_B = logits_BE.argmax(-1)
                scale_B = None
            self.last = SMEARRouting(soft_BE, expert_B)
            y_BLD = self.apply_weights(x_BLD, self.selected_weights(expert_B))
            if scale_B is not None:
                y_BLD = y_BLD * scale_B.to(y_BLD.dtype)[:, None, None]
            return y_BLD.reshape(x.shape)

        p_BE = self._expert_dropout(logits_BE.softmax(-1))
        if routing == "smear":
            self.last = SMEARRouting(p_BE, None)
            y_BLD = self.merged_forward(x_BLD, p_BE)
        elif routing == "ensemble":
            self.last = SMEARRouting(p_BE, None)
            y_BLD = self.ensemble_forward(x_BLD, p_BE)
        elif routing == "top1":
            expert_B = p_BE.argmax(-1)
            self.last = SMEARRouting(p_BE, expert_B)
            scale_B = p_BE.gather(1, expert_B[:, None]).squeeze(1)
            y_BLD = self.apply_weights(x_BLD, self.selected_weights(expert_B)) * scale_B.to(x.dtype)[:, None, None]
        else:  # reinforce
            if self.training:
                expert_B = torch.multinomial(p_BE.detach(), 1).squeeze(1)
            else:
                expert_B = p_BE.argmax(-1)
            log_prob_B = torch.log(p_BE.gather(1, expert_B[:, None]).squeeze(1))
            baseline_B = self.baseline(u_BD.detach()).squeeze(-1)
            self.last = SMEARRouting(p_BE, expert_B, log_prob_B, baseline_B)
            y_BLD = self.apply_weights(x_BLD, self.selected_weights(expert_B))
        return y_BLD.reshape(x.shape)

    # ----------------------------------------------------------------------------------------------- accounting
    def expert_flops_per_token(self) -> int:
        """Multiply-adds x 2 of one expert on one position (matmuls only)."""
        mats = 3 if self.experts.spec.glu else 2
        return 2 * mats * self.dim * self.experts.hidden_dim

    def merge_flops_per_example(self) -> int:
        """SMEAR's merge: one multiply-add per expert per parameter of one expert."""
        per_expert = sum(w[0].numel() for w in self._bank() if w is not None)
        return 2 * self.num_experts * per_expert

    def extra_repr(self) -> str:
        c = self.config
        return f"routing={c.routing}, E={self.num_experts}, expert_dropout={c.expert_dropout}"


def set_step(model: nn.Module, step: int) -> None:
    """Set the training step of every SMEAR layer in ``model`` (drives the ST-Gumbel temperature schedule)."""
    for m in model.modules():
        if isinstance(m, SMEAR):
            m.step.fill_(int(step))


def reinforce_loss(
    model: nn.Module,
    example_loss_B: Tensor,
    *,
    policy_coef: float = 0.01,
    entropy_coef: float = 5e-4,
    baseline_coef: float = 0.01,
) -> Tensor:
    """The REINFORCE-with-baseline terms of every ``routing="reinforce"`` SMEAR layer's last forward.

    With advantage ``A = L_b - baseline_b`` (``L_b`` the per-example task loss, detached):

        policy_coef * mean_b(log p_b[e_b] * sg(A_b)) + entropy_coef * mean_b(-sum_e p log p)
        + baseline_coef * mean_b Huber_{delta=1}(A_b)

    As in the authors' code the entropy term is *added*, so the router's entropy is minimised. Add the result to the
    task loss before ``backward()``. Returns 0 when the model has no REINFORCE layer.
    """
    target_B = example_loss_B.detach()
    total = target_B.new_zeros(())
    for m in model.modules():
        if not (isinstance(m, SMEAR) and m.config.routing == "reinforce" and m.last is not None):
            continue
        r = m.last
        if r.log_prob_B.shape != target_B.shape:
            raise ValueError(
                f"reinforce_loss: example_loss_B has shape {tuple(target_B.shape)} but the layer routed "
                f"{tuple(r.log_prob_B.shape)} examples; pass one loss per example"
            )
        advantage_B = target_B - r.baseline_B
        entropy_B = -(r.probs_BE * torch.log(r.probs_BE)).sum(-1)
        total = total + policy_coef * (r.log_prob_B * advantage_B.detach()).mean()
        total = total + entropy_coef * entropy_B.mean()
        total = total + baseline_coef * F.huber_loss(r.baseline_B, target_B, delta=1.0)
    return total
