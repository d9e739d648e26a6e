"""The Python blocks of docs/routers.md run as written."""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "routers.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_docs_routers_block_runs(i, capsys):
    exec(compile(BLOCKS[i], f"docs/routers.md block {i}", "exec"), {})
