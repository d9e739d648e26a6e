"""The local dispatcher's plan (the one DispatchPlan type) and its dispatch / combine, against explicit loops.

Tolerances: float64, 1e-12 absolute (the fast paths reorder sums of a few terms)."""

import dataclasses

import pytest
import torch

from moekit.assignment import Assignment
from moekit.dispatch import Capacity, DispatchPlan, Dropless

from _dispatch_probe import same, snapshot

T, E, K, D = 11, 5, 2, 3
TOL = 1e-12


def _topk_assignment(grid: bool) -> Assignment:
    g = torch.Generator().manual_seed(3)
    idx_TK = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    w_TK = torch.rand(T, K, generator=g, dtype=torch.float64).requires_grad_()
    a = Assignment.from_topk(idx_TK, w_TK, E)
    assert a.num_slots == K
    return a if grid else dataclasses.replace(a, num_slots=None)


DISPATCH = {
    "dropless_grid": (Dropless(), True),
    "dropless_pairs": (Dropless(), False),
    "capacity": (Capacity(capacity=3), True),
    "capacity_score": (Capacity(factor=0.6, drop="score"), False),
}


@pytest.mark.parametrize("name", DISPATCH)
def test_plan_fields_mean_what_they_say(name):
    spec, grid = DISPATCH[name]
    a = _topk_assignment(grid)
    plan = spec.build(E).plan(a)
    assert type(plan) is DispatchPlan and plan.exchange is None
    routed = torch.bincount(a.expert_N, minlength=E)
    assert torch.equal(plan.routed_E, routed)
    # on one process the bank is every expert: what it runs is what was kept
    assert torch.equal(plan.counts_E, plan.kept_E)
    assert bool((plan.kept_E <= plan.routed_E).all())
    assert int(plan.num_dropped) == int(routed.sum() - plan.kept_E.sum())
    if isinstance(spec, Capacity) and spec.capacity is not None:
        assert torch.equal(plan.kept_E, routed.clamp_max(spec.capacity))
    # rows grouped by expert 0..E-1, one per kept pair
    assert torch.equal(plan.expert_N, torch.repeat_interleave(torch.arange(E), plan.counts_E))
    assert plan.token_N.numel() == int(plan.counts_E.sum())
    assert (plan.inv_order_N is not None) == (grid and isinstance(spec, Dropless))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.counts_E = plan.routed_E


@pytest.mark.parametrize("name", DISPATCH)
def test_dispatch_combine_equal_the_pair_loop(name):
    """x_ND rows are the kept pairs' tokens; combine is the weighted sum over the kept pairs (each kept pair found
    in the assignment by (token, expert)); gradients to x and the weights match the loop's."""
    spec, grid = DISPATCH[name]
    a = _topk_assignment(grid)
    disp = spec.build(E)
    plan = disp.plan(a)
    before = snapshot(plan)
    x_TD = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    x_ND, handle = disp.dispatch(x_TD, plan)
    assert handle is None
    scale_N = (plan.expert_N + 1).to(x_ND.dtype).unsqueeze(-1)  # expert e multiplies by e + 1
    y_TD = disp.combine(x_ND * scale_N, plan, handle)
    assert same(snapshot(plan), before)

    kept = {(int(t), int(e)) for t, e in zip(plan.token_N, plan.expert_N)}
    x_ref = x_TD.detach().clone().requires_grad_()
    ref = [torch.zeros(D, dtype=torch.float64) for _ in range(T)]
    for t, e, w in zip(a.token_N.tolist(), a.expert_N.tolist(), a.weight_N):
        if (t, e) in kept:
            ref[t] = ref[t] + w * (e + 1) * x_ref[t]
    ref = torch.stack(ref)
    assert torch.equal(x_ND.detach(), x_TD.detach()[plan.token_N])
    assert (y_TD - ref).abs().max() <= TOL
    g = torch.randn(T, D, dtype=torch.float64)
    gx, gw = torch.autograd.grad((y_TD * g).sum(), (x_TD, a.weight_N))
    gx_ref, gw_ref = torch.autograd.grad((ref * g).sum(), (x_ref, a.weight_N))
    assert (gx - gx_ref).abs().max() <= TOL and (gw - gw_ref).abs().max() <= TOL


def test_grid_fast_path_equals_the_generic_path():
    """The same pairs with and without the grid layout: one plan type, the same bank fields, the same output."""
    a = _topk_assignment(True)
    disp = Dropless().build(E)
    p_grid, p_pairs = disp.plan(a), disp.plan(dataclasses.replace(a, num_slots=None))
    for f in ("token_N", "counts_E", "expert_N", "routed_E", "kept_E"):
        assert torch.equal(getattr(p_grid, f), getattr(p_pairs, f)), f
    x_TD = torch.randn(T, D, dtype=torch.float64)
    y = [disp.combine(disp.dispatch(x_TD, p)[0] * 2, p, None) for p in (p_grid, p_pairs)]
    assert (y[0] - y[1]).abs().max() <= TOL
