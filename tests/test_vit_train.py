"""M3ViT training step: per-task forward/backward, gradients accumulated over the tasks, one optimizer step."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from moekit import aux_loss
from moekit.models import MultiTaskViT, TaskHead, ViTConfig
from moekit.models.train import MultiTaskTrainer, TrainConfig


@dataclass
class Toy:
    images: torch.Tensor
    targets: dict

    def __len__(self):
        return len(self.images)


def toy_data(n=48):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, 4, 8, generator=g)
    return Toy(images, {"cls": torch.randint(0, 3, (n,), generator=g), "seg": (images[:, 0] > 0.5).long()})

TASKS = (TaskHead(name="cls", kind="classify", num_classes=3), TaskHead(name="seg", kind="segment", num_classes=2))


def cfg():
    return ViTConfig(tasks=TASKS, image_size=(4, 8), patch_size=2, dim=8, depth=2, num_heads=2, num_experts=4, k=2,
                     router={"type": "multi_gate"}, cv2_coef=0.05)


def test_step_gradient_is_sum_over_tasks_of_weighted_loss_plus_aux():
    torch.manual_seed(0)
    data = toy_data()
    model = MultiTaskViT(cfg()).double()
    data = Toy(data.images.double(), data.targets)
    tc = TrainConfig(steps=1, batch_size=16, grad_clip=None, task_weights=(0.5, 2.0))
    trainer = MultiTaskTrainer(model, data, tc, progress=False)

    # reference: one backward of sum_t (w_t L_t + aux_t), computed on a copy before the step
    ref = MultiTaskViT(cfg()).double()
    ref.load_state_dict(model.state_dict())
    ref.train()
    idx = trainer.batch_indices(0)
    x = data.images[idx]
    total = 0.0
    for t, (name, w) in enumerate(zip(("cls", "seg"), (0.5, 2.0))):
        total = total + w * F.cross_entropy(ref(x, t), data.targets[name][idx]) + aux_loss(ref)
    total.backward()
    expected = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}

    captured = {}
    real_step = trainer.optimizer.step

    def spy(*a, **kw):
        captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return real_step(*a, **kw)

    trainer.optimizer.step = spy
    rec = trainer.train_step()
    assert set(captured) == set(expected)
    for n in expected:
        assert (captured[n] - expected[n]).abs().max() <= 1e-12, n
    # every task's gate got a gradient only from its own task's pass, and each got one
    gate = captured["blocks.1.ffn.router.weight_NED"]
    assert gate[0].abs().sum() > 0 and gate[1].abs().sum() > 0
    assert rec["step"] == 1 and rec["aux"] > 0


def test_progress_bar_is_shown(capsys):
    pytest.importorskip("tqdm")
    torch.manual_seed(0)
    trainer = MultiTaskTrainer(MultiTaskViT(cfg()), toy_data(), TrainConfig(steps=2, batch_size=16),
                               desc="train toy")
    trainer.fit()
    err = capsys.readouterr().err
    assert "train toy" in err and "2/2" in err


def test_lr_schedule_warmup_then_cosine():
    tc = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert tc.lr_at(0) == pytest.approx(0.1) and tc.lr_at(9) == pytest.approx(1.0)
    assert tc.lr_at(10) == pytest.approx(1.0) and tc.lr_at(100) == pytest.approx(0.1)
    assert all(tc.lr_at(s) >= tc.lr_at(s + 1) for s in range(10, 100))
