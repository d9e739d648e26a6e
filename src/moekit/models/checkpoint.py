"""Checkpoints: a folder with ``model.safetensors`` (weights), ``config.json`` (the :class:`ViTConfig`) and, for a
training run, ``trainer.safetensors`` (optimizer state, RNG state, step, history and the run id).

All files of one save are written together by :class:`moekit.io.CheckpointWriter` (a fresh ``save-<id>``
directory, then one atomic ``manifest.json`` that lists every file with its size and checksum), so a crash mid-save
leaves the previous save loadable and never a mix of two. Loading verifies the manifest and the checksums (pass
``verify=False`` to skip hashing), and that the config stored in the weights' header equals ``config.json``.

Folders written before manifests existed (``model.safetensors`` and ``config.json`` directly in the folder) still
load, with a :class:`LegacyCheckpointWarning`; the next save into such a folder converts it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..io import CheckpointError, FileData, has_manifest, read_checkpoint, write_checkpoint
from .vit import MultiTaskViT, ViTConfig

FORMAT = "moekit.vit/1"
MODEL_FILE, CONFIG_FILE, TRAINER_FILE = "model.safetensors", "config.json", "trainer.safetensors"
LEGACY_FILES = (MODEL_FILE, CONFIG_FILE, TRAINER_FILE)

__all__ = ["CheckpointError", "LegacyCheckpointWarning", "load_model", "read_config", "save_model"]


class LegacyCheckpointWarning(UserWarning):
    """A checkpoint without a manifest (written by moekit before 0.x): loaded without integrity checks."""


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("checkpoints need safetensors: pip install safetensors (or 'moekit[demo]')") from e
    return st


def tensor_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> FileData:
    """A writer function for :class:`moekit.io.CheckpointWriter` that saves ``tensors`` as safetensors."""
    st = _safetensors()
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return lambda path: st.save_file(tensors, str(path), metadata=metadata)


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """One safetensors file, written atomically (for single files outside a checkpoint folder)."""
    from ..io import atomic_write

    atomic_write(path, tensor_bytes(tensors, metadata))


def load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    _safetensors()  # clear ImportError when missing
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"cannot read checkpoint file {path}: permission denied")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or garbage files
        raise CheckpointError(f"corrupt checkpoint file {path}: {type(e).__name__}: {e}") from None
    return tensors, metadata


def model_files(model: MultiTaskViT, step: int, extra_meta: Mapping[str, str] | None = None) -> dict[str, FileData]:
    """The files :func:`save_model` writes (the trainer adds its own to the same save)."""
    meta = {"format": FORMAT, "step": str(step), "config": json.dumps(model.config.to_dict()), **(extra_meta or {})}
    text = json.dumps({"format": FORMAT, "step": step, "config": model.config.to_dict()}, indent=2) + "\n"
    return {MODEL_FILE: tensor_bytes(dict(model.state_dict()), meta), CONFIG_FILE: text.encode()}


def save_model(folder: str | os.PathLike, model: MultiTaskViT, *, step: int = 0) -> Path:
    """Write ``model.safetensors`` and ``config.json`` as one new save of ``folder`` (created if needed)."""
    write_checkpoint(folder, model_files(model, step), kind=FORMAT, meta={"step": step}, remove=LEGACY_FILES)
    return Path(folder)


def checkpoint_files(folder: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, Path], dict[str, Any]]:
    """``(file name -> path, manifest meta)`` of the current save of ``folder``, verified; a folder without a
    manifest is read as a legacy checkpoint (with a warning and no integrity check)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if has_manifest(folder):
        ck = read_checkpoint(folder, kind=FORMAT, verify=verify)
        return {name: ck.path(name) for name in ck.files}, dict(ck.meta, save_id=ck.save_id)
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"checkpoint config not found: {folder / CONFIG_FILE} (and no manifest.json)")
    warnings.warn(f"{folder} has no manifest.json (written by an older moekit): loading it without integrity checks; "
                  "save it again to convert it", LegacyCheckpointWarning, stacklevel=3)
    return {name: folder / name for name in LEGACY_FILES}, {}


def read_config(folder: str | os.PathLike, *, verify: bool = True) -> tuple[ViTConfig, int]:
    files, _ = checkpoint_files(folder, verify=verify)
    return _read_config_file(files[CONFIG_FILE])


def _read_config_file(path: Path) -> tuple[ViTConfig, int]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint config not found: {path}")
    try:
        d = json.loads(path.read_text())
    except PermissionError:
        raise PermissionError(f"cannot read checkpoint config {path}: permission denied") from None
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint config {path}: {type(e).__name__}: {e}") from None
    try:
        if d.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {d.get('format')!r}; expected {FORMAT!r}")
        return ViTConfig.from_dict(d["config"]), int(d["step"])
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint config {path}: {type(e).__name__}: {e}") from None


def load_model(folder: str | os.PathLike, *, verify: bool = True) -> MultiTaskViT:
    """Rebuild the model saved by :func:`save_model` (or by a trainer checkpoint). ``verify=False`` skips the
    checksums (sizes are still checked)."""
    model, _, _ = _load_model_and_step(folder, verify=verify)
    return model


def _load_model_and_step(folder, verify: bool = True):
    """``(model, step, files)``, with every consistency check between the files of one save."""
    files, _ = checkpoint_files(folder, verify=verify)
    config, step = _read_config_file(files[CONFIG_FILE])
    tensors, meta = load_tensors(files[MODEL_FILE])
    if meta.get("step") != str(step):
        raise CheckpointError(
            f"checkpoint {folder}: {MODEL_FILE} is from step {meta.get('step')} but {CONFIG_FILE} from step {step} "
            "(an interrupted save?)"
        )
    if "config" in meta and json.loads(meta["config"]) != json.loads(json.dumps(config.to_dict())):
        raise CheckpointError(
            f"checkpoint {folder}: {CONFIG_FILE} does not match the config stored with the weights "
            "(edited, or copied from another run); refusing to build a different model over these weights"
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
    return model, step, files


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
