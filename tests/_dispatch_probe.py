"""A dispatcher wrapper that records how the layer drives a dispatcher, for the tests that the layer's code path
is the same for local and expert-parallel dispatch (tests/layer/test_dispatch_path.py and the EP worker)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from moekit.dispatch import DispatchPlan


def snapshot(plan: DispatchPlan) -> dict:
    """Every field of a plan, tensors cloned (nested dataclasses flattened), to check it is never changed."""
    out = {}
    for f in dataclasses.fields(plan):
        v = getattr(plan, f.name)
        if dataclasses.is_dataclass(v):
            out.update({f"{f.name}.{k}": w for k, w in snapshot(v).items()})
        else:
            out[f.name] = v.clone() if isinstance(v, Tensor) else v
    return out


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, Tensor) != isinstance(y, Tensor):
            return False
        if isinstance(x, Tensor) and not (x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)):
            return False
        if not isinstance(x, Tensor) and x != y:
            return False
    return True


class RecordingDispatcher(nn.Module):
    """Forwards plan / dispatch / combine to ``inner`` and records, per call, what the layer passed: whether
    ``dispatch`` and ``combine`` got the very plan ``plan`` returned, whether ``combine`` got the very handle
    ``dispatch`` returned, whether the bank's rows match the plan's counts, and whether the plan changed."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.log: list[tuple] = []
        self._plan = self._handle = self._snap = None

    def plan(self, a, group_size=None):
        self._plan = self.inner.plan(a, group_size)
        self._snap = snapshot(self._plan)
        self.log.append(("plan", type(self._plan).__name__))
        return self._plan

    def dispatch(self, x_TD, plan):
        x_ND, self._handle = self.inner.dispatch(x_TD, plan)
        rows_ok = x_ND.shape[0] == int(plan.counts_E.sum()) == plan.expert_N.numel()
        self.log.append(("dispatch", plan is self._plan, rows_ok))
        return x_ND, self._handle

    def combine(self, y_ND, plan, handle):
        y_TD = self.inner.combine(y_ND, plan, handle)
        self.log.append(("combine", plan is self._plan, handle is self._handle, same(snapshot(plan), self._snap)))
        return y_TD


EXPECTED_LOG = [("plan", "DispatchPlan"), ("dispatch", True, True), ("combine", True, True, True)]
