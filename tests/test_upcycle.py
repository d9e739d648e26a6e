"""Upcycling dense transformers: exact function at init (copy with renormalised / unit weights, neuron split with
every slice active), gradients against the dense model, reversibility, layer selection, freezing and errors.

The reference is the dense model itself: at init the upcycled model must compute the same logits (float32, 1e-5)
and the same gradients (float64, 1e-10), and the expert gradients must add up to the dense FFN's gradient.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from upcycle_models import ARCHS, tiny

from moekit import MoE, SwitchLoss, TopK
from moekit.convert.ffn_forms import activation_name
from moekit.convert.unit_gate import UnitGate
from moekit.convert.upcycle import UpcycleConfig, get_upcycle, revert, select_sites, train_only_moe_, upcycle_

E = 4
CONFIGS = {
    "copy-topk2-renorm": UpcycleConfig(num_experts=E, router=TopK(k=2, normalize=True), init="copy"),
    "copy-switch-unit": UpcycleConfig(num_experts=E, router=UnitGate(router=TopK(k=1)), init="copy"),
    "split-all-active": UpcycleConfig(num_experts=E, router=UnitGate(router=TopK(k=E)), init="split"),
}


def _logits(model, inputs):
    return model(**inputs).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_upcycled_logits_equal_dense_at_init(arch, name):
    model, inputs = tiny(arch)
    with torch.no_grad():
        dense = _logits(model, inputs)
    handle = upcycle_(model, CONFIGS[name])
    assert len(handle.moe_layers()) == 2 and all(isinstance(m, MoE) for m in handle.moe_layers().values())
    with torch.no_grad():
        moe = _logits(model, inputs)
    assert (moe - dense).abs().max().item() <= 1e-5


def _dense_w1_param(site) -> nn.Parameter:
    """The dense FFN's first weight (GPT-2's Conv1D stores it as (D, F), the others as (F, D))."""
    m = site.module
    first = {"glu": "gate_proj", "conv1d": "c_fc", "lin": "lin1", "fc": "fc1", "bert": "intermediate.dense"}[site.form]
    return m.get_submodule(first).weight


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2", "llama", "vit"])
@pytest.mark.parametrize("name", ["copy-topk2-renorm", "split-all-active"])
def test_gradients_match_dense_float64(arch, name):
    model, inputs = tiny(arch)
    model.double()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    site = select_sites(model, None)[0]
    w1 = _dense_w1_param(site)
    transposed = site.form == "conv1d"
    c = torch.randn(_logits(model, inputs).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (_logits(model, inputs) * c).sum().backward()
    dense_g1 = (w1.grad.t() if transposed else w1.grad).clone()
    dense_all = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    cfg = CONFIGS[name]
    if name.startswith("split"):
        # the unit gate's straight-through term sends sum_e E_e(x) dp_e/dx to x (how the router learns); a zero
        # router has dp/dx = 0, so then every parameter the models share must get exactly the dense gradient.
        # Copies with renormalised weights need no such care: sum_e dp_e = 0 and the experts are equal.
        cfg = dataclasses.replace(cfg, router_std=0.0)
    handle = upcycle_(model, cfg)
    (_logits(model, inputs) * c).sum().backward()
    bank = handle.moe_layers()[site.name].experts
    g1_EFD = bank.w_in.grad[:, : bank.hidden_dim]  # the gate rows (GLU) or the whole input weight
    if name.startswith("copy"):  # copies weighted by renormalised gates: expert gradients add up to the dense one
        torch.testing.assert_close(g1_EFD.sum(0), dense_g1, rtol=0, atol=1e-10)
    else:  # slices: each expert's gradient is its slice of the dense gradient
        torch.testing.assert_close(g1_EFD.reshape(dense_g1.shape), dense_g1, rtol=0, atol=1e-10)
    for n, p in model.named_parameters():  # every parameter the two models share gets the same gradient
        if n in dense_all and p.grad is not None:
            torch.testing.assert_close(p.grad, dense_all[n], rtol=0, atol=1e-10)


def test_split_slices_are_the_dense_neurons():
    model, _ = tiny("llama")
    site = select_sites(model, [0])[0]
    dense = site.weights()
    handle = upcycle_(model, UpcycleConfig(num_experts=E, router=UnitGate(router=TopK(k=E)), init="split", layers=[0]))
    bank = handle.moe_layers()[site.name].experts
    F_ = dense.hidden_dim // E
    for e in range(E):
        assert torch.equal(bank.gate_EFD[e], dense.w1_FD[e * F_ : (e + 1) * F_])
        assert torch.equal(bank.up_EFD[e], dense.w3_FD[e * F_ : (e + 1) * F_])
        assert torch.equal(bank.w2_EDF[e], dense.w2_DF[:, e * F_ : (e + 1) * F_])


def test_split_output_bias_is_shared_once():
    model, _ = tiny("bert")
    site = select_sites(model, [1])[0]
    b2 = site.weights().b2_D.clone()
    handle = upcycle_(model, UpcycleConfig(num_experts=E, router=UnitGate(router=TopK(k=E)), init="split", layers=[1]))
    torch.testing.assert_close(handle.moe_layers()[site.name].experts.b2_ED.sum(0), b2, rtol=0, atol=1e-6)


def test_unit_gate_weights_are_one_with_switch_router_gradient():
    torch.manual_seed(3)
    x = torch.randn(10, 8)
    plain = MoE(8, 3, router=TopK(k=1, normalize=False), experts="mlp")
    unit = MoE(8, 3, router=UnitGate(router=TopK(k=1, normalize=False)), experts="mlp")
    unit.router.inner.load_state_dict(plain.router.state_dict())
    unit.experts.load_state_dict(plain.experts.state_dict())
    a = unit.router(x)
    assert torch.equal(a.weight_N, torch.ones_like(a.weight_N))
    assert torch.equal(a.expert_N, plain.router(x).expert_N)
    # unit output = selected expert's output with weight 1
    ref = torch.stack([unit.experts.expert_forward(int(e), x[t : t + 1])[0] for t, e in zip(a.token_N, a.expert_N)])
    torch.testing.assert_close(unit(x), ref, rtol=0, atol=1e-6)
    # for a loss linear in y, d loss / d weight = <c, E_e(x)> in both layers: the routers get the same gradient
    c = torch.randn(10, 8)
    (plain(x) * c).sum().backward()
    (unit(x) * c).sum().backward()
    torch.testing.assert_close(unit.router.inner.gate.weight.grad, plain.router.gate.weight.grad, rtol=0, atol=1e-6)


def test_unit_gate_serializes():
    cfg = UpcycleConfig(num_experts=E, router=UnitGate(router=TopK(k=1)), balance=SwitchLoss(coef=0.02))
    again = UpcycleConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("arch", ["bert", "distilbert", "gpt2", "llama"])
def test_revert_restores_module_objects_and_outputs(arch):
    model, inputs = tiny(arch)
    before = dict(model.named_modules())
    with torch.no_grad():
        dense = _logits(model, inputs)
    handle = upcycle_(model, UpcycleConfig(num_experts=E, noise=0.5, router=TopK(k=2)))
    with torch.no_grad():
        assert (_logits(model, inputs) - dense).abs().max() > 1e-6  # noise made it differ: revert is not a no-op
    handle.moe_layers()  # usable before revert
    revert(model)
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert get_upcycle(model) is None and not any(isinstance(m, MoE) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(_logits(model, inputs), dense)
    upcycle_(model, CONFIGS["copy-switch-unit"])  # can upcycle again after revert
    with pytest.raises(RuntimeError, match="no longer active"):
        handle.revert()


def test_copy_noise_makes_experts_differ_by_the_requested_scale():
    model, _ = tiny("llama")
    site = select_sites(model, [0])[0]
    w1 = site.weights().w1_FD.clone()
    handle = upcycle_(model, UpcycleConfig(num_experts=E, noise=0.1, layers=[0], seed=5))
    bank = handle.moe_layers()[site.name].experts
    delta = bank.gate_EFD.detach() - w1
    ratio = float(delta.std() / w1.std())
    assert 0.08 < ratio < 0.12
    assert not torch.equal(bank.gate_EFD[0], bank.gate_EFD[1])


def test_random_init_and_seed_reproducibility():
    m1, inputs = tiny("gpt2")
    m2, _ = tiny("gpt2")
    m2.load_state_dict(m1.state_dict())
    cfg = UpcycleConfig(num_experts=E, init="random", seed=7)
    h1 = upcycle_(m1, cfg)
    upcycle_(m2, cfg)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n
    site = h1.sites[0]
    assert not torch.allclose(h1.moe_layers()[site].experts.w1_EFD[0], h1.moe_layers()[site].experts.w1_EFD[1])
    with torch.no_grad():
        assert torch.isfinite(m1(**inputs).logits).all()


def test_layer_selection_by_index_pattern_names_and_filter():
    model, _ = tiny("bert")
    assert [s.index for s in select_sites(model, None)] == [0, 1]
    assert [s.name for s in select_sites(model, (-1,))] == ["bert.encoder.layer.1"]
    assert [s.name for s in select_sites(model, r"layer\.0$")] == ["bert.encoder.layer.0"]
    assert [s.name for s in select_sites(model, lambda n, m: n.endswith("1"))] == ["bert.encoder.layer.1"]
    assert [s.form for s in select_sites(model, ("bert.encoder.layer.1",))] == ["bert"]
    untouched = model.bert.encoder.layer[0].intermediate
    upcycle_(model, UpcycleConfig(num_experts=E, layers=[1]))
    assert model.bert.encoder.layer[0].intermediate is untouched
    assert isinstance(model.bert.encoder.layer[1].output.dense, nn.Identity)


class _ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = _ToyMLP()

    def forward(self, x):
        return x + self.mlp(x)


class _ToyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(8, 16), nn.Linear(16, 8), nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_unknown_architecture_needs_a_filter():
    model = nn.Sequential(_ToyBlock(), _ToyBlock())
    with pytest.raises(ValueError, match="no known FFN location"):
        upcycle_(model, UpcycleConfig(num_experts=E))
    with pytest.raises(ValueError, match="no known FFN location"):
        upcycle_(model, UpcycleConfig(num_experts=E, layers=[0]))
    x = torch.randn(3, 8)
    dense = model(x)
    handle = upcycle_(model, UpcycleConfig(num_experts=E, layers=lambda name, m: name == "1.mlp"))
    assert handle.sites == ["1.mlp"] and handle.forms == ["fc"]
    assert handle.moe_layers()["1.mlp"].experts.spec.activation == "gelu_tanh"
    torch.testing.assert_close(model(x), dense, rtol=0, atol=1e-5)
    revert(model)
    assert isinstance(model[1].mlp, _ToyMLP)
    with pytest.raises(ValueError, match="selects no dense FFN"):
        upcycle_(model, UpcycleConfig(num_experts=E, layers="nothing_matches"))


def test_errors():
    model, _ = tiny("distilbert")
    with pytest.raises(ValueError, match=r"layer index 2 out of range: the model has 2 blocks"):
        upcycle_(model, UpcycleConfig(num_experts=E, layers=[0, 2]))
    with pytest.raises(ValueError, match="num_experts=3 to divide the FFN hidden size 64"):
        upcycle_(model, UpcycleConfig(num_experts=3, router=UnitGate(router=TopK(k=3)), init="split"))
    assert get_upcycle(model) is None and not any(isinstance(m, MoE) for m in model.modules())  # untouched
    with pytest.raises(ValueError, match="unknown init"):
        UpcycleConfig(num_experts=E, init="clone")
    with pytest.raises(ValueError, match="noise applies to init='copy' only"):
        UpcycleConfig(num_experts=E, init="split", noise=0.1)
    with pytest.raises(ValueError, match="larger than the number of experts"):
        UpcycleConfig(num_experts=2, router=TopK(k=3))
    with pytest.raises(TypeError, match="layers must be"):
        UpcycleConfig(num_experts=E, layers=1.5)
    with pytest.raises(ValueError, match="no module named"):
        upcycle_(model, UpcycleConfig(num_experts=E, layers=["distilbert.nope"]))
    upcycle_(model, UpcycleConfig(num_experts=E))
    with pytest.raises(ValueError, match="already upcycled"):
        upcycle_(model, UpcycleConfig(num_experts=E))
    revert(model)
    with pytest.raises(ValueError, match="not upcycled"):
        revert(model)
    with pytest.raises(ValueError, match="matches none of moekit's activations"):
        activation_name(torch.tanh)


def test_train_only_moe_freezes_the_rest():
    model, inputs = tiny("bert")
    upcycle_(model, UpcycleConfig(num_experts=E, router=UnitGate(router=TopK(k=1))))
    names = train_only_moe_(model, extra=[r"^classifier\."])
    assert names and all(".moe.router." in n or ".moe.experts." in n or n.startswith("classifier.") for n in names)
    assert any(n.startswith("classifier.") for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names)
    model(**inputs).logits.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    routers_only = train_only_moe_(model, experts=False)
    assert routers_only and all(".router." in n for n in routers_only)


def test_revert_follows_a_dtype_change():
    model, inputs = tiny("bert")
    upcycle_(model, CONFIGS["copy-switch-unit"])
    model.double()  # the kept dense modules are outside the model; revert brings them to its dtype
    revert(model)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.bert.encoder.layer[1].output.dense.weight.dtype == torch.float64
    with torch.no_grad():
        assert model(**inputs).logits.dtype == torch.float64
