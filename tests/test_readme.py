"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_runs_as_written(capsys):
    blocks = python_blocks()
    assert blocks, "the README has no python quickstart"
    namespace: dict = {}
    exec(compile(blocks[0], "README quickstart", "exec"), namespace)
    result = namespace["result"]
    assert result.eigenvalues.shape == (64, 5)
    assert result.eigenvectors.shape == (64, 5, 1, 28, 28)
    assert namespace["G"].gram().shape[0] == 2
    assert "eigenvalues" not in capsys.readouterr().err
