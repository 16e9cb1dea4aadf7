"""Smoke runs of every command (tiny sizes) and up-front validation with one-line errors."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from pullgeom.paper.cli import build_parser, main, reproduce_profile
from pullgeom.paper.datasets import DATASETS, load_dataset, write_blob_images
from pullgeom.paper.evaluation import EvalSettings
from pullgeom.paper.outputs import load_checkpoint
from pullgeom.paper.profiles import Profile
from pullgeom.paper.report import COMPARISON_TITLE, SUMMARY_KEYS
from pullgeom.paper.training import log_spaced

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    """Skip backend="auto"'s one-time timing of every backend (tens of seconds on a busy 2-core box):
    these tests check results, not which backend is fastest."""
    monkeypatch.setenv("PULLGEOM_AUTOTUNE", "0")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    code = main(
        [
            "--quiet",
            "--threads",
            "2",
            "train",
            "--dataset",
            "mnist-small",
            "--beta",
            "0.1",
            "5",
            "--epochs",
            "1",
            "--limit",
            "256",
            "--batch-size",
            "64",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_train_writes_safetensors_checkpoints_and_sweep_json(trained):
    models = sorted(p.name for p in (trained / "models").iterdir())
    assert models == ["beta=0.1_mixup=0", "beta=5_mixup=0"]
    for name in models:
        assert (trained / "models" / name / "model.safetensors").is_file()
        config = json.loads((trained / "models" / name / "config.json").read_text())
        assert config["arch"] == "paper-mlp" and config["epochs"] == 1
    assert json.loads((trained / "sweep.json").read_text())["betas"] == [0.1, 5.0]
    assert not list(trained.rglob("*.tmp"))


def test_score_writes_rows_with_dataset_indices(trained, tmp_path):
    code = main(
        [
            "--quiet",
            "score",
            "--checkpoint",
            str(trained / "models" / "beta=0.1_mixup=0"),
            "--dataset",
            "mnist-small",
            "--split",
            "test",
            "--limit",
            "12",
            "--k",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [int(r["index"]) for r in rows] == list(range(12))
    assert list(rows[0])[:6] == ["index", "spectral_radius", "entropy", "lambda_1", "lambda_2", "lambda_3"]
    assert list(rows[0])[-2:] == ["authors_radius", "authors_entropy"]
    for r in rows:
        assert float(r["spectral_radius"]) == pytest.approx(float(r["lambda_1"]))
        assert float(r["lambda_1"]) >= float(r["lambda_2"]) >= float(r["lambda_3"]) >= 0
        # G = J_mu^T J_mu + J_sigma^T J_sigma >= J_mu^T J_mu: lambda_max(G) >= s_max(J_mu)^2.
        assert float(r["authors_radius"]) ** 2 <= float(r["spectral_radius"]) * (1 + 1e-5)
    # The authors' convention against a float64 SVD of J_mu (float32 scores: 1e-4 relative; using
    # eigenvalues for singular values, or G for J_mu, is off by far more).
    model, _ = load_checkpoint(trained / "models" / "beta=0.1_mixup=0")
    images, _ = load_dataset("mnist-small", "test", limit=3)
    encoder = model.encoder.double()
    for r, x in zip(rows, images.double(), strict=False):
        jacobian = torch.autograd.functional.jacobian(lambda v: encoder(v.reshape(1, 1, 28, 28))[0][0],
                                                      x.reshape(-1))
        s = torch.linalg.svdvals(jacobian)
        p = s / s[0]
        assert float(r["authors_radius"]) == pytest.approx(float(s[0]), rel=1e-4)
        assert float(r["authors_entropy"]) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-4)
    assert (tmp_path / "histograms.png").stat().st_size > 1000


def test_score_decoder_metric_on_a_sweep_directory(trained, tmp_path):
    code = main(
        [
            "--quiet",
            "score",
            "--checkpoint",
            str(trained),
            "--dataset",
            "mnist-small",
            "--limit",
            "3",
            "--decoder-metric",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert (tmp_path / "beta=5_mixup=0" / "scores.csv").is_file()


def test_attack_writes_curves_grid_and_pgd(trained, tmp_path):
    code = main(
        [
            "--quiet",
            "attack",
            "--checkpoint",
            str(trained / "models" / "beta=5_mixup=0"),
            "--dataset",
            "mnist-small",
            "--limit",
            "4",
            "--steps",
            "3",
            "--pgd-limit",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    lines = (tmp_path / "curves.csv").read_text().splitlines()
    assert lines[0] == "scaling,direction,delta,mse,latent_distance"
    assert len(lines) == 1 + 2 * 5 * 3 + 3
    assert set(json.loads((tmp_path / "theorem_pgd.json").read_text())) >= {"pgd", "eigen_G", "random"}
    assert (tmp_path / "examples.png").is_file() and (tmp_path / "curves.png").is_file()


def test_attack_with_a_pixel_box(trained, tmp_path, capsys):
    argv = ["--quiet", "attack", "--checkpoint", str(trained / "models" / "beta=5_mixup=0"), "--dataset",
            "mnist-small", "--limit", "3", "--steps", "3", "--pgd-limit", "2", "--box", "0", "1",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "curves.csv").open()))
    boxed = [r for r in rows if r["scaling"] == "box"]
    assert [r["direction"] for r in boxed] == ["perturb"] * 3
    unit = [r for r in rows if r["scaling"] == "unit" and r["direction"] == "v_1"]
    assert [r["delta"] for r in boxed] == [r["delta"] for r in unit]
    # The box can only cost latent shift against the unboxed top direction, to first order; allow
    # the second-order terms (the unboxed attack takes the worse sign, the boxed one maximises G).
    for b, u in zip(boxed, unit, strict=True):
        assert float(b["latent_distance"]) <= 1.05 * float(u["latent_distance"])
    capsys.readouterr()
    assert main(argv[:-4] + ["1", "0", "--out", str(tmp_path)]) == 2
    assert "--box 1 0: pass the lowest then the highest pixel value" in capsys.readouterr().err
    assert main(argv[:-4] + ["0.5", "1", "--out", str(tmp_path)]) == 2  # mnist-small has pixels below 0.5
    assert "--box 0.5 1: " in capsys.readouterr().err


def test_attack_at_its_default_size(trained, tmp_path):
    """``pullgeom attack`` as the README runs it, with no size option: 64 images, the top 5
    directions, 40 deltas, PGD on 16 images. At that size it once crashed, Fig. 2's 8 images
    meeting the spectrum of all 64 ("The size of tensor a (8) must match ... (64)")."""
    argv = ["--quiet", "attack", "--checkpoint", str(trained / "models" / "beta=5_mixup=0"), "--dataset",
            "mnist-small", "--out", str(tmp_path)]
    assert main(argv) == 0
    lines = (tmp_path / "curves.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 5 * 40 + 40  # header, 2 scalings x 5 directions x 40 deltas, random
    assert len(json.loads((tmp_path / "theorem_pgd.json").read_text())["pgd"]) == 6
    assert (tmp_path / "examples.png").stat().st_size > 1000 and (tmp_path / "curves.png").is_file()


def test_demo_writes_every_summary_key(tmp_path):
    code = main(
        ["--quiet", "demo", "--out", str(tmp_path), "--epochs", "1", "--limit", "512", "--score-limit", "16"]
    )
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert len(summary["betas"]) >= 6 and min(summary["betas"]) == 0.01 and max(summary["betas"]) == 10
    for key in ("spectral_radius_mean", "spectral_radius_std", "entropy_mean", "entropy_std", "recon_mse"):
        assert len(summary[key]) == len(summary["betas"])
    assert -1 <= summary["spearman_beta_spectral_radius"] <= 1
    report = (tmp_path / "report.md").read_text()
    # report.md opens with the per-claim verdicts, written from the run's own correlations.
    opening = report.split("\n\n")[1].splitlines()
    assert [line.split(":")[0] for line in opening] == [
        "- the paper's claim 'spectral radius falls as beta grows'",
        "- the paper's claim 'entropy falls as beta grows'"]
    rho = summary["spearman_beta_spectral_radius"]
    assert f"{rho:.2f}" in opening[0] and ("does not hold" in opening[0]) == (rho > -0.9)
    for figure in (
        "fig5_scores_vs_beta.png",
        "fig2_examples.png",
        "fig3_latent_vs_delta.png",
        "theorem_pgd.png",
    ):
        assert (tmp_path / figure).stat().st_size > 1000
        assert figure in report


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--dataset", "mnist", "--data-dir", "{missing}", "--beta", "1", "--out", "{out}"],
            "train-images-idx3-ubyte.gz",
        ),
        (
            ["train", "--dataset", "mnist-small", "--beta", "1", "--epochs", "0", "--out", "{out}"],
            "--epochs 0",
        ),
        (["train", "--dataset", "mnist-small", "--beta", "-1", "--out", "{out}"], "positive"),
        (
            [
                "train",
                "--dataset",
                "mnist-small",
                "--beta",
                "1",
                "2",
                "--mixup",
                "1",
                "2",
                "3",
                "--out",
                "{out}",
            ],
            "mixup",
        ),
        (["train", "--dataset", "cifar", "--beta", "1", "--out", "{out}"], "unknown dataset"),
        (
            ["score", "--checkpoint", "{missing}", "--dataset", "mnist-small", "--out", "{out}"],
            "no checkpoint",
        ),
        (
            ["attack", "--checkpoint", "{missing}", "--dataset", "mnist-small", "--out", "{out}"],
            "no checkpoint",
        ),
        (["reproduce", "--dataset", "mnist", "--data-dir", "{missing}", "--out", "{out}"], "--download"),
        (["reproduce", "--epochs", "0", "--out", "{out}"], "--epochs 0"),
        (["reproduce", "--train-images", "-1", "--out", "{out}"], "--train-images -1"),
        (["--threads", "0", "demo"], "--threads 0"),
        (
            ["train", "--dataset", "mnist-small", "--beta", "1", "--device", "cuda:7", "--out", "{out}"],
            "--device",
        ),
        (["demo", "--out", "{file}"], "is a file"),
        (["train", "--dataset", "celeba", "--beta", "1", "--out", "{out}"], "celeba needs --data-dir"),
        (
            ["train", "--dataset", "celeba", "--data-dir", "{missing}", "--beta", "1", "--out", "{out}"],
            "does not exist",
        ),
        (
            ["reproduce", "--dataset", "celeba", "--data-dir", "{empty}", "--out", "{out}"],
            "img_align_celeba",
        ),
        (
            ["train", "--dataset", "mnist-small", "--channels", "4", "--beta", "1", "--out", "{out}"],
            "--channels set the celeba conv VAE",
        ),
        (
            ["train", "--dataset", "celeba", "--data-dir", "{empty}", "--channels", "4", "0", "--beta", "1",
             "--out", "{out}"],
            "positive conv widths",
        ),
        (
            ["train", "--dataset", "mnist-small", "--limit", "10", "--batch-size", "64", "--beta", "1",
             "--out", "{out}"],
            "--batch-size of at most 10",
        ),
        (
            ["reproduce", "--dataset", "celeba", "--data-dir", "{empty}", "--latent-dim", "2",
             "--out", "{out}"],
            "--latent-dim >= 3",
        ),
        (["train", "--dataset", "mnist-small", "--beta", "1", "--cosine-t-max", "50", "--out", "{out}"],
         "pass --lr-schedule cosine with it"),
        (["train", "--dataset", "mnist-small", "--beta", "1", "--lr-schedule", "cosine", "--cosine-t-max",
          "0", "--out", "{out}"], "--cosine-t-max 0"),
        (["reproduce", "--dataset", "mnist-small", "--paper-dir", "{empty}", "--out", "{out}"],
         "no authors_mnist_scores.csv in"),
        (["reproduce", "--dataset", "mnist-small", "--paper-dir", "{bad}", "--out", "{out}"],
         "has no column n_images, radius_std"),
        (["reproduce", "--dataset", "celeba", "--data-dir", "{empty}", "--paper-dir", "{empty}",
          "--out", "{out}"], "MNIST's, not celeba's"),
        (["compare-authors", "{empty}"], "holds no summary.json"),
    ],
)
def test_bad_options_fail_up_front_with_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("PULLGEOM_DATA_DIR", raising=False)  # CI sets it (to MNIST); these pass folders
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "authors_mnist_scores.csv").write_text("beta,radius_mean,entropy_mean,entropy_std\n")
    names = {name: tmp_path / name for name in ("missing", "out", "file", "empty", "bad")}
    argv = [a.format(**names) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pullgeom: error:") and message in err and "\n" not in err
    if "--batch-size" not in message:  # that one is known only once the images are read
        assert not (tmp_path / "out").exists()  # nothing was started


def test_module_entry_point_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pullgeom", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and "reproduce" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "pullgeom", "score", "--checkpoint", "nowhere", "--out", "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_reproduce_overrides_the_profile_sizes():
    parser = build_parser()
    quick = reproduce_profile(parser.parse_args(["reproduce", "--out", "x"]))
    argv = ["reproduce", "--epochs", "20", "--train-images", "0", "--out", "x"]
    longer = reproduce_profile(parser.parse_args(argv))
    assert (quick.epochs, quick.limit) == (5, 20000)
    assert (longer.epochs, longer.limit) == (20, None)  # 0: the whole training set
    assert longer.betas == quick.betas and longer.evaluation == quick.evaluation
    assert (quick.likelihood, quick.lr_schedule) == (None, "constant")  # the Bernoulli MLP, as before
    argv = ["reproduce", "--likelihood", "sse", "--lr-schedule", "cosine", "--out", "x"]
    changed = reproduce_profile(parser.parse_args(argv))
    assert (changed.likelihood, changed.lr_schedule) == ("sse", "cosine")


def test_the_paper_profile_is_the_authors_setting():
    paper = reproduce_profile(build_parser().parse_args(["reproduce", "--profile", "paper", "--out", "x"]))
    grid = [10 ** (-2 + 3 * i / 49) for i in range(50)]  # numpy's logspace(-2, 1, 50)
    # rounded to 6 significant digits (as the authors' files write them): within 5e-6 relative
    assert paper.betas == pytest.approx(grid, rel=5e-6) and len(paper.betas) == 50
    assert (paper.epochs, paper.limit, paper.batch_size) == (100, None, 128)
    assert (paper.likelihood, paper.lr_schedule) == ("sse", "cosine")
    assert paper.evaluation.score_limit == 3072  # the authors' first 3072 test images
    assert paper.mixup_models == [(1.04811, 1.0)]  # Fig. 6: beta 1 (nearest grid point), weight 1



# ----------------------------------------------------------------------------------------
# celeba: the conv VAE on a folder of generated JPEG faces, at the smallest sizes the CLI takes
# (one conv block of 2 filters, latent 2).

CONV = ["--channels", "2", "--latent-dim", "2"]
# reproduce at test size: the celeba profiles' structure (plain betas, a mixup model on the grid).
TINY_CELEBA = Profile(
    betas=[0.01, 10.0],
    mixup_models=[(10.0, 10.0)],
    epochs=1,
    limit=16,
    batch_size=8,
    evaluation=EvalSettings(score_limit=4, attack_limit=2, attack_steps=3, pgd_limit=2, pgd_steps=2,
                            decoder_limit=2, decoder_models=1, batch_size=4),
)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    write_blob_images(folder / "img_align_celeba", 24, size=(178, 218))  # 21 train, 3 test
    return folder


@pytest.fixture(scope="module")
def celeba_trained(faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("celeba-train")
    argv = ["--quiet", "--threads", "2", "train", "--dataset", "celeba", "--data-dir", str(faces), "--beta",
            "0.1", "5", "--epochs", "1", "--limit", "16", "--batch-size", "8", *CONV, "--out", str(out)]
    assert main(argv) == 0
    return out


def test_celeba_train_writes_conv_checkpoints(celeba_trained):
    for name in ("beta=0.1_mixup=0", "beta=5_mixup=0"):
        config = json.loads((celeba_trained / "models" / name / "config.json").read_text())
        assert config["arch"] == "celeba-conv" and config["channels"] == [2] and config["latent_dim"] == 2
        assert config["likelihood"] == "gaussian" and config["input_shape"] == [3, 64, 64]
    assert json.loads((celeba_trained / "sweep.json").read_text())["arch"] == "celeba-conv"


def test_celeba_score_and_attack(faces, celeba_trained, tmp_path):
    model = str(celeba_trained / "models" / "beta=5_mixup=0")
    data = ["--dataset", "celeba", "--data-dir", str(faces)]
    assert main(["--quiet", "score", "--checkpoint", model, *data, "--limit", "3", "--k", "2",
                 "--decoder-metric", "--out", str(tmp_path / "score")]) == 0
    rows = list(csv.DictReader((tmp_path / "score" / "scores.csv").open()))
    assert [int(r["index"]) for r in rows] == [0, 1, 2]
    assert all(float(r["lambda_1"]) >= float(r["lambda_2"]) > 0 for r in rows)
    assert main(["--quiet", "attack", "--checkpoint", model, *data, "--limit", "2", "--k", "2",
                 "--steps", "2",
                 "--pgd-limit", "1", "--out", str(tmp_path / "attack")]) == 0
    lines = (tmp_path / "attack" / "curves.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 * 2 + 2  # header, 2 scalings x 2 directions x 2 steps, random x 2
    assert (tmp_path / "attack" / "examples.png").is_file()


def test_celeba_checkpoint_on_mnist_is_refused(celeba_trained, tmp_path, capsys):
    argv = ["score", "--checkpoint", str(celeba_trained / "models" / "beta=5_mixup=0"), "--dataset",
            "mnist-small", "--limit", "2", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "expects inputs [3, 64, 64]" in capsys.readouterr().err


def test_celeba_reproduce(faces, tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS["celeba"].profiles, "tiny", TINY_CELEBA)  # also one of the parser's choices
    # latent 3: the evaluation takes the top 5 eigenpairs of G (rank <= 2 x latent)
    argv = ["--quiet", "--threads", "2", "reproduce", "--profile", "tiny", "--dataset", "celeba",
            "--data-dir", str(faces), "--channels", "2", "--latent-dim", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["betas"] == [0.01, 10.0]
    report = (tmp_path / "report.md").read_text()
    assert "celeba-conv" in report and "fig6_mixup.png" in report
    assert (tmp_path / "fig2_examples.png").stat().st_size > 1000


@pytest.mark.parametrize("name", sorted(DATASETS["celeba"].profiles))
def test_celeba_profiles_train_mixup_models_on_their_grid(name):
    profile = DATASETS["celeba"].profiles[name]
    assert all(beta in profile.betas for beta, _ in profile.mixup_models)
    parser = build_parser()
    chosen = reproduce_profile(parser.parse_args(["reproduce", "--dataset", "celeba", "--profile", name,
                                                  "--out", "x"]))
    assert chosen == profile


# ----------------------------------------------------------------------------------------
# Beside the authors: a reproduce run on their beta grid, then compare-authors on it.

TINY_MNIST = Profile(
    betas=[0.01, 0.0719686, 10.0],  # points of the authors' 50-beta grid
    mixup_models=[(0.0719686, 1.0)],
    epochs=2,
    limit=256,
    batch_size=64,
    evaluation=EvalSettings(score_limit=8, attack_limit=4, attack_steps=3, pgd_limit=2, pgd_steps=2,
                            decoder_limit=2, decoder_models=1, batch_size=4),
    likelihood="sse",
    lr_schedule="cosine",
)
AUTHORS_HEADER = "beta,n_images,radius_mean,radius_std,entropy_mean,entropy_std,mse_top1_smallest_step\n"


def _authors_dir(folder: Path, radius: list[float]) -> Path:
    """A paper folder whose authors_mnist_scores.csv has the grid's first 50 betas' ``radius``
    (cycled) and entropy 2."""
    folder.mkdir()
    grid = log_spaced(0.01, 10, 50)
    rows = [f"{b},3072,{radius[i % len(radius)]},0.1,2,0.1,0.01\n" for i, b in enumerate(grid)]
    (folder / "authors_mnist_scores.csv").write_text(AUTHORS_HEADER + "".join(rows))
    return folder


def test_reproduce_lays_its_numbers_beside_the_authors(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(DATASETS["mnist-small"].profiles, "tiny", TINY_MNIST)
    out = tmp_path / "run"
    first = _authors_dir(tmp_path / "paper", [4.0])
    argv = ["--quiet", "--threads", "2", "reproduce", "--profile", "tiny", "--dataset", "mnist-small",
            "--paper-dir", str(first), "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    block = summary["authors_convention"]
    assert set(block) == {"radius_mean", "radius_median", "entropy_mean", "entropy_median"}
    assert all(len(values) == 3 for values in block.values())
    table = list(csv.DictReader((out / "authors_comparison.csv").open()))
    assert [float(r["beta"]) for r in table] == [0.01, 0.0719686, 10.0]
    for row, ours in zip(table, block["radius_mean"], strict=True):
        assert float(row["authors_radius_mean"]) == 4.0
        assert float(row["ours_radius_mean"]) == pytest.approx(ours, rel=1e-5)
        assert float(row["radius_ratio"]) == pytest.approx(ours / 4.0, rel=1e-5)
    with (out / "scores" / "beta=0.01_mixup=0.csv").open() as handle:
        scored = list(csv.DictReader(handle))
    radii = sorted(float(r["authors_radius"]) for r in scored)
    assert len(radii) == 8 and block["radius_median"][0] == pytest.approx((radii[3] + radii[4]) / 2, rel=1e-6)
    config = json.loads((out / "sweep" / "models" / "beta=0.01_mixup=0" / "config.json").read_text())
    assert (config["likelihood"], config["lr_schedule"], config["cosine_t_max"]) == ("sse", "cosine", 200)
    report = (out / "report.md").read_text()
    assert "cosine learning-rate schedule, T_max 200 epochs" in report and "likelihood sse" in report
    assert report.count(f"## {COMPARISON_TITLE}") == 1 and "theirs -nan" not in report
    # compare-authors on the finished run, against other numbers: the section and files are replaced.
    second = _authors_dir(tmp_path / "paper2", [1.0, 2.0, 3.0])
    capsys.readouterr()
    assert main(["compare-authors", str(out), "--paper-dir", str(second)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "authors_comparison.csv") in printed and "Spearman(beta, radius): ours" in printed
    table = list(csv.DictReader((out / "authors_comparison.csv").open()))
    # beta 0.01, 0.0719686 and 10 are grid points 0, 14 and 49: radius 1, 3 and 2 of the cycle
    assert [float(r["authors_radius_mean"]) for r in table] == [1.0, 3.0, 2.0]
    report = (out / "report.md").read_text()
    assert report.count(f"## {COMPARISON_TITLE}") == 1 and "| 0.01 |" in report
    assert json.loads((out / "summary.json").read_text())["authors_comparison"]["spearman_beta"]["radius"][
        "authors"] == pytest.approx(0.5)


def test_reproduce_without_the_authors_file_says_so_and_reports_the_rest(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(DATASETS["mnist-small"].profiles, "tiny", TINY_MNIST)
    monkeypatch.setenv("PULLGEOM_PAPER_DIR", str(tmp_path / "nowhere"))
    argv = ["--quiet", "--threads", "2", "reproduce", "--profile", "tiny", "--dataset", "mnist-small",
            "--epochs", "1", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert "so the report does not lay its numbers beside the authors'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "authors_comparison.csv").exists()
    assert "authors_convention" in json.loads((tmp_path / "run" / "summary.json").read_text())


# ----------------------------------------------------------------------------------------
# The command line explains itself (issue 16): help for every option, one spelling per concept,
# summaries on the console.


def _subparsers():
    import argparse

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_every_option_of_every_command_has_help_and_shows_its_default():
    import argparse

    parser, commands = _subparsers()
    for name, sub in [("pullgeom", parser), *commands.items()]:
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"
        text = sub.format_help()
        for action in sub._actions:
            has_default = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
            if has_default and action.help != argparse.SUPPRESS and not isinstance(action.default, bool):
                # the default is printed (argparse may wrap the line, so compare without whitespace)
                shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
                assert "".join(shown.split()) in "".join(text.split()), f"{name} {action.option_strings[0]}"
    train_help = "".join(commands["train"].format_help().split())
    for default in ("(default:10)", "(default:128)", "(default:0)", "(default:cpu)"):
        assert default in train_help


def test_one_spelling_for_the_number_of_images_and_the_old_ones_still_parse():
    parser, commands = _subparsers()
    for command in ("demo", "train", "score", "attack", "reproduce"):
        assert "--images" in commands[command].format_help(), command
        for old in ("--limit", "--train-images", "--score-limit"):
            assert old not in commands[command].format_help(), (command, old)
    required = {"train": ["--beta", "1", "--out", "x"], "score": ["--checkpoint", "c", "--out", "x"],
                "attack": ["--checkpoint", "c", "--out", "x"], "demo": []}
    for command, rest in required.items():
        for spelling in ("--images", "--limit"):
            assert parser.parse_args([command, spelling, "7", *rest]).limit == 7, (command, spelling)
    for spelling in ("--images", "--train-images", "--limit"):
        assert parser.parse_args(["reproduce", spelling, "0", "--out", "x"]).train_images == 0, spelling
    for spelling in ("--score-images", "--score-limit"):
        assert parser.parse_args(["demo", spelling, "9"]).score_limit == 9, spelling
    assert parser.parse_args(["demo"]).score_limit == 300 and parser.parse_args(["attack", "--checkpoint", "c",
                                                                                 "--out", "x"]).limit == 64


def test_a_bad_value_is_named_as_the_user_spelled_it(tmp_path, capsys):
    for spelling in ("--images", "--limit"):
        argv = ["score", "--checkpoint", str(tmp_path), "--dataset", "mnist-small", spelling, "-3",
                "--out", str(tmp_path / "o")]
        assert main(argv) == 2
        assert f"{spelling} -3: pass an integer >= 1" in capsys.readouterr().err


def test_train_summary_lists_every_model_with_its_loss(trained):
    from pullgeom.paper.cli import train_summary

    directories = sorted((trained / "models").iterdir())
    text = train_summary(directories)
    assert "final loss" in text and "recon error" in text and "time s" in text
    for d in directories:
        config = json.loads((d / "config.json").read_text())
        row = next(line for line in text.splitlines() if line.startswith(d.name))
        assert f"{config['final_train']['loss']:.4g}" in row and f"{config['beta']:g}" in row


def test_score_and_attack_print_summaries(trained, tmp_path, capsys):
    model = str(trained / "models" / "beta=5_mixup=0")
    argv = ["--quiet", "score", "--checkpoint", model, "--dataset", "mnist-small", "--images", "20",
            "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [str(tmp_path / "s" / "scores.csv")]  # stdout: the path alone
    out = captured.err  # the summary, on the console's stderr
    assert "scored 20 images" in out and "mean" in out and "median" in out
    assert "spectral radius" in out and "entropy" in out and str(tmp_path / "s" / "scores.csv") in out
    with open(tmp_path / "s" / "scores.csv") as handle:
        radii = [float(row["spectral_radius"]) for row in csv.DictReader(handle)]
    mean = sum(radii) / len(radii)
    row = next(line for line in out.splitlines() if line.startswith("spectral radius"))
    assert abs(float(row.split()[2]) - mean) <= 1e-3 * abs(mean) + 1e-12

    argv = ["--quiet", "attack", "--checkpoint", model, "--dataset", "mnist-small", "--images", "4",
            "--steps", "3", "--pgd-limit", "2", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "latent shift" in out and "MSE increase" in out and str(tmp_path / "a" / "curves.csv") in out
    rows = [line for line in out.splitlines() if line[:1].isdigit()]
    assert len(rows) == 3  # the smallest, middle and largest budget


def test_demo_verdicts_are_written_from_the_numbers():
    from pullgeom.paper.report import claim_verdicts

    text = claim_verdicts({"spearman_beta_spectral_radius": -0.97, "spearman_beta_entropy": -0.6})
    radius, entropy = text.splitlines()
    assert "spectral radius falls" in radius and "holds" in radius and "-0.97" in radius
    assert "entropy falls" in entropy and "does not hold" in entropy and "-0.60 > -0.8" in entropy
    assert "not decided" in claim_verdicts({"spearman_beta_spectral_radius": float("nan")})


def test_help_does_not_import_the_pipeline():
    """`pullgeom --help` answers without importing torch or the pipeline (issue 16): the top-level
    import of pullgeom.paper.cli, and building and printing its parser, load neither."""
    code = ("import sys, pullgeom.paper.cli as cli; cli.build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'numpy', 'safetensors', 'matplotlib', 'pullgeom.paper.training', "
            "'pullgeom.paper.evaluation', 'pullgeom.paper.report', 'pullgeom.api') if m in sys.modules]; "
            "print(heavy)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
    result = subprocess.run([sys.executable, "-m", "pullgeom", "train", "--help"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0 and "(default: 128)" in result.stdout


def test_the_parsers_facts_match_the_pipeline():
    from pullgeom.paper.cli import PARSER_FACTS, pipeline_facts

    assert PARSER_FACTS == pipeline_facts()
