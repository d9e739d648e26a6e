"""Checkpoints: round trip to identical outputs, exact resume, atomic writes, clear errors for missing, corrupt or
inconsistent files."""

import json
import os
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("safetensors")

from moekit.models import MultiTaskViT, TaskHead, ViTConfig  # noqa: E402
from moekit.models.checkpoint import CheckpointError, load_model, save_model  # noqa: E402
from moekit.models.extract import extract_task  # noqa: E402
from moekit.models.train import MultiTaskTrainer, TrainConfig  # noqa: E402

TASKS = (TaskHead(name="cls", kind="classify", num_classes=3), TaskHead(name="seg", kind="segment", num_classes=2))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matrices: one thread is faster, and avoids oversubscription when pytest-xdist runs workers side by side
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def cfg(router="task_experts"):
    return ViTConfig(tasks=TASKS, image_size=(4, 8), patch_size=2, dim=8, depth=2, num_heads=2, num_experts=4, k=2,
                     router={"type": router})


@pytest.mark.parametrize("router", ["task_experts", "multi_gate", "task_embed"])
def test_checkpoint_roundtrip_identical_outputs(tmp_path, router):
    model = MultiTaskViT(cfg(router)).eval()
    save_model(tmp_path / "ck", model, step=7)
    again = load_model(tmp_path / "ck").eval()
    assert again.config == model.config
    x = torch.rand(5, 1, 4, 8)
    for task in ("cls", "seg"):
        assert torch.equal(again(x, task), model(x, task))
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["step"] == 7
    assert not [f for f in os.listdir(tmp_path / "ck") if f.endswith(".tmp")]  # no temporary files left


def test_pathway_checkpoint_roundtrip(tmp_path):
    model = MultiTaskViT(cfg()).eval()
    pathway = extract_task(model, "seg")
    save_model(tmp_path / "p", pathway)
    x = torch.rand(3, 1, 4, 8)
    assert torch.equal(load_model(tmp_path / "p").eval()(x), model(x, "seg"))


def test_resumed_run_continues_exactly(tmp_path):
    data = toy_data()
    tc = TrainConfig(steps=6, batch_size=16, warmup_steps=2)  # 3 batches per epoch: resume crosses an epoch
    torch.manual_seed(0)
    straight = MultiTaskTrainer(MultiTaskViT(cfg()), data, tc, progress=False)
    straight.fit()

    torch.manual_seed(0)
    first = MultiTaskTrainer(MultiTaskViT(cfg()), data, tc, progress=False)
    first.fit(steps=2, checkpoint_dir=tmp_path / "run")
    resumed = MultiTaskTrainer.resume(tmp_path / "run", data, progress=False)
    assert resumed.step == 2 and len(resumed.history) == 2
    resumed.fit()

    assert resumed.history == straight.history
    for (n, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    # the optimizer state matches too
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_training_reduces_loss_and_accumulates_over_tasks():
    data = toy_data(64)
    torch.manual_seed(0)
    trainer = MultiTaskTrainer(MultiTaskViT(cfg()), data, TrainConfig(steps=30, batch_size=32, lr=5e-3),
                               progress=False)
    trainer.fit()
    first, last = trainer.history[0], trainer.history[-1]
    assert last["loss/seg"] < 0.7 * first["loss/seg"]
    assert set(first) >= {"loss/cls", "loss/seg", "aux", "lr", "grad_norm"}


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_model(tmp_path / "nope")
    model = MultiTaskViT(cfg())
    save_model(tmp_path / "ck", model, step=3)

    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt checkpoint file"):
        load_model(tmp_path / "ck")

    save_model(tmp_path / "ck", model, step=3)
    data = (tmp_path / "ck" / "model.safetensors").read_bytes()
    (tmp_path / "ck" / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt checkpoint file"):
        load_model(tmp_path / "ck")

    save_model(tmp_path / "ck", model, step=3)
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint config"):
        load_model(tmp_path / "ck")

    save_model(tmp_path / "ck", model, step=3)
    os.unlink(tmp_path / "ck" / "config.json")
    with pytest.raises(CheckpointError, match="checkpoint config not found"):
        load_model(tmp_path / "ck")

    save_model(tmp_path / "ck", model, step=3)
    os.unlink(tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_model(tmp_path / "ck")

    # files from different saves
    save_model(tmp_path / "ck", model, step=3)
    cfg_text = (tmp_path / "ck" / "config.json").read_text()
    save_model(tmp_path / "ck", model, step=4)
    (tmp_path / "ck" / "config.json").write_text(cfg_text)
    with pytest.raises(CheckpointError, match="interrupted save"):
        load_model(tmp_path / "ck")

    # a weights file that does not fit the config
    save_model(tmp_path / "ck", model, step=3)
    other = MultiTaskViT(cfg().replace(dim=4))
    save_model(tmp_path / "other", other, step=3)
    os.replace(tmp_path / "other" / "model.safetensors", tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "ck")

    # resuming needs the trainer state
    save_model(tmp_path / "weights_only", model)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        MultiTaskTrainer.resume(tmp_path / "weights_only", toy_data(), progress=False)


def test_trainer_input_errors():
    model = MultiTaskViT(cfg())
    data = toy_data()
    with pytest.raises(ValueError, match="no targets for tasks"):
        MultiTaskTrainer(model, Toy(data.images, {"cls": data.targets["cls"]}), TrainConfig(steps=1, batch_size=8))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        MultiTaskTrainer(model, data, TrainConfig(steps=1, batch_size=100))
