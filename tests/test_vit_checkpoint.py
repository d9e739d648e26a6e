"""Checkpoints: round trip to identical outputs, exact resume, atomic writes, clear errors for missing, corrupt or
inconsistent files."""

import json
import os
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("safetensors")

from moekit.models import MultiTaskViT, TaskHead, ViTConfig  # noqa: E402
from moekit.io import read_checkpoint  # noqa: E402
from moekit.models.checkpoint import CheckpointError, LegacyCheckpointWarning, load_model, read_config, save_model  # noqa: E402,E501
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
    assert read_config(tmp_path / "ck")[1] == 7
    ck = read_checkpoint(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path / "ck")) == sorted(["manifest.json", f"save-{ck.save_id}"])  # nothing else left
    assert sorted(ck.files) == ["config.json", "model.safetensors"]


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


def cur(folder, name):
    """Where the current save of ``folder`` keeps ``name``."""
    return read_checkpoint(folder, verify=False).path(name)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_model(tmp_path / "nope")
    model = MultiTaskViT(cfg())
    ck = tmp_path / "ck"
    save_model(ck, model, step=3)

    cur(ck, "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="has 80 bytes, the manifest says"):
        load_model(ck)
    with pytest.raises(CheckpointError, match="has 80 bytes"):  # sizes are checked even without checksums
        load_model(ck, verify=False)

    save_model(ck, model, step=3)
    data = cur(ck, "model.safetensors").read_bytes()
    cur(ck, "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(ck)

    save_model(ck, model, step=3)
    p = cur(ck, "model.safetensors")
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the tensor data: same size, still parses
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256 checksum"):
        load_model(ck)
    assert load_model(ck, verify=False) is not None  # the opt-out really skips the hashing

    save_model(ck, model, step=3)
    cur(ck, "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="truncated or overwritten|checksum"):
        load_model(ck)

    save_model(ck, model, step=3)
    os.unlink(cur(ck, "config.json"))
    with pytest.raises(CheckpointError, match="is missing"):
        load_model(ck)

    save_model(ck, model, step=3)
    (ck / "manifest.json").write_text((ck / "manifest.json").read_text().replace('"step": 3', '"step": 4'))
    with pytest.raises(CheckpointError, match="corrupt checkpoint manifest"):
        load_model(ck)

    # a config.json edited in place, with the manifest "fixed" too: the weights' header still disagrees
    other = MultiTaskViT(cfg().replace(k=1))  # same shapes, different computation
    save_model(tmp_path / "other", other, step=3)
    save_model(ck, model, step=3)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    os.replace(cur(ck, "model.safetensors"), legacy / "model.safetensors")
    os.replace(cur(tmp_path / "other", "config.json"), legacy / "config.json")
    with pytest.warns(LegacyCheckpointWarning), pytest.raises(CheckpointError, match="does not match the config"):
        load_model(legacy)

    # resuming needs the trainer state
    save_model(tmp_path / "weights_only", model)
    with pytest.raises(CheckpointError, match="has no trainer state"):
        MultiTaskTrainer.resume(tmp_path / "weights_only", toy_data(), progress=False)


def test_legacy_checkpoint_loads_with_a_warning_and_converts(tmp_path):
    """A folder in the layout of moekit before manifests (files directly in the folder) still loads; saving into
    it converts it and removes the old files."""
    import safetensors.torch as st

    model = MultiTaskViT(cfg()).eval()
    legacy = tmp_path / "old"
    legacy.mkdir()
    meta = {"format": "moekit.vit/1", "step": "5", "config": json.dumps(model.config.to_dict())}
    st.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, legacy / "model.safetensors", metadata=meta)
    (legacy / "config.json").write_text(json.dumps({"format": "moekit.vit/1", "step": 5,
                                                     "config": model.config.to_dict()}))
    with pytest.warns(LegacyCheckpointWarning, match="no manifest.json"):
        again = load_model(legacy).eval()
    x = torch.rand(2, 1, 4, 8)
    assert torch.equal(again(x, "cls"), model(x, "cls"))
    save_model(legacy, again, step=6)
    assert not (legacy / "model.safetensors").exists() and read_config(legacy)[1] == 6


def test_trainer_state_from_another_run_or_config_is_refused(tmp_path):
    data = toy_data()
    tc = TrainConfig(steps=2, batch_size=16, warmup_steps=1)
    torch.manual_seed(0)
    a = MultiTaskTrainer(MultiTaskViT(cfg()), data, tc, progress=False)
    a.fit(checkpoint_dir=tmp_path / "a")
    b = MultiTaskTrainer(MultiTaskViT(cfg()), data, tc, progress=False)
    b.fit(checkpoint_dir=tmp_path / "b")
    resumed = MultiTaskTrainer.resume(tmp_path / "a", data, progress=False)
    assert resumed.run_id == a.run_id != b.run_id

    # b's trainer state copied over a's: the manifest checksum catches it...
    import shutil

    shutil.copy(cur(tmp_path / "b", "trainer.safetensors"), cur(tmp_path / "a", "trainer.safetensors"))
    with pytest.raises(CheckpointError, match="trainer.safetensors does not match"):
        MultiTaskTrainer.resume(tmp_path / "a", data, progress=False)
    # ... and without checksums, the run id does
    with pytest.raises(CheckpointError, match="trainer state is from another run"):
        MultiTaskTrainer.resume(tmp_path / "a", data, progress=False, verify=False)

    with pytest.raises(CheckpointError, match=r"config differs from the checkpoint's run in \['lr'\]"):
        MultiTaskTrainer.resume(tmp_path / "b", data, progress=False, config=TrainConfig(steps=4, batch_size=16,
                                                                                          warmup_steps=1, lr=1.0))
    more = MultiTaskTrainer.resume(tmp_path / "b", data, progress=False,
                                   config=TrainConfig(steps=4, batch_size=16, warmup_steps=1))
    assert more.config.steps == 4


def test_trainer_input_errors():
    model = MultiTaskViT(cfg())
    data = toy_data()
    with pytest.raises(ValueError, match="no targets for tasks"):
        MultiTaskTrainer(model, Toy(data.images, {"cls": data.targets["cls"]}), TrainConfig(steps=1, batch_size=8))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        MultiTaskTrainer(model, data, TrainConfig(steps=1, batch_size=100))
