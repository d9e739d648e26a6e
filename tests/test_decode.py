"""The decode path (few rows, no autograd): per touched expert, equal to the grouped path and the reference loop."""

from __future__ import annotations

import pytest
import torch

import moekit.experts.bank as bank_mod
from moekit.ops import native
from moekit import Capacity, Dropless, MoE
from moekit.experts import MLP, SwiGLU
from moekit.reference.loop import moe_reference
from moekit.routers import TopK

D, E = 8, 6


@pytest.mark.parametrize("experts", [SwiGLU(hidden_dim=16), SwiGLU(hidden_dim=16, bias=True), MLP(hidden_dim=16)],
                         ids=["swiglu", "swiglu-bias", "mlp"])
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_decode_path_equals_grouped_path_and_reference(experts, T, dtype, tol):
    torch.manual_seed(T)
    layer = MoE(D, E, router=TopK(k=2), experts=experts).to(dtype).eval()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(T, D, dtype=dtype)
    with torch.no_grad():
        y_decode = layer(x)
    y_grouped = layer(x)  # autograd on: the grouped path
    torch.testing.assert_close(y_decode, y_grouped.detach(), atol=tol, rtol=0)
    torch.testing.assert_close(y_decode, moe_reference(layer, x).detach(), atol=tol, rtol=0)


def test_decode_path_is_taken_and_reads_only_touched_experts(monkeypatch):
    """Under no_grad with <= DECODE_MAX_ROWS rows the grouped kernel is not called; unsorted rows work too."""
    layer = MoE(D, E, router=TopK(k=2), experts=SwiGLU(hidden_dim=16)).eval()
    layer.fuse_decode(False)  # the composed path: the bank's own decode (the fused call: tests/test_fused_decode.py)
    monkeypatch.setattr(bank_mod, "grouped_linear", lambda *a, **k: (_ for _ in ()).throw(AssertionError("grouped")))
    x = torch.randn(4, D)
    expert_N = torch.tensor([3, 0, 3, 5, 0, 1])  # unsorted, repeated experts
    x_ND = torch.randn(6, D)
    with torch.no_grad():
        y = layer.experts(x_ND, torch.bincount(expert_N, minlength=E), expert_N)
        layer(x)
    want = torch.stack([layer.experts.expert_forward(int(e), x_ND[n : n + 1])[0] for n, e in enumerate(expert_N)])
    torch.testing.assert_close(y, want, atol=1e-5, rtol=0)
    with pytest.raises(AssertionError, match="grouped"):  # more rows than the decode path takes
        with torch.no_grad():
            layer(torch.randn(bank_mod.DECODE_MAX_ROWS, D))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize("out_dim", [24, 13])  # 13: no block count > 1 divides it (falls back to one matmul)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
def test_small_linear_equals_linear(threads, M, out_dim, bias, split, monkeypatch):
    """``small_linear`` (row blocks of an (out, in) weight or reduction blocks of an (in, out) one in one bmm for one
    row, weight-left for a few) equals ``F.linear`` in float64 to 1e-12, for every thread count (the block count
    follows the threads), split (the size threshold lowered to 0 so these small weights split) or not."""
    if split:
        monkeypatch.setattr(bank_mod, "SPLIT_MIN_BYTES", 0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(M)
        D = 8  # divisible by 2, 4: the reduction split of a transposed weight applies
        x = torch.randn(M, D, dtype=torch.float64)
        w = torch.randn(out_dim, D, dtype=torch.float64)
        b = torch.randn(out_dim, dtype=torch.float64) if bias else None
        ref = torch.nn.functional.linear(x, w, b)
        torch.testing.assert_close(bank_mod.small_linear(x, w, b), ref, atol=1e-12, rtol=0)
        w_in_out = torch.randn(D, out_dim, dtype=torch.float64).T  # an (in, out) weight seen as (out, in)
        torch.testing.assert_close(bank_mod.small_linear(x, w_in_out, b),
                                   torch.nn.functional.linear(x, w_in_out, b), atol=1e-12, rtol=0)
        x_expanded = x[:1].expand(1, D)  # a stride-0 row (a broadcast token)
        torch.testing.assert_close(bank_mod.small_linear(x_expanded, w_in_out, b),
                                   torch.nn.functional.linear(x[:1], w_in_out, b), atol=1e-12, rtol=0)
    finally:
        torch.set_num_threads(old)


def test_small_linear_splits_only_large_weights(monkeypatch):
    """Two threads, torch path (native kernels off): a one-row matmul runs as one bmm over blocks from
    SPLIT_MIN_BYTES of weight, as one mm below."""
    monkeypatch.setattr(native, "available", lambda: False)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(a[0].shape) or real_bmm(*a, **k))
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(1, 64)
        bank_mod.small_linear(x, torch.randn(128, 64))  # 32 KB
        assert calls == []
        big = torch.randn(bank_mod.SPLIT_MIN_BYTES // (64 * 4), 64)  # exactly the threshold
        bank_mod.small_linear(x, big)
        bank_mod.small_linear(x, torch.randn(64, big.shape[0]).T)  # (in, out) storage: reduction blocks
        assert len(calls) == 2 and calls[0][0] == 4 and calls[1][0] == 4
    finally:
        torch.set_num_threads(old)


def test_decode_layer_with_two_threads_equals_reference():
    """The decode path at two threads (one-row experts take the row-block bmm) equals the per-token reference."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        layer = MoE(D, E, router=TopK(k=2), experts=SwiGLU(hidden_dim=16)).double().eval()
        x = torch.randn(1, D, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), moe_reference(layer, x), atol=1e-12, rtol=0)
    finally:
        torch.set_num_threads(old)


def _top_level_aten_ops(fn) -> list[str]:
    from torch.profiler import profile

    with profile() as p:
        fn()
    return [e.name for e in p.events() if e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_one_token_call_stays_lean(k):
    """Decode is bound by per-op dispatch cost on CPU (a few microseconds each), so a one-token call's op count is
    part of the contract: routing, a two-op plan (no argsort), one gather for the dispatch, two matmuls per touched
    expert with one gating over all rows, and a one-product combine. Measured 2026-12-07: 34 / 44 / 60 ops at
    k = 1 / 2 / 4 (profiler, top level, views included; 55 / 75 / 113 before); the bound leaves a few ops of room."""
    layer = MoE(D, E, router=TopK(k=k), experts=SwiGLU(hidden_dim=16)).eval()
    x = torch.randn(1, D)
    with torch.no_grad():
        layer(x)
        ops = _top_level_aten_ops(lambda: layer(x))
    assert len(ops) <= 35 + 8 * k, (len(ops), ops)
    for slow in ("aten::argsort", "aten::index_add", "aten::gather", "aten::arange"):
        assert slow not in ops, slow


@pytest.mark.parametrize("router", [TopK(k=2), TopK(k=2, correction_bias=True, score="sigmoid"),
                                    TopK(k=2, n_group=3, topk_group=2)], ids=["plain", "bias", "groups"])
@pytest.mark.parametrize("dispatch", [Dropless(), Capacity(factor=0.3)], ids=["dropless", "capacity"])
def test_one_token_equals_reference(router, dispatch):
    """One token without autograd (the top-k values shortcut or the gather, the two-op plan or the capacity plan,
    the one-product combine) against the per-token loop, float64 to 1e-12."""
    torch.manual_seed(0)
    layer = MoE(D, E, router=router, experts=SwiGLU(hidden_dim=16), dispatch=dispatch).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        if layer.router.bias_E is not None:
            layer.router.bias_E.copy_(torch.linspace(-0.5, 0.5, E, dtype=torch.float64))
        for _ in range(3):
            x = torch.randn(1, D, dtype=torch.float64)
            out = layer.forward_with_aux(x)
            torch.testing.assert_close(out.y, moe_reference(layer, x), atol=1e-12, rtol=0)
            assert int(out.stats.routed_per_expert_E.sum()) == 2  # the counts are the token's two pairs


@pytest.mark.parametrize("impl,E,k", [("grouped_mm", 8, 2), ("loop", 8, 2), ("auto", 40, 20), ("grouped_mm", 40, 20)],
                         ids=["grouped_mm", "loop", "auto-too-many-rows", "grouped_mm-too-many-rows"])
def test_one_token_on_banks_that_do_not_decode(impl, E, k):
    """One token without autograd whose rows reach the grouped kernel or the loop (impl forced, or more than
    DECODE_MAX_ROWS pairs): the dispatched rows must be real rows (a stride-0 view of the token broke grouped_mm)."""
    torch.manual_seed(1)
    layer = MoE(64, E, router=TopK(k=k), experts=SwiGLU(hidden_dim=64, impl=impl)).eval()
    x = torch.randn(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), moe_reference(layer, x), atol=1e-5, rtol=0)
