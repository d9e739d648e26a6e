"""Tests that pass in the plain log but not in the swapped one (pytest -rA logs), with the first error line."""

from __future__ import annotations

import re
import sys


def outcomes(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in open(path, errors="replace"):
        m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)(?: - (.*))?", line)
        if m and "::" in m.group(2):
            if not out.get(m.group(2), "").startswith("SUBFAILED"):
                out.setdefault(m.group(2), m.group(1) + (f" - {m.group(3)[:160]}" if m.group(3) else ""))
        sub = re.match(r"^SUBFAILED(\[[^\]]*\])? (\S+)", line)  # a failed subTest fails its test
        if sub and "::" in sub.group(2):
            out[sub.group(2)] = f"SUBFAILED{sub.group(1) or ''}"
    return out


def main(plain: str, swapped: str) -> int:
    a, b = outcomes(plain), outcomes(swapped)
    passed = [t for t, o in a.items() if o.startswith("PASSED")]
    skipped_here = [t for t in passed if t not in b]  # deselected in the swapped run (-k)
    lost = [t for t in passed if t in b and not b[t].startswith("PASSED")]
    print(f"plain: {len(passed)} passed of {len(a)}; swapped: "
          f"{sum(o.startswith('PASSED') for o in b.values())} passed of {len(b)}; passing plain but not swapped: "
          f"{len(lost)} (not run swapped: {len(skipped_here)})")
    for t in lost:
        print(f"  {t}: {b.get(t, 'missing')}")
    if skipped_here:  # -rA names skipped tests only by file:line: deselected (-k) or skipped in the swapped run
        print("passing plain, deselected or skipped swapped:")
        for t in skipped_here:
            print(f"  {t}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
