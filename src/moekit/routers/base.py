"""The router contract: a spec that declares what the router needs, and a module that routes.

A router spec is a frozen dataclass with ``build(dim, num_experts) -> Router``. It *declares* what the layer must
provide, so that the layer never probes the router's type:

- ``task_conditioned``: reads ``ctx.task`` (a task id); a layer called with ``task=`` and a router that is not task
  conditioned raises instead of silently ignoring it.
- ``needs_token_ids``: reads ``ctx.token_ids_T`` (Hash layers).
- ``needs_prev_logits``: reads ``ctx.prev_logits_TE`` (MoE++ gating residuals).
- ``reads_experts``: routes from the expert bank's weights (Autonomy-of-Experts); the layer calls
  ``router.bind_experts(bank)`` once, and the experts cannot be sharded across ranks.
- ``has_selection_bias``: owns a ``bias_E`` added to the scores for selection only; ``with_selection_bias()`` returns
  the spec with it turned on (what :class:`moekit.AuxFree` asks for).
- ``num_free_experts`` / ``build_free_experts(dim)``: compute-free experts (zero / copy / constant / null) whose ids
  follow the bank's; the layer builds them beside the bank.
- ``flops_per_token(dim, num_experts)``: the router's own multiply-adds per token.

The module (:class:`Router`) implements ``route(x_TD, ctx) -> Assignment``. It is called as ``router(x_TD, ctx)``;
the older ``router(x_TD, task=..., prev_logits=...)`` keywords still work and build the context.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from ..assignment import Assignment
from ..protocols import RouteContext
from ..spec import Spec


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterSpec(Spec):
    # --- declarations (class-level defaults; a spec overrides them with a class attribute or a property) -------
    task_conditioned = False
    needs_token_ids = False
    needs_prev_logits = False
    reads_experts = False
    has_selection_bias = False
    num_free_experts = 0
    supports_replay = False  # reads ctx.replay_idx_TK: selects the recorded experts (moekit.replay)

    def build(self, dim: int, num_experts: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, num_experts: int) -> None:
        """Raise a ValueError if this spec cannot route over ``num_experts`` experts."""

    def with_selection_bias(self) -> "RouterSpec":
        """This spec with a selection bias ``bias_E`` (auxiliary-loss-free balancing). Specs that cannot carry one
        return themselves unchanged (``has_selection_bias`` stays False and the layer reports it)."""
        return self

    def build_free_experts(self, dim: int) -> nn.Module | None:
        """The layer-level module for the ``num_free_experts`` compute-free experts (None when there are none)."""
        return None

    def flops_per_token(self, dim: int, num_experts: int, *, experts: Spec | None = None,
                        task: int | None = None) -> float:
        """Multiply-adds the router spends per token (a linear gate: ``dim * num_experts``); ``experts`` is the
        layer's expert spec (for routers that read the bank), ``task`` the task id (for per-task gates)."""
        return float(dim * num_experts)

    # how a training loop drives the router: THOR trains on two stochastic passes with a consistency term
    consistency_passes = 1

    def for_step_budget(self, steps: int) -> "RouterSpec":
        """The spec for a run of ``steps`` optimizer steps (SMoE-Dropout spans its k schedule over them)."""
        return self

    def at_layer(self, index: int) -> "RouterSpec":
        """The spec to use at MoE layer ``index`` of a stack (0 = first); MoE++ turns its gating residual off at
        layer 0, where no previous logits exist. Default: unchanged."""
        return self


def context_of(ctx: Any = None, *, task: Any = None, prev_logits: Tensor | None = None,
               token_ids: Tensor | None = None, token_mask: Tensor | None = None) -> RouteContext:
    """A RouteContext from either a context or the convenience keywords (a RouteContext passed as ``task`` by a
    wrapper written against the old signature is accepted too)."""
    if isinstance(ctx, RouteContext):
        return ctx
    if isinstance(task, RouteContext):
        return task
    if ctx is not None:
        raise TypeError(f"router: the second argument must be a RouteContext, got {type(ctx).__name__}")
    return RouteContext(task=task, token_ids_T=token_ids, prev_logits_TE=prev_logits, token_mask_T=token_mask)


class Router(nn.Module):
    """Base class of moekit's router modules: subclasses implement :meth:`route`.

    ``bias_E`` is None unless the router owns a selection bias: the base registers an empty buffer slot that a
    subclass fills with ``register_buffer("bias_E", tensor)``."""

    num_experts: int

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias_E", None)

    def forward(self, x_TD: Tensor, ctx: RouteContext | None = None, *, task: Any = None,
                prev_logits: Tensor | None = None, token_ids: Tensor | None = None,
                token_mask: Tensor | None = None) -> Assignment:
        return self.route(x_TD, context_of(ctx, task=task, prev_logits=prev_logits, token_ids=token_ids,
                                           token_mask=token_mask))

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:  # pragma: no cover - abstract
        raise NotImplementedError
