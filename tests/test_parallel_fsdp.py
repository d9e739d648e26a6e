"""Distributed checkpoints (moekit.parallel.dcp) in one process: the atomic switch under a crash, pruning, errors.

The multi-process checks of EP x FSDP2, DCP across meshes and the consistency errors run inside the two spawns of
test_parallel_ep.py (process start-up costs seconds each on a shared machine); see _parallel_workers.py.
"""

import json

import pytest
import torch

from moekit.parallel import load_dcp, read_latest, save_dcp

import _parallel_workers as W


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
    wider = torch.nn.Sequential()
    wider.add_module("moe", W.MoE(W.D, 8, router=W.TopK(k=2), experts=W.SwiGLU(hidden_dim=8)))
    with pytest.raises(ValueError, match=r"moe.router.gate.weight has shape \(4, 8\) in the checkpoint .*"
                                         r"\(8, 8\) in the model"):
        load_dcp(wider, None, tmp_path)
    with pytest.raises(ValueError, match="saved without optimizer state"):
        save_dcp(model, None, tmp_path / "weights_only")
        load_dcp(fresh, fresh_opt, tmp_path / "weights_only")
