"""EP x FSDP2 (torch.distributed.fsdp.fully_shard on a DeviceMesh), distributed checkpoints (DCP) with optimizer
state across meshes, and cross-rank consistency checks, on 2 and 4 gloo processes against one process.

Tolerances: float64 (AdamW) <= 1e-10, float32 (SGD + momentum) <= 1e-5, for every step's loss and the trained
parameters; resumed runs: float64 <= 1e-10 for the two steps after loading (the second depends on the restored
optimizer state). The checks are in _parallel_workers.py (several per spawn, to pay the start-up once).
"""

import json

import pytest
import torch

from moekit.parallel import consolidate, load_dcp, read_latest, save_dcp, spawn_local

import _parallel_workers as W


def test_ep2_fsdp_training_and_consistency_errors():
    """2 ranks: EP2 x FSDP training (float64 AdamW, float32 SGD) equals one process; ranks that differ in k, expert
    size, seed, dispatch, E or dim raise a ConsistencyError naming the field and the ranks, on every rank."""
    spawn_local(W.worker_fsdp_2, 2, timeout_s=60)


def test_ep2_fsdp2_dcp_resumes_at_other_meshes_and_one_process(tmp_path):
    """4 ranks: EP2 x FSDP2 training equals one process and is saved with DCP (model + AdamW state); it resumes at
    EP4, EP1 x FSDP4, EP2 x HSDP2 (in the workers) and in this single process with the single-process losses; the
    per-rank parameter and optimizer bytes drop under FSDP2; a sharded Mixtral-like model exports to HF."""
    root, hf_root = tmp_path / "run", tmp_path / "hf"
    spawn_local(W.worker_fsdp_4, 4, str(root), str(hf_root), timeout_s=90)
    manifest = read_latest(root)
    assert manifest["step"] == 3 and manifest["optimizer"] is True
    # one process, no process group: the same next-step losses (float64)
    data = W._train_data(5, 4, 2, 4, torch.float64)
    _, ref_losses = W.reference_run(torch.float64, "adamw", data)
    torch.manual_seed(1234)
    model = W.Toy().to(torch.float64).train()
    opt = W.make_opt("adamw", model.parameters())
    load_dcp(model, opt, root)
    for i, (x, y) in enumerate(data[3:]):
        loss = W._step(model, opt, x, y)
        opt.step()
        W.update_balance_bias(model)
        assert abs(float(loss - ref_losses[3 + i])) <= 1e-10, (i, float(loss), float(ref_losses[3 + i]))
    # consolidated HF export of the sharded Mixtral-like model
    transformers = pytest.importorskip("transformers")
    from moekit.convert import to_hf

    torch.manual_seed(5)
    ref = W.HFToy().to(torch.float64)
    torch.manual_seed(99)
    plain = consolidate(hf_root, W.HFToy().to(torch.float64))
    for (n, a), (_, b) in zip(ref.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), n
    cfg = transformers.MixtralConfig(hidden_size=W.D, intermediate_size=8, num_local_experts=4,
                                     num_experts_per_tok=2)
    block = to_hf(plain.moe, cfg)
    x = torch.randn(2, 3, W.D, dtype=torch.float64)
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    assert (out - ref(x)).abs().max() <= 1e-12


def _tiny():
    torch.manual_seed(0)
    model = W.HFToy()
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _train_once(model, opt):
    opt.zero_grad()
    model(torch.randn(2, 3, W.D)).pow(2).mean().backward()
    opt.step()


def test_dcp_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies before the switch (or leaves a half-written directory) is never read: the loader gets the
    previous save, whole; the next successful save removes the debris and keeps ``keep`` saves."""
    import moekit.parallel.dcp as dcp_mod

    model, opt = _tiny()
    _train_once(model, opt)
    first = save_dcp(model, opt, tmp_path, step=1)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    _train_once(model, opt)

    def crash(root, manifest):
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(dcp_mod, "_switch", crash)
    with pytest.raises(KeyboardInterrupt):
        save_dcp(model, opt, tmp_path, step=2)
    monkeypatch.undo()
    (tmp_path / "step-00000003-deadbeef").mkdir()  # a save killed while writing: files but no .metadata
    (tmp_path / "step-00000003-deadbeef" / "__0_0.distcp").write_bytes(b"partial")
    assert read_latest(tmp_path)["checkpoint"] == first.name
    fresh, fresh_opt = _tiny()
    torch.manual_seed(3)
    for p in fresh.parameters():
        p.data.normal_()
    load_dcp(fresh, fresh_opt, tmp_path)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    second = save_dcp(model, opt, tmp_path, step=4, keep=2)
    names = sorted(d.name for d in tmp_path.iterdir() if d.is_dir())
    assert names == sorted([first.name, second.name]), names
    assert json.loads((tmp_path / "latest.json").read_text())["checkpoint"] == second.name
    with pytest.raises(FileNotFoundError, match="no complete distributed checkpoint"):
        load_dcp(fresh, None, tmp_path / "nothing")
