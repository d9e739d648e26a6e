"""``moekit generate`` / ``moekit compress`` on a tiny checkpoint: output lines, argument validation before work."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from offload_models import save_tiny  # noqa: E402

from moekit.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("q3cli")
    save_tiny("qwen3_moe", d)
    return d


def test_generate_prints_text_speed_hit_rate_memory(ckpt, capsys):
    from transformers import AutoModelForCausalLM

    assert main(["generate", str(ckpt), "--prompt-ids", "5 6 7", "--max-new-tokens", "4", "--expert-budget", "40%",
                 "--prefetch", "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    ref = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    want = ref.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)[0].tolist()
    assert out.splitlines()[0] == " ".join(map(str, want))
    for s in ("tok/s", "cache hit rate", "peak RSS", "prefetch precision"):
        assert s in out


@pytest.mark.parametrize("argv,msg", [
    (["--prompt-ids", "1 2", "--expert-budget", "0%"], "expert-budget='0%'"),
    (["--prompt-ids", "1 x"], "--prompt-ids: expected"),
    (["--prompt-ids", "1 2", "--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["--prompt", "hello"], "has no tokenizer; use --prompt-ids"),
    (["--prompt-ids", "1 500"], "id 500, the vocabulary has 97"),
    (["--prompt-ids", "1 2", "--expert-budget", "10"], "smaller than one expert"),
])
def test_generate_bad_arguments(ckpt, argv, msg):
    with pytest.raises(SystemExit, match=msg):
        main(["generate", str(ckpt), "--no-progress", *argv])


def test_generate_bad_dir(tmp_path):
    with pytest.raises(SystemExit, match="has no config.json"):
        main(["generate", str(tmp_path), "--prompt-ids", "1"])


def test_compress_prints_sizes_and_perplexity(ckpt, tmp_path, capsys):
    calib = tmp_path / "calib.pt"
    torch.save(torch.randint(3, 97, (400,), generator=torch.Generator().manual_seed(0)), calib)
    out = tmp_path / "out"
    assert main(["compress", str(ckpt), "--method", "reap", "--keep", "50%", "--calib", str(calib), "--out", str(out),
                 "--seq-len", "32", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "8 -> 4 experts per layer" in text and "MiB ->" in text and "held-out perplexity" in text
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main(["compress", str(ckpt), "--method", "reap", "--calib", str(calib), "--out", str(out)])
    with pytest.raises(SystemExit, match="no such file"):
        main(["compress", str(ckpt), "--method", "reap", "--calib", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match="keep='0%' gives 0"):
        main(["compress", str(ckpt), "--method", "reap", "--keep", "0%", "--calib", str(calib), "--out",
              str(tmp_path / "o3"), "--seq-len", "32"])
