"""MoEfication (moekit.convert.moefy): neuron clustering into experts of a tiny random Llama, exactness with every
expert active, balanced clusters, fitted routers, and the UpcycleConfig(init="cluster") entry point."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.convert.moefy import (  # noqa: E402
    MoefyConfig, balanced_assign, balanced_kmeans, expert_contributions, finetune_, moefy_, neuron_partition,
    set_top_k_,
)
from moekit.convert.upcycle import UpcycleConfig, revert, select_sites, upcycle_  # noqa: E402
from moekit.convert.unit_gate import UnitGate  # noqa: E402
from moekit.routers.topk import TopK  # noqa: E402


def tiny_llama(seed: int = 0, layers: int = 2, inter: int = 64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def ids(seed: int, b: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["cluster", "contiguous", "random"])
def test_all_experts_equal_dense_logits(method):
    model = tiny_llama()
    x = ids(1)
    with torch.no_grad():
        dense = model(input_ids=x).logits
    handle = moefy_(model, ids(2, 4, 32), MoefyConfig(num_experts=8, k=8, method=method))
    with torch.no_grad():
        moe = model(input_ids=x).logits
    assert len(handle.moe_layers()) == 2
    assert (moe - dense).abs().max().item() <= 1e-4
    revert(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, dense)


def test_upcycle_init_cluster_is_exact_and_balanced():
    model = tiny_llama(3)
    x = ids(4)
    with torch.no_grad():
        dense = model(input_ids=x).logits
    handle = upcycle_(model, UpcycleConfig(num_experts=4, router=UnitGate(router=TopK(k=4)), init="cluster"))
    with torch.no_grad():
        assert (model(input_ids=x).logits - dense).abs().max().item() <= 1e-4
    moe = next(iter(handle.moe_layers().values()))
    assert moe.experts.hidden_dim == 16
    # the router starts at the clusters' mean gate rows, not at random
    gate = moe.router.inner.gate.weight
    w1 = select_sites(tiny_llama(3), None)[0].weights().w1_FD
    rows = {tuple(r.tolist()) for r in torch.round(moe.experts.gate_EFD.detach().reshape(-1, 32) * 1e5)}
    assert rows == {tuple(r.tolist()) for r in torch.round(w1 * 1e5)}  # every dense neuron lands in one expert
    assert torch.allclose(gate, moe.experts.gate_EFD.detach().mean(1), atol=1e-6)


def test_upcycle_cluster_needs_divisible_hidden():
    with pytest.raises(ValueError, match="init='cluster' needs num_experts=5"):
        upcycle_(tiny_llama(), UpcycleConfig(num_experts=5, router=UnitGate(router=TopK(k=5)), init="cluster"))


def test_balanced_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 6, generator=g) * 10
    truth = torch.arange(4).repeat_interleave(5)[torch.randperm(20, generator=g)]
    x = centers[truth] + 0.1 * torch.randn(20, 6, generator=g)
    found = balanced_kmeans(x, 4, seed=1)
    assert torch.bincount(found, minlength=4).tolist() == [5, 5, 5, 5]
    # the same partition up to cluster names
    pairs = {(int(a), int(b)) for a, b in zip(truth, found)}
    assert len(pairs) == 4


def test_balanced_assign_respects_capacity():
    d = torch.zeros(6, 3)
    d[:, 0] = -1.0  # every point prefers cluster 0
    out = balanced_assign(d)
    assert torch.bincount(out, minlength=3).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="do not divide"):
        balanced_assign(torch.zeros(7, 3))


def test_partitions_are_balanced_permutations():
    model = tiny_llama()
    dw = select_sites(model, None)[0].weights()
    x = torch.randn(50, 32)
    for method in ("cluster", "contiguous", "random"):
        n = neuron_partition(dw, 8, method, features="activations", x_TD=x)
        assert n.shape == (8, 8)
        assert sorted(n.reshape(-1).tolist()) == list(range(64))
    assert not torch.equal(neuron_partition(dw, 8, "cluster", features="activations", x_TD=x),
                           torch.arange(64).reshape(8, 8))


def test_regression_router_beats_random_router_and_centroid_is_built():
    model = tiny_llama(5, layers=1, inter=128)
    calib = ids(6, 8, 32)
    handle = moefy_(model, calib, MoefyConfig(num_experts=8, k=2, method="cluster"))
    fit = handle.moefy.router_fit
    (name, moe), = handle.moe_layers().items()
    assert 0.0 < fit[name]["r2"] <= 1.0
    # on the calibration inputs the router's top-2 captures more of the true contribution than a random top-2
    site_x = {}
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: site_x.update(x=a[0].reshape(-1, 32)))
    with torch.no_grad():
        model(input_ids=calib)
    h.remove()
    revert(model)
    dw = select_sites(model, None)[0].weights()
    c = expert_contributions(dw, handle.moefy.neurons[name], site_x["x"])
    logits = site_x["x"] @ moe.router.inner.gate.weight.detach().T
    chosen = c.gather(1, logits.topk(2, dim=1).indices).sum(1).mean()
    rand = c.gather(1, torch.randint(0, 8, (c.shape[0], 2), generator=torch.Generator().manual_seed(0))).sum(1).mean()
    assert chosen > rand * 1.05
    # the centroid router needs no data
    model2 = tiny_llama(5, layers=1, inter=128)
    h2 = moefy_(model2, None, MoefyConfig(num_experts=8, k=2, features="weights", router_fit="centroid"))
    moe2 = next(iter(h2.moe_layers().values()))
    assert moe2.router.inner.gate.weight.abs().sum() > 0


def test_top_k_approximation_improves_with_k_and_set_top_k():
    model = tiny_llama(7)
    x = ids(8)
    with torch.no_grad():
        dense = model(input_ids=x).logits
    moefy_(model, ids(9, 8, 32), MoefyConfig(num_experts=8, k=1))
    errs = []
    for k in (1, 4, 8):
        set_top_k_(model, k)
        with torch.no_grad():
            errs.append((model(input_ids=x).logits - dense).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] <= 1e-4
    with pytest.raises(ValueError, match="k must be in"):
        set_top_k_(model, 9)


def test_finetune_router_only_changes_only_routers():
    model = tiny_llama(10, layers=1)
    handle = moefy_(model, ids(11, 4, 32), MoefyConfig(num_experts=4, k=1))
    moe = next(iter(handle.moe_layers().values()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = finetune_(model, [ids(12, 2, 16)], steps=3, lr=1e-2, router_only=True)
    assert len(losses) == 3
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("router" in n for n in changed)
    assert moe.router.inner.gate.weight.requires_grad


def test_config_errors():
    with pytest.raises(ValueError, match="k must be in"):
        MoefyConfig(num_experts=4, k=5)
    with pytest.raises(ValueError, match="unknown method"):
        MoefyConfig(num_experts=4, method="kmeans")
    with pytest.raises(ValueError, match="needs calibration"):
        moefy_(tiny_llama(), None, MoefyConfig(num_experts=4))
    with pytest.raises(ValueError, match="must divide the FFN hidden size"):
        moefy_(tiny_llama(), ids(0), MoefyConfig(num_experts=5, k=1))


def test_tail_from_cached_hidden_states_equals_the_full_model():
    from moekit.lm.metrics import perplexity
    from moekit.lm.tail import hidden_before, tail_loss, tail_perplexity, tail_view

    model = tiny_llama(20, layers=3)
    x = ids(21, 3, 20)
    with torch.no_grad():
        full = model(input_ids=x).logits
        h = hidden_before(model, x, 2, batch_size=2)
        assert h.shape == (3, 20, 32)
        with tail_view(model, 2):
            assert len(model.model.layers) == 1
            tail = model(inputs_embeds=h, use_cache=False).logits
    assert len(model.model.layers) == 3  # restored
    assert (tail - full).abs().max().item() <= 1e-5
    assert abs(tail_perplexity(model, 2, h, x, batch_size=2) - perplexity(model, x)) <= 1e-4 * perplexity(model, x)
    ref = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    with torch.no_grad():
        assert abs(float(tail_loss(model, 2, h, x)) - float(ref)) <= 1e-5
    with pytest.raises(ValueError, match="start must be in"):
        hidden_before(model, x, 3)


def test_finetune_of_the_last_layers_on_cached_hidden_states_trains_only_them():
    from moekit.lm.tail import hidden_before, tail_loss

    model = tiny_llama(30, layers=2)
    moefy_(model, ids(31, 4, 32), MoefyConfig(num_experts=4, k=1, layers=(1,)))
    x = ids(32, 2, 16)
    h = hidden_before(model, x, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tail = [p for p in model.model.layers[1].parameters()]
    losses = finetune_(model, [(h, x)], steps=6, lr=3e-3, params=tail,
                       loss_fn=lambda b: tail_loss(model, 1, *b))
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.1.") for n in changed)
    assert all(p.requires_grad for p in model.parameters())  # restored
    with pytest.raises(ValueError, match="either router_only"):
        finetune_(model, [x], steps=1, router_only=True, params=tail)
