"""Sharded ``reproduce`` under torchrun: 2 gloo processes on loopback against one process.

``reproduce`` has no profile small enough for a test, so this module is also the command the
tests launch (here and in test_reliability_kill.py): run as a script (``python THIS OUT
[GLOBAL ...] [-- OPTION ...]``, or under torchrun) it adds the tiny profile ``TINY`` to the CLI's
profiles and runs ``pullgeom [GLOBAL ...] reproduce --profile tiny --dataset mnist-small --out OUT
[OPTION ...]``, the real command line in every process (an OPTION such as ``--dataset mnist``
overrides the default before it). Every launch is bounded by ``TIMEOUT_S``.

The 2-process runs start from a copy of the single process's trained sweep: training sharded
is tested in test_distributed.py (equal to 1e-5, not bitwise), and identical weights let these
tests ask for identical files.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import _environment, _free_port, _ok

from pullgeom.paper import cli
from pullgeom.paper import distributed
from pullgeom.paper.datasets import DATASETS, load_dataset
from pullgeom.paper.evaluation import EvalSettings, plan_evaluation
from pullgeom.paper.outputs import load_checkpoint
from pullgeom.paper.profiles import Profile
from pullgeom.paper.training import model_tag

TINY = Profile(
    betas=[0.01, 0.3, 10.0],
    mixup_models=[(0.3, 10.0)],
    epochs=1,
    limit=256,
    batch_size=64,
    evaluation=EvalSettings(score_limit=64, attack_limit=16, attack_steps=8, pgd_limit=8, pgd_steps=5,
                            decoder_limit=8, decoder_models=2, batch_size=32),
)
# Checkpoint order (the plain sweep, then the mixup one): model j is evaluated by rank j mod 2.
NAMES = [model_tag(beta, 0.0) for beta in TINY.betas] + [model_tag(b, w) for b, w in TINY.mixup_models]
TIMEOUT_S = 180
WALL_CLOCK = ("seconds_total", "seconds_training")
EVALUATED = re.compile(r"\[rank \d/2\] evaluated (\d+) of 4 models of .*: (\d+) computed, (\d+) reused "
                       r"from an earlier run(?: \((.*)\))?")


def _reproduce(out: str, arguments: list[str]) -> int:
    """``pullgeom GLOBAL reproduce --profile tiny ... OPTIONS`` into ``out`` (the script's entry
    point); arguments: the command line's global options (``--quiet``, ``--threads N``), then
    optionally ``--`` and reproduce's own (``--dataset mnist``, ``--epochs 2``, ...)."""
    DATASETS["mnist-small"].profiles["tiny"] = TINY
    split = arguments.index("--") if "--" in arguments else len(arguments)
    return cli.main([*arguments[:split], "reproduce", "--profile", "tiny", "--dataset", "mnist-small",
                     "--out", out, *arguments[split + 1:]])


def _one_process(out: Path, cwd: Path) -> subprocess.CompletedProcess:
    # The backend a torchrun launch pins, and the one thread per process torchrun gives.
    environment = _environment(PULLGEOM_AUTOTUNE="0", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, __file__, str(out)], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def _two_processes(out: Path, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, str(out)]
    return subprocess.run(command, cwd=cwd, env=_environment(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def _outputs(out: Path) -> dict[str, object]:
    """Every file reproduce writes beside the sweep (relative path -> content), wall-clock parts cut."""
    written = [path.relative_to(out) for path in sorted(out.rglob("*")) if path.is_file()]
    files: dict[str, object] = {str(path): (out / path).read_bytes() for path in written
                                if path.parts[0] != "sweep"}
    summary = json.loads(files["summary.json"])
    assert all(key in summary for key in WALL_CLOCK)
    files["summary.json"] = {key: value for key, value in summary.items() if key not in WALL_CLOCK}
    files["report.md"] = re.sub(rb"training took \d+ s", b"training took N s", files["report.md"])
    return files


def _evaluated(stderr: str) -> tuple[int, int, set[str]]:
    """(models computed, models reused, names reused) summed over the ranks' summary lines."""
    computed = reused = 0
    names: set[str] = set()
    for match in EVALUATED.finditer(stderr):
        computed += int(match[2])
        reused += int(match[3])
        names |= set(match[4].split(", ")) if match[4] else set()
    return computed, reused, names


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed-reproduce")


@pytest.fixture(scope="module")
def single(workdir) -> Path:
    """A whole single-process reproduce run: the sweep it trains and the files it writes."""
    out = workdir / "one"
    _ok(_one_process(out, workdir))
    return out


def _sweep_copy(single: Path, out: Path) -> Path:
    shutil.copytree(single / "sweep", out / "sweep")
    return out


def test_two_ranks_evaluate_the_sweep_into_the_files_of_one_process(workdir, single):
    out = _sweep_copy(single, workdir / "two")
    result = _ok(_two_processes(out, workdir))
    assert _outputs(out) == _outputs(single)  # and no shard file is left behind
    assert result.stderr.count("evaluated 2 of 4 models") == 2  # models 0, 2 on rank 0; 1, 3 on rank 1
    assert _evaluated(result.stderr) == (4, 0, set())
    assert "evaluating models (rank 0 of 2)" in result.stderr  # the progress bar, drawn by rank 0 only
    assert "evaluating models (rank 1 of 2)" not in result.stderr
    assert result.stdout.count("reproduce finished") == 1


def test_a_failed_rank_is_resumed_without_reevaluating_finished_models(workdir, single):
    out = _sweep_copy(single, workdir / "resumed")
    models = [load_checkpoint(out / "sweep" / "models" / name) for name in NAMES]
    jobs = plan_evaluation([config for _, config in models], TINY.evaluation)
    test, _ = load_dataset("mnist-small", "test")
    # Rank 1 evaluates models 1 and 3; a directory where model 3's result goes makes its atomic
    # rename fail, so rank 1 dies after saving model 1 and torchrun stops rank 0 wherever it is.
    blocker = distributed.evaluation_shard_path(out, NAMES[3], models[3][0], test, TINY.evaluation, jobs[3])
    blocker.mkdir(parents=True)
    failed = _two_processes(out, workdir)
    assert failed.returncode != 0
    assert not (out / "summary.json").exists()
    blocker.rmdir()
    finished = {path.name.rsplit("-", 1)[0] for path in blocker.parent.glob("*.safetensors")}
    assert NAMES[1] in finished and NAMES[3] not in finished

    result = _ok(_two_processes(out, workdir))
    assert _evaluated(result.stderr) == (4 - len(finished), len(finished), finished)
    assert _outputs(out) == _outputs(single)
    assert not (out / distributed.SHARD_ROOT).exists()


if __name__ == "__main__":
    sys.exit(_reproduce(sys.argv[1], sys.argv[2:]))
