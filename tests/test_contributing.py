"""CONTRIBUTING.md names only things that exist: every path, every test and every identifier it
puts in backticks, so its recipes cannot drift from the code unnoticed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "CONTRIBUTING.md"
SOURCES = ("pullgeom", "csrc", "tests", "benchmarks", "scripts")


def code_spans() -> list[str]:
    text = re.sub(r"```.*?```", "", GUIDE.read_text(), flags=re.S)
    return re.findall(r"`([^`\n]+)`", text)


def corpus() -> str:
    files = [path for folder in SOURCES for path in (ROOT / folder).rglob("*")
             if path.is_file() and path.suffix in (".py", ".cpp", ".cu", ".h", ".cuh", ".sh")]
    files += [ROOT / "pyproject.toml", ROOT / "setup.py", ROOT / ".ci" / "run"]
    return "\n".join(path.read_text(errors="replace") for path in files if path.is_file())


def is_path(span: str) -> bool:
    return "/" in span or re.search(r"\w\.(py|md|h|cpp|cu|sh)$", span) is not None


def cited_paths() -> set[str]:
    """Paths in backticks, and the file and folder names of the layout diagram."""
    paths = {span.split("::")[0] for span in code_spans() if is_path(span) and " " not in span}
    for block in re.findall(r"```\n(.*?)```", GUIDE.read_text(), flags=re.S):
        paths.update(re.findall(r"[\w/<>]+\.py|pullgeom/[\w/]+/", block))
    return paths


def exists(path: str) -> bool:
    """A path from the root, a glob, or a bare file name found somewhere in the package."""
    if "/" not in path:
        return any((ROOT / "pullgeom").rglob(path))
    return (ROOT / path.rstrip("/")).exists() or any(ROOT.glob(path))


def test_every_path_exists():
    paths = cited_paths()
    # <name> and <op> are the recipes' placeholders.
    missing = [p for p in sorted(paths) if "<" not in p and not exists(p)]
    assert len(paths) >= 30, "CONTRIBUTING.md lost its file references"
    assert not missing, f"CONTRIBUTING.md names paths that do not exist: {missing}"


def test_every_named_test_exists():
    tests = ROOT / "tests"
    for span in code_spans():
        for file, name in re.findall(r"(tests/test_\w+\.py)::(test_\w+)", span):
            assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), flags=re.M), f"{file}::{name}"
    defined = set(re.findall(r"^def (test_\w+)\(", "\n".join(p.read_text() for p in tests.glob("test_*.py")),
                             flags=re.M))
    named = {span for span in code_spans() if re.fullmatch(r"test_\w+", span)}
    assert named <= defined, f"tests named in CONTRIBUTING.md but not defined: {sorted(named - defined)}"


def test_every_identifier_exists_in_the_sources():
    words = set(re.findall(r"\w+", corpus()))
    identifiers = set()
    for span in code_spans():
        match = re.fullmatch(r"([A-Za-z_][\w.]*)(\(.*\))?", span)
        if match and not is_path(span):
            identifiers.update(part for part in match.group(1).split(".") if part)
    missing = sorted(name for name in identifiers if name not in words)
    assert len(identifiers) >= 40, "CONTRIBUTING.md lost its identifiers"
    assert not missing, f"CONTRIBUTING.md names identifiers found nowhere in the sources: {missing}"
