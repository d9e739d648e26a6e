"""Task-conditioned routers for multi-task MoE (M3ViT, Liang et al. 2022; Edge-MoE, Sarkar et al. 2023).

Every router here is called as ``router(x_TD, ctx) -> Assignment`` with ``ctx.task = t`` (``router(x_TD, task=t)`` also works), where ``t`` is an integer task id, a 0-d
tensor, or a 1-D long tensor giving each token's task. Gates follow M3ViT's ``noisy_vmoe`` gate:
p = softmax(x W) over the experts the task may use, the k largest are selected and their probabilities are the
combine weights (not renormalised unless ``normalize=True``).

- :class:`MultiGate` (M3ViT default): one gate W_t per task.
- :class:`TaskEmbedGate` (M3ViT ``task_one_hot``): one shared gate fed [x; tau_t], where tau_t is a learned task
  embedding LN(Linear(GELU(Linear(onehot_t)))).
- :class:`TaskExperts` (Edge-MoE task-level sparsity, M3ViT ``regu_experts_fromtask``): task t owns a subset of the
  experts and its own gate over that subset, so a single-task model needs only those experts.
- :class:`PathwayGate`: the gate of an extracted single-task pathway (see ``moekit.models.extract_task``): a fixed
  gate whose score columns map onto the kept experts; columns of dropped experts still count in the softmax
  denominator (so the weights equal the full model's) but are never selected.

Shapes: T tokens, D model dim, E experts, K experts per token, S gate score columns, M experts a task owns.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..approx.softmax import SOFTMAX_MODES, softmax
from ..assignment import Assignment
from ..numerics import renormalize
from ..spec import register_spec
from ..protocols import RouteContext
from .base import Router, RouterSpec


def task_ids(task, num_tasks: int, num_tokens: int, router: str) -> int | Tensor:
    """Validate ``task``: an int in [0, num_tasks), a 0-d tensor, or one id per token. Returns an int or a (T,)
    tensor."""
    if task is None:
        raise ValueError(
            f"{router}: this router is task-conditioned; call it with task=<task id in 0..{num_tasks - 1}>"
        )
    if isinstance(task, str):
        raise ValueError(
            f"{router}: got task name {task!r}; routers take integer task ids (the model maps names to ids)"
        )
    if isinstance(task, Tensor):
        if task.is_floating_point() or task.is_complex():
            raise ValueError(f"{router}: task ids must be integers, got a {task.dtype} tensor")
        if task.dim() == 0:
            task = int(task)
        elif task.dim() == 1 and task.numel() == num_tokens:
            if task.numel() and (int(task.min()) < 0 or int(task.max()) >= num_tasks):
                bad = task[(task < 0) | (task >= num_tasks)][0]
                raise ValueError(f"{router}: unknown task id {int(bad)}; valid ids are 0..{num_tasks - 1}")
            return task.long()
        else:
            raise ValueError(
                f"{router}: task must be an int, a 0-d tensor or one id per token ({num_tokens}), "
                f"got shape {tuple(task.shape)}"
            )
    if isinstance(task, bool) or not isinstance(task, int):
        raise ValueError(f"{router}: task must be an integer id, got {type(task).__name__}")
    if not 0 <= task < num_tasks:
        raise ValueError(f"{router}: unknown task id {task}; valid ids are 0..{num_tasks - 1}")
    return task


def _kaiming_rows(w: Tensor, fan_in: int) -> None:
    # nn.Linear's default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(w, -bound, bound)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _TaskGateSpec(RouterSpec):
    task_conditioned = True  # reads ctx.task
    task_level = False  # True: a task can only reach a fixed subset of experts (its pathway is known in advance)
    num_tasks: int
    k: int = 2
    normalize: bool = False  # M3ViT / Edge-MoE use the raw full-softmax probabilities as combine weights
    noise_std: float = 0.0  # V-MoE noise on the logits in training (M3ViT's vmoe_noisy_std; 0 there)
    softmax: str = "exact"  # "online": Edge-MoE's single-pass softmax

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.num_tasks < 1:
            raise ValueError(f"{name}: num_tasks must be >= 1, got {self.num_tasks}")
        if self.k < 1:
            raise ValueError(f"{name}: k must be >= 1, got {self.k}")
        if self.noise_std < 0:
            raise ValueError(f"{name}: noise_std must be >= 0, got {self.noise_std}")
        if self.softmax not in SOFTMAX_MODES:
            raise ValueError(f"{name}: unknown softmax {self.softmax!r}; valid choices: {', '.join(SOFTMAX_MODES)}")

    def validate(self, num_experts: int) -> None:
        if self.k > num_experts:
            raise ValueError(f"{type(self).__name__}: k={self.k} is larger than the number of experts ({num_experts})")


class _TaskRouter(Router):
    """Shared forward: route per task, then (for per-token tasks) merge the groups in slot-major order."""

    def __init__(self, dim: int, num_experts: int, spec: _TaskGateSpec) -> None:
        super().__init__()
        self.spec, self.dim, self.num_experts = spec, dim, num_experts

    def route_task(self, x_TD: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """(logits_TS, expert_S): gate logits over the S experts task ``t`` may use and their expert ids."""
        raise NotImplementedError

    def task_gate(self, t: int) -> tuple[Tensor, Tensor, list[int] | None]:
        """Task ``t``'s gate as a fixed linear map, for pathway extraction: ``(w_SD, b_S, owned)`` with logits
        ``x w_SD^T + b_S``; ``owned`` lists the experts the S columns are (task-level routing), or None when the
        columns are all E experts and any of them may be chosen (token-level routing)."""
        raise NotImplementedError

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        t = task_ids(ctx.task, self.spec.num_tasks, x_TD.shape[0], type(self.spec).__name__)
        if isinstance(t, int):
            idx_TK, weight_TK, scores_TE, logits_TE = self._one_task(x_TD, t)
        else:
            idx_TK, weight_TK, scores_TE, logits_TE = _per_token(x_TD, t, self._one_task, self.spec.k, self.num_experts)
        return Assignment.from_topk(idx_TK, weight_TK.to(x_TD.dtype), self.num_experts, scores_TE, logits_TE)

    def _one_task(self, x_TD: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = self.spec
        logits_TS, expert_S = self.route_task(x_TD, t)
        if self.training and s.noise_std > 0:
            logits_TS = logits_TS + s.noise_std * torch.randn_like(logits_TS)
        probs_TS = softmax(logits_TS, -1, s.softmax)
        top_TK = logits_TS.detach().topk(s.k, dim=-1).indices  # softmax is monotone: same choice as on probs
        weight_TK = probs_TS.gather(1, top_TK)
        if s.normalize:
            weight_TK = renormalize(weight_TK)
        T, E = x_TD.shape[0], self.num_experts
        if expert_S.numel() == E and bool((expert_S == torch.arange(E, device=expert_S.device)).all()):
            return top_TK, weight_TK, probs_TS, logits_TS
        scores_TE = probs_TS.new_zeros(T, E).index_copy(1, expert_S, probs_TS)
        logits_TE = logits_TS.new_full((T, E), float("-inf")).index_copy(1, expert_S, logits_TS)
        return expert_S[top_TK], weight_TK, scores_TE, logits_TE

    def extra_repr(self) -> str:
        s = self.spec
        return f"tasks={s.num_tasks}, k={s.k}, normalize={s.normalize}, softmax={s.softmax}"


def _per_token(x_TD: Tensor, task_T: Tensor, route: Callable, k: int, E: int):
    """Route each task's tokens with ``route(x, t)`` and scatter the results back into token order."""
    T = x_TD.shape[0]
    idx_TK = torch.zeros(T, k, dtype=torch.long, device=x_TD.device)
    weight_TK = x_TD.new_zeros(T, k)
    scores_TE = x_TD.new_zeros(T, E)
    logits_TE = x_TD.new_zeros(T, E)
    for t in torch.unique(task_T).tolist():
        rows = (task_T == t).nonzero().squeeze(1)
        i, w, s, lg = route(x_TD.index_select(0, rows), t)
        idx_TK = idx_TK.index_copy(0, rows, i)
        weight_TK = weight_TK.index_copy(0, rows, w.to(weight_TK.dtype))
        scores_TE = scores_TE.index_copy(0, rows, s.to(scores_TE.dtype))
        logits_TE = logits_TE.index_copy(0, rows, lg.to(logits_TE.dtype))
    return idx_TK, weight_TK, scores_TE, logits_TE


# ---------------------------------------------------------------------------------------------------------------
@register_spec("multi_gate", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiGate(_TaskGateSpec):
    """M3ViT multi-gate routing: one linear gate per task over all experts (no bias).

    Args:
        num_tasks: number of tasks (ids 0..num_tasks-1).
        k: experts per token.
        normalize: renormalise the k selected probabilities (default False, as M3ViT).
        noise_std: Gaussian noise on the logits in training.
        softmax: ``"exact"`` or ``"online"`` (Edge-MoE single pass).
    """

    def build(self, dim: int, num_experts: int) -> "MultiGateRouter":
        self.validate(num_experts)
        return MultiGateRouter(dim, num_experts, self)


    def flops_per_token(self, dim: int, num_experts: int, *, experts=None, task=None) -> float:
        return float(dim * num_experts)  # the task's own gate


class MultiGateRouter(_TaskRouter):
    def __init__(self, dim: int, num_experts: int, spec: MultiGate) -> None:
        super().__init__(dim, num_experts, spec)
        self.weight_NED = nn.Parameter(torch.empty(spec.num_tasks, num_experts, dim))  # N = tasks
        _kaiming_rows(self.weight_NED, dim)
        self.register_buffer("all_experts_E", torch.arange(num_experts), persistent=False)

    def route_task(self, x_TD: Tensor, t: int) -> tuple[Tensor, Tensor]:
        return F.linear(x_TD, self.weight_NED[t].to(x_TD.dtype)), self.all_experts_E

    def task_gate(self, t: int) -> tuple[Tensor, Tensor, list[int] | None]:
        w_SD = self.weight_NED[t].detach()
        return w_SD, torch.zeros(self.num_experts, dtype=w_SD.dtype, device=w_SD.device), None


# ---------------------------------------------------------------------------------------------------------------
@register_spec("task_embed", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskEmbedGate(_TaskGateSpec):
    """M3ViT task-conditioned gate: one shared gate over [x; tau_t] with a learned task embedding
    tau_t = LN(Linear(GELU(Linear(onehot_t)))) of width ``task_dim``.

    Args:
        num_tasks, k, normalize, noise_std, softmax: as :class:`MultiGate`.
        task_dim: width of the task embedding (M3ViT ``gate_task_specific_dim``).
    """

    task_dim: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task_dim < 1:
            raise ValueError(f"TaskEmbedGate: task_dim must be >= 1, got {self.task_dim}")

    def flops_per_token(self, dim: int, num_experts: int, *, experts=None, task=None) -> float:
        return float((dim + self.task_dim) * num_experts)  # one gate over [x; tau_t]

    def build(self, dim: int, num_experts: int) -> "TaskEmbedRouter":
        self.validate(num_experts)
        return TaskEmbedRouter(dim, num_experts, self)


class TaskEmbedRouter(_TaskRouter):
    def __init__(self, dim: int, num_experts: int, spec: TaskEmbedGate) -> None:
        super().__init__(dim, num_experts, spec)
        n, dt = spec.num_tasks, spec.task_dim
        self.embed_in = nn.Linear(n, dt)
        self.embed_out = nn.Linear(dt, dt)
        self.embed_norm = nn.LayerNorm(dt)
        self.gate = nn.Linear(dim + dt, num_experts, bias=False)
        self.register_buffer("all_experts_E", torch.arange(num_experts), persistent=False)

    def task_vector(self, t: int) -> Tensor:
        """tau_t, shape (task_dim,)."""
        onehot = torch.zeros(self.spec.num_tasks, device=self.embed_in.weight.device, dtype=self.embed_in.weight.dtype)
        onehot[t] = 1.0
        return self.embed_norm(self.embed_out(F.gelu(self.embed_in(onehot))))

    def route_task(self, x_TD: Tensor, t: int) -> tuple[Tensor, Tensor]:
        tau = self.task_vector(t).to(x_TD.dtype)
        x_in = torch.cat([x_TD, tau.expand(x_TD.shape[0], -1)], dim=-1)
        return F.linear(x_in, self.gate.weight.to(x_TD.dtype)), self.all_experts_E

    def task_gate(self, t: int) -> tuple[Tensor, Tensor, list[int] | None]:
        # [x; tau_t] W^T = x W_x^T + (W_tau tau_t): the task vector folds into a bias
        w = self.gate.weight.detach()
        return w[:, : self.dim], w[:, self.dim :] @ self.task_vector(t).detach(), None


# ---------------------------------------------------------------------------------------------------------------
@register_spec("task_experts", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskExperts(_TaskGateSpec):
    """Task-level sparsity (Edge-MoE; M3ViT ``regu_experts_fromtask``): task t routes only among its own experts,
    with its own gate over them, so the task's pathway is a fixed subset of the experts.

    Args:
        num_tasks, k, normalize, noise_std, softmax: as :class:`MultiGate`.
        experts_per_task: size M of each task's contiguous window of experts; windows are spread evenly over
            0..E-1 (disjoint when M * num_tasks == E, overlapping, i.e. shared, when larger). Default E // num_tasks.
        expert_sets: explicit expert ids per task instead of windows, e.g. ``((0, 1, 2), (2, 3, 4))``.
    """

    task_level = True
    experts_per_task: int | None = None
    expert_sets: tuple | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert_sets is not None:
            sets = tuple(tuple(int(e) for e in s) for s in self.expert_sets)
            object.__setattr__(self, "expert_sets", sets)
            if len(sets) != self.num_tasks:
                raise ValueError(f"TaskExperts: expert_sets has {len(sets)} sets for num_tasks={self.num_tasks}")
            for t, s in enumerate(sets):
                if len(set(s)) != len(s):
                    raise ValueError(f"TaskExperts: expert set of task {t} repeats an expert: {s}")
        if self.experts_per_task is not None and self.experts_per_task < 1:
            raise ValueError(f"TaskExperts: experts_per_task must be >= 1, got {self.experts_per_task}")

    def sets(self, num_experts: int) -> tuple[tuple[int, ...], ...]:
        """The expert ids each task owns."""
        if self.expert_sets is not None:
            return self.expert_sets
        m = self.experts_per_task if self.experts_per_task is not None else num_experts // self.num_tasks
        if not 1 <= m <= num_experts:
            raise ValueError(
                f"TaskExperts: experts_per_task={m} must be in [1, num_experts={num_experts}] "
                f"(default num_experts // num_tasks)"
            )
        if self.num_tasks == 1:
            return (tuple(range(m)),)
        starts = [round(t * (num_experts - m) / (self.num_tasks - 1)) for t in range(self.num_tasks)]
        return tuple(tuple(range(s, s + m)) for s in starts)

    def validate(self, num_experts: int) -> None:
        for t, s in enumerate(self.sets(num_experts)):
            if any(not 0 <= e < num_experts for e in s):
                raise ValueError(f"TaskExperts: task {t} names an expert outside 0..{num_experts - 1}: {s}")
            if len(s) < self.k:
                raise ValueError(f"TaskExperts: task {t} owns {len(s)} experts, fewer than k={self.k}")

    def flops_per_token(self, dim: int, num_experts: int, *, experts=None, task=None) -> float:
        sets = self.sets(num_experts)  # task t's gate covers only its own experts (mean over tasks without task=)
        owned = len(sets[task]) if task is not None else sum(map(len, sets)) / len(sets)
        return float(dim * owned)

    def build(self, dim: int, num_experts: int) -> "TaskExpertsRouter":
        self.validate(num_experts)
        return TaskExpertsRouter(dim, num_experts, self)


class TaskExpertsRouter(_TaskRouter):
    def __init__(self, dim: int, num_experts: int, spec: TaskExperts) -> None:
        super().__init__(dim, num_experts, spec)
        self.expert_sets = spec.sets(num_experts)
        self.gates = nn.ParameterList()
        for t, s in enumerate(self.expert_sets):
            w_MD = nn.Parameter(torch.empty(len(s), dim))
            _kaiming_rows(w_MD, dim)
            self.gates.append(w_MD)
            self.register_buffer(f"experts_{t}_M", torch.tensor(s, dtype=torch.long), persistent=False)

    def route_task(self, x_TD: Tensor, t: int) -> tuple[Tensor, Tensor]:
        return F.linear(x_TD, self.gates[t].to(x_TD.dtype)), getattr(self, f"experts_{t}_M")

    def task_gate(self, t: int) -> tuple[Tensor, Tensor, list[int] | None]:
        w_SD = self.gates[t].detach()
        return w_SD, torch.zeros(w_SD.shape[0], dtype=w_SD.dtype, device=w_SD.device), list(self.expert_sets[t])


# ---------------------------------------------------------------------------------------------------------------
@register_spec("pathway", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PathwayGate(RouterSpec):
    """The fixed gate of an extracted single-task pathway; task-agnostic (``task`` is ignored).

    logits = x W^T + b over ``num_scores`` columns; p = softmax(logits); column s maps to local expert
    ``expert_S[s]`` or to -1 (an expert that was dropped: it stays in the softmax denominator but is never
    selected). Built weights are filled in by ``extract_task``.

    Args:
        num_scores: S, the gate's score columns (the parent gate's width).
        k, normalize, softmax: as the parent router.
    """

    num_scores: int
    k: int = 2
    normalize: bool = False
    softmax: str = "exact"

    def __post_init__(self) -> None:
        if self.num_scores < 1 or self.k < 1:
            raise ValueError(f"PathwayGate: num_scores and k must be >= 1, got {self.num_scores}, {self.k}")
        if self.softmax not in SOFTMAX_MODES:
            raise ValueError(
                f"PathwayGate: unknown softmax {self.softmax!r}; valid choices: {', '.join(SOFTMAX_MODES)}"
            )

    def validate(self, num_experts: int) -> None:
        if self.k > num_experts:
            raise ValueError(f"PathwayGate: k={self.k} is larger than the number of kept experts ({num_experts})")

    def flops_per_token(self, dim: int, num_experts: int, *, experts=None, task=None) -> float:
        return float(dim * self.num_scores)  # the parent gate's columns

    def build(self, dim: int, num_experts: int) -> "PathwayRouter":
        self.validate(num_experts)
        return PathwayRouter(dim, num_experts, self)


class PathwayRouter(Router):
    def __init__(self, dim: int, num_experts: int, spec: PathwayGate) -> None:
        super().__init__()
        self.spec, self.dim, self.num_experts = spec, dim, num_experts
        S = spec.num_scores
        self.weight_SD = nn.Parameter(torch.zeros(S, dim))
        self.bias_S = nn.Parameter(torch.zeros(S))
        default_S = torch.arange(S)
        self.register_buffer("expert_S", torch.where(default_S < num_experts, default_S, -1))  # set by extract_task

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        s = self.spec
        logits_TS = F.linear(x_TD, self.weight_SD.to(x_TD.dtype), self.bias_S.to(x_TD.dtype))
        probs_TS = softmax(logits_TS, -1, s.softmax)
        kept_S = self.expert_S >= 0
        choice_TS = logits_TS.detach()
        if not bool(kept_S.all()):
            choice_TS = choice_TS.masked_fill(~kept_S, float("-inf"))
        top_TK = choice_TS.topk(s.k, dim=-1).indices
        weight_TK = probs_TS.gather(1, top_TK)
        if s.normalize:
            weight_TK = renormalize(weight_TK)
        T, E = x_TD.shape[0], self.num_experts
        if logits_TS.shape[1] == E and bool((self.expert_S == torch.arange(E, device=x_TD.device)).all()):
            return Assignment.from_topk(top_TK, weight_TK.to(x_TD.dtype), E, probs_TS, logits_TS)  # nothing dropped
        cols = kept_S.nonzero().squeeze(1)
        scores_TE = probs_TS.new_zeros(T, E).index_copy(1, self.expert_S[cols], probs_TS[:, cols])
        logits_TE = logits_TS.new_full((T, E), float("-inf")).index_copy(1, self.expert_S[cols], logits_TS[:, cols])
        return Assignment.from_topk(self.expert_S[top_TK], weight_TK.to(x_TD.dtype), E, scores_TE, logits_TE)

    def extra_repr(self) -> str:
        return f"scores={self.spec.num_scores}, experts={self.num_experts}, k={self.spec.k}"
