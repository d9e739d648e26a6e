"""Dispatchers own the movement of tokens: ``plan(a, group_size) -> DispatchPlan``, ``dispatch(x_TD, plan) ->
(x_ND, handle)``, ``combine(y_ND, plan, handle) -> y_TD``. One plan type for local and expert-parallel dispatch."""

from .local import Capacity, CapacityDispatcher, Dropless, LocalDispatcher
from .plan import DispatchPlan, RowExchange

__all__ = ["Capacity", "CapacityDispatcher", "DispatchPlan", "Dropless", "LocalDispatcher", "RowExchange"]
