"""pytest conftest that passes every transformers model a test builds through ``moekit.convert.swap_hf_moe``.

run.sh copies it to the root of a fetched transformers tests tree (never committed here) for the "swapped" run.
A model is swapped when its outermost ``PreTrainedModel.__init__`` finishes (``post_init``), and after
``from_pretrained`` returns (not while loading: weights load into the HF layout, then the model is swapped). Models
without a supported MoE block, and models already swapped (a deepcopy keeps its swap), are left alone.
``MOEKIT_SWAP_SHARE=0`` swaps with ``share=False``.
"""

from __future__ import annotations

import os
import threading

import pytest

_state = threading.local()
SHARE = os.environ.get("MOEKIT_SWAP_SHARE", "1") != "0"
SWAPS = {"count": 0}


def _get(name: str) -> int:
    return getattr(_state, name, 0)


def _maybe_swap(model):
    from moekit.convert import is_hf_moe_block, swap_hf_moe

    if getattr(model, "_moekit_swap", None) is not None:
        return
    if not any(is_hf_moe_block(m) for m in model.modules()):
        return
    swap_hf_moe(model, share=SHARE)
    SWAPS["count"] += 1


def _install() -> None:
    from transformers import PreTrainedModel

    orig_init = PreTrainedModel.__init__
    orig_post_init = PreTrainedModel.post_init
    orig_from_pretrained = PreTrainedModel.from_pretrained.__func__

    def __init__(self, *args, **kwargs):
        _state.depth = _get("depth") + 1
        orig_init(self, *args, **kwargs)

    def post_init(self):
        orig_post_init(self)
        _state.depth = max(_get("depth") - 1, 0)
        if _get("depth") == 0 and _get("loading") == 0:
            _maybe_swap(self)

    def from_pretrained(cls, *args, **kwargs):
        _state.loading = _get("loading") + 1
        try:
            out = orig_from_pretrained(cls, *args, **kwargs)
        finally:
            _state.loading -= 1
            _state.depth = 0
        if _get("loading") == 0:
            _maybe_swap(out[0] if isinstance(out, tuple) else out)
        return out

    PreTrainedModel.__init__ = __init__
    PreTrainedModel.post_init = post_init
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def pytest_configure(config):
    _install()


@pytest.fixture(autouse=True)
def _fresh_construction_state():
    _state.depth = 0
    _state.loading = 0
    yield


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"moekit: swap_hf_moe(share={SHARE}) applied to {SWAPS['count']} models")
