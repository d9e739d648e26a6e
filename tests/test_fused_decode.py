"""The fused decode call (moekit.fused_decode): a layer in eval mode, outside autograd, with at most 16 tokens runs
router, experts and combine in one native call. Checked against the per-token reference in float64 for every
routing rule it fuses, against the composed path, in bfloat16 against float64 of the rounded model; and every
condition that must keep the composed path does."""

import pytest
import torch

from moekit import Capacity, MoE, SwiGLU, TopK
from moekit import fused_decode
from moekit.experts import MLP
from moekit.ops import native
from moekit.reference.loop import moe_reference
from moekit.routers import TopKSoftmax

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no C compiler)")

ROUTERS = {
    "softmax-renorm": TopK(k=2),
    "softmax-raw-scaled": TopK(k=3, normalize=False, scale=1.7),
    "sigmoid-bias": TopK(k=2, score="sigmoid", correction_bias=True, scale=2.5),
    "router-bias": TopK(k=1, router_bias=True),
    "gpt-oss": TopKSoftmax(k=2, router_bias=True, correction_bias=True),
    "deepseek-v3-groups": TopK(k=2, score="sigmoid", correction_bias=True, n_group=4, topk_group=2, scale=2.5),
    "deepseek-v2-groups": TopK(k=3, n_group=2, topk_group=1, group_score="max", normalize=False),
}


def _layer(router, experts=None, shared=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = MoE(32, 8, router=router, experts=experts or SwiGLU(hidden_dim=24), shared_experts=shared)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        if layer.router.bias_E is not None:
            layer.router.bias_E.normal_(0, 0.2)
    return layer.to(dtype).eval()


class _Spy:
    """Counts native fused decode calls (each runs a prepared :class:`native.DecodeCall`, checked by the caller or
    by the call)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("__call__", "launch_checked"):  # (checked() runs launch_checked)
            real = getattr(native.DecodeCall, name)

            def spy(call, *a, _real=real, **k):
                self.calls += 1
                return _real(call, *a, **k)

            monkeypatch.setattr(native.DecodeCall, name, spy)


@needs_native
@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("T", [1, 5, 16])
def test_fused_equals_per_token_reference(name, T, monkeypatch):
    """float32 layer, fused, against the float64 per-token loop of the same weights (1e-5 relative to the scale),
    and against the composed float32 path (the same choices; outputs to 1e-5)."""
    ref_layer = _layer(ROUTERS[name])
    layer = _layer(ROUTERS[name]).float()
    assert layer.decode_fusion is not None
    x = torch.randn(T, 32, dtype=torch.float64)
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        y = layer(x.float())
        composed = layer.forward_with_aux(x.float()).y
    assert spy.calls == 1
    ref = moe_reference(ref_layer, x)
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(y, composed, rtol=0, atol=1e-5 * scale)


@needs_native
@pytest.mark.parametrize("name", list(ROUTERS))
def test_forward_and_logits_fused_returns_the_composed_logits(name, monkeypatch):
    """``MoE.forward_and_logits`` (what a swapped HF block that hands logits on calls): one native call, whose
    logits equal the composed path's ``assignment.logits_TE`` (float32, 1e-6) and whose output equals ``layer(x)``."""
    layer = _layer(ROUTERS[name]).float()
    x = torch.randn(3, 32)
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        y, logits = layer.forward_and_logits(x)
        composed = layer.forward_with_aux(x)
        assert torch.equal(y, layer(x))
    assert spy.calls == 2 and logits.dtype == torch.float32
    torch.testing.assert_close(logits, composed.assignment.logits_TE, rtol=0, atol=1e-6)
    layer.train()
    y_train, logits_train = layer.forward_and_logits(x)  # the composed path
    assert spy.calls == 2 and logits_train.requires_grad


@needs_native
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("T", [1, 6])
def test_fused_gpt_oss_layer_clamped_interleaved_on_transposed_weights(transposed, T, monkeypatch):
    """gpt-oss's layer as a swap builds it: TopKSoftmax with router bias, clamped interleaved SwiGLU with biases,
    and (transposed) the expert weights as views of (in, out) storages, as HF keeps them. Fused float32 equals the
    composed float64 path of the same weights to 1e-5 of the scale; the clamp binds (limit 0.8)."""
    from moekit.experts.clamped import ClampedSwiGLU

    spec = ClampedSwiGLU(hidden_dim=24, interleaved=True, limit=0.8)
    layer = _layer(TopKSoftmax(k=2, router_bias=True), experts=spec).float()
    if transposed:
        bank = layer.experts
        bank.w13_E2FD = torch.nn.Parameter(bank.w13_E2FD.detach().transpose(1, 2).contiguous().transpose(1, 2))
        bank.w2_EDF = torch.nn.Parameter(bank.w2_EDF.detach().transpose(1, 2).contiguous().transpose(1, 2))
        assert bank.w13_E2FD.stride(2) != 1
    ref_layer = _layer(TopKSoftmax(k=2, router_bias=True), experts=spec)
    ref_layer.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    ref_layer.fuse_decode(False)
    x = torch.randn(T, 32, dtype=torch.float64)
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        y = layer(x.float())
        ref = ref_layer(x)
    assert spy.calls == 1
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * scale)


@needs_native
@pytest.mark.parametrize("experts,shared", [
    (MLP(hidden_dim=24, activation="gelu"), None),
    (SwiGLU(hidden_dim=24), SwiGLU(hidden_dim=16)),  # shared experts added after the fused call
])
def test_fused_with_mlp_experts_and_shared_experts(experts, shared, monkeypatch):
    ref_layer = _layer(TopK(k=2), experts, shared)
    layer = _layer(TopK(k=2), experts, shared).float()
    x = torch.randn(2, 3, 32, dtype=torch.float64)  # any leading shape
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        y = layer(x.float())
    assert spy.calls == 1 and y.shape == x.shape
    ref = moe_reference(ref_layer, x)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@needs_native
def test_fused_bfloat16_is_closer_to_float64_than_the_composed_path(monkeypatch):
    layer = _layer(TopK(k=2)).bfloat16()
    ref_layer = _layer(TopK(k=2))
    ref_layer.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})  # the rounded weights
    x = torch.randn(4, 32).bfloat16()
    with torch.no_grad():
        y = layer(x)
        composed = layer.forward_with_aux(x).y
    ref = moe_reference(ref_layer, x.double())
    err, err_composed = (y.double() - ref).abs().max(), (composed.double() - ref).abs().max()
    assert y.dtype == torch.bfloat16
    assert err <= 2 ** -8 * ref.abs().max() and err <= err_composed + 1e-12, (err, err_composed)


@needs_native
def test_everything_else_keeps_the_composed_path(monkeypatch):
    layer = _layer(TopK(k=2)).float()
    x = torch.randn(3, 32)
    spy = _Spy(monkeypatch)
    layer.train()
    with torch.no_grad():
        layer(x)  # training mode
    layer.eval()
    layer(x)  # autograd needs the parameters
    with torch.no_grad():
        layer(torch.randn(17, 32))  # more than MAX_TOKENS
        layer(x, token_mask=torch.ones(3, dtype=torch.bool))  # per-call arguments
        layer.accumulate_stats = True
        layer(x)
        layer.accumulate_stats = False
        h = layer.router.register_forward_hook(lambda *a: None)
        layer(x)  # someone watches the router
        h.remove()
        layer.routing_log = []
        layer(x)
        layer.routing_log = None
        old = layer.router
        layer.router = _layer(TopK(k=2)).float().router  # a part replaced after the fusion was built
        layer(x)
        layer.router = old
        assert spy.calls == 0
        fusion = layer.decode_fusion  # its checks take (T, D) of the layer's width only (the layer flattens)
        assert fusion.takes(layer, x) and not fusion.takes(layer, x.view(1, 3, 32))
        assert not fusion.takes(layer, torch.randn(3, 31)) and not fusion.takes(layer, x[:, :16])
        layer(x)
        assert spy.calls == 1
        assert layer.fuse_decode(False) == "turned off"
        layer(x)
        assert spy.calls == 1 and layer.fuse_decode() is None


@needs_native
def test_quick_path_after_a_fused_call_sees_every_change(monkeypatch):
    """After a fused call, the next one takes DecodeFusion.quick's short checks; each change below must still send
    the call to the composed path (no native call; its result, its error), and undoing it must fuse again."""
    layer = _layer(TopK(k=2)).float()
    x = torch.randn(3, 32)
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        composed = layer.forward_with_aux(x).y

        def fused_again():
            before = spy.calls
            torch.testing.assert_close(layer(x), composed, atol=1e-5, rtol=1e-5)
            assert spy.calls == before + 1

        def composed_only(call=lambda: layer(x)):
            before = spy.calls
            out = call()
            assert spy.calls == before
            return out

        fused_again()
        for flag, on, off in [("training", True, False), ("routing_log", [], None), ("accumulate_stats", True, False)]:
            setattr(layer, flag, on)
            composed_only()
            setattr(layer, flag, off)
            fused_again()
        layer.replay_queue = [torch.tensor([[0, 1]] * 3)]
        composed_only()
        layer.replay_queue = None
        fused_again()
        layer.check_inputs = True
        with pytest.raises(ValueError, match="NaN"):
            layer(torch.full((3, 32), float("nan")))
        layer.check_inputs = False
        fused_again()
        layer.last_aux_loss = torch.ones(())
        fused_again()
        assert layer.last_aux_loss is None
        layer.shared = _layer(TopK(k=2), shared=SwiGLU(hidden_dim=8)).float().shared
        torch.testing.assert_close(layer(x), composed + layer.shared(x), atol=1e-5, rtol=1e-5)
        layer.shared = None
        fused_again()
        h = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)  # a global hook
        composed_only()
        h.remove()
        fused_again()
        old = layer.router
        layer.router = _layer(TopK(k=2), seed=1).float().router
        y = composed_only()
        torch.testing.assert_close(y, layer.forward_with_aux(x).y)
        layer.router = old
        fused_again()
        composed_only(lambda: torch.testing.assert_close(layer(torch.randn(17, 32)).shape, (17, 32)))
        with pytest.raises(ValueError):
            layer(torch.randn(3, 16))  # the layer's width is checked
        wide = torch.randn(3, 64)
        torch.testing.assert_close(layer(wide[:, ::2]), layer.forward_with_aux(wide[:, ::2].contiguous()).y,
                                   atol=1e-5, rtol=1e-5)  # a strided input gives its own values
        fused_again()
        before = spy.calls  # (B, S, D) inputs, as a transformers block passes them, and the logits it hands on
        x_BSD = torch.randn(2, 3, 32)
        want = layer.forward_with_aux(x_BSD)
        y, logits = layer.forward_and_logits(x_BSD)
        assert spy.calls == before + 1 and y.shape == (2, 3, 32) and logits.shape == (6, 8)
        torch.testing.assert_close(y, want.y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, want.assignment.logits_TE.float(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer(x_BSD), want.y, atol=1e-5, rtol=1e-5)
        x_SBD = x_BSD.transpose(0, 1)  # not contiguous: rows are not D apart
        torch.testing.assert_close(layer(x_SBD), layer.forward_with_aux(x_SBD.contiguous()).y, atol=1e-5, rtol=1e-5)
        assert spy.calls == before + 3
        fused_again()
        with pytest.raises(ValueError, match="dtype"):
            layer(x.double())  # the composed path's error, not float64 read as float32
        gate = layer.router.gate
        full = gate.weight.data
        gate.weight.data = full[:4]  # the same address, four experts' rows: a new shape the call must see
        with pytest.raises(ValueError, match="do not chain"):
            layer(x)
        gate.weight.data = full
        fused_again()
        monkeypatch.setattr(fused_decode, "_is_compiling", lambda: True)  # (the quick path's, bound at import)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        composed_only()
        monkeypatch.undo()
        spy = _Spy(monkeypatch)
        fused_again()
    xg = x.clone().requires_grad_(True)
    assert composed_only(lambda: layer(xg)).requires_grad  # autograd: the composed path
    with torch.no_grad():
        fused_again()


@needs_native
def test_quick_path_sees_a_bias_removed_after_a_fused_call(monkeypatch):
    """A router bias set to None after a fused call (its Parameter freed, the weak reference dead): the next call
    routes without it, as the composed path does."""
    layer = _layer(TopK(k=2, router_bias=True)).float()
    with torch.no_grad():
        layer.router.gate.bias.fill_(3.0)
        layer.router.gate.bias[6] = 50.0  # every token takes expert 6 while the bias is there
        x = torch.randn(3, 32)
        layer(x)
        layer.router.gate.bias = None
        y = layer(x)
        torch.testing.assert_close(y, layer.forward_with_aux(x).y, atol=1e-5, rtol=1e-5)


@needs_native
def test_quick_path_sees_an_in_place_update_of_a_converted_selection_bias(monkeypatch):
    """A bfloat16 layer's selection bias is converted to float32 for the kernel (a copy): the call is prepared again
    every time, so an in-place update of the bias moves the routing at the next call, as on the composed path."""
    layer = _layer(TopK(k=2, score="sigmoid", correction_bias=True)).to(torch.bfloat16)
    x = torch.randn(2, 32).to(torch.bfloat16)
    with torch.no_grad():
        layer(x)
        first = layer(x)
        layer.router.bias_E.zero_()
        layer.router.bias_E[5] = 100.0  # every token now takes expert 5
        y = layer(x)
        want = layer.forward_with_aux(x).y
    assert not torch.equal(y, first)
    torch.testing.assert_close(y.float(), want.float(), atol=0.05, rtol=0.05)


def test_layers_without_a_fused_form_say_why(monkeypatch):
    cases = {
        "dispatcher": MoE(16, 4, router=TopK(k=2), dispatch=Capacity(factor=1.0)),
        "noisy": MoE(16, 4, router=TopK(k=2, noisy_gating=True)),
        "computes in": MoE(16, 4, router=TopK(k=2, logits_dtype="float64")),
    }
    for word, layer in cases.items():
        assert layer.decode_fusion is None
        assert word in layer.fuse_decode(), (word, layer.fuse_decode())
    monkeypatch.setenv("MOEKIT_FUSED_DECODE", "0")
    assert MoE(16, 4).decode_fusion is None


@needs_native
def test_fused_call_is_one_native_call_and_few_ops():
    """The point of fusing: a one-token call issues a handful of aten ops (the output, its reshape), not ~20."""
    from torch.profiler import ProfilerActivity, profile

    layer = MoE(64, 8, router=TopK(k=2), experts=SwiGLU(hidden_dim=48)).eval()
    x = torch.randn(1, 64)
    with torch.no_grad():
        layer(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            layer(x)
    ops = [e.name for e in prof.events() if e.name.startswith("aten::") and
           (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    assert len(ops) <= 6, ops


@needs_native
def test_moe_decode_rejects_bad_arguments():
    x, wr = torch.randn(2, 8), torch.randn(4, 8)
    w_in, w2 = torch.randn(4, 10, 8), torch.randn(4, 8, 5)
    args = (None, 2, "softmax", True, 1.0, None, w_in, None, w2, None, True, "silu")
    with pytest.raises(ValueError, match="at most"):
        native.moe_decode(torch.randn(17, 8), wr, *args)
    with pytest.raises(ValueError, match="k must"):
        native.moe_decode(x, wr, None, 5, *args[2:])
    with pytest.raises(ValueError, match="score"):
        native.moe_decode(x, wr, None, 2, "relu", *args[3:])
    with pytest.raises(ValueError, match="chain"):
        native.moe_decode(x, wr, None, 2, "softmax", True, 1.0, None, w_in, None, torch.randn(4, 8, 6), None,
                          True, "silu")
    with pytest.raises(TypeError, match="dtype"):
        native.moe_decode(x, wr.double(), *args)


@needs_native
def test_prepared_call_follows_the_weights(monkeypatch):
    """The fused path checks and lays out the weights once per placement: an in-place update is read live, and a
    weight moved, replaced or converted (``.data =``, ``load_state_dict(assign=True)``, ``.to``) is seen at the
    next call; a weight that needs autograd (with grad enabled) sends the call to the composed path."""
    layer = _layer(ROUTERS["softmax-renorm"]).float()
    x = torch.randn(3, 32)
    spy = _Spy(monkeypatch)

    def check(expect_fused=True):
        before = spy.calls
        with torch.no_grad():
            y = layer(x)
            composed = layer.forward_with_aux(x).y
        assert spy.calls == before + int(expect_fused)
        torch.testing.assert_close(y, composed, rtol=1e-5, atol=1e-5)
        return y

    y0 = check()
    w = layer.experts.w2_EDF
    with torch.no_grad():
        w.mul_(2.0)  # same storage: the prepared call reads the new values
    torch.testing.assert_close(check(), 2 * y0, rtol=1e-5, atol=1e-5)
    w.data = torch.randn_like(w) * 0.3  # new storage
    check()
    state = {k: v.clone() + 0.01 for k, v in layer.state_dict().items()}
    layer.load_state_dict(state, assign=True)
    check()
    layer.router.gate.weight.data = layer.router.gate.weight.data.t().contiguous().t()  # no unit inner stride
    check(expect_fused=False)
    layer.router.gate.weight.data = layer.router.gate.weight.data.contiguous()
    check()
    layer.to(torch.bfloat16)
    x = x.bfloat16()
    with torch.no_grad():
        before = spy.calls
        layer(x)
        assert spy.calls == before + 1
    x = x.float()
    layer.float()
    with torch.enable_grad():
        before = spy.calls
        layer(x).sum().backward()  # weights need autograd: composed
        assert spy.calls == before and layer.experts.w2_EDF.grad is not None


@needs_native
def test_fused_path_reads_replaced_parts_and_new_biases(monkeypatch):
    """The fused call reads the layer's parts from the modules' own dicts (not through ``nn.Module.__getattr__``):
    a router gate replaced by another Linear, a bias added where there was None (a plain attribute that becomes a
    parameter) and a bank whose input projection is a subclass's own property are all seen, fused, at the next
    call."""
    from torch import nn

    from moekit.experts.bank import ExpertBank

    layer = _layer(ROUTERS["softmax-renorm"]).float()
    x = torch.randn(3, 32)
    spy = _Spy(monkeypatch)

    def check():
        before = spy.calls
        with torch.no_grad():
            y = layer(x)
            composed = layer.forward_with_aux(x).y
        assert spy.calls == before + 1
        torch.testing.assert_close(y, composed, rtol=1e-5, atol=1e-5)
        return y

    y0 = check()
    gate = nn.Linear(32, 8, bias=True)
    layer.router.gate = gate  # a new submodule, with a bias the old one lacked
    y1 = check()
    assert not torch.allclose(y0, y1)
    for register in (gate.register_forward_pre_hook, layer.experts.register_forward_hook,
                     torch.nn.modules.module.register_module_forward_hook):  # the new gate's, the bank's, global
        h = register(lambda *a: None)
        before = spy.calls
        with torch.no_grad():
            layer(x)
        assert spy.calls == before, register
        h.remove()
    assert "b2_ED" in layer.experts.__dict__  # no bias: a plain None attribute
    layer.experts.b2_ED = nn.Parameter(torch.full((8, 32), 0.25))
    torch.testing.assert_close(check(), y1 + 0.25, rtol=1e-5, atol=1e-5)

    class Doubled(ExpertBank):  # a subclass whose input projection is its own property
        @property
        def w_in(self):
            return self.w13_E2FD * 2

    layer2 = MoE(32, 8, router=TopK(k=2), experts=SwiGLU(hidden_dim=24)).eval()
    layer2.experts.__class__ = Doubled
    layer2.decode_fusion = fused_decode.fusion_for(layer2)[0]
    assert layer2.decode_fusion._w_in == "w_in"
    with torch.no_grad():
        torch.testing.assert_close(layer2(x), layer2.forward_with_aux(x).y, rtol=1e-5, atol=1e-5)
