"""Edge-MoE approximations: single-pass softmax vs torch.softmax (<= 1e-6 in float32, <= 1e-12 in float64), the
table GELU's maximum error over [-8, 8], and both used inside attention and the task gates."""

import torch
import torch.nn.functional as F

from moekit.approx import GELU_TABLE_END, GELU_TABLE_STEP, gelu_table, online_softmax, online_softmax_stats, softmax
from moekit.models.vit import Attention

GELU_TABLE_MAX_ERR = 1.2e-4  # bound: h^2/8 * max|delta''| ~ 1e-4 for h = 1/32; measured 9.74e-5 in float64


def test_online_softmax_matches_torch_float32():
    for scale in (0.1, 1.0, 10.0, 80.0):
        s = torch.randn(64, 7, 33) * scale
        for dim in (-1, 1, 0):
            err = (online_softmax(s, dim) - torch.softmax(s, dim)).abs().max()
            assert err <= 1e-6, (scale, dim, float(err))


def test_online_softmax_matches_torch_float64_and_grads():
    s = (torch.randn(50, 16, dtype=torch.float64) * 5).requires_grad_(True)
    w = torch.randn(50, 16, dtype=torch.float64)
    g1, = torch.autograd.grad((online_softmax(s) * w).sum(), s)
    g2, = torch.autograd.grad((torch.softmax(s, -1) * w).sum(), s)
    assert (online_softmax(s) - torch.softmax(s, -1)).abs().max() <= 1e-12
    assert (g1 - g2).abs().max() <= 1e-12


def test_online_stats_are_max_and_normaliser():
    s = torch.tensor([[1.0, 3.0, 2.0, 3.0, -1.0]], dtype=torch.float64)
    m, z = online_softmax_stats(s)
    assert float(m) == 3.0
    assert abs(float(z) - float(torch.exp(s - 3.0).sum())) < 1e-14


def test_online_softmax_extreme_values_no_overflow():
    s = torch.tensor([[-1e4, 0.0, 1e4], [88.0, 89.0, -88.0]])
    assert torch.isfinite(online_softmax(s)).all()
    assert (online_softmax(s) - torch.softmax(s, -1)).abs().max() <= 1e-6


def test_softmax_mode_errors():
    try:
        softmax(torch.zeros(2, 3), mode="fast")
    except ValueError as e:
        assert "exact" in str(e) and "online" in str(e)
    else:
        raise AssertionError("unknown mode accepted")


def test_gelu_table_max_error_over_range():
    x = torch.linspace(-8, 8, 400_001, dtype=torch.float64)
    err = (gelu_table(x) - F.gelu(x)).abs()
    max_err = float(err.max())
    assert max_err <= GELU_TABLE_MAX_ERR, max_err
    assert max_err > 1e-6  # it is an approximation: a test that cannot fail is a defect
    # exact at the table's knots up to float64 rounding
    knots = torch.arange(0, GELU_TABLE_END, GELU_TABLE_STEP, dtype=torch.float64)
    assert (gelu_table(knots) - F.gelu(knots)).abs().max() <= 1e-15
    assert (gelu_table(-knots) - F.gelu(-knots)).abs().max() <= 1e-15


def test_gelu_table_float32_and_outside_range_is_relu():
    x = torch.linspace(-8, 8, 10_001)
    assert (gelu_table(x) - F.gelu(x)).abs().max() <= GELU_TABLE_MAX_ERR + 1e-6
    far = torch.tensor([-50.0, -8.0, 8.0, 50.0])
    assert torch.equal(gelu_table(far), torch.relu(far))


def test_gelu_table_gradient_is_slope_of_interpolant():
    x = torch.linspace(-6, 6, 997, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(gelu_table(x).sum(), x)
    x0 = x.detach()
    exact = 0.5 * (1 + torch.erf(x0 / 2**0.5)) + x0 * torch.exp(-x0**2 / 2) / (2 * torch.pi) ** 0.5
    assert (g - exact).abs().max() <= 0.02  # a piecewise-linear table's slope is within h * max|delta''|


def test_online_attention_matches_exact():
    torch.manual_seed(1)
    exact = Attention(16, 4, "exact").double()
    online = Attention(16, 4, "online").double()
    online.load_state_dict(exact.state_dict())
    x = torch.randn(3, 9, 16, dtype=torch.float64) * 3
    assert (exact(x) - online(x)).abs().max() <= 1e-12
    assert (exact.float()(x.float()) - online.float()(x.float())).abs().max() <= 1e-5
