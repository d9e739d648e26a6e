"""Dispatchers own the movement of tokens: ``plan(assignment)``, ``dispatch(x_TD, plan)``, ``combine(y_ND, plan)``."""

from .local import Capacity, CapacityDispatcher, DispatchPlan, Dropless, LocalDispatcher

__all__ = ["Capacity", "CapacityDispatcher", "DispatchPlan", "Dropless", "LocalDispatcher"]
