"""The CLI on bad input: missing or corrupt data, broken checkpoints, unwritable output, bad options.

Every case runs the real ``python -m pullgeom`` in a subprocess and must end with a non-zero
exit status and exactly one stderr line ``pullgeom: error: ...`` that names the remedy, with no
traceback unless ``--debug`` is given. Pickle checkpoints that would run code are refused
without ever being unpickled (a marker file the payload would write must never appear).
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pullgeom.paper.cli import main
from pullgeom.paper.outputs import CheckpointError, load_checkpoint, save_checkpoint
from pullgeom.paper.models import PaperVAE

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m pullgeom ARGV`` in a fresh process (one thread, no autotuning)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PULLGEOM_AUTOTUNE": "0"}
    return subprocess.run([sys.executable, "-m", "pullgeom", "--quiet", *argv], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=TIMEOUT)


def run_in_process(argv, capsys) -> subprocess.CompletedProcess:
    """``pullgeom.paper.cli.main(ARGV)`` in this process: the same code path, without the ~3 s of a fresh
    interpreter; used for the cases whose failure is decided by validation alone."""
    capsys.readouterr()
    try:
        code = main(["--quiet", *argv])
    except SystemExit as stop:  # argparse's own errors exit
        code = stop.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit status ``code``, no traceback, and a single ``pullgeom: error:`` line containing ``needles``."""
    err = result.stderr.strip()
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("pullgeom: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ----------------------------------------------------------------------------------------
# Fixtures: a small real checkpoint and IDX files.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A valid (untrained) MNIST-shaped checkpoint; small hidden layers keep it quick to load."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    save_checkpoint(directory, PaperVAE((1, 28, 28), (16, 8), 4, "bernoulli").eval())
    return directory


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0 0 0x08 ndim, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_test_split(directory: Path, images: bytes | None = None, labels: bytes | None = None) -> Path:
    """t10k images/labels .gz under ``directory``: 8 valid images unless bytes are given."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    valid_images = gzip.compress(idx_bytes(rng.integers(0, 256, (8, 28, 28))))
    valid_labels = gzip.compress(idx_bytes(rng.integers(0, 10, (8,))))
    (directory / "t10k-images-idx3-ubyte.gz").write_bytes(valid_images if images is None else images)
    (directory / "t10k-labels-idx1-ubyte.gz").write_bytes(valid_labels if labels is None else labels)
    return directory


def score(checkpoint: Path, data_dir: Path, out: Path, *extra: str) -> tuple[str, ...]:
    return ("score", "--checkpoint", str(checkpoint), "--dataset", "mnist", "--data-dir", str(data_dir),
            "--limit", "4", "--k", "2", "--out", str(out), *extra)


def test_valid_inputs_score_cleanly(checkpoint, tmp_path):
    """The control: the fixtures themselves are good, so each failure below is the bad input's."""
    result = run_cli(*score(checkpoint, write_test_split(tmp_path / "data"), tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "out" / "scores.csv").read_text().splitlines()) == 5  # header + 4 rows
    # Atomic writes keep the permissions of an ordinary file (mkstemp alone would leave 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out" / "scores.csv").stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------------------
# Data.


def test_missing_data_directory(checkpoint, tmp_path):
    result = run_cli(*score(checkpoint, tmp_path / "nowhere", tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(result, "t10k-images-idx3-ubyte.gz", "--download", "mnist-small")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_data_directory_without_the_files(checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    result = run_in_process(score(checkpoint, tmp_path / "empty", tmp_path / "out"), capsys)
    assert_one_line_error(result, "not found", "--download")


def _truncated_idx() -> bytes:
    full = idx_bytes(np.zeros((8, 28, 28)))
    return gzip.compress(full[: len(full) // 2])  # a complete gzip of half an IDX file


def _cut_gzip() -> bytes:
    full = gzip.compress(idx_bytes(np.random.default_rng(1).integers(0, 256, (8, 28, 28))))
    return full[: len(full) // 2]  # the gzip stream itself cut off


@pytest.mark.parametrize("images, needles", [
    (_truncated_idx(), ("truncated", "re-download")),
    (_cut_gzip(), ("gzip", "re-download")),
    (gzip.compress(b"\x12\x34\x56\x78" + bytes(64)), ("bad magic", "re-download")),
], ids=["idx-truncated", "gzip-cut-off", "bad-magic"])
def test_corrupt_idx_files(checkpoint, tmp_path, images, needles):
    data = write_test_split(tmp_path / "data", images=images)
    assert_one_line_error(run_cli(*score(checkpoint, data, tmp_path / "out"), cwd=tmp_path), *needles)


def test_images_and_labels_that_do_not_belong_together(checkpoint, tmp_path, capsys):
    labels = gzip.compress(idx_bytes(np.zeros(5)))
    data = write_test_split(tmp_path / "data", labels=labels)
    assert_one_line_error(run_in_process(score(checkpoint, data, tmp_path / "out"), capsys), "labels")


# ----------------------------------------------------------------------------------------
# Checkpoints.


def _copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def test_truncated_checkpoint(checkpoint, tmp_path):
    broken = _copy_checkpoint(checkpoint, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(broken)
    result = run_cli(*score(broken, write_test_split(tmp_path / "data"), tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(result, "model.safetensors", "truncated", "pullgeom train")


def test_debug_shows_the_traceback(checkpoint, tmp_path):
    broken = _copy_checkpoint(checkpoint, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x00" * 5)
    args = score(broken, write_test_split(tmp_path / "data"), tmp_path / "out")
    result = run_cli("--debug", *args, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "CheckpointError" in result.stderr


@pytest.mark.parametrize("config, needle", [
    ('{"arch": "paper-mlp", "input_', "not valid JSON"),
    ('{"arch": "resnet"}', "does not describe a pullgeom model"),
    ('[1, 2, 3]', "does not describe a pullgeom model"),
], ids=["cut-off", "unknown-arch", "not-an-object"])
def test_corrupt_checkpoint_config(checkpoint, tmp_path, capsys, config, needle):
    broken = _copy_checkpoint(checkpoint, tmp_path / "broken")
    (broken / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(broken)
    result = run_in_process(score(broken, write_test_split(tmp_path / "data"), tmp_path / "out"), capsys)
    assert_one_line_error(result, "config.json", needle)


class _Payload:
    """Unpickling this runs ``exec``, which creates the marker file: an attack, harmless here."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"encoder.mu.weight": torch.zeros(2, 2), "hook": _Payload(marker)})


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    """Sanity check of the fixture: an unguarded pickle.loads does create the marker."""
    marker = tmp_path / "ran"
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=_evil_pickle(marker), timeout=TIMEOUT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert marker.read_text() == "code ran"


def test_pickle_disguised_as_safetensors_is_refused_and_never_run(checkpoint, tmp_path):
    marker = tmp_path / "ran"
    evil = _copy_checkpoint(checkpoint, tmp_path / "evil")
    (evil / "model.safetensors").write_bytes(_evil_pickle(marker))
    with pytest.raises(CheckpointError, match="never loads pickles"):
        load_checkpoint(evil)
    assert not marker.exists()
    result = run_cli(*score(evil, write_test_split(tmp_path / "data"), tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(result, "never loads pickles")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt"])
def test_torch_save_pickle_checkpoint_is_refused_and_never_run(checkpoint, tmp_path, capsys, name):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / name).write_bytes(_evil_pickle(marker))
    data = write_test_split(tmp_path / "data")
    result = run_cli(*score(evil, data, tmp_path / "out"), cwd=tmp_path)
    assert_one_line_error(result, "pickle", "safetensors", "pullgeom train")
    result = run_in_process(score(evil / name, data, tmp_path / "out"), capsys)  # the file itself
    assert_one_line_error(result, "pickle", "safetensors", "pullgeom train")
    assert not marker.exists()


def test_no_unsafe_deserialisation_in_the_package():
    """Every torch.load in pullgeom passes weights_only=True, and nothing imports pickle."""
    for path in (ROOT / "pullgeom").rglob("*.py"):
        source = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", source, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, (path, call)


# ----------------------------------------------------------------------------------------
# Output directory and options.


def test_bad_option_in_a_real_process(checkpoint, tmp_path):
    result = run_cli("score", "--checkpoint", str(checkpoint), "--k", "five", "--out", str(tmp_path / "o"),
                     cwd=tmp_path)
    assert_one_line_error(result, "--k", "invalid int", "--help")


def test_output_under_a_regular_file(checkpoint, tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_cli(*score(checkpoint, write_test_split(tmp_path / "data"), tmp_path / "file" / "out"),
                     cwd=tmp_path)
    assert_one_line_error(result, "is a file", "pass a directory")


def test_output_in_a_read_only_directory(checkpoint, tmp_path, capsys):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Root writes through permission bits; /sys is a mount nobody may create files in.
        assert os.path.isdir("/sys"), "the root variant of this test needs /sys"
        argv = score(checkpoint, write_test_split(tmp_path / "data"), Path("/sys/pullgeom-out"))
        result = run_in_process(argv, capsys)
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            argv = score(checkpoint, write_test_split(tmp_path / "data"), locked / "out")
            result = run_in_process(argv, capsys)
        finally:
            locked.chmod(0o755)
    assert_one_line_error(result, "not writable", "pass a directory you can write to")


@pytest.mark.parametrize("argv, needles", [
    (("score", "--checkpoint", "{ckpt}", "--dataset", "mnist-small", "--k", "five", "--out", "{out}"),
     ("--k", "invalid int", "--help")),
    (("score", "--checkpoint", "{ckpt}", "--dataset", "mnist-small", "--k", "0", "--out", "{out}"),
     ("--k 0", ">= 1")),
    (("score", "--checkpoint", "{ckpt}", "--dataset", "mnist-small", "--split", "val", "--out", "{out}"),
     ("--split", "train", "--help")),
    (("score", "--checkpoint", "{ckpt}", "--dataset", "mnist-small", "--limit", "-3", "--out", "{out}"),
     ("--limit -3",)),
    (("attack", "--checkpoint", "{ckpt}", "--dataset", "mnist-small", "--delta-min", "2", "--out", "{out}"),
     ("--delta-min",)),
    (("score", "--dataset", "mnist-small", "--out", "{out}"), ("--checkpoint", "required")),
    (("scroe",), ("invalid choice", "score", "--help")),
], ids=["k-not-int", "k-zero", "split", "limit-negative", "delta-range", "missing-required", "typo"])
def test_bad_option_values(checkpoint, tmp_path, capsys, argv, needles):
    argv = [a.format(ckpt=checkpoint, out=tmp_path / "out") for a in argv]
    assert_one_line_error(run_in_process(argv, capsys), *needles)
    assert not (tmp_path / "out").exists()
