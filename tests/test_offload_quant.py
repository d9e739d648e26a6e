"""int8 / int4 group-wise quantisation: per-element error <= scale / 2 (+ float32 rounding), packing round trip,
and through the offloaded model: logits close to exact, bytes smaller, HOBBIT low-bit misses and EdgeMoE precision."""

from __future__ import annotations

import pytest
import torch

from moekit.offload.quant import QMAX, precision_by_importance, quantize


@pytest.mark.parametrize("bits", ["int8", "int4"])
@pytest.mark.parametrize("shape,group", [((6, 64), 32), ((3, 5, 24), 64), ((4, 10), 4)])
def test_error_bound(bits, shape, group):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    q = quantize(w, bits, group)
    d = q.dequantize()
    gs = q.group_size
    scale = w.reshape(*shape[:-1], -1, gs).abs().amax(-1) / QMAX[bits]
    bound = (scale / 2).repeat_interleave(gs, -1).reshape(shape) * (1 + 1e-5) + 1e-7
    assert d.shape == w.shape and d.dtype == w.dtype
    assert (d - w).abs().le(bound).all()
    # bytes: int8 ~ 1/4 of float32, int4 ~ 1/8 (+ scales)
    assert q.nbytes < w.nbytes * (0.3 if bits == "int8" else 0.2) + 4 * w.numel() // gs + 1


def test_int4_packing_exact_on_grid():
    s = 0.5
    w = torch.arange(-7, 8, dtype=torch.float32).repeat(2)[:28].reshape(2, 14) * s
    w[:, 0] = 7 * s  # absmax 3.5 in every group -> scale 0.5
    assert torch.equal(quantize(w, "int4", 14).dequantize(), w)


def test_bad_bits():
    with pytest.raises(ValueError, match="bits='int2'"):
        quantize(torch.ones(4, 4), "int2")
    with pytest.raises(ValueError, match="high_fraction=2"):
        precision_by_importance({0: torch.ones(4)}, high_fraction=2)


def test_precision_by_importance():
    bits = precision_by_importance({0: torch.tensor([5, 1, 9, 0]), 1: torch.tensor([0, 0, 1, 3])}, "int8", "int4", 0.5)
    assert bits[(0, 2)] == bits[(0, 0)] == "int8" and bits[(0, 1)] == bits[(0, 3)] == "int4"
    assert bits[(1, 3)] == bits[(1, 2)] == "int8"


@torch.no_grad()
def test_quantised_offload_close_and_smaller(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from offload_models import save_tiny
    from transformers import AutoModelForCausalLM

    from moekit.offload import QuantConfig, load_offloaded

    save_tiny("qwen3_moe", tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(0))
    want = ref(ids).logits
    errs = {}
    for bits in ("int8", "int4"):
        om = load_offloaded(tmp_path, "100%", quant=bits)
        got = om.model(ids).logits
        errs[bits] = (got - want).abs().max().item()
        assert om.cache.used_bytes < 0.3 * om.total_expert_bytes
    assert 0 < errs["int8"] < 0.02 * want.abs().max().item() and errs["int8"] < errs["int4"]
    # HOBBIT: with a one-expert budget nearly every lookup misses and is computed with the int4 copy, no disk read
    om = load_offloaded(tmp_path, 6144, quant=QuantConfig(lowbit_on_miss=True))
    om.cache.reset_stats()
    got = om.model(ids).logits
    st = om.stats()
    assert st["lowbit_served"] > 0 and st["cache"]["bytes_read"] == 0 and st["lowbit_bytes"] > 0
    assert (got - want).abs().max().item() < 10 * errs["int4"] + 1e-3
    # EdgeMoE: per-expert precision from a profile
    prof = load_offloaded(tmp_path, "100%")
    prof.model(ids)
    eb = precision_by_importance(prof.runtime.counts, None, "int4", 0.5)
    om = load_offloaded(tmp_path, "100%", quant=QuantConfig(expert_bits=eb))
    got = om.model(ids).logits
    assert (got - want).abs().max().item() <= errs["int4"] * 1.5 + 1e-6
