"""Checkpoints: a folder with ``model.safetensors`` (weights), ``config.json`` (the :class:`ViTConfig`) and, for a
training run, ``trainer.safetensors`` (optimizer state, RNG state, step and history).

Every file is written to a temporary name in the same folder and moved into place with ``os.replace``, so a crash
mid-save leaves the previous file intact. All three files carry the step they were saved at; loading checks that
they agree (a save interrupted between two files is reported, not silently mixed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import atomic_write
from .vit import MultiTaskViT, ViTConfig

FORMAT = "moekit.vit/1"
MODEL_FILE, CONFIG_FILE, TRAINER_FILE = "model.safetensors", "config.json", "trainer.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or inconsistent."""


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("checkpoints need safetensors: pip install safetensors (or 'moekit[demo]')") from e
    return st


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    st = _safetensors()
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: st.save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    _safetensors()  # clear ImportError when missing
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbage files
        raise CheckpointError(f"corrupt checkpoint file {path}: {type(e).__name__}: {e}") from None
    return tensors, metadata


def save_model(folder: str | os.PathLike, model: MultiTaskViT, *, step: int = 0) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "step": str(step), "config": json.dumps(model.config.to_dict())}
    save_tensors(folder / MODEL_FILE, dict(model.state_dict()), meta)
    text = json.dumps({"format": FORMAT, "step": step, "config": model.config.to_dict()}, indent=2)
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text + "\n"))
    return folder


def read_config(folder: str | os.PathLike) -> tuple[ViTConfig, int]:
    path = Path(folder) / CONFIG_FILE
    if not Path(folder).is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint config not found: {path}")
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {d.get('format')!r}; expected {FORMAT!r}")
        return ViTConfig.from_dict(d["config"]), int(d["step"])
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint config {path}: {type(e).__name__}: {e}") from None


def load_model(folder: str | os.PathLike) -> MultiTaskViT:
    """Rebuild the model saved by :func:`save_model` (or by a trainer checkpoint)."""
    model, _ = _load_model_and_step(folder)
    return model


def _load_model_and_step(folder) -> tuple[MultiTaskViT, int]:
    config, step = read_config(folder)
    tensors, meta = load_tensors(Path(folder) / MODEL_FILE)
    if meta.get("step") != str(step):
        raise CheckpointError(
            f"checkpoint {folder}: {MODEL_FILE} is from step {meta.get('step')} but {CONFIG_FILE} from step {step} "
            "(an interrupted save?)"
        )
    model = MultiTaskViT(config)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"checkpoint {folder}: weights do not match its config: {e}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {folder} does not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model, step


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state as flat tensors ``optim.<param index>.<name>`` plus JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for i, state in sd["state"].items():
        for name, v in state.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{i}.{name}"] = v
            else:
                scalars[f"{i}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    for key, v in meta["scalars"].items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}
