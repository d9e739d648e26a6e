"""``moekit train-ep`` runs under torchrun (2 gloo processes, EP2 x FSDP2, a few tiny steps) and writes a
distributed checkpoint; the same command resumes it in one process (a torchrun-like environment of world 1, so
that the suite pays one multi-process launch) and writes a sharded safetensors checkpoint."""

import json
import subprocess
import sys

from moekit.parallel import free_port


ARGS = ["--log-every", "1", "--dim", "8", "--experts", "4", "--hidden", "8", "--batch", "2", "--seq", "4",
        "--aux-free", "0.01", "--timeout", "60"]


def test_train_ep_under_torchrun_fsdp2_dcp_then_resume_in_one_process(tmp_path, monkeypatch, capsys):
    import torch.distributed as dist

    from moekit.cli import main

    run = str(tmp_path / "run")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "moekit", "train-ep", "--steps", "3", *ARGS, "--fsdp", "fsdp", "--ckpt", run, "--ckpt-every", "2",
        "--resume",  # nothing to resume yet: starts at step 1
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "world 2 = EP 2 x DP 1; FSDP2 dense=fsdp" in out.stdout, out.stdout
    assert "step     3" in out.stdout and "resumed" not in out.stdout, out.stdout
    assert "saved distributed checkpoint (step 2)" in out.stdout, out.stdout
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 3

    # the same checkpoint, resumed by one process without FSDP, continues at step 4 and saves safetensors shards
    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(var, value)
    capsys.readouterr()
    try:
        assert main(["train-ep", "--steps", "5", *ARGS, "--ckpt", run, "--resume", "--save",
                     str(tmp_path / "ckpt")]) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    text = capsys.readouterr().out
    assert "resumed from" in text and "(step 3, saved at mesh {'world': 2, 'ep': 2, 'dp': 1})" in text, text
    assert "world 1 = EP 1 x DP 1" in text and "step     4" in text and "step     3 " not in text, text
    from moekit.parallel import read_meta

    assert read_meta(tmp_path / "ckpt")["ep_size"] == 1
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 5


def test_train_ep_without_torchrun_says_how_to_launch(monkeypatch, capsys):
    import pytest

    from moekit.cli import main

    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match="launch it with torchrun"):
        main(["train-ep"])

