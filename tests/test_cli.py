"""Smoke runs of every command (tiny sizes) and up-front validation with one-line errors."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pullgeom.paper.cli import build_parser, main, reproduce_profile
from pullgeom.paper.datasets import DATASETS, write_blob_images
from pullgeom.paper.evaluation import EvalSettings
from pullgeom.paper.profiles import Profile
from pullgeom.paper.report import SUMMARY_KEYS

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
    for r in rows:
        assert float(r["spectral_radius"]) == pytest.approx(float(r["lambda_1"]))
        assert float(r["lambda_1"]) >= float(r["lambda_2"]) >= float(r["lambda_3"]) >= 0
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
    ],
)
def test_bad_options_fail_up_front_with_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("PULLGEOM_DATA_DIR", raising=False)  # CI sets it (to MNIST); these pass folders
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    names = {name: tmp_path / name for name in ("missing", "out", "file", "empty")}
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
