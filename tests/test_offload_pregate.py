"""Pre-gated MoE's pre-gate as a prefetch predictor: initialised at router reuse, trained to predict the next layer's
experts better than reusing its router on the same inputs, and exact when serving (it only decides what to load)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from offload_models import save_tiny  # noqa: E402

from moekit.offload import load_offloaded  # noqa: E402
from moekit.offload.pregate import prediction_quality, record_routing, train_pregate  # noqa: E402


def _batches(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (2, 16), generator=g) for _ in range(n)]


@torch.no_grad()
def test_pregate_beats_router_reuse_and_serves_exactly(tmp_path):
    torch.manual_seed(0)
    model = save_tiny("qwen3_moe", tmp_path)
    routers = {L: layer.mlp.gate for L, layer in enumerate(model.model.layers)}
    rec = record_routing(model, _batches(0))
    base = prediction_quality(rec, routers)
    same = prediction_quality(rec, train_pregate(model, _batches(0), routers, steps=0))
    assert same == base  # steps=0: the pre-gate is the router (router reuse)
    pg = train_pregate(model, _batches(0), routers, steps=200)
    fit = prediction_quality(rec, pg)
    assert fit["recall"] > base["recall"] + 0.05, (fit, base)
    held = prediction_quality(record_routing(model, _batches(1)), pg)
    assert 0 <= held["recall"] <= 1

    ids = _batches(2, 1)[0][:1]
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    om = load_offloaded(tmp_path, "40%", prefetch=True, pregate=pg)
    assert torch.equal(om.model.generate(ids, max_new_tokens=6, do_sample=False), want)
    st = om.stats()
    assert st["prefetch"]["predicted"] > 0
    om.close()
    with pytest.raises(ValueError, match="pregate"):
        load_offloaded(tmp_path, "40%", prefetch=True, pregate={5: pg[1]})
    with pytest.raises(ValueError, match="pregate"):
        load_offloaded(tmp_path, "40%", prefetch=False, pregate=pg)
