"""Single-pass ("online") softmax, as Edge-MoE computes its gate and attention probabilities.

One sweep over the scores keeps a running maximum m and a running sum Z of exp(s - m). When a new score s_j beats
the maximum, the sum is rescaled: Z <- Z * exp(m - s_j) + 1 and m <- s_j; otherwise Z <- Z + exp(s_j - m). At the
end p_j = exp(s_j - m) / Z. Mathematically equal to softmax; only the rounding differs.

Both branches are written with exp(-|s_j - m|) <= 1, so neither can overflow (and no gradient of an untaken
``torch.where`` branch can turn into inf * 0 = nan).
"""

from __future__ import annotations

import torch
from torch import Tensor

SOFTMAX_MODES = ("exact", "online")


def online_softmax_stats(s_RN: Tensor) -> tuple[Tensor, Tensor]:
    """Running max ``m_R`` and normaliser ``z_R`` of each row of ``s_RN`` (rows = all leading dims), in one sweep
    over the last dimension. Scores must be finite."""
    if s_RN.shape[-1] == 0:
        raise ValueError("online_softmax: cannot normalise over an empty dimension")
    m_R = s_RN[..., 0]
    z_R = torch.ones_like(m_R)
    for j in range(1, s_RN.shape[-1]):
        s_j = s_RN[..., j]
        beats = s_j > m_R
        a = torch.exp(-(s_j - m_R).abs())  # exp(m - s_j) if s_j beats m, else exp(s_j - m)
        z_R = torch.where(beats, z_R * a + 1.0, z_R + a)
        m_R = torch.where(beats, s_j, m_R)
    return m_R, z_R


def online_softmax(s: Tensor, dim: int = -1) -> Tensor:
    """Softmax of ``s`` along ``dim`` computed with :func:`online_softmax_stats`."""
    s_RN = s.movedim(dim, -1)
    m_R, z_R = online_softmax_stats(s_RN)
    p_RN = torch.exp(s_RN - m_R.unsqueeze(-1)) / z_R.unsqueeze(-1)
    return p_RN.movedim(-1, dim)


def softmax(s: Tensor, dim: int = -1, mode: str = "exact") -> Tensor:
    """``torch.softmax`` (``mode="exact"``) or the single-pass :func:`online_softmax` (``mode="online"``)."""
    if mode == "exact":
        return torch.softmax(s, dim=dim)
    if mode == "online":
        return online_softmax(s, dim=dim)
    raise ValueError(f"unknown softmax mode {mode!r}; valid choices: {', '.join(SOFTMAX_MODES)}")
