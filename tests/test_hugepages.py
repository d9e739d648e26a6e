"""moekit.hugepages: a module's large storages move onto transparent huge pages with values, Parameter objects,
sharing, gradients and strides unchanged; nothing moves where the kernel has no THP."""

import copy

import pytest
import torch
from torch import nn

from moekit import MoE, SwiGLU, TopK, hugepages

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages on this kernel")


def _model():
    torch.manual_seed(0)
    m = nn.Linear(1024, 2048)  # an 8 MiB weight, a small bias
    m.register_buffer("table", torch.randn(1024, 1024))
    m.view_t = m.weight.detach().t()  # a plain tensor attribute sharing the weight's storage
    return m


@needs_thp
def test_moves_storages_and_keeps_everything_else():
    m = _model()
    w, before = m.weight, {k: v.clone() for k, v in m.state_dict().items()}
    bias_ptr = m.bias.data_ptr()
    r = hugepages.to_hugepages(m)
    assert r.storages == 2 and r.bytes_moved == (2048 + 1024) * 1024 * 4  # weight + buffer, not the 8 KiB bias
    assert r.huge_bytes is not None and r.huge_bytes >= 2 * 2**20, r  # the kernel backs them with huge pages
    assert m.weight is w and isinstance(m.weight, nn.Parameter) and m.weight.requires_grad
    assert m.bias.data_ptr() == bias_ptr
    assert m.weight.data_ptr() % hugepages.HUGE_PAGE == 0
    assert m.view_t.data_ptr() == m.weight.data_ptr() and m.view_t.stride() == (1, 1024)  # still shared
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        m.weight[3, 5] = 7.0
    assert m.view_t[5, 3] == 7.0
    m(torch.randn(2, 1024)).sum().backward()
    assert m.weight.grad.shape == (2048, 1024)
    clone = copy.deepcopy(m)
    assert torch.equal(clone.weight, m.weight) and clone.weight.data_ptr() != m.weight.data_ptr()
    assert "moved to huge-page memory" in str(r)


@needs_thp
def test_moe_layer_gives_the_same_output_on_huge_pages():
    torch.manual_seed(0)
    moe = MoE(256, 8, router=TopK(k=2), experts=SwiGLU(hidden_dim=1024))
    x = torch.randn(3, 256)
    with torch.no_grad():
        ref = moe(x)
        assert hugepages.to_hugepages(moe).bytes_moved > 0
        torch.testing.assert_close(moe(x), ref, rtol=0, atol=0)


@needs_thp
def test_empty_is_aligned_on_huge_pages():
    t = hugepages.empty(3 * 2**20, dtype=torch.float32)
    assert t.shape == (3 * 2**20,) and t.data_ptr() % hugepages.HUGE_PAGE == 0
    t.fill_(1.0)
    assert t.sum().item() == 3 * 2**20


def test_moves_nothing_without_thp(monkeypatch):
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "never")
    m = _model()
    ptr = m.weight.data_ptr()
    r = hugepages.to_hugepages(m)
    assert (r.storages, r.bytes_moved, r.mode) == (0, 0, "never") and m.weight.data_ptr() == ptr
    assert not hugepages.available()
    assert hugepages.empty(4).shape == (4,)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        hugepages.to_hugepages(torch.zeros(3))
    with pytest.raises(ValueError, match="min_bytes"):
        hugepages.to_hugepages(nn.Linear(2, 2), min_bytes=-1)
