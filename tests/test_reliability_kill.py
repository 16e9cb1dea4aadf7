"""No data lost: SIGKILL ``pullgeom train`` / ``score`` / ``demo`` / ``reproduce`` at seeded points, then
check the files.

Each run is the real command line in a subprocess (``python -m pullgeom``; for ``reproduce``, its
``cli.main`` with a profile small enough for a test added), killed with SIGKILL (no handler, no
cleanup) at points picked by a seeded generator: when a given file is (re)written plus a random
delay, or after a random delay. After every kill, every file the run left must be complete and
loadable (JSON parses, safetensors and checkpoints load, CSVs are whole, PNGs decode); rerunning
the same command must then finish the job with outputs bit-identical to an uninterrupted run.
The two windows too narrow to hit by chance (between the two files of the training state, and
between the checkpoints of one group) are reproduced exactly from real files of a real run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import matplotlib.image
import pytest
import torch
from safetensors.torch import load_file

from test_distributed_reproduce import NAMES as TINY_MODELS
from test_distributed_reproduce import _outputs as reproduce_outputs

from pullgeom.paper import distributed
from pullgeom.paper.datasets import DataError, load_dataset
from pullgeom.paper.outputs import is_checkpoint, load_checkpoint
from pullgeom.paper.training import SweepConfig, train_sweep

ROOT = Path(__file__).resolve().parents[1]
# Summed over the tests of this module; `pytest -s` prints it (the figures in docs/reliability.md).
TALLY = {"faults_injected": 0, "files_checked": 0, "files_lost": 0}
TIMEOUT = 180  # seconds for any one process: generous for a loaded 2-core machine
TRAIN = ("train", "--dataset", "mnist-small", "--beta", "0.5", "2", "--mixup", "0.2", "--epochs", "4",
         "--limit", "256", "--batch-size", "64")
# Per-run bookkeeping; timing fields legitimately differ between an interrupted and a clean run.
VOLATILE_CONFIG_KEYS = {"train_seconds_group"}


def command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "pullgeom", "--quiet", "--threads", "1", *argv]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PULLGEOM_AUTOTUNE": "0"}


def run_to_end(argv: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, env=environment(), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    return result


def _stamp(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def run_and_kill(argv: list[str], trigger: Path | Callable[[], bool] | None, delay: float,
                 log: Path | None = None) -> bool:
    """Start ``argv``; once ``trigger`` is (re)written, or returns True when it is a function (at
    once when None), wait ``delay`` s and SIGKILL. ``log``: a file that receives its stderr.

    Returns whether the kill landed, i.e. the process was still running when it was sent.
    """
    if trigger is None or callable(trigger):
        ready = trigger or (lambda: True)
    else:
        before = _stamp(trigger)
        ready = lambda: _stamp(trigger) not in (None, before)  # noqa: E731
    with log.open("wb") if log is not None else contextlib.nullcontext(subprocess.PIPE) as stderr:
        process = subprocess.Popen(argv, env=environment(), stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not ready() and process.poll() is None:
                assert time.monotonic() < deadline, f"{trigger} never happened"
                time.sleep(0.002)
            time.sleep(delay)
            landed = process.poll() is None
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=TIMEOUT)
    if not landed:
        assert process.returncode == 0, log.read_text() if log is not None else process.stderr.read().decode()
    return landed


def _check_file(path: Path) -> None:
    """Raise unless ``path`` is a complete file of its kind."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".safetensors":
        load_file(str(path))
    elif path.suffix == ".csv":
        text = path.read_text()
        rows = list(csv.reader(io.StringIO(text)))
        if not text.endswith("\n") or len(rows) < 2 or {len(row) for row in rows} != {len(rows[0])}:
            raise ValueError("incomplete CSV")
    elif path.suffix == ".png":
        matplotlib.image.imread(str(path))
    if path.name == "config.json" and is_checkpoint(path.parent):
        load_checkpoint(path.parent)


def check_files(root: Path) -> list[str]:
    """Check every file under ``root``; returns the broken ones ("lost": present but unusable).

    Temporaries (``.NAME.XXXX.tmp``) are a killed writer's leftovers: never read by pullgeom and
    never under a real name, so they are skipped.
    """
    files = [p for p in root.rglob("*")
             if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp"))]
    lost = []
    for path in files:
        try:
            _check_file(path)
        except Exception as error:  # any failure to read it back is a lost file
            lost.append(f"{path.relative_to(root)}: {error!r}")
    TALLY["files_checked"] += len(files)
    TALLY["files_lost"] += len(lost)
    return lost


def _record(faults: int) -> None:
    TALLY["faults_injected"] += faults
    print(f"\nreliability tally: {TALLY}")


def same_outputs(got: Path, want: Path, names: list[str]) -> None:
    """The named files under both roots are bit-identical (configs up to their timing fields)."""
    for name in names:
        a, b = got / name, want / name
        if a.name == "config.json":
            strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items()  # noqa: E731
                               if k not in VOLATILE_CONFIG_KEYS}
            assert strip(a) == strip(b), name
        else:
            assert a.read_bytes() == b.read_bytes(), name


# The cosine schedule's state (the epoch it reached, the rate) travels in the training state's file.
SCHEDULES = {"constant": (), "cosine": ("--lr-schedule", "cosine", "--cosine-t-max", "5")}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path, schedule):
    rng = random.Random(7)
    reference, run = tmp_path / "reference", tmp_path / "run"
    train = (*TRAIN, *SCHEDULES[schedule])
    run_to_end(command(*train, "--out", str(reference)))
    state = run / "state" / "group.safetensors"
    # Kill: right after some epoch's state lands, mid-epoch, and while checkpoints are being written.
    plan = [(state, rng.uniform(0.0, 0.3)), (state, rng.uniform(0.0, 0.3)),
            (run / "models" / "beta=0.5_mixup=0.2" / "model.safetensors", rng.uniform(0.0, 0.004))]
    landed = 0
    for trigger, delay in plan:
        if run_and_kill(command(*train, "--out", str(run)), trigger, delay):
            landed += 1
        assert check_files(run) == []
    run_to_end(command(*train, "--out", str(run)))
    names = ["sweep.json"] + [f"models/{tag}/{f}" for tag in ("beta=0.5_mixup=0.2", "beta=2_mixup=0.2")
                              for f in ("model.safetensors", "config.json")]
    same_outputs(run, reference, names)
    assert not (run / "state" / "group.safetensors").exists()
    assert landed >= 2, "the kills mostly missed the run: the test exercised nothing"
    _record(landed)


def test_killed_scoring_reruns_to_the_same_scores(tmp_path):
    rng = random.Random(11)
    checkpoint = tmp_path / "sweep" / "models" / "beta=1_mixup=0"
    run_to_end(command("train", "--dataset", "mnist-small", "--beta", "1", "--epochs", "1", "--limit", "128",
                       "--batch-size", "64", "--out", str(tmp_path / "sweep")))
    score = ("score", "--checkpoint", str(checkpoint), "--dataset", "mnist-small", "--limit", "64",
             "--k", "3")
    run_to_end(command(*score, "--out", str(tmp_path / "reference")))
    out = tmp_path / "run"
    # Kill during start-up/scoring, then right after scores.csv lands (while the histogram is drawn).
    plan = [(None, rng.uniform(0.5, 2.0)), (out / "scores.csv", rng.uniform(0.0, 0.05))]
    landed = 0
    for trigger, delay in plan:
        if run_and_kill(command(*score, "--out", str(out)), trigger, delay):
            landed += 1
        assert not out.exists() or check_files(out) == []
    run_to_end(command(*score, "--out", str(out)))
    same_outputs(out, tmp_path / "reference", ["scores.csv", "histograms.png"])
    assert landed >= 1
    _record(landed)


# ----------------------------------------------------------------------------------------
# The narrow windows, rebuilt exactly from real files.

SMALL = dict(batch_size=32, dataset="mnist-small", limit=96)


@pytest.fixture(scope="module", params=["constant", "cosine"])
def sweep_with_saved_states(tmp_path_factory, request):
    """An uninterrupted 3-epoch sweep of two models, plus a copy of its state after every epoch;
    at a constant rate and on a cosine schedule (T_max 4 epochs, so every epoch's rate differs)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("states")
    images, _ = load_dataset("mnist-small", "train", limit=96)
    schedule = {"lr_schedule": "cosine", "cosine_t_max": 4} if request.param == "cosine" else {}
    config = SweepConfig(betas=[0.5, 2.0], mixup=[0.2], epochs=3, **SMALL, **schedule)

    def keep(group):
        shutil.copytree(root / "reference" / "state", root / f"state{group.epochs_done}")

    train_sweep(config, images, root / "reference", progress=False, on_epoch_end=keep)
    return root, config, images


def _model_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "models").rglob("*") if p.is_file())


def test_kill_between_the_two_state_files_resumes_exactly(sweep_with_saved_states, tmp_path):
    """Killed after the epoch-2 tensors were renamed into place but before group.json followed."""
    root, config, images = sweep_with_saved_states
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(root / "reference" / "sweep.json", run / "sweep.json")
    (run / "state").mkdir()
    shutil.copy(root / "state2" / "group.safetensors", run / "state" / "group.safetensors")
    shutil.copy(root / "state1" / "group.json", run / "state" / "group.json")
    epochs = []
    train_sweep(config, images, run, progress=False, on_epoch_end=lambda g: epochs.append(g.epochs_done))
    assert epochs == [3]  # resumed after epoch 2, as the tensors say, not after epoch 1
    assert check_files(run) == []
    same_outputs(run, root / "reference", _model_files(root / "reference"))
    _record(1)


def test_kill_between_the_checkpoints_of_a_group_finishes_it_exactly(sweep_with_saved_states, tmp_path):
    """Killed after the first model's checkpoint was written and before the second's."""
    root, config, images = sweep_with_saved_states
    run = tmp_path / "run"
    shutil.copytree(root / "reference", run)
    shutil.copytree(root / "state3", run / "state", dirs_exist_ok=True)
    second = run / "models" / "beta=2_mixup=0.2"
    (second / "config.json").unlink()  # its weights landed, its config (the completion mark) did not
    epochs = []
    train_sweep(config, images, run, progress=False, on_epoch_end=lambda g: epochs.append(g.epochs_done))
    assert epochs == []  # nothing retrained: the saved, finished group is written out
    assert check_files(run) == []
    same_outputs(run, root / "reference", _model_files(root / "reference"))
    _record(1)


def test_kill_after_the_last_checkpoint_cleans_up_on_rerun(sweep_with_saved_states, tmp_path):
    """Killed after every checkpoint was written but before the training state was removed."""
    root, config, images = sweep_with_saved_states
    run = tmp_path / "run"
    shutil.copytree(root / "reference", run)
    shutil.copytree(root / "state3", run / "state", dirs_exist_ok=True)
    epochs = []
    train_sweep(config, images, run, progress=False, on_epoch_end=lambda g: epochs.append(g.epochs_done))
    assert epochs == [] and not any((run / "state").iterdir())  # nothing retrained, no stale state left
    assert check_files(run) == []
    same_outputs(run, root / "reference", _model_files(root / "reference"))
    _record(1)


# ----------------------------------------------------------------------------------------
# The reproduce pipeline, through `pullgeom demo`.

DEMO = ("demo", "--epochs", "2", "--limit", "512", "--score-limit", "32")
SUMMARY_NUMBERS = ("betas", "spectral_radius_mean", "entropy_mean", "recon_mse",
                   "spearman_beta_spectral_radius", "spearman_beta_entropy")


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def test_killed_demo_reruns_to_the_uninterrupted_report(tmp_path):
    """SIGKILL the ``reproduce`` pipeline (via ``demo``) in training, in scoring and among the figures.

    ``pullgeom reproduce`` has no profile small enough for a test, but ``pullgeom demo`` runs the
    same code: ``cmd_demo`` calls ``train.train_sweep`` (``cmd_reproduce`` calls
    ``distributed.train_sweep``, which without torchrun is exactly ``train.train_sweep``) into
    OUT/sweep, then ``report.evaluate_sweep`` on the checkpoints (scores, attacks, figures,
    report.md, summary.json). ``reproduce`` itself, with its mixup sweep, Fig. 6 and its kept
    evaluation results, is killed in the test after this one.
    """
    rng = random.Random(13)
    reference, run = tmp_path / "reference", tmp_path / "run"
    run_to_end(command(*DEMO, "--out", str(reference)))
    # Kill: mid-epoch 2 (after epoch 1's state lands), while Fig. 5 is drawn (after its JSON
    # lands), and among the attack figures or the decoder-metric scores (after attacks.json).
    plan = [(run / "sweep" / "state" / "group.safetensors", rng.uniform(0.0, 0.3)),
            (run / "fig5_scores_vs_beta.json", rng.uniform(0.0, 0.5)),
            (run / "attacks.json", rng.uniform(0.0, 2.0))]
    landed = 0
    for trigger, delay in plan:
        if run_and_kill(command(*DEMO, "--out", str(run)), trigger, delay):
            landed += 1
        assert check_files(run) == []
    run_to_end(command(*DEMO, "--out", str(run)))
    assert _all_files(run) == _all_files(reference)
    assert check_files(run) == []
    assert not any((run / "sweep" / "state").iterdir())
    models = [name for name in _all_files(reference) if name.startswith("sweep/models/")]
    same_outputs(run, reference, ["sweep/sweep.json", *models])
    got, want = (json.loads((root / "summary.json").read_text()) for root in (run, reference))
    for key in SUMMARY_NUMBERS:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12), key
    assert landed >= 2, "the kills mostly missed the run: the test exercised nothing"
    _record(landed)


# ----------------------------------------------------------------------------------------
# `pullgeom reproduce` itself: the tiny evaluation profile of test_distributed_reproduce.py, on
# the first training images of real MNIST through the command line's size overrides.

REPRODUCE = ("--dataset", "mnist", "--epochs", "2", "--train-images", "512")
RESUMED = re.compile(r"pullgeom: evaluated 4 of 4 models of .*: (\d+) computed, (\d+) reused from an earlier "
                     r"run(?: \((.*)\))?")


@pytest.fixture(scope="module")
def real_mnist() -> None:
    """Skips unless ``$PULLGEOM_DATA_DIR`` holds MNIST (e.g. PULLGEOM_DATA_DIR=../shared/data/mnist)."""
    try:
        load_dataset("mnist", "test", limit=1)
    except DataError as error:
        pytest.skip(f"real MNIST is not at $PULLGEOM_DATA_DIR: {error}")


def reproduce(out: Path) -> list[str]:
    """The real ``pullgeom reproduce`` on the tiny profile (that module, run as a script)."""
    script = Path(__file__).with_name("test_distributed_reproduce.py")
    return [sys.executable, str(script), str(out), "--quiet", "--threads", "1", "--", *REPRODUCE]


def _identity(paths: list[Path]) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each file: an atomic rewrite, even of the same bytes, changes both."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in paths}


def _resumed(stderr: str) -> tuple[int, int, set[str]]:
    """(models computed, models reused, names reused) from the line a resumed evaluation prints."""
    matches = list(RESUMED.finditer(stderr))
    assert len(matches) == 1, f"not one line on reused evaluations in:\n{stderr}"
    return int(matches[0][1]), int(matches[0][2]), set(matches[0][3].split(", "))


def test_killed_reproduce_resumes_without_reevaluating_finished_models(real_mnist, tmp_path):
    """SIGKILL ``reproduce`` in its mixup sweep, once its first model's evaluation is kept, and
    among the figures; the reruns must reuse what was evaluated and write the uninterrupted files."""
    rng = random.Random(17)
    reference, run = tmp_path / "reference", tmp_path / "run"
    fresh = run_to_end(reproduce(reference))
    assert "reused" not in fresh.stderr  # nothing to resume: evaluated without a word
    kept = run / distributed.SHARD_ROOT / "evaluation"
    last_plain = run / "sweep" / "models" / TINY_MODELS[-2] / "config.json"  # then the mixup sweep trains
    landed = [
        run_and_kill(reproduce(run), last_plain, rng.uniform(0.0, 0.3)),
        # Models are evaluated in checkpoint order, the first (Fig. 2, PGD, decoder metric) slowest.
        run_and_kill(reproduce(run), lambda: any(kept.glob("*.safetensors")), rng.uniform(0.0, 0.05)),
    ]
    assert landed[-1], "the run finished before the kill in the evaluation"
    assert check_files(run) == []
    evaluated = _identity(sorted(kept.glob("*.safetensors")))
    assert 1 <= len(evaluated) < len(TINY_MODELS), "the kill missed the evaluation"
    names = {name.rsplit("-", 1)[0] for name in evaluated}
    # Fig. 5's numbers are written once every model is evaluated, and the figures take seconds after.
    log = tmp_path / "resumed.log"
    landed.append(run_and_kill(reproduce(run), run / "fig5_scores_vs_beta.json", rng.uniform(0.0, 0.3), log))
    assert landed[-1], "the run finished before the kill among the figures"
    assert _resumed(log.read_text()) == (len(TINY_MODELS) - len(names), len(names), names)
    assert check_files(run) == []
    shards = sorted(kept.glob("*.safetensors"))
    assert len(shards) == len(TINY_MODELS)
    assert {name: _identity(shards)[name] for name in evaluated} == evaluated  # reused, not recomputed

    last = run_to_end(reproduce(run))
    assert _resumed(last.stderr) == (0, len(TINY_MODELS), set(TINY_MODELS))
    assert reproduce_outputs(run) == reproduce_outputs(reference)  # every file but the sweep's, and no others
    assert check_files(run) == []
    assert not [p for p in run.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert not (run / distributed.SHARD_ROOT).exists()
    models = [name for name in _all_files(reference) if name.startswith("sweep/models/")]
    assert models == [name for name in _all_files(run) if name.startswith("sweep/models/")]
    same_outputs(run, reference, models)
    _record(sum(landed))
