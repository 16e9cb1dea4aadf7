"""Sharded ``score`` and ``train`` under torchrun: 2 gloo processes on loopback against one process.

Every torchrun here is a real launch (``python -m torch.distributed.run``) of the command line,
bounded by ``TIMEOUT_S``, on 127.0.0.1 with a port picked by binding port 0.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pullgeom.paper import cli
from pullgeom.paper import distributed
from pullgeom.paper.datasets import load_dataset
from pullgeom.paper.outputs import load_checkpoint

TIMEOUT_S = 120
LIMIT, BATCH = 300, 64  # 5 blocks of rows: ranks 0 and 1 own 3 and 2, so the shards are uneven
SCORE = ["score", "--dataset", "mnist-small", "--limit", str(LIMIT), "--batch-size", str(BATCH)]
TRAIN = ["train", "--dataset", "mnist-small", "--limit", "64", "--batch-size", "32", "--epochs", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(**extra: str) -> dict[str, str]:
    """The test's environment without conftest's TRITON_INTERPRET: with it, Triton's (slow)
    interpreter would be the first eligible backend that a launch pins."""
    dropped = ("TRITON_INTERPRET", "PULLGEOM_AUTOTUNE")
    return {**{key: value for key, value in os.environ.items() if key not in dropped}, **extra}


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "pullgeom", *args]
    return _run(command, cwd, _environment(OMP_NUM_THREADS="1"))


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


def _block_counts(stderr: str) -> tuple[int, int, set[str]]:
    """(blocks computed, blocks reused, reused row ranges) summed over the ranks' summary lines."""
    computed = reused = 0
    ranges: set[str] = set()
    for line in stderr.splitlines():
        match = re.search(r"\[rank \d/2\] scored .*: (\d+) computed, (\d+) reused from an earlier run(.*)",
                          line)
        if match:
            computed += int(match[1])
            reused += int(match[2])
            ranges |= set(re.findall(r"\d+-\d+", match[3]))
    return computed, reused, ranges


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    assert cli.main(["--quiet", *TRAIN, "--beta", "1", "--out", str(workdir / "model")]) == 0
    return workdir / "model" / "models" / "beta=1_mixup=0"


@pytest.fixture(scope="module")
def single(workdir, checkpoint) -> Path:
    """scores.csv of one process, with the backend a torchrun launch pins."""
    out = workdir / "one"
    _ok(_run([sys.executable, "-m", "pullgeom", "--quiet", *SCORE, "--checkpoint", str(checkpoint), "--out",
              str(out)], workdir, _environment(PULLGEOM_AUTOTUNE="0")))
    return out


def test_launch_from_env():
    assert distributed.launch_from_env({}) is None
    assert distributed.launch_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert distributed.launch_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1",
                                        "LOCAL_WORLD_SIZE": "2"}) == distributed.Launch(3, 4, 1, 2)
    with pytest.raises(RuntimeError, match="RANK"):
        distributed.launch_from_env({"WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="outside"):
        distributed.launch_from_env({"WORLD_SIZE": "2", "RANK": "2"})


@pytest.mark.parametrize("count,world", [(0, 2), (1, 3), (7, 2), (50, 4)])
def test_every_item_has_exactly_one_rank(count, world):
    launches = [distributed.Launch(r, world, r, world) for r in range(world)]
    owners = [[launch.rank for launch in launches if launch.owns(i)] for i in range(count)]
    assert owners == [[i % world] for i in range(count)]


def test_shard_ranges_cover_the_rows_in_order():
    assert distributed.shard_ranges(0, 4) == []
    assert distributed.shard_ranges(9, 4) == [(0, 4), (4, 8), (8, 9)]


def test_rank_device():
    launch = distributed.Launch(3, 4, 1, 2)
    assert distributed.rank_device("cuda", launch) == "cuda:1"
    assert distributed.rank_device("cuda:0", launch) == "cuda:0"
    assert distributed.rank_device("cpu", launch) == "cpu"
    assert distributed.rank_device("cuda", None) == "cuda"


def test_two_ranks_write_the_files_of_one_process(workdir, checkpoint, single):
    out = workdir / "two"
    result = _ok(_torchrun([*SCORE, "--checkpoint", str(checkpoint), "--out", str(out)], workdir))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())  # no shard files
    assert (out / "scores.csv").read_bytes() == (single / "scores.csv").read_bytes()
    assert (out / "histograms.png").read_bytes() == (single / "histograms.png").read_bytes()
    assert result.stdout.splitlines() == [str(out / "scores.csv")]  # printed once, by rank 0
    assert _block_counts(result.stderr)[:2] == (5, 0)
    assert "[rank 0/2] joined" in result.stderr and "[rank 1/2] joined" in result.stderr
    assert "scoring (rank 0 of 2)" in result.stderr  # the progress bar, drawn by rank 0 only
    assert "scoring (rank 1 of 2)" not in result.stderr


def test_a_failed_rank_is_resumed_without_redoing_finished_blocks(workdir, checkpoint, single):
    out = workdir / "resumed"
    model, _ = load_checkpoint(checkpoint)
    images, _ = load_dataset("mnist-small", "test", limit=LIMIT)
    shards = distributed.score_shard_dir(out, model, images, k=5, decoder_metric=False, batch_size=BATCH)
    # Rank 1 owns blocks 1 and 3; a directory where block 3's file goes makes its atomic rename
    # fail, so rank 1 dies after finishing block 1 and torchrun stops rank 0 wherever it is.
    blocker = shards / "rows-000000192-000000256.safetensors"
    blocker.mkdir(parents=True)
    failed = _torchrun([*SCORE, "--checkpoint", str(checkpoint), "--out", str(out)], workdir)
    assert failed.returncode != 0
    assert not (out / "scores.csv").exists()
    blocker.rmdir()
    finished = {p.name: p.stat().st_mtime_ns for p in shards.glob("rows-*.safetensors")}
    assert "rows-000000064-000000128.safetensors" in finished
    assert "rows-000000192-000000256.safetensors" not in finished
    for name in finished:  # each finished block holds the rows a single process computes for it
        start, end = (int(v) for v in re.findall(r"\d+", name))
        assert load_file(str(shards / name))["index"].tolist() == list(range(start, end))

    result = _ok(_torchrun([*SCORE, "--checkpoint", str(checkpoint), "--out", str(out)], workdir))
    computed, reused, ranges = _block_counts(result.stderr)
    assert reused == len(finished) and computed == 5 - len(finished)
    assert {f"rows-{int(a):09d}-{int(b):09d}.safetensors" for a, b in (r.split("-") for r in ranges)} == \
        set(finished)
    assert (out / "scores.csv").read_bytes() == (single / "scores.csv").read_bytes()
    assert not (out / distributed.SHARD_ROOT).exists()


def test_sweep_models_are_sharded_and_finished_ones_are_not_retrained(workdir):
    out, reference = workdir / "sweep", workdir / "sweep-one"
    assert cli.main(["--quiet", *TRAIN, "--beta", "0.1", "1", "--out", str(out)]) == 0
    earlier = {p.name: (p / "model.safetensors").stat().st_mtime_ns for p in (out / "models").iterdir()}

    # Models 0..3 go to ranks 0, 1, 0, 1: each rank finds one of its two already trained.
    result = _ok(_torchrun(["--quiet", *TRAIN, "--beta", "0.1", "1", "10", "3", "--out", str(out)], workdir))
    assert result.stderr.count("2 of 4 models are this rank's, 1 already trained") == 2
    names = ["beta=0.1_mixup=0", "beta=1_mixup=0", "beta=10_mixup=0", "beta=3_mixup=0"]
    assert result.stdout.splitlines() == [str(out / "models" / name) for name in names]
    assert {p.name: (p / "model.safetensors").stat().st_mtime_ns for p in (out / "models").iterdir()
            if p.name in earlier} == earlier
    assert sorted(p.name for p in (out / "state").iterdir()) == []  # shard sweeps are cleaned up

    # The same four models trained by one process in one stack: same init, batches and noise;
    # only the float32 rounding of the wider batched matmuls differs. 1e-5 is far below one Adam
    # step (lr 3e-3), so a model with another seed, batch order or noise would fail.
    assert cli.main(["--quiet", *TRAIN, "--beta", "0.1", "1", "10", "3", "--out", str(reference)]) == 0
    for name in names[2:]:
        ours, theirs = load_file(str(out / "models" / name / "model.safetensors")), \
            load_file(str(reference / "models" / name / "model.safetensors"))
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5, msg=f"{name} {key}")


def test_commands_that_do_not_shard_refuse_a_launch(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "demo runs in one process; start it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
