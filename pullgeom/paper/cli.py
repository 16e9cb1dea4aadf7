"""The ``pullgeom`` command line: demo, train, score, attack, reproduce, compare-authors.

Every option is checked before any work starts; a bad one ends the run with a one-line
``pullgeom: error: ...`` that says what to do and exit status 2 (``--debug`` shows tracebacks
of failures during the run instead of the one-line message).
"""

from __future__ import annotations

import argparse
import tempfile
import sys
import time
from dataclasses import replace
from pathlib import Path


# The pipeline (torch, numpy, safetensors, matplotlib through pullgeom.paper.*) is imported by
# _import_pipeline() when a command runs, so that `pullgeom --help` answers without it. The
# parser's help reads the few facts below instead; tests/test_cli.py checks them against the
# pipeline's own tables.
PARSER_FACTS = {
    "datasets": ("mnist", "fashion-mnist", "mnist-small", "celeba"),
    "likelihoods": ("bernoulli", "gaussian", "sse"),
    "likelihood_defaults": "bernoulli for the paper's MLP; gaussian for the celeba conv VAE",
    "conv_datasets": "celeba",
    "conv_widths": "32 64 128 256 512",
    "conv_latent_dim": 128,
    "lr_schedules": ("constant", "cosine"),
    "cosine_t_max": 200,
    "authors_scores": "authors_mnist_scores.csv",
    "paper_dir_env": "PULLGEOM_PAPER_DIR",
}


def pipeline_facts() -> dict:
    """``PARSER_FACTS`` as the pipeline's tables state them today (imports the pipeline)."""
    from pullgeom.paper.datasets import DATASETS
    from pullgeom.paper.models import ARCHITECTURES, LIKELIHOODS
    from pullgeom.paper.report import AUTHORS_SCORES, PAPER_DIR_ENV
    from pullgeom.paper.training import AUTHORS_COSINE_T_MAX, LR_SCHEDULES

    sized = [spec for spec in DATASETS.values() if spec.model_options]  # the datasets of the conv VAE
    conv = sized[0].architecture
    return {
        "datasets": tuple(DATASETS),
        "likelihoods": tuple(LIKELIHOODS),
        "likelihood_defaults": "; ".join(f"{a.likelihood} for the {a.description}" for a in ARCHITECTURES.values()),
        "conv_datasets": " and ".join(spec.name for spec in sized),
        "conv_widths": " ".join(map(str, conv.sizes)),
        "conv_latent_dim": conv.latent_dim,
        "lr_schedules": tuple(LR_SCHEDULES),
        "cosine_t_max": AUTHORS_COSINE_T_MAX,
        "authors_scores": AUTHORS_SCORES,
        "paper_dir_env": PAPER_DIR_ENV,
    }


def _import_pipeline() -> None:
    """Import the pipeline into this module's namespace (once; cheap after the first call)."""
    global torch, tqdm, attacks, distributed, DATASETS, DataError, check_dataset_args, dataset_spec
    global load_dataset, EvalSettings, attack_curves, fig2_examples, images_used, pgd_comparison
    global score_dataset, plot_fig2, plot_mse_vs_step, pyplot_or_none, write_histograms
    global ARCHITECTURES, LIKELIHOODS, CheckpointError, atomic_write_json, atomic_write_text
    global find_checkpoints, load_checkpoint, Profile, AUTHORS_SCORES, PAPER_DIR_ENV
    global add_authors_comparison, attack_curves_csv, claim_verdicts, default_paper_dir, evaluate_sweep
    global read_authors_scores, scores_csv, AUTHORS_COSINE_T_MAX, LR_SCHEDULES, SweepConfig
    global log_spaced, train_sweep
    import torch
    from tqdm.auto import tqdm

    from pullgeom.paper import attacks
    from pullgeom.paper import distributed
    from pullgeom.paper.datasets import DATASETS, DataError, check_dataset_args, dataset_spec, load_dataset
    from pullgeom.paper.evaluation import (
        EvalSettings,
        attack_curves,
        fig2_examples,
        images_used,
        pgd_comparison,
        score_dataset,
    )
    from pullgeom.paper.figures import plot_fig2, plot_mse_vs_step, pyplot_or_none, write_histograms
    from pullgeom.paper.models import ARCHITECTURES, LIKELIHOODS
    from pullgeom.paper.outputs import (
        CheckpointError,
        atomic_write_json,
        atomic_write_text,
        find_checkpoints,
        load_checkpoint,
    )
    from pullgeom.paper.profiles import Profile
    from pullgeom.paper.report import (
        AUTHORS_SCORES,
        PAPER_DIR_ENV,
        add_authors_comparison,
        attack_curves_csv,
        claim_verdicts,
        default_paper_dir,
        evaluate_sweep,
        read_authors_scores,
        scores_csv,
    )
    from pullgeom.paper.training import AUTHORS_COSINE_T_MAX, LR_SCHEDULES, SweepConfig, log_spaced, train_sweep


_figures_note_printed = False


def _note_figures_skipped() -> None:
    """Say once per run that figures were skipped for lack of matplotlib (an optional extra)."""
    global _figures_note_printed
    if not _figures_note_printed:
        _figures_note_printed = True
        print("pullgeom: matplotlib is not installed, so no figures were drawn (every number is written); "
              "pip install 'pullgeom[plots]' for them", file=sys.stderr)


class UsageError(Exception):
    """A bad option: printed as one line, exit status 2."""


# torch.save / pickle file names: refused by name, with the reason, instead of "no checkpoint".
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already states it or there is
    none to state (a flag, or no default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {default})"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block) that points to --help, and every
    option's default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"pullgeom: error: {message}; see `{self.prog} --help`\n")


class _Spelled(argparse._StoreAction):
    """Stores the value and remembers the spelling used, so that a message about an option names
    it as the user typed it (an old alias included)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        spelled = dict(getattr(namespace, "spelled", None) or {})
        spelled[self.dest] = option_string
        namespace.spelled = spelled


def _spelling(args, dest: str, default: str) -> str:
    """The option name (without --) the user gave for ``dest``, else ``default``."""
    return (getattr(args, "spelled", None) or {}).get(dest, "--" + default)[2:]


def _images_option(parser, dest: str, help: str, default=None, old: tuple[str, ...] = ("--limit",),
                   new: str = "--images") -> None:
    """The number of images a command uses: one spelling, ``--images`` (``--score-images`` for
    demo's scored images), with the old spellings accepted but hidden for one release."""
    parser.add_argument(new, dest=dest, type=int, default=default, action=_Spelled, metavar="N", help=help)
    for spelling in old:
        parser.add_argument(spelling, dest=dest, type=int, default=argparse.SUPPRESS, action=_Spelled,
                            help=argparse.SUPPRESS)


DEMO_BETAS = 6
# The command-line options that size a dataset's VAE (a DatasetSpec's model_options), as SweepConfig fields.
MODEL_OPTIONS = ("channels", "latent_dim")


# ----------------------------------------------------------------------------------------
# Validation helpers.


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"--{name} {value}: pass an integer >= {minimum}")


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out '{out}' is a file; pass a directory (it is created if missing)")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise UsageError(f"--out '{out}': '{parent}' is a file, so no directory can be made under it; "
                         "pass a directory path")
    # Try it for real: os.access says yes to root even on read-only mounts.
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        raise UsageError(f"--out '{out}' is not writable ({error.strerror}); "
                         "pass a directory you can write to") from None
    return out


def _data_dir(args) -> Path | None:
    """Check dataset, split and that the files of every split this command reads are there (or
    will be downloaded), listing files at most."""
    reads = {"train": ("train",), "reproduce": ("train", "test")}.get(args.command) or (args.split,)
    try:
        spec = dataset_spec(args.dataset)
        resolved = check_dataset_args(args.dataset, getattr(args, "split", "train"), args.data_dir)
        for split in reads:
            spec.check_files(split, resolved, getattr(args, "download", False))
    except DataError as error:
        raise UsageError(str(error)) from None
    return resolved


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _model_fields(args) -> dict:
    """The SweepConfig fields of --dataset (its VAE and image shape) and of the model options
    (``MODEL_OPTIONS``) given, which only a dataset whose ``model_options`` list them takes."""
    spec = dataset_spec(args.dataset)
    given = {field: getattr(args, field) for field in MODEL_OPTIONS if getattr(args, field) is not None}
    foreign = [field for field in given if field not in spec.model_options]
    if foreign:
        owner = next(other.architecture for other in DATASETS.values() if foreign[0] in other.model_options)
        raise UsageError(f"{' and '.join(map(_option, foreign))} set the {owner.description}; drop them for "
                         f"--dataset {args.dataset} (the {spec.architecture.description})")
    return {"arch": spec.architecture.name, "input_shape": list(spec.image_shape), **given}


def _enough_images(images, batch_size: int, option: str) -> None:
    """Training drops the last incomplete batch, so it needs at least one full batch."""
    if images.shape[0] < batch_size:
        raise UsageError(f"{images.shape[0]} training images but {option} {batch_size}: pass a "
                         f"{option} of at most {images.shape[0]} (or more images)")


def _check_input_shape(model, images, dataset: str) -> None:
    if tuple(model.config["input_shape"]) != tuple(images.shape[1:]):
        raise UsageError(
            f"the checkpoint ({model.config['arch']}) expects inputs {model.config['input_shape']} but "
            f"{dataset} images are {list(images.shape[1:])}; pass the dataset it was trained on"
        )


def _checkpoints(path: str) -> list[Path]:
    found = find_checkpoints(path)
    if not found and any(p.suffix in PICKLE_SUFFIXES for p in [Path(path), *_children(Path(path))]):
        raise UsageError(
            f"--checkpoint '{path}' is (or holds) a pickle file; pullgeom loads only safetensors "
            "checkpoints because unpickling can run arbitrary code: pass a directory written by "
            "`pullgeom train`, or convert trusted weights with safetensors.torch.save_file"
        )
    if not found:
        raise UsageError(
            f"--checkpoint '{path}' holds no checkpoint (model.safetensors + config.json); pass a "
            "model directory or a sweep directory written by `pullgeom train`"
        )
    return found


def _children(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.is_dir() else []


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------
# Commands.


def cmd_demo(args) -> int:
    out = _out_dir(args.out)
    _positive_int("epochs", args.epochs)
    _positive_int(_spelling(args, "limit", "images"), args.limit, 2 * 128)
    start = time.perf_counter()
    images, _ = load_dataset("mnist-small", "train", limit=args.limit)
    test, _ = load_dataset("mnist-small", "test")
    config = SweepConfig(
        betas=log_spaced(0.01, 10, DEMO_BETAS),
        mixup=[0.0],
        epochs=args.epochs,
        batch_size=128,
        dataset="mnist-small",
        seed=args.seed,
    )
    checkpoints = train_sweep(config, images, out / "sweep", progress=not args.quiet)
    small = min(args.score_limit, 32)
    settings = EvalSettings(
        score_limit=args.score_limit,
        attack_limit=small,
        attack_steps=20,
        pgd_limit=small // 2,
        pgd_steps=20,
        decoder_limit=small // 2,
        decoder_models=3,
    )
    summary = evaluate_sweep(
        checkpoints,
        test,
        out,
        settings,
        "pullgeom demo: beta sweep on mnist-small",
        progress=not args.quiet,
        notes=f"{DEMO_BETAS} paper-architecture VAEs trained together (vectorised) for "
        f"{args.epochs} epochs on {images.shape[0]} images of the embedded mnist-small "
        f"(MNIST test-set images), scored on {min(args.score_limit, len(test))} "
        "held-out ones.",
    )
    seconds = time.perf_counter() - start
    print(f"demo finished in {seconds:.0f} s: {out / 'report.md'}")
    print(
        f"Spearman(beta, spectral radius) = {summary['spearman_beta_spectral_radius']:.3f}, "
        f"Spearman(beta, entropy) = {summary['spearman_beta_entropy']:.3f}"
    )
    print(claim_verdicts(summary))
    return 0


def _train_config(args, betas, mixup, epochs, limit, batch_size, likelihood, lr_schedule) -> SweepConfig:
    if args.cosine_t_max is not None and lr_schedule != "cosine":
        raise UsageError(f"--cosine-t-max {args.cosine_t_max} sets the period of the cosine schedule, but "
                         f"the learning rate is {lr_schedule}: pass --lr-schedule cosine with it, or drop it")
    try:
        return SweepConfig(
            betas=betas,
            mixup=mixup,
            epochs=epochs,
            batch_size=batch_size,
            lr=args.lr,
            seed=args.seed,
            likelihood=likelihood,
            dataset=args.dataset,
            limit=limit,
            lr_schedule=lr_schedule,
            cosine_t_max=args.cosine_t_max,
            **_model_fields(args),
        )
    except ValueError as error:
        raise UsageError(str(error)) from None


def cmd_train(args) -> int:
    _positive_int("epochs", args.epochs)
    _positive_int(_spelling(args, "limit", "images"), args.limit)
    _positive_int("batch-size", args.batch_size, 2)
    config = _train_config(args, args.beta, args.mixup, args.epochs, args.limit, args.batch_size,
                           args.likelihood, args.lr_schedule)
    data_dir = _data_dir(args)
    out = _out_dir(args.out)
    images, _ = load_dataset(args.dataset, "train", data_dir, args.limit, args.download)
    _enough_images(images, config.batch_size, "--batch-size")
    directories = distributed.train_sweep(config, images, out, device=args.device, progress=not args.quiet)
    if distributed.is_main():  # one listing per run, not one per rank
        for d in directories:
            print(d)
        # On stderr: stdout stays the model folders alone, which scripts (and tests/test_distributed.py) read.
        print(train_summary(directories), file=sys.stderr)
    return 0


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A plain text table, columns right-aligned but the first."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def train_summary(directories) -> str:
    """The trained models as a table: beta, mixup weight, the final epoch's training loss and its
    reconstruction term (-log p(x | z), summed over pixels, batch mean) and the training time of
    the model's group (a sweep trains its models together)."""
    import json

    rows = []
    for d in directories:
        config = json.loads((Path(d) / "config.json").read_text())
        final = config.get("final_train") or {}
        rows.append([Path(d).name, f"{config.get('beta', float('nan')):g}", f"{config.get('mixup', 0.0):g}",
                     f"{final.get('loss', float('nan')):.4g}", f"{final.get('recon', float('nan')):.4g}",
                     f"{config.get('train_seconds_group', float('nan')):.1f}"])
    header = ["model", "beta", "mixup", "final loss", "recon error", "time s"]
    return ("trained (final epoch, training set; recon error = -log p(x | z) per image; time = the sweep "
            "group's):\n" + _table(header, rows))


def score_summary(scores: dict, path) -> str:
    """Mean and median of the spectral radius and the entropy, and the file written."""
    rows = []
    for name in ("spectral_radius", "entropy"):
        values = scores[name].double()
        rows.append([name.replace("_", " "), f"{values.mean().item():.4g}", f"{values.median().item():.4g}"])
    count = len(scores["spectral_radius"])
    return f"scored {count} images:\n" + _table(["score", "mean", "median"], rows) + f"\nwritten: {path}"


def attack_summary(curves: dict, grid, path, clean_mse: float) -> str:
    """Latent shift and increase of the reconstruction MSE (against the clean image, over the
    clean reconstruction's ``clean_mse``) of the top eigendirection attack and of a random
    direction of the same norm (and of the boxed attack when the curves have it), at the smallest,
    middle and largest l2 budget."""
    picks = sorted({0, len(grid) // 2, len(grid) - 1})
    boxed = "box_latent" in curves
    rows = [[f"{float(grid[i]):.3g}", f"{float(curves['unit_latent'][0, i]):.4g}",
             f"{float(curves['random_latent'][i]):.4g}", f"{float(curves['unit_mse'][0, i]) - clean_mse:.4g}",
             f"{float(curves['random_mse'][i]) - clean_mse:.4g}"]
            + ([f"{float(curves['box_latent'][i]):.4g}", f"{float(curves['box_mse'][i]) - clean_mse:.4g}"]
               if boxed else []) for i in picks]
    header = ["l2 budget", "latent shift eigen", "random", "MSE increase eigen", "random"] + (
        ["latent shift boxed", "MSE increase boxed"] if boxed else [])
    return ("attack, top eigendirection against a random direction of the same norm (means over the "
            "images):\n" + _table(header, rows) + f"\nwritten: {path}")


def cmd_score(args) -> int:
    _positive_int(_spelling(args, "limit", "images"), args.limit)
    _positive_int("k", args.k)
    checkpoints = _checkpoints(args.checkpoint)
    data_dir = _data_dir(args)
    out = _out_dir(args.out)
    images, _ = load_dataset(args.dataset, args.split, data_dir, args.limit, args.download)
    for path in checkpoints:
        model, _ = load_checkpoint(path)
        _check_input_shape(model, images, args.dataset)
        target = out if len(checkpoints) == 1 else out / path.name
        if distributed.current() is None:
            scores = score_dataset(
                model,
                images,
                k=args.k,
                decoder_metric=args.decoder_metric,
                batch_size=args.batch_size,
                progress=not args.quiet,
            )
        else:  # rows split across torchrun's ranks; rank 0 gets them all back, in order
            scores = distributed.score_sharded(
                model,
                images,
                target,
                k=args.k,
                decoder_metric=args.decoder_metric,
                batch_size=args.batch_size,
                progress=not args.quiet,
            )
            if scores is None:  # a rank other than 0: rank 0 writes the files
                continue
        atomic_write_text(target / "scores.csv", scores_csv(scores))
        if not write_histograms(scores, target / "histograms.png"):
            _note_figures_skipped()
        print(target / "scores.csv")
        # On stderr: stdout stays the path alone, which scripts (and tests/test_distributed.py) read.
        print(score_summary(scores, target / "scores.csv"), file=sys.stderr)
    return 0


def cmd_attack(args) -> int:
    _positive_int(_spelling(args, "limit", "images"), args.limit)
    _positive_int("k", args.k)
    _positive_int("steps", args.steps, 2)
    checkpoints = _checkpoints(args.checkpoint)
    data_dir = _data_dir(args)
    out = _out_dir(args.out)
    images, _ = load_dataset(args.dataset, args.split, data_dir, args.limit, args.download)
    plt = pyplot_or_none()
    if plt is None:
        _note_figures_skipped()
    # The evaluation's own jobs (what reproduce runs per model), on one grid: --delta-min to
    # --delta-max serves both scalings and the random direction.
    grid = attacks.log_grid(args.delta_min, args.delta_max, args.steps)
    pgd_steps = EvalSettings().pgd_steps
    box = None
    if args.box is not None:
        box = tuple(args.box)
        if not box[0] < box[1]:
            raise UsageError(f"--box {box[0]:g} {box[1]:g}: pass the lowest then the highest pixel value, "
                             "e.g. --box 0 1 for images in [0, 1]")
    # One tick per job of each model (the attack curves, the PGD check, the figures); the postfix
    # names the job under way.
    bar = tqdm(total=len(checkpoints) * 3, desc="attacking", disable=args.quiet)
    for path in checkpoints:
        model, config = load_checkpoint(path)
        _check_input_shape(model, images, args.dataset)
        target = out if len(checkpoints) == 1 else out / path.name
        bar.set_postfix_str(f"{path.name}: eigen and random attacks")
        try:
            curves = attack_curves(model, images, args.k, grid, grid, box=box)
        except ValueError as error:
            if box is None:
                raise
            # pullgeom.perturb refuses images outside the box: say which option to change.
            raise UsageError(f"--box {box[0]:g} {box[1]:g}: {error}") from None
        bar.update()
        atomic_write_text(target / "curves.csv", attack_curves_csv(curves, grid, grid))
        bar.set_postfix_str(f"{path.name}: PGD check")
        theorem = pgd_comparison(model, images[: args.pgd_limit], pgd_steps)
        bar.update()
        atomic_write_json(target / "theorem_pgd.json", {name: v.tolist() for name, v in theorem.items()})
        bar.set_postfix_str(f"{path.name}: figures")
        if plt is not None:
            beta = config.get("beta", float("nan"))
            drawn = {"beta": beta, "unit_deltas": grid.tolist(), "unit_mse": curves["unit_mse"].tolist(),
                     "random_mse": curves["random_mse"].tolist(),
                     **({"box_mse": curves["box_mse"].tolist()} if box is not None else {})}
            plot_mse_vs_step(plt, {"unit": drawn}, target / "curves.png")
            plot_fig2(plt, fig2_examples(model, images), beta, target / "examples.png")
        bar.update()
        bar.write(str(target / "curves.csv"), file=sys.stdout)
        clean_mse = float(attacks.attack_metrics(model, images, images)[0].double().mean())
        bar.write(attack_summary(curves, grid, target / "curves.csv", clean_mse), file=sys.stdout)
    bar.close()
    return 0


def reproduce_profile(args) -> Profile:
    """The chosen profile of the dataset (its ``DatasetSpec.profiles``) with ``--epochs`` /
    ``--train-images`` (0: the whole training set) / ``--batch-size`` / ``--likelihood`` /
    ``--lr-schedule`` applied."""
    _import_pipeline()
    _positive_int("epochs", args.epochs)
    _positive_int(_spelling(args, "train_images", "images"), args.train_images, minimum=0)
    _positive_int("batch-size", args.batch_size, 2)
    spec = dataset_spec(args.dataset)
    if args.profile not in spec.profiles:
        raise UsageError(f"--profile {args.profile}: --dataset {args.dataset} has the profiles "
                         f"{', '.join(sorted(spec.profiles))}")
    profile = spec.profiles[args.profile]
    if args.epochs is not None:
        profile = replace(profile, epochs=args.epochs)
    if args.train_images is not None:
        profile = replace(profile, limit=args.train_images or None)
    if args.batch_size is not None:
        profile = replace(profile, batch_size=args.batch_size)
    if args.likelihood is not None:
        profile = replace(profile, likelihood=args.likelihood)
    if args.lr_schedule is not None:
        profile = replace(profile, lr_schedule=args.lr_schedule)
    return profile


def _overrides(args) -> str:
    options = ("epochs", "train_images", "batch_size", "likelihood", "lr_schedule", "cosine_t_max")
    given = [f"{'--images' if name == 'train_images' else _option(name)} {getattr(args, name)}"
             for name in options if getattr(args, name) is not None]
    return f" ({', '.join(given)})" if given else ""


def _authors_csv(paper_dir: str | None) -> Path:
    """The authors' scores file in ``paper_dir`` (default: ``report.default_paper_dir``), checked."""
    path = Path(paper_dir or default_paper_dir()) / AUTHORS_SCORES
    if not path.is_file():
        raise UsageError(f"--paper-dir: no {AUTHORS_SCORES} in '{path.parent}'; pass the folder that holds "
                         f"the authors' published scores (default: ${PAPER_DIR_ENV}, else ../shared/paper)")
    try:
        read_authors_scores(path)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return path


def _reproduce_authors_csv(args) -> Path | None:
    """The authors' scores ``reproduce`` compares with: for a dataset of their images only, and
    without --paper-dir only when the default folder holds them."""
    spec = dataset_spec(args.dataset)
    if not spec.authors_reference:
        if args.paper_dir is not None:
            raise UsageError(f"--paper-dir: the authors' published scores are MNIST's, not {args.dataset}'s; "
                             "drop --paper-dir")
        return None
    if args.paper_dir is None and not (default_paper_dir() / AUTHORS_SCORES).is_file():
        return None
    return _authors_csv(args.paper_dir)


def cmd_reproduce(args) -> int:
    profile = reproduce_profile(args)
    plain = _train_config(args, profile.betas, [0.0], profile.epochs, profile.limit, profile.batch_size,
                          profile.likelihood, profile.lr_schedule)
    if 2 * plain.latent_dim < profile.evaluation.k:  # G's rank is at most 2 dz
        raise UsageError(f"--latent-dim {plain.latent_dim}: the evaluation takes the top "
                         f"{profile.evaluation.k} "
                         f"eigenpairs of G, whose rank is at most 2 x latent dim; pass --latent-dim "
                         f">= {-(-profile.evaluation.k // 2)}")
    authors_csv = _reproduce_authors_csv(args)
    data_dir = _data_dir(args)
    out = _out_dir(args.out)
    if authors_csv is None and dataset_spec(args.dataset).authors_reference:
        print(f"pullgeom: no {AUTHORS_SCORES} in '{default_paper_dir()}', so the report does not lay its "
              "numbers beside the authors' (pass --paper-dir, or run `pullgeom compare-authors` later)",
              file=sys.stderr)
    start = time.perf_counter()
    images, _ = load_dataset(args.dataset, "train", data_dir, profile.limit, args.download)
    _enough_images(images, profile.batch_size, "--batch-size")
    # Only the first images_used test images are ever read: the rest need not be decoded.
    test, _ = load_dataset(args.dataset, "test", data_dir, images_used(profile.evaluation), args.download)
    mixed = _train_config(
        args,
        [b for b, _ in profile.mixup_models],
        [w for _, w in profile.mixup_models],
        profile.epochs,
        profile.limit,
        profile.batch_size,
        profile.likelihood,
        profile.lr_schedule,
    )
    train_start = time.perf_counter()
    checkpoints = distributed.train_sweep(
        plain, images, out / "sweep", device=args.device, progress=not args.quiet
    )
    checkpoints += distributed.train_sweep(
        mixed, images, out / "sweep", device=args.device, progress=not args.quiet
    )
    train_seconds = time.perf_counter() - train_start
    notes = (
        f"Profile `{args.profile}`{_overrides(args)} on {args.dataset}, the {plain.arch} VAE "
        f"({', '.join(f'{k} {v}' for k, v in plain.model_config().items() if k != 'arch')}): "
        f"{len(profile.betas)} betas log-spaced in [0.01, 10] "
        f"and {len(profile.mixup_models)} mixup models (beta, weight) = {profile.mixup_models}, "
        f"{profile.epochs} epochs on {images.shape[0]} training images (batch {profile.batch_size}, "
        f"Adam lr {args.lr}, {_schedule(plain)}); training took {train_seconds:.0f} s on "
        f"{torch.get_num_threads()} threads."
    )
    summary = distributed.evaluate_sweep(
        checkpoints,
        test,
        out,
        profile.evaluation,
        f"pullgeom reproduce --profile {args.profile} --dataset {args.dataset}",
        progress=not args.quiet,
        notes=notes,
        authors_csv=authors_csv,
    )
    if summary is None:  # a rank other than 0: it evaluated its models, rank 0 writes every file
        return 0
    summary["seconds_total"] = time.perf_counter() - start
    summary["seconds_training"] = train_seconds
    atomic_write_json(out / "summary.json", summary)
    print(f"reproduce finished in {summary['seconds_total']:.0f} s: {out / 'report.md'}")
    print(claim_verdicts(summary))
    return 0


def _schedule(config: SweepConfig) -> str:
    if config.lr_schedule == "cosine":
        return f"cosine learning-rate schedule, T_max {config.cosine_t_max} epochs"
    return "constant learning rate"


def cmd_compare_authors(args) -> int:
    run = Path(args.run_dir)
    if not (run / "summary.json").is_file():
        raise UsageError(f"'{run}' holds no summary.json; pass a directory written by `pullgeom reproduce`")
    _out_dir(args.run_dir)  # the comparison's files are written into it
    authors_csv = _authors_csv(args.paper_dir)
    try:
        entry = add_authors_comparison(run, authors_csv)
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(run / "authors_comparison.csv")
    print("; ".join(f"Spearman(beta, {score}): ours {rho['ours']:.3f}, authors {rho['authors']:.3f}"
                    for score, rho in entry["spearman_beta"].items()))
    return 0


# ----------------------------------------------------------------------------------------
# Parsing.


def _add_data(parser, split: bool = True) -> None:
    parser.add_argument("--dataset", default="mnist", help=f"one of {', '.join(PARSER_FACTS['datasets'])} (default mnist)")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the IDX files, or for celeba the face images (.jpg/.png, any size: center-"
        "cropped and resized to 64 x 64; 1 in 10 is a test image) (default: $PULLGEOM_DATA_DIR)",
    )
    parser.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    if split:
        parser.add_argument("--split", default="test", choices=["train", "test"], help="which split's images to use")


def _add_model(parser, profile_sets: bool = False) -> None:
    """--likelihood and the options that size the conv VAE, their defaults read from the tables
    (``profile_sets``: reproduce, whose profile may set the likelihood)."""
    likelihoods = PARSER_FACTS["likelihood_defaults"]
    profile_default = "the profile's (sse for mnist's paper profile), else " if profile_sets else ""
    parser.add_argument("--likelihood", default=None, choices=PARSER_FACTS["likelihoods"],
                        help="decoder likelihood, -log p(x | z) summed over pixels: bernoulli = binary "
                        "cross-entropy, gaussian = 0.5 ||x - g(z)||^2, sse = ||x - g(z)||^2 (summed squared "
                        f"error) (default: {profile_default}{likelihoods})")
    takers = PARSER_FACTS["conv_datasets"]
    widths = PARSER_FACTS["conv_widths"]
    parser.add_argument("--channels", type=int, nargs="+", default=None,
                        help=f"{takers} only: conv widths (default: the paper's {widths})")
    parser.add_argument("--latent-dim", type=int, default=None,
                        help=f"{takers} only: latent size (default {PARSER_FACTS['conv_latent_dim']})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pullgeom",
        description="Local geometry and adversarial robustness "
        "of VAE encoders (Khan & Storkey, AISTATS 2023).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="`pullgeom COMMAND --help` lists its options")

    demo = sub.add_parser("demo", help="train and score a beta sweep on the embedded mnist-small (offline)")
    demo.add_argument("--out", default="pullgeom-demo", help="output folder: report.md, summary.json, figures")
    demo.add_argument("--epochs", type=int, default=3, help="training epochs")
    _images_option(demo, "score_limit", "held-out images scored per model", default=300,
                   old=("--score-limit",), new="--score-images")
    _images_option(demo, "limit", "training images (default: all 8000)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (weights, batches)")

    train = sub.add_parser("train", help="train the paper's VAE, or a vectorised sweep for several --beta")
    _add_data(train, split=False)
    train.add_argument("--beta", type=float, nargs="+", required=True, help="one or more betas")
    train.add_argument(
        "--mixup", type=float, nargs="+", default=[0.0], help="mixup weight, one or one per beta"
    )
    train.add_argument("--epochs", type=int, default=10, help="training epochs")
    _images_option(train, "limit", "use the first N training images (default: all)")
    train.add_argument("--batch-size", type=int, default=128, help="training batch size")
    train.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 0.003)")
    _add_schedule(train, default="constant")
    train.add_argument("--seed", type=int, default=0, help="random seed (weights, batches)")
    _add_model(train)
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    train.add_argument("--out", required=True, help="output folder: one model folder per beta under models/")

    score = sub.add_parser("score", help="spectral radius, entropy and top eigenvalues per image")
    score.add_argument("--checkpoint", required=True,
                       help="a model folder written by `pullgeom train`, or a sweep folder (every model in it)")
    _add_data(score)
    _images_option(score, "limit", "score the first N images of the split (default: all)")
    score.add_argument("--k", type=int, default=5, help="top eigenvalues written per image")
    score.add_argument("--decoder-metric", action="store_true", help="use G = J^T G_z J (Eq. 11)")
    score.add_argument("--batch-size", type=int, default=256, help="images per spectrum call")
    score.add_argument("--out", required=True, help="output folder: scores.csv and histograms.png")

    att = sub.add_parser("attack", help="eigendirection attacks with random and PGD baselines")
    att.add_argument("--checkpoint", required=True,
                     help="a model folder written by `pullgeom train`, or a sweep folder (every model in it)")
    _add_data(att)
    _images_option(att, "limit", "attack the first N images of the split", default=64)
    att.add_argument("--k", type=int, default=5, help="eigendirections attacked per image")
    att.add_argument("--steps", type=int, default=40, help="delta grid size")
    att.add_argument("--delta-min", type=float, default=1e-3, help="smallest attack budget (l2 norm)")
    att.add_argument("--delta-max", type=float, default=1.0, help="largest attack budget (l2 norm)")
    att.add_argument("--pgd-limit", type=int, default=16, help="images checked against PGD (Theorem 3.2)")
    att.add_argument("--box", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                     help="also attack with pullgeom.perturb keeping every pixel in [LO, HI] (e.g. 0 1: "
                     "every dataset loads in [0, 1]); about doubles the attack's time (default: off)")
    att.add_argument("--out", required=True, help="output folder: curves.csv, theorem_pgd.json, figures")

    rep = sub.add_parser("reproduce", help="every figure of the paper: train, score, attack, report")
    # No argparse choices: the dataset's profiles are checked by reproduce_profile, which names them.
    rep.add_argument("--profile", default="quick",
                     help="quick: 8 betas, minutes on a CPU; paper: the authors' 50 betas and 100 epochs")
    rep.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
    _images_option(rep, "train_images", "override the profile's number of training images (0: all of them)",
                   old=("--train-images", "--limit"))
    _add_data(rep, split=False)
    rep.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 0.003)")
    _add_schedule(rep, default=None)
    rep.add_argument("--seed", type=int, default=0, help="random seed (weights, batches)")
    rep.add_argument("--batch-size", type=int, default=None, help="override the profile's batch size")
    _add_model(rep, profile_sets=True)
    rep.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    _add_paper_dir(rep, ", laid beside this run's for mnist and mnist-small; skipped with a note when the "
                   "default folder lacks it")
    rep.add_argument("--out", required=True, help="output folder: report.md, summary.json, every figure")

    cmp = sub.add_parser("compare-authors",
                         help="lay a reproduce run's scores beside the authors' published MNIST numbers")
    cmp.add_argument("run_dir", help="a directory written by `pullgeom reproduce`: its summary.json is read; "
                     "authors_comparison.csv/.json/.png, a report.md section and a summary.json entry are "
                     "written")
    _add_paper_dir(cmp, "")
    return parser


def _add_schedule(parser, default: str | None) -> None:
    """--lr-schedule and --cosine-t-max (``default`` None: the profile's schedule)."""
    parser.add_argument("--lr-schedule", default=default, choices=PARSER_FACTS["lr_schedules"],
                        help="constant, or cosine: CosineAnnealingLR from --lr to 0 over --cosine-t-max "
                        "epochs, stepped once per epoch (the authors') (default: "
                        f"{default or 'the profile: cosine for paper, constant for quick'})")
    parser.add_argument("--cosine-t-max", type=int, default=None,
                        help=f"period of the cosine schedule in epochs (default {PARSER_FACTS['cosine_t_max']}, the "
                        "authors', who train 100 epochs: half way down)")


def _add_paper_dir(parser, purpose: str) -> None:
    parser.add_argument("--paper-dir", default=None,
                        help=f"folder holding the authors' published scores ({PARSER_FACTS['authors_scores']}){purpose} "
                        f"(default: ${PARSER_FACTS['paper_dir_env']}, else ../shared/paper)")


COMMANDS = {
    "demo": cmd_demo,
    "train": cmd_train,
    "score": cmd_score,
    "attack": cmd_attack,
    "reproduce": cmd_reproduce,
    "compare-authors": cmd_compare_authors,
}


def _check_common(args) -> None:
    _positive_int("threads", args.threads)
    _positive_int("cosine-t-max", getattr(args, "cosine_t_max", None))
    if getattr(args, "lr", 1.0) <= 0:
        raise UsageError(f"--lr {args.lr}: pass a positive learning rate")
    if getattr(args, "delta_min", 1.0) <= 0 or getattr(args, "delta_max", 2.0) <= getattr(
        args, "delta_min", 1.0
    ):
        raise UsageError("--delta-min and --delta-max: pass 0 < delta-min < delta-max")
    _positive_int(_spelling(args, "score_limit", "score-images"), getattr(args, "score_limit", None), 2)
    _positive_int("pgd-limit", getattr(args, "pgd_limit", None))
    device = getattr(args, "device", "cpu")
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise UsageError(f"--device {device}: this machine has no such device; pass --device cpu")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _import_pipeline()
    try:
        _check_common(args)
        _set_threads(args.threads)
        if args.command not in distributed.SHARDED_COMMANDS and distributed.launch_from_env() is not None:
            raise UsageError(
                f"{args.command} runs in one process; start it without torchrun (torchrun "
                f"shards {', '.join(distributed.SHARDED_COMMANDS)})"
            )
        with distributed.session():
            if not distributed.is_main():
                args.quiet = True  # progress bars on rank 0 only
            return COMMANDS[args.command](args)
    except (UsageError, DataError, CheckpointError) as error:
        if args.debug:
            raise
        print(f"pullgeom: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pullgeom: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(
            f"pullgeom: error: {type(error).__name__}: {error} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
