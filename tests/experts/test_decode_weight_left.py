"""The bank's decode path (weight-left matmuls per touched expert) against the per-row reference
``ExpertBank.expert_forward``, at shapes where each expert gets 1..16 rows, sorted or not."""

from __future__ import annotations

import pytest
import torch

from moekit.experts import MLP, SwiGLU
from moekit.experts.bank import DECODE_MAX_ROWS

D, E = 24, 5


def _bank(spec, dtype):
    bank = spec.build(D, E).to(dtype)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.3)
    return bank


def _reference(bank, x_ND, expert_N):
    return torch.stack([bank.expert_forward(int(e), x_ND[n:n + 1])[0] for n, e in enumerate(expert_N)])


SPECS = [SwiGLU(hidden_dim=40), SwiGLU(hidden_dim=40, bias=True), SwiGLU(hidden_dim=40, activation="gelu"),
         MLP(hidden_dim=40), MLP(hidden_dim=40, activation="relu", bias=False)]


@pytest.mark.parametrize("spec", SPECS, ids=["swiglu", "swiglu-bias", "geglu", "mlp", "mlp-relu-nobias"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("layout", ["sorted", "shuffled", "one-expert"])
def test_decode_equals_per_row_reference(spec, dtype, tol, layout):
    g = torch.Generator().manual_seed(hash((layout, str(dtype))) % 2**31)
    N = DECODE_MAX_ROWS
    if layout == "one-expert":  # every row on one expert: the largest M the decode path sees
        expert_N = torch.full((N,), 3)
    else:
        expert_N = torch.randint(0, E, (N,), generator=g)
        if layout == "sorted":
            expert_N = expert_N.sort().values
    bank = _bank(spec, dtype)
    x_ND = torch.randn(N, D, generator=g, dtype=dtype)
    with torch.no_grad():
        y = bank(x_ND, torch.bincount(expert_N, minlength=E), expert_N)
        want = _reference(bank, x_ND, expert_N)
    torch.testing.assert_close(y, want, atol=tol, rtol=0)
    assert (y - want).abs().max() <= tol  # the tolerance is the test's, not assert_close's default


def test_decode_reads_each_touched_expert_once_weight_left(monkeypatch):
    """Torch path (native kernels off): two matmuls per touched expert, each with an (out, in) expert weight on the
    left; untouched experts unread. (The native path: tests/test_native.py.)"""
    from moekit.ops import native

    monkeypatch.setattr(native, "available", lambda: False)
    bank = _bank(SwiGLU(hidden_dim=40), torch.float32)
    calls = []
    real_mm = torch.mm

    def spy(a, b, *args, **kw):
        calls.append((a.data_ptr(), tuple(a.shape)))
        return real_mm(a, b, *args, **kw)

    monkeypatch.setattr(torch, "mm", spy)
    expert_N = torch.tensor([4, 1, 4, 4, 1])
    x_ND = torch.randn(5, D)
    with torch.no_grad():
        bank(x_ND, torch.bincount(expert_N, minlength=E), expert_N)
    w13, w2 = bank.w13_E2FD, bank.w2_EDF
    want = {(w13[e].data_ptr(), (80, D)) for e in (1, 4)} | {(w2[e].data_ptr(), (D, 40)) for e in (1, 4)}
    assert len(calls) == 4 and set(calls) == want
