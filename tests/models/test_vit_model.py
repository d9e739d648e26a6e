"""Multi-task MoE ViT: FLOPs against a hand count, dense twin with equal active FLOPs, clear errors on bad input,
single-task pathway extraction (exact for task-level routing, measured for token-level routing)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moekit.models import MultiTaskViT, TaskHead, ViTConfig, with_approximations
from moekit.models.extract import extract_task, pathway_agreement
from moekit.models.flops import count_params, vit_flops, vit_flops_all_tasks

TASKS = (TaskHead(name="cls", kind="classify", num_classes=3), TaskHead(name="seg", kind="segment", num_classes=2))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matrices: one thread is faster, and avoids oversubscription when pytest-xdist runs workers side by side
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw):
    base = dict(tasks=TASKS, image_size=(4, 4), patch_size=2, dim=4, depth=2, num_heads=2, mlp_ratio=2,
                moe_every=2, num_experts=4, k=2)
    base.update(kw)
    return ViTConfig(**base)


def test_flops_hand_count_tiny_moe():
    # image 4x4, patch 2 -> P = 4 patches, T = 5 tokens; D = 4; block 0 dense (F = 8), block 1 MoE (E = 4, k = 2,
    # expert hidden 8 / 2 = 4); all counts are 2 FLOPs per multiply-add.
    patch = 4 * (1 * 2 * 2) * 4 * 2  # P * (C p^2) * D * 2 = 128
    attn = 5 * 4 * 12 * 2 + 5 * 5 * 4 * 2 + 5 * 5 * 4 * 2 + 5 * 4 * 4 * 2  # qkv 480, QK 200, AV 200, proj 160
    dense_ffn = 5 * (4 * 8 + 8 * 4) * 2  # 640
    gate = 5 * 4 * 4 * 2  # T * D * E * 2 = 160
    experts = 5 * 2 * (4 * 4 + 4 * 4) * 2  # T * k * (D*Fe + Fe*D) * 2 = 640
    head_cls = 4 * 3 * 2  # 24
    head_seg = 4 * 4 * (2 * 2 * 2) * 2  # P * D * (p^2 C) * 2 = 256
    f = vit_flops(tiny(router={"type": "multi_gate"}), "cls")
    assert f.as_dict() == {"patch_embed": 128, "attention": 2 * 1040, "dense_ffn": 640, "gate": 160, "experts": 640,
                           "heads": 24, "total": 3672}
    assert f.total == patch + 2 * attn + dense_ffn + gate + experts + head_cls
    assert vit_flops(tiny(router={"type": "multi_gate"}), "seg").total == f.total - head_cls + head_seg
    # every expert active: 4 experts instead of 2
    assert vit_flops(tiny(router={"type": "multi_gate"}), "cls", experts="all").experts == 2 * experts
    # task-level routing: the gate scores only the task's own experts (2 of 4)
    assert vit_flops(tiny(router={"type": "task_experts"}), 0).gate == gate // 2
    # task embedding gate: input D + task_dim
    assert vit_flops(tiny(router={"type": "task_embed", "task_dim": 3}), 0).gate == 5 * (4 + 3) * 4 * 2
    # all tasks: the routed encoder runs once per task
    both = vit_flops_all_tasks(tiny(router={"type": "multi_gate"}))
    assert both.total == 2 * (f.total - head_cls) + head_cls + head_seg


def test_dense_flops_match_torch_flop_counter_and_moe_active_flops():
    dense_cfg = tiny(moe_every=0)
    model = MultiTaskViT(dense_cfg).eval()
    x = torch.rand(3, 1, 4, 4)
    for task in ("cls", "seg"):
        with FlopCounterMode(display=False) as fc:
            model(x, task)
        assert fc.get_total_flops() == 3 * vit_flops(dense_cfg, task).total
    with FlopCounterMode(display=False) as fc:
        model.forward_all(x)
    assert fc.get_total_flops() == 3 * vit_flops_all_tasks(dense_cfg).total
    # the dense twin's FFN costs exactly the MoE's k active experts
    moe = vit_flops(tiny(), "cls")
    dense = vit_flops(dense_cfg, "cls")
    assert moe.experts + moe.dense_ffn == dense.dense_ffn
    assert moe.total - moe.gate == dense.total


@pytest.mark.parametrize("router", ["multi_gate", "task_embed", "task_experts"])
def test_forward_shapes_and_forward_all(router):
    model = MultiTaskViT(tiny(router={"type": router})).eval()
    x = torch.rand(5, 1, 4, 4)
    assert model(x, "cls").shape == (5, 3)
    assert model(x, 1).shape == (5, 2, 4, 4)
    every = model.forward_all(x)
    assert torch.equal(every["cls"], model(x, "cls")) and torch.equal(every["seg"], model(x, "seg"))


def test_bad_input_errors():
    model = MultiTaskViT(tiny())
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown task 'depth'; valid tasks: cls, seg"):
        model(x, "depth")
    with pytest.raises(ValueError, match="unknown task id 2"):
        model(x, 2)
    with pytest.raises(ValueError, match="pass task="):
        model(x)
    with pytest.raises(ValueError, match=r"images are \(5, 4\) \(H, W\); this model expects \(4, 4\)"):
        model(torch.rand(2, 1, 5, 4), "cls")
    with pytest.raises(ValueError, match="images have 3 channels; this model expects 1"):
        model(torch.rand(2, 3, 4, 4), "cls")
    with pytest.raises(ValueError, match="4-D"):
        model(torch.rand(1, 4, 4), "cls")
    with pytest.raises(ValueError, match="floating point"):
        model(torch.ones(2, 1, 4, 4, dtype=torch.long), "cls")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        tiny(image_size=(5, 4))
    with pytest.raises(ValueError, match="unknown kind"):
        TaskHead(name="x", kind="depth", num_classes=1)
    with pytest.raises(ValueError, match="unknown task 'x'"):
        vit_flops(tiny(), "x")


def _trained_like(model):
    with torch.no_grad():  # spread the gates so routing is not decided by init noise alone
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model.eval()


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_task_level_extraction_is_exact(task):
    cfg = tiny(dim=8, num_experts=6, router={"type": "task_experts", "experts_per_task": 3}, depth=4)
    model = _trained_like(MultiTaskViT(cfg).double())
    x = torch.rand(16, 1, 4, 4, dtype=torch.float64)
    pathway = extract_task(model, task)
    assert torch.equal(pathway(x), model(x, task))
    assert pathway.config.task_names == (task,)
    assert [m.num_experts for m in pathway.moe_layers()] == [3, 3]
    # fewer parameters: 3 of 6 experts per layer and one head
    assert count_params(pathway) < count_params(model)
    full_experts = sum(count_params(m.experts) for m in model.moe_layers())
    assert sum(count_params(m.experts) for m in pathway.moe_layers()) * 2 == full_experts
    # float32 too
    model32 = model.float()
    assert torch.equal(extract_task(model32, task)(x.float()), model32(x.float(), task))


@pytest.mark.parametrize("router", ["multi_gate", "task_embed"])
def test_token_level_extraction_calibrated(router):
    cfg = tiny(dim=8, num_experts=8, router={"type": router}, depth=4)
    model = _trained_like(MultiTaskViT(cfg).double())
    x = torch.rand(64, 1, 4, 4, dtype=torch.float64)
    # no calibration: every expert kept, identical up to rounding (the task embedding is folded into a bias)
    full = extract_task(model, "cls")
    assert [m.num_experts for m in full.moe_layers()] == [8, 8]
    assert (full(x) - model(x, "cls")).abs().max() <= 1e-12
    # calibrated on the same inputs with coverage 1: only used experts kept, same routing, same outputs
    exact = extract_task(model, "cls", calibration=x, coverage=1.0)
    assert (exact(x) - model(x, "cls")).abs().max() <= 1e-12
    # a tight cap: fewer experts, agreement is measured (and can be < 1)
    small = extract_task(model, "cls", calibration=x, max_experts=2)
    assert [m.num_experts for m in small.moe_layers()] == [2, 2]
    agree = pathway_agreement(model, small, "cls", x)
    with torch.no_grad():
        full_logits, small_logits = model(x, "cls"), small(x)
    same = (full_logits.argmax(1) == small_logits.argmax(1)).double().mean()
    assert agree["prediction_agreement"] == float(same)
    assert agree["max_abs_logit_diff"] == float((full_logits - small_logits).abs().max())


def test_extraction_errors():
    model = MultiTaskViT(tiny(router={"type": "topk"}))
    with pytest.raises(ValueError, match="needs a task router"):
        extract_task(model, "cls")
    with pytest.raises(ValueError, match="unknown task"):
        extract_task(MultiTaskViT(tiny()), "depth")
    with pytest.raises(ValueError, match="coverage"):
        extract_task(MultiTaskViT(tiny()), "cls", coverage=0.0)


@pytest.mark.parametrize("router", ["task_experts", "multi_gate"])
def test_with_approximations_is_close(router):
    model = MultiTaskViT(tiny(dim=8, router={"type": router})).eval()
    approx = with_approximations(model)
    assert approx.config.attention_softmax == "online" and approx.config.gelu == "table"
    x = torch.rand(32, 1, 4, 4)
    for task in ("cls", "seg"):
        diff = (approx(x, task) - model(x, task)).abs().max()
        assert 0 < diff <= 1e-3
    pathway = with_approximations(extract_task(model, "seg"))
    assert (pathway(x) - approx(x, "seg")).abs().max() <= 1e-5
