"""``moekit train-ep`` runs under torchrun (2 gloo processes, a few tiny steps) and writes a sharded checkpoint."""

import subprocess
import sys

from moekit.parallel import free_port


def test_train_ep_under_torchrun(tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "moekit", "train-ep", "--steps", "3", "--log-every", "1", "--dim", "8", "--experts", "4",
        "--hidden", "8", "--batch", "2", "--seq", "4", "--aux-free", "0.01", "--timeout", "60",
        "--save", str(tmp_path / "ckpt"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "world 2 = EP 2 x DP 1" in out.stdout, out.stdout
    assert "step     3" in out.stdout, out.stdout
    from moekit.parallel import read_meta

    assert read_meta(tmp_path / "ckpt")["ep_size"] == 2


def test_train_ep_without_torchrun_says_how_to_launch(monkeypatch, capsys):
    import pytest

    from moekit.cli import main

    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match="launch it with torchrun"):
        main(["train-ep"])
