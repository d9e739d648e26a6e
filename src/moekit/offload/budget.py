"""Parse an expert memory budget: ``"25%"`` of all expert bytes, a byte count (``int`` or ``"3GB"``/``"512MiB"``)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_budget(budget: int | float | str, total_expert_bytes: int, max_expert_bytes: int) -> int:
    """Budget in bytes. ``total_expert_bytes`` resolves percentages; a budget below ``max_expert_bytes`` (one expert)
    cannot hold the expert being computed and is rejected with the sizes in the message."""
    if isinstance(budget, bool):
        raise ValueError(f"expert_budget={budget!r}: expected a percentage like '25%' or a byte count")
    if isinstance(budget, str):
        s = budget.strip().upper().replace(" ", "")
        if s.endswith("%"):
            try:
                pct = float(s[:-1])
            except ValueError:
                raise ValueError(f"expert_budget={budget!r}: expected a percentage like '25%'") from None
            if not 0 < pct <= 100:
                raise ValueError(f"expert_budget={budget!r}: a percentage must lie in (0, 100]")
            nbytes = int(total_expert_bytes * pct / 100)
        else:
            m = re.fullmatch(r"([0-9.]+)([A-Z]*)", s)
            if not m or m.group(2) not in _UNITS:
                raise ValueError(f"expert_budget={budget!r}: expected '25%', a byte count, or e.g. '2GB', '512MiB'")
            nbytes = int(float(m.group(1)) * _UNITS[m.group(2)])
    elif isinstance(budget, (int, float)):
        nbytes = int(budget)
    else:
        raise ValueError(f"expert_budget={budget!r}: expected a percentage string or a byte count")
    if nbytes < max_expert_bytes:
        raise ValueError(f"expert_budget={budget!r} is {nbytes} bytes, smaller than one expert ({max_expert_bytes} "
                         f"bytes; all experts: {total_expert_bytes} bytes). Raise the budget to at least one expert.")
    return nbytes
