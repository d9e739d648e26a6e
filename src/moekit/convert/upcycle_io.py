"""Save and load an upcycled model: ``model.safetensors`` (every weight) + ``upcycle.json`` (the transform).

    save_upcycled(model, "ckpt/")                       # after upcycle_ (and training)
    model = load_upcycled("ckpt/")                      # fresh process: rebuilds the HF model from its config
    load_upcycled("ckpt/", model=base_model)            # or: apply the saved transform to a model you built

The JSON holds the :class:`UpcycleConfig` with ``layers`` set to the exact module names that were replaced, the
model class and Hugging Face config, and each MoE layer's sizes. The same JSON is stored in the safetensors header
under ``moekit_upcycle``, with a random ``save_id``, so a weights file and a JSON from different saves are refused.
Each file is written to a temporary name in the target folder and renamed into place (atomic on POSIX), so a crash
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

from torch import nn

from ..io import atomic_write
from .upcycle import UpcycleConfig, get_upcycle, revert, upcycle_

FORMAT = "moekit.upcycle"
FORMAT_VERSION = 1
CONFIG_NAME = "upcycle.json"
WEIGHTS_NAME = "model.safetensors"
_META_KEY = "moekit_upcycle"


class UpcycleCheckpointError(ValueError):
    """The checkpoint cannot be loaded into this model (different architecture, sizes, layers or config)."""


def save_upcycled(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``path/model.safetensors`` and ``path/upcycle.json``; returns the folder."""
    from safetensors.torch import save_model

    handle = get_upcycle(model)
    if handle is None:
        raise ValueError("save_upcycled: the model is not upcycled (call moekit.convert.upcycle.upcycle_ first)")
    cfg = dataclasses.replace(handle.config, layers=tuple(handle.sites))
    hf_config = getattr(model, "config", None)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "save_id": uuid.uuid4().hex,
        "model_class": type(model).__name__,
        "model_type": handle.model_type,
        "upcycle": cfg.to_dict(),
        "layers": _layer_shapes(model),
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_model(model, str(tmp), metadata={_META_KEY: json.dumps(meta)}))
    full = dict(meta, hf_config=hf_config.to_dict() if hasattr(hf_config, "to_dict") else None)
    text = json.dumps(full, indent=2, sort_keys=True, default=str)
    atomic_write(folder / CONFIG_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return folder


def load_upcycled(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a checkpoint written by :func:`save_upcycled`.

    With ``model=None`` the Hugging Face model is rebuilt from the saved config (``transformers`` class of the same
    name, in eval mode). With a model, it must be the same architecture, either dense (the saved transform is
    applied to it) or already upcycled with the same config. Raises :class:`UpcycleCheckpointError` on any
    mismatch, leaving a given dense model unchanged.
    """
    from safetensors import safe_open
    from safetensors.torch import load_model

    folder = Path(path)
    meta = read_upcycle_meta(folder)
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        header = (f.metadata() or {}).get(_META_KEY)
    if header is None or json.loads(header).get("save_id") != meta["save_id"]:
        raise UpcycleCheckpointError(
            f"{folder / WEIGHTS_NAME} and {folder / CONFIG_NAME} come from different saves (save_id differs)"
        )
    if model is None:
        model = _build_hf_model(meta)
    if type(model).__name__ != meta["model_class"]:
        raise UpcycleCheckpointError(
            f"checkpoint was saved from {meta['model_class']}, cannot load it into {type(model).__name__}"
        )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != meta["model_type"]:
        raise UpcycleCheckpointError(f"checkpoint model_type {meta['model_type']!r} != model's {model_type!r}")

    cfg = UpcycleConfig.from_dict(meta["upcycle"])
    existing = get_upcycle(model)
    applied_here = existing is None
    if existing is not None:
        mine = dataclasses.replace(existing.config, layers=tuple(existing.sites))
        if mine.to_dict() != cfg.to_dict():
            raise UpcycleCheckpointError(
                "the model is already upcycled with a different config than the checkpoint's:\n"
                f"  model:      {mine.to_dict()}\n  checkpoint: {cfg.to_dict()}"
            )
    else:
        try:
            upcycle_(model, cfg)
        except (ValueError, TypeError) as e:
            raise UpcycleCheckpointError(f"the checkpoint's upcycle config does not fit this model: {e}") from e
    try:
        shapes = _layer_shapes(model)
        if shapes != meta["layers"]:
            diff = [(a, b) for a, b in zip(meta["layers"], shapes) if a != b] or [(meta["layers"], shapes)]
            raise UpcycleCheckpointError(f"MoE layer sizes differ from the checkpoint's (saved, model): {diff[:3]}")
        try:
            load_model(model, str(folder / WEIGHTS_NAME), strict=True)
        except RuntimeError as e:
            raise UpcycleCheckpointError(f"weights do not match the model: {e}") from e
    except UpcycleCheckpointError:
        if applied_here:
            revert(model)
        raise
    return model


def read_upcycle_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``upcycle.json`` of a checkpoint folder, checked for format and version."""
    folder = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: not an upcycled checkpoint folder")
    meta = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise UpcycleCheckpointError(f"{folder / CONFIG_NAME}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise UpcycleCheckpointError(
            f"{folder / CONFIG_NAME}: format version {meta.get('version')} is not supported (this moekit reads "
            f"version {FORMAT_VERSION})"
        )
    return meta


def _layer_shapes(model: nn.Module) -> list[dict[str, Any]]:
    handle = get_upcycle(model)
    return [
        {"name": name, "dim": moe.dim, "num_experts": moe.num_experts, "expert_hidden": moe.experts.hidden_dim}
        for name, moe in handle.moe_layers().items()
    ]


def _build_hf_model(meta: dict[str, Any]) -> nn.Module:
    if meta.get("hf_config") is None or meta.get("model_type") is None:
        raise UpcycleCheckpointError("the checkpoint has no Hugging Face config; pass model= to load_upcycled")
    import transformers

    cls = getattr(transformers, meta["model_class"], None)
    if cls is None:
        raise UpcycleCheckpointError(f"transformers has no class {meta['model_class']!r}; pass model= to load_upcycled")
    hf = dict(meta["hf_config"])
    hf.pop("model_type", None)
    config = transformers.AutoConfig.for_model(meta["model_type"], **hf)
    return cls(config).eval()
