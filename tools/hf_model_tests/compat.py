"""Bridge a tests snapshot to the installed transformers: names the snapshot's helpers import from
``transformers.testing_utils`` that the installed version lacks.

The per-model tests and their helpers (``causal_lm_tester.py`` ...) come from a git snapshot that need not match the
installed version exactly (e.g. a 5.16.0.dev0 snapshot imports ``_TEXT_MODEL_TESTER_DEFAULTS``, a plain dict of
tester defaults, which 5.24.0 does not define). For each such name whose definition in the snapshot's own
``src/transformers/testing_utils.py`` is a plain literal assignment, this appends it to ``tests/__init__.py`` (set on
``transformers.testing_utils`` before any helper imports it). Anything else missing is reported and left to fail.

    python compat.py DIR SNAPSHOT_GIT_DIR REF
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys


def main(root: str, git: str, ref: str) -> int:
    import transformers.testing_utils as installed

    src = subprocess.run(["git", "--git-dir", git, "show", f"{ref}:src/transformers/testing_utils.py"],
                         capture_output=True, text=True, check=True).stdout
    literals = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                ast.literal_eval(node.value)
            except ValueError:
                continue
            literals[node.targets[0].id] = ast.get_source_segment(src, node)
    missing: dict[str, str] = {}
    for f in sorted(pathlib.Path(root, "tests").rglob("*.py")):
        try:
            tree = ast.parse(f.read_text())
        except SyntaxError:
            continue
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module == "transformers.testing_utils":
                for a in n.names:
                    if not hasattr(installed, a.name):
                        missing.setdefault(a.name, str(f.relative_to(root)))
    lines = []
    for name, where in missing.items():
        if name in literals:
            lines.append(literals[name].replace(f"{name} =", f"_tu.{name} =", 1))
            print(f"compat: {name} (imported by {where}) taken from the snapshot's testing_utils")
        else:
            print(f"compat: {name} (imported by {where}) is missing from the installed transformers", file=sys.stderr)
    if lines:
        init = pathlib.Path(root, "tests", "__init__.py")
        init.write_text(init.read_text() + "\n# added by moekit tools/hf_model_tests/compat.py\n"
                        "import transformers.testing_utils as _tu\n" + "\n".join(lines) + "\ndel _tu\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
