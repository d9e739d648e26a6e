"""Finding MoE layers in a model: one walker for every module that needs it (statistics, balance, conversion).

:class:`MoELayerBase` is the marker base class of :class:`moekit.MoE`; it lives here so that the walker needs no
import of ``moekit.layer`` (no import cycle between the layer and the statistics).
"""

from __future__ import annotations

from typing import Iterator

from torch import nn


class MoELayerBase(nn.Module):
    """Marker base of MoE layers found by :func:`moe_layers`."""


def moe_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` for every MoE layer in ``model`` (``model`` itself included), in module order."""
    for name, m in model.named_modules():
        if isinstance(m, MoELayerBase):
            yield name, m
