"""The README's Python blocks run as written (docs you can run)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(path: pathlib.Path) -> list[str]:
    # only ```python blocks run; use ```py or ```text for snippets that should not
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


CASES = [p for p in DOCS if p.exists() and _blocks(p)]


@pytest.mark.parametrize("path", CASES, ids=[p.name for p in CASES])
def test_doc_python_blocks_run(path, tmp_path, monkeypatch):
    """A document's ```python blocks run in order in one namespace, like a notebook. Illustrative snippets that
    are not meant to run in-process use ```py."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc__"}
    for index, code in enumerate(_blocks(path)):
        exec(compile(code, f"{path.name}[{index}]", "exec"), namespace)


def test_cli_help_runs():
    from moekit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_bench_smoke(capsys):
    from moekit.cli import main

    assert main(["bench", "--quick", "--repeats", "1", "--shapes", "quick-train", "--no-tcmalloc",
                 "--modes", "fwd+bwd"]) == 0
    out = capsys.readouterr().out
    for impl in ("dense-floor", "moekit", "per-expert-loop", "hf-mixtral-grouped_mm", "hf-qwen3moe-eager"):
        assert f"| {impl} |" in out
