"""The README's quickstart runs as written, and the tables of tests and figures it links to
(docs/reliability.md) are true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
RELIABILITY = README.parent / "docs" / "reliability.md"


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


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def table_row(text: str, label: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 1, f"expected one table row '{label}', found {len(rows)}"
    return rows[0]


def test_every_test_named_in_the_bad_input_table_exists():
    """The table's "test" column (docs/reliability.md, moved there from the README): each name must
    be a test function in the files it names."""
    named = set(re.findall(r"`(test_\w+)(?:`|\[)", section(RELIABILITY.read_text(), "The API on bad input")))
    tests = Path(__file__).resolve().parent
    defined = set()
    for module in ("test_api.py", "test_numerics.py"):
        defined |= set(re.findall(r"^def (test_\w+)", (tests / module).read_text(), flags=re.M))
    assert len(named) >= 15, "the bad-input table lost its test column"
    assert named <= defined, f"named in docs/reliability.md but not defined: {sorted(named - defined)}"


def hypothesis_examples() -> dict[str, int]:
    """max_examples of each property test, keyed the way the README names them."""
    import test_properties as properties
    import test_properties_backends as backends

    def examples(test) -> int:
        return test._hypothesis_internal_use_settings.max_examples

    return {
        "torch/autograd MLPs": examples(properties.test_random_mlps_match_the_dense_reference),
        "lanczos MLPs": examples(properties.test_random_mlps_on_lanczos_match_the_dense_reference),
        "autograd conv": examples(properties.test_random_conv_encoders_on_autograd_match_the_dense_reference),
        "lanczos conv": examples(properties.test_random_conv_encoders_on_lanczos_match_the_dense_reference),
        "cpp MLPs": examples(backends.test_cpp_matches_the_dense_reference),
        "triton MLPs": examples(backends.test_triton_matches_the_dense_reference),
    }


def stated_counts(row: str) -> dict[str, int]:
    figure = row.split("|")[2]
    return {name.strip(): int(count) for count, name in re.findall(r"(\d+) ([a-z/]+(?: [A-Za-z]+)?)", figure)}


def test_reliability_figures_match_the_tests():
    """Every count in the reliability table (docs/reliability.md, "Figures"; the README links to it)
    is read from the tests that produce it, so it cannot drift from what CI runs."""
    tests = Path(__file__).resolve().parent
    figures = section(RELIABILITY.read_text() + "\n## end\n", "Figures")

    examples = hypothesis_examples()
    row = table_row(figures, "random encoders (hypothesis examples a run)")
    assert stated_counts(row) == examples, row

    fuzz_count = int(re.search(r"^SEED, COUNT = \d+, (\d+)", (tests / "test_fuzz_ops.py").read_text(),
                               flags=re.M).group(1))
    assert re.search(rf"\| {fuzz_count} a run", table_row(figures, "fuzzed op calls")), "fuzzed op calls"

    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
               str(tests / "test_reliability_cli.py")]
    collected = subprocess.run(collect, capture_output=True, text=True, cwd=README.parent, timeout=300)
    cli_tests = int(re.search(r"(\d+) tests? collected", collected.stdout).group(1))
    assert f"| {cli_tests} tests in `tests/test_reliability_cli.py`" in table_row(figures, "CLI bad-input tests")


def test_readme_links_lead_to_files_and_its_front_door_is_short():
    """Every relative link in the README (and in the docs pages it links) points at a file, the
    main job and the test command sit in its first 60 lines, and it stays about 200 lines."""
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 210, len(lines)
    head = "\n".join(lines[:60])
    assert "pullgeom demo --out demo-out" in head and "bash scripts/test.sh" in head
    for page in [README, *sorted((README.parent / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def shown_command_lines() -> list[list[str]]:
    """Every ``pullgeom <command> ...`` line in the README's and docs' shell blocks, as argv
    (backslash continuations joined, comments dropped, each ``<placeholder>`` one plain word)."""
    import shlex

    lines = []
    for page in (README, *sorted((README.parent / "docs").glob("*.md"))):
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", page.read_text(), flags=re.S):
            for command in block.replace("\\\n", " ").splitlines():
                command = re.sub(r"<[^>]*>", "PLACEHOLDER", command.split(" #", 1)[0].strip())
                if command.startswith("#"):
                    continue
                for part in command.split("&&"):
                    words = shlex.split(part)
                    starts = [i for i, word in enumerate(words)
                              if word.endswith("/pullgeom") or word == "pullgeom"]
                    if starts and len(words) > starts[0] + 1:
                        lines.append(words[starts[0] + 1:])
    return lines


def test_every_command_line_the_docs_show_parses():
    """The README's and docs' ``pullgeom ...`` command lines name commands and options that exist
    (parsed by the CLI's own parser, nothing run)."""
    from pullgeom.paper.cli import build_parser

    lines = shown_command_lines()
    assert {line[0] for line in lines} >= {"demo", "train", "score", "attack", "reproduce"}, lines
    parser = build_parser()
    for argv in lines:
        try:
            parser.parse_args(argv)
        except SystemExit as error:
            raise AssertionError(f"`pullgeom {' '.join(argv)}` does not parse") from error
