"""Smoke runs of every command (tiny sizes) and up-front validation with one-line errors."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pullgeom.cli import build_parser, main, reproduce_profile
from pullgeom.report import SUMMARY_KEYS

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
    ],
)
def test_bad_options_fail_up_front_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("x")
    argv = [
        a.format(missing=tmp_path / "missing", out=tmp_path / "out", file=tmp_path / "file") for a in argv
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pullgeom: error:") and message in err and "\n" not in err
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
