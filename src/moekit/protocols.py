"""The written contracts between the parts of an MoE layer.

``MoE.forward`` is a composition of five parts, each behind one of the protocols below; the layer never asks which
concrete class it holds. Shapes: T tokens, D model dim, E experts (bank + compute-free), N (token, expert) pairs.

    ctx   = RouteContext(task=..., token_ids=..., prev_logits_TE=..., token_mask_T=...)
    a     = router(x_TD, ctx)                        # Router        -> Assignment (pairs, weights, scores)
    bank, free = a.split_free()                      # compute-free pairs never reach the bank
    plan  = dispatcher.plan(bank, group_size)        # Dispatcher    -> an immutable DispatchPlan
    x_ND, handle = dispatcher.dispatch(x_TD, plan)   # the rows the bank runs + what combine needs from dispatch
    y_ND  = experts(x_ND, plan.counts_E, plan.expert_N)   # ExpertBank: rows grouped by expert 0..E-1
    y_TD  = dispatcher.combine(y_ND, plan, handle) + free_experts(x_TD, free)   # FreeExperts beside the bank
    loss  = sum(policy.loss(a_with_counts) for policy in losses)        # BalancePolicy, fed the plan's counts

What a router needs is declared by its *spec* (:class:`moekit.routers.base.RouterSpec`): ``needs_token_ids``,
``needs_prev_logits``, ``task_conditioned``, ``reads_experts``, ``has_selection_bias``, ``num_free_experts`` and
``build_free_experts``. The layer reads these declarations once, at construction.

These are ``typing.Protocol`` classes: documentation and static typing, not base classes to inherit (routers
usually subclass :class:`moekit.routers.base.Router`, which adapts the old ``router(x_TD, task=...)`` call). The two
data types that cross the contracts are concrete frozen dataclasses: :class:`~moekit.assignment.Assignment` and
:class:`~moekit.dispatch.plan.DispatchPlan` (re-exported here), one plan type for local and expert-parallel dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from .assignment import Assignment
from .dispatch.plan import DispatchPlan  # noqa: F401  (re-exported: the one plan type)


@dataclass(frozen=True)
class RouteContext:
    """Everything a router may read besides the hidden states. All fields are optional; a router reads only what its
    spec declares (``task_conditioned``, ``needs_token_ids``, ``needs_prev_logits``).

    Fields:
        task: a task id (int, 0-d tensor) or one id per token (T,), for task-conditioned routers (M3ViT, Edge-MoE).
        token_ids_T: long (T,) vocabulary ids of the tokens, for routers that hash them (Hash layers).
        prev_logits_TE: (T, E) routing logits of the previous MoE layer, for gating residuals (MoE++).
        token_mask_T: bool (T,), True for real tokens and False for padding; balance losses and statistics skip
            padded tokens (routing itself is unchanged).
        replay_idx_TK: long (T, K) experts to select instead of the router's own choice (router replay, see
            :mod:`moekit.replay`); only routers whose spec declares ``supports_replay`` read it.
    """

    task: Tensor | int | None = None
    token_ids_T: Tensor | None = None
    prev_logits_TE: Tensor | None = None
    token_mask_T: Tensor | None = None
    replay_idx_TK: Tensor | None = None


EMPTY_CONTEXT = RouteContext()


@runtime_checkable
class Router(Protocol):
    """``router(x_TD, ctx) -> Assignment``: which (token, expert) pairs exist and their combine weights.

    A router moves no data and owns no expert computation. It may own a selection bias ``bias_E`` (added to the
    scores for selection only; None when it has none), which a :class:`SelectionBiasPolicy` moves between steps.
    Pairs are listed in priority order (earlier pairs win when a capacity dispatcher drops pairs)."""

    num_experts: int
    bias_E: Tensor | None

    def __call__(self, x_TD: Tensor, ctx: RouteContext) -> Assignment: ...


@runtime_checkable
class ExpertBank(Protocol):
    """``experts(x_ND, counts_E, expert_N) -> y_ND``: the rows of ``x_ND`` are grouped by expert in order
    ``0..E-1`` (``counts_E[e]`` rows each; ``expert_N`` names each row's expert for banks that want it); row n of
    the output is expert ``expert_N[n]`` applied to row n. ``expert_forward(e, x_TD)`` runs one expert alone
    (references and inspection). ``flops_per_token()`` is the multiply-adds of one expert per token (for
    heterogeneous banks, the mean over experts)."""

    num_experts: int

    def __call__(self, x_ND: Tensor, counts_E: Tensor, expert_N: Tensor | None = None) -> Tensor: ...

    def expert_forward(self, e: int, x_TD: Tensor) -> Tensor: ...


@runtime_checkable
class FreeExperts(Protocol):
    """``free_experts(x_TD, free) -> y_TD``: the weighted sum of compute-free experts (zero, copy, constant, AdaMoE's
    null) over the pairs of ``free`` (an Assignment whose expert ids count from 0 over the free experts). A
    layer-level part beside the bank, built from the router spec's ``build_free_experts(dim)``."""

    num_experts: int

    def __call__(self, x_TD: Tensor, free: Assignment) -> Tensor: ...


@runtime_checkable
class Dispatcher(Protocol):
    """Groups pairs by expert, moves the rows to the bank and the results back; the same contract for local
    (:mod:`moekit.dispatch`) and expert-parallel (:class:`moekit.parallel.AllToAllDispatcher`) dispatch:

    - ``plan(a, group_size) -> DispatchPlan``: decides which pairs are kept and where every row goes, before any row
      moves. The plan is immutable and has one type (:class:`moekit.dispatch.plan.DispatchPlan`) whose fields mean
      the same thing everywhere: ``counts_E`` / ``expert_N`` what this process's bank runs, ``routed_E`` / ``kept_E``
      this process's pairs per routed expert before / after dropping (over all E experts: losses and statistics),
      ``token_N`` / ``weight_N`` this process's kept pairs; ``exchange`` the all-to-all when the bank is sharded.
    - ``dispatch(x_TD, plan) -> (x_ND, handle)``: the rows of the bank's input, grouped by bank expert, and an opaque
      handle of whatever ``combine`` needs from the dispatch (None locally; the received rows under expert
      parallelism, so that autograd runs every rank's half of the exchange).
    - ``combine(y_ND, plan, handle) -> y_TD``: the weighted sum of each token's expert outputs.
    """

    def plan(self, a: Assignment, group_size: int | None = None) -> DispatchPlan: ...

    def dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> tuple[Tensor, Any]: ...

    def combine(self, y_ND: Tensor, plan: DispatchPlan, handle: Any) -> Tensor: ...


@runtime_checkable
class BalancePolicy(Protocol):
    """An auxiliary loss: ``policy.loss(a) -> scalar`` (already weighted by its coefficient), keyed by
    ``type_name`` in ``MoEOutput.losses``. ``a.counts_E()`` returns the plan's counts (the layer fills
    ``Assignment.routed_E``), and ``a.token_mask_T`` marks padding to skip."""

    type_name: str

    def loss(self, a: Assignment) -> Tensor: ...


@runtime_checkable
class SelectionBiasPolicy(Protocol):
    """Auxiliary-loss-free balancing: not a loss. A module holding the pending expert counts that ``record``
    accumulates in training forwards and ``step(bias_E)`` turns into a bias move (after the optimizer step)."""

    def record(self, counts_E: Tensor) -> None: ...

    def step(self, bias_E: Tensor) -> None: ...
