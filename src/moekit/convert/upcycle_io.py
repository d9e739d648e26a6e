"""Save and load an upcycled model: ``model.safetensors`` (every weight) + ``upcycle.json`` (the transform).

    save_upcycled(model, "ckpt/")                       # after upcycle_ (and training)
    model = load_upcycled("ckpt/")                      # fresh process: rebuilds the HF model from its config
    load_upcycled("ckpt/", model=base_model)            # or: apply the saved transform to a model you built

The JSON holds the :class:`UpcycleConfig` with ``layers`` set to the exact module names that were replaced, the
model class and Hugging Face config, and each MoE layer's sizes. The same JSON is stored in the safetensors header
under ``moekit_upcycle``, with a random ``save_id``, so a weights file and a JSON from different saves are refused.
Both files are one save of :class:`moekit.io.CheckpointWriter` (a fresh ``save-<id>`` directory committed by an
atomic ``manifest.json`` with sizes and checksums): a crash leaves the previous save or the new one, never a mix,
and loading verifies the checksums (``verify=False`` skips the hashing). Folders without a manifest (written by an
older moekit) load with a :class:`LegacyCheckpointWarning`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..io import CheckpointError, has_manifest, read_checkpoint, write_checkpoint
from .upcycle import UpcycleConfig, get_upcycle, revert, upcycle_

FORMAT = "moekit.upcycle"
FORMAT_VERSION = 1
CONFIG_NAME = "upcycle.json"
WEIGHTS_NAME = "model.safetensors"
_META_KEY = "moekit_upcycle"


class UpcycleCheckpointError(CheckpointError):
    """The checkpoint cannot be loaded into this model (different architecture, sizes, layers or config)."""


class LegacyCheckpointWarning(UserWarning):
    """An upcycled checkpoint without a manifest (older moekit): loaded without integrity checks."""


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
    full = dict(meta, hf_config=hf_config.to_dict() if hasattr(hf_config, "to_dict") else None)
    text = json.dumps(full, indent=2, sort_keys=True, default=str)
    files = {WEIGHTS_NAME: lambda tmp: save_model(model, str(tmp), metadata={_META_KEY: json.dumps(meta)}),
             CONFIG_NAME: text.encode("utf-8")}
    write_checkpoint(folder, files, kind=FORMAT, meta={"save_id": meta["save_id"]}, remove=(WEIGHTS_NAME, CONFIG_NAME))
    return folder


def load_upcycled(path: str | os.PathLike, model: nn.Module | None = None, *, verify: bool = True) -> nn.Module:
    """Load a checkpoint written by :func:`save_upcycled`.

    With ``model=None`` the Hugging Face model is rebuilt from the saved config (``transformers`` class of the same
    name, in eval mode). With a model, it must be the same architecture, either dense (the saved transform is
    applied to it) or already upcycled with the same config. Raises :class:`UpcycleCheckpointError` on any
    mismatch, leaving a given dense model unchanged. ``verify=False`` skips the checksums (sizes are checked).
    """
    from safetensors import safe_open
    from safetensors.torch import load_model

    folder = Path(path)
    files = _files(folder, verify=verify)
    meta = _read_meta_file(files[CONFIG_NAME])
    weights = files[WEIGHTS_NAME]
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = (f.metadata() or {}).get(_META_KEY)
    except OSError:
        raise
    except Exception as e:
        raise UpcycleCheckpointError(f"corrupt weights file {weights}: {type(e).__name__}: {e}") from None
    if header is None or json.loads(header).get("save_id") != meta["save_id"]:
        raise UpcycleCheckpointError(
            f"{weights} and {files[CONFIG_NAME]} come from different saves (save_id differs)"
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
            load_model(model, str(weights), strict=True)
        except RuntimeError as e:
            raise UpcycleCheckpointError(f"weights do not match the model: {e}") from e
    except UpcycleCheckpointError:
        if applied_here:
            revert(model)
        raise
    return model


def _files(folder: Path, verify: bool = True) -> dict[str, Path]:
    """Where the current save of ``folder`` keeps each file (verified), or the legacy layout with a warning."""
    if has_manifest(folder):
        ck = read_checkpoint(folder, kind=FORMAT, verify=verify)
        return {name: ck.path(name) for name in (CONFIG_NAME, WEIGHTS_NAME)}
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found (and no manifest.json): not an upcycled checkpoint "
                                    "folder")
    warnings.warn(f"{folder} has no manifest.json (written by an older moekit): loading it without integrity checks; "
                  "save it again to convert it", LegacyCheckpointWarning, stacklevel=3)
    return {name: folder / name for name in (CONFIG_NAME, WEIGHTS_NAME)}


def read_upcycle_meta(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The parsed ``upcycle.json`` of a checkpoint folder, checked for format and version."""
    return _read_meta_file(_files(Path(path), verify=verify)[CONFIG_NAME])


def _read_meta_file(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise PermissionError(f"cannot read checkpoint config {path}: permission denied") from None
    except ValueError as e:
        raise UpcycleCheckpointError(f"corrupt checkpoint config {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise UpcycleCheckpointError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise UpcycleCheckpointError(
            f"{path}: format version {meta.get('version')} is not supported (this moekit reads "
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
