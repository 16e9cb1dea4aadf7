"""Sharded scoring and beta sweeps on torch.distributed, for runs launched by ``torchrun``.

``torchrun --nproc_per_node=P -m pullgeom score|train|reproduce ...`` starts P copies of the
command line; each finds its rank in the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins one process group: ``gloo`` on
CPU, ``nccl`` when CUDA is available. Without torchrun, or with a world of one process,
no process group is joined and every command behaves exactly as a single process (which
keeps and reuses its evaluation results the same way, see ``evaluate_sweep``).

Work is split deterministically, so a rerun gives every rank the same shards:

- scoring: the dataset rows in blocks of ``batch_size`` (exactly the batches a single process
  scores, so every number is computed from the same batch and the CSV is byte-identical);
  block j goes to rank j mod P. Each block is saved atomically as
  ``TARGET/.pullgeom-shards/scores-<fingerprint>/rows-<start>-<end>.safetensors``; the
  fingerprint hashes the weights, the images and the options, so a rerun with the same
  inputs reuses finished blocks and a changed input never mixes with stale ones. Rank 0
  gathers the blocks (over the process group, so no shared filesystem is needed), restores
  row order and writes the files a single process writes; the shard files are removed once
  every rank is done.
- sweeps: model i of the sweep goes to rank i mod P, and each rank trains its models as one
  vectorised stack in ``OUT/state/shard-<rank>-of-<P>/`` (resumable per epoch by
  ``pullgeom.paper.training``) and moves each finished checkpoint into ``OUT/models/``. A model's
  initialisation, batches and noise depend only on its own tag and the sweep seed, so it is
  the model a single-process sweep trains. Finished models are never retrained. Sweeps
  need ``OUT`` on a filesystem every node sees.
- sweep evaluation (``reproduce``): model j's ``evaluation.evaluate_model`` (its scores, attack
  curves, PGD check, ...) runs on rank j mod P and is saved atomically as
  ``OUT/.pullgeom-shards/evaluation/<model>-<fingerprint>.safetensors`` (weights, test
  images, settings and the model's jobs hashed, as for scoring). Rank 0 gathers the results
  over the process group and ``report.assemble_sweep`` writes every figure, CSV, JSON,
  report.md and summary.json a single process writes; what compares models runs there. A
  single process saves and reuses the same files, so an interrupted ``reproduce`` resumes
  without re-evaluating finished models either way.

Logs go to stderr tagged ``[rank r/P]``; progress bars are drawn by rank 0 only. (One process
logs nothing but the line ``pullgeom: evaluated ... reused ...`` of an evaluation it resumed.) Every rank
runs the same spectrum backend (``PULLGEOM_AUTOTUNE=0`` unless set), so ``scores.csv`` is
byte-identical to a single process run with ``PULLGEOM_AUTOTUNE=0``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

import pullgeom
from pullgeom.paper import evaluation, report
from pullgeom.paper import training as train
from pullgeom.paper.outputs import atomic_save_tensors, is_checkpoint, load_checkpoint

SHARDED_COMMANDS = ("score", "train", "reproduce")
SHARD_ROOT = ".pullgeom-shards"
TIMEOUT_ENV = "PULLGEOM_DIST_TIMEOUT_S"
AUTOTUNE_ENV = "PULLGEOM_AUTOTUNE"
# Ranks wait at a barrier while their peers train the rest of a sweep, which can take hours;
# a dead peer does not leave them hanging, because torchrun stops the whole group when one
# worker fails. So the collective timeout only has to exceed the longest legitimate wait.
DEFAULT_TIMEOUT_S = 24 * 3600

log = logging.getLogger("pullgeom.paper.distributed")


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, position: int) -> bool:
        """Whether item ``position`` of a deterministic work list is this rank's (round robin)."""
        return position % self.world_size == self.rank


@dataclass
class _Session:
    launch: Launch
    backend: str
    shard_files: list[Path] = field(default_factory=list)  # this rank's, removed when all succeed
    shard_roots: list[Path] = field(default_factory=list)


_session: _Session | None = None


def launch_from_env(environ: dict[str, str] | None = None) -> Launch | None:
    """The launch torchrun describes in ``environ`` (default ``os.environ``); None for one process."""
    environ = os.environ if environ is None else environ
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    if "RANK" not in environ:
        raise RuntimeError("WORLD_SIZE is set but RANK is not; start pullgeom with torchrun, which sets both")
    rank = int(environ["RANK"])
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return Launch(rank, world_size, int(environ.get("LOCAL_RANK", rank)),
                  int(environ.get("LOCAL_WORLD_SIZE", world_size)))


def current() -> Launch | None:
    """The active launch inside ``session()`` when there is more than one process, else None."""
    return None if _session is None else _session.launch


def is_main() -> bool:
    """True on rank 0 and in a single-process run: the process that writes results and prints."""
    return _session is None or _session.launch.is_main


def backend_for(launch: Launch) -> str:
    """``nccl`` when every local rank can have its own GPU, else ``gloo`` (the same on every rank)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= launch.local_world_size:
        return "nccl"
    return "gloo"


def rank_device(device: str, launch: Launch | None) -> str:
    """``cuda`` without an index means this rank's GPU (``cuda:LOCAL_RANK``); anything else as given."""
    return f"cuda:{launch.local_rank}" if launch is not None and device == "cuda" else device


@contextlib.contextmanager
def session(environ: dict[str, str] | None = None) -> Iterator[Launch | None]:
    """Join the process group for the duration of one command; a no-op for a single process.

    On success every rank waits for the others, then removes the shard files it wrote; on an
    error the shard files stay, so the rerun redoes only what is missing.
    """
    global _session
    launch = launch_from_env(environ)
    if launch is None:
        yield None
        return
    backend = backend_for(launch)
    # backend="auto" times the backends and keeps the fastest; under load two ranks can pick
    # different ones, whose results agree to ~1e-7, not bitwise. One deterministic choice (the
    # first eligible backend: cpp on CPU, cuda on GPUs) keeps every row of a run from the same
    # code path. An explicit PULLGEOM_AUTOTUNE wins.
    pinned = AUTOTUNE_ENV not in os.environ
    if pinned:
        os.environ[AUTOTUNE_ENV] = "0"
    # Every pullgeom record (this module's INFO and up, the package's warnings) tagged by rank.
    package = logging.getLogger("pullgeom")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {launch.rank}/{launch.world_size}] %(message)s"))
    package.addHandler(handler)
    propagate, package.propagate = package.propagate, False
    log.setLevel(logging.INFO)
    try:
        device_id = None
        if backend == "nccl":
            torch.cuda.set_device(launch.local_rank)  # collectives on objects use the current device
            device_id = torch.device("cuda", launch.local_rank)
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout,
                                device_id=device_id)
        _session = _Session(launch, backend)
        log.info("joined the process group (%s backend, local rank %d)", backend, launch.local_rank)
        yield launch
        if _session.shard_roots:  # every rank that scored has roots, even with no block of its own
            dist.barrier()  # rank 0 has written the gathered results: the shards are no longer needed
            _remove_shards(_session)
    finally:
        _session = None
        if dist.is_initialized():
            dist.destroy_process_group()
        package.removeHandler(handler)
        package.propagate = propagate
        log.setLevel(logging.NOTSET)
        if pinned:
            os.environ.pop(AUTOTUNE_ENV, None)


def _remove_shards(state: _Session) -> None:
    """Each rank removes its own shard files, and the directories its filesystem keeps (nodes
    may have filesystems of their own); then, once every rank is done, rank 0 the whole roots.

    The barrier keeps rank 0's removal from pulling a root out from under another rank that is
    still listing it (FileNotFoundError at the very end of a successful run).
    """
    for path in state.shard_files:
        path.unlink(missing_ok=True)
    if not state.launch.is_main:
        for root in state.shard_roots:
            _remove_empty_directories(root)
    dist.barrier()
    if state.launch.is_main:
        for root in state.shard_roots:
            # Leftovers of runs with other inputs (another fingerprint) are stale for good.
            shutil.rmtree(root, ignore_errors=True)


def _remove_empty_directories(root: Path) -> None:
    """rmdir ``root`` and the directories in it that are empty; others (other ranks' files on
    a shared filesystem, or already removed by another rank) are left alone."""
    with contextlib.suppress(OSError):
        for directory in sorted(root.glob("*"), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()
        root.rmdir()


# ----------------------------------------------------------------------------------------
# Scoring.

def shard_ranges(count: int, size: int) -> list[tuple[int, int]]:
    """[start, end) blocks of ``size`` rows covering ``range(count)``, in order."""
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def scores_fingerprint(model: torch.nn.Module, images: Tensor, **options) -> str:
    """Hash of the weights, the images and the scoring options: names one run's shard files."""
    digest = hashlib.blake2b(digest_size=12)
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    digest.update(str((tuple(images.shape), images.dtype)).encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()


def score_shard_dir(target: str | os.PathLike, model: torch.nn.Module, images: Tensor, *, k: int,
                    decoder_metric: bool, batch_size: int) -> Path:
    """Where ``score_sharded`` keeps the finished row blocks of this model, data and options."""
    key = scores_fingerprint(model, images, k=k, decoder_metric=decoder_metric, batch_size=batch_size,
                             columns=evaluation.SCORE_COLUMNS)
    return Path(target) / SHARD_ROOT / f"scores-{key}"


def score_sharded(model: torch.nn.Module, images: Tensor, target: str | os.PathLike, *, k: int = 5,
                  decoder_metric: bool = False, batch_size: int = 256,
                  progress: bool = True) -> dict[str, Tensor] | None:
    """``evaluation.score_dataset`` over all of ``images`` (n, *S), split across the ranks.

    Every rank must call it with the same arguments. Returns the rows of every rank in
    index order on rank 0 (the dict ``score_dataset`` returns) and None on the others.
    Blocks finished by an earlier, interrupted run with the same inputs are reused.
    """
    launch = current()
    if launch is None:
        raise RuntimeError("score_sharded runs inside distributed.session() under torchrun")
    directory = score_shard_dir(target, model, images, k=k, decoder_metric=decoder_metric,
                                batch_size=batch_size)
    _session.shard_roots.append(directory.parent)
    blocks = shard_ranges(images.shape[0], batch_size)
    mine = [block for position, block in enumerate(blocks) if launch.owns(position)]
    rows: dict[int, dict[str, Tensor]] = {}
    computed, reused = 0, []
    bar = tqdm(mine, desc=f"scoring (rank {launch.rank} of {launch.world_size})", disable=not progress)
    for start, end in bar:
        path = directory / f"rows-{start:09d}-{end:09d}.safetensors"
        if path.is_file():
            rows[start] = load_file(str(path))
            reused.append(f"{start}-{end}")
        else:
            rows[start] = evaluation.score_dataset(model, images, torch.arange(start, end), k=k,
                                               decoder_metric=decoder_metric, batch_size=batch_size,
                                               progress=False)
            atomic_save_tensors(path, rows[start])
            computed += 1
        _session.shard_files.append(path)
    log.info("scored %d of %d blocks of %s: %d computed, %d reused from an earlier run%s", len(mine),
             len(blocks), Path(target), computed, len(reused),
             f" (rows {', '.join(reused)})" if reused else "")
    gathered: list[dict[int, dict[str, Tensor]]] | None = [{} for _ in range(launch.world_size)] \
        if launch.is_main else None
    dist.gather_object(rows, gathered, dst=0)
    if not launch.is_main:
        return None
    merged = {start: block for part in gathered for start, block in part.items()}
    if not merged:  # no rows at all: the empty result has the shapes score_dataset gives
        return evaluation.score_dataset(model, images, k=k, decoder_metric=decoder_metric,
                                    batch_size=batch_size, progress=False)
    ordered = [merged[start] for start, _ in blocks]
    return {name: torch.cat([block[name] for block in ordered]) for name in ordered[0]}


# ----------------------------------------------------------------------------------------
# Sweeps.

def shard_dir(out: str | os.PathLike, launch: Launch) -> Path:
    """The sweep directory in which ``launch``'s rank trains its models."""
    return Path(out) / "state" / f"shard-{launch.rank:05d}-of-{launch.world_size:05d}"


def train_sweep(config: train.SweepConfig, images: Tensor, out: str | os.PathLike, *, device: str = "cpu",
                progress: bool = True) -> list[Path]:
    """``pullgeom.paper.training.train_sweep`` with the models split across the ranks.

    Without a launch, exactly ``train.train_sweep``. Under torchrun every rank must call it
    with the same arguments; every rank returns every model's checkpoint directory, in
    ``config`` order, once all ranks have finished.
    """
    launch = current()
    if launch is None:
        return train.train_sweep(config, images, out, device=device, progress=progress)
    out = Path(out)
    if launch.is_main:
        # Checks that OUT holds no sweep with other settings and writes OUT/sweep.json
        # exactly as a single-process sweep does.
        train._record_sweep(out, config)
    dist.barrier()
    tags = config.tags()
    directories = [out / "models" / tag for tag in tags]
    mine = [i for i in range(len(tags)) if launch.owns(i)]
    pending = [i for i in mine if not is_checkpoint(directories[i])]
    log.info("sweep %s: %d of %d models are this rank's, %d already trained", out, len(mine), len(tags),
             len(mine) - len(pending))
    if pending:
        own = shard_dir(out, launch)
        subset = dataclasses.replace(config, betas=[config.betas[i] for i in pending],
                                     mixup=[config.mixup[i] for i in pending])
        trained = train.train_sweep(subset, images, own, device=rank_device(device, launch),
                                    progress=progress)
        for i, directory in zip(pending, trained, strict=True):
            if directories[i].exists():  # an incomplete checkpoint left by a killed run
                shutil.rmtree(directories[i])
            directories[i].parent.mkdir(parents=True, exist_ok=True)
            os.replace(directory, directories[i])  # a directory rename: the checkpoint appears whole
            log.info("trained %s", tags[i])
        shutil.rmtree(own)
    dist.barrier()
    missing = [d for d in directories if not is_checkpoint(d)]
    if missing:
        raise RuntimeError(f"{len(missing)} checkpoints trained by other ranks are not visible here (e.g. "
                           f"'{missing[0]}'); a sweep across nodes needs --out on a filesystem all nodes "
                           "share")
    return directories


# ----------------------------------------------------------------------------------------
# Evaluating sweeps.

def evaluation_shard_path(out: str | os.PathLike, name: str, model: torch.nn.Module, test_images: Tensor,
                          settings: evaluation.EvalSettings, jobs: tuple[str, ...]) -> Path:
    """Where ``evaluate_sweep`` keeps model ``name``'s finished ``evaluation.evaluate_model`` result.

    The file name hashes the weights, the test images the evaluation reads, the settings, the
    model's jobs, the package version and the score columns, so a result of other inputs (or
    one without a column this version writes) is never reused.
    """
    used = test_images[: evaluation.images_used(settings)]
    key = scores_fingerprint(model, used, settings=dataclasses.asdict(settings), jobs=list(jobs),
                             version=pullgeom.__version__, columns=evaluation.SCORE_COLUMNS)
    return Path(out) / SHARD_ROOT / "evaluation" / f"{name}-{key}.safetensors"


def _save_evaluation(path: Path, result: dict[str, Tensor]) -> None:
    # safetensors does not keep the order of the tensors, and Fig. 2 draws its rows in that order.
    atomic_save_tensors(path, result, {"keys": json.dumps(list(result))})


def _load_evaluation(path: Path) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt") as stored:
        return {key: stored.get_tensor(key) for key in json.loads(stored.metadata()["keys"])}


def _load_sweep(checkpoints: list[Path], launch: Launch) -> tuple[list[dict], dict[int, torch.nn.Module]]:
    """Every model's config (all ranks plan the same work) and this rank's models, by position."""
    configs, mine = [], {}
    for j, path in enumerate(checkpoints):
        model, config = load_checkpoint(path)
        configs.append(config)
        if launch.owns(j):
            mine[j] = model
    return configs, mine


def _evaluate_own(models: dict[int, torch.nn.Module], names: list[str], jobs: list[tuple[str, ...]],
                  test_images: Tensor, out: Path, settings: evaluation.EvalSettings, launch: Launch,
                  progress: bool) -> tuple[dict[int, dict[str, Tensor]], list[Path]]:
    """``evaluation.evaluate_model`` for this rank's models, each saved to (or reused from) its shard file.

    Returns the results by model position and the shard files, which the caller removes once
    the sweep's files are written.
    """
    results: dict[int, dict[str, Tensor]] = {}
    paths, reused = [], []
    where = f" (rank {launch.rank} of {launch.world_size})" if launch.world_size > 1 else ""
    bar = tqdm(sorted(models), desc=f"evaluating models{where}", disable=not progress)
    for j in bar:
        path = evaluation_shard_path(out, names[j], models[j], test_images, settings, jobs[j])
        if path.is_file():
            results[j] = _load_evaluation(path)
            reused.append(names[j])
        else:
            results[j] = evaluation.evaluate_model(models[j], jobs[j], test_images, settings)
            _save_evaluation(path, results[j])
        paths.append(path)
        bar.set_postfix(reused=len(reused))
    message = (f"evaluated {len(models)} of {len(names)} models of {out}: {len(models) - len(reused)} "
               f"computed, {len(reused)} reused from an earlier run"
               + (f" ({', '.join(reused)})" if reused else ""))
    if launch.world_size > 1:
        log.info(message)  # tagged with the rank by session()'s handler
    elif reused:  # one process configures no logging: say on stderr that a resume skipped work
        tqdm.write(f"pullgeom: {message}", file=sys.stderr)
    return results, paths


def evaluate_sweep(checkpoints: list[Path], test_images: Tensor, out: str | os.PathLike,
                   settings: evaluation.EvalSettings, title: str, *, progress: bool = True,
                   notes: str = "", authors_csv: Path | None = None) -> dict | None:
    """``report.evaluate_sweep``, resumable, with the models split across the ranks under torchrun.

    Every model's ``evaluation.evaluate_model`` result is saved to ``evaluation_shard_path`` as soon
    as it is computed, and a run that finds it there (left by an earlier, interrupted run with
    the same inputs) reuses it; the shard files are removed once every file is written.
    In one process, every model is evaluated here and the summary returned. Under torchrun every
    rank must call it with the same arguments: model j (``checkpoints`` order) is evaluated by
    rank j mod P; rank 0 gathers every result over the process group, writes the files a single
    process writes and returns the summary; the other ranks return None.
    """
    launch = current() or Launch(rank=0, world_size=1, local_rank=0, local_world_size=1)
    out = Path(out)
    names = [path.name for path in checkpoints]
    configs, mine = _load_sweep(checkpoints, launch)
    jobs = evaluation.plan_evaluation(configs, settings)  # the same plan, or the same error, on every rank
    results, paths = _evaluate_own(mine, names, jobs, test_images, out, settings, launch, progress)
    if _session is not None:
        _session.shard_roots.append(out / SHARD_ROOT)  # removed by session() once every rank is done
        _session.shard_files.extend(paths)
        gathered: list[dict[int, dict[str, Tensor]]] | None = [{} for _ in range(launch.world_size)] \
            if launch.is_main else None
        dist.gather_object(results, gathered, dst=0)
        if not launch.is_main:
            return None
        results = {j: result for part in gathered for j, result in part.items()}
    summary = report.assemble_sweep(names, configs, [results[j] for j in range(len(names))],
                                    test_images.shape[0], out, settings, title, notes, authors_csv,
                                    evaluation.mean_image_mse(test_images[: settings.score_limit]))
    if _session is None:
        # What session() does at the end of a torchrun run: leftovers of other inputs are stale too.
        shutil.rmtree(out / SHARD_ROOT, ignore_errors=True)
    return summary
