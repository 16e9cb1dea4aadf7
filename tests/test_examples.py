"""Every example runs in its smoke mode."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["score_own_encoder.py", "train_sweep.py", "attack_grid.py", "reproduce_figure.py"]


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_smoke(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "PULLGEOM_AUTOTUNE": "0"}
    writes_figure = script in ("attack_grid.py", "reproduce_figure.py")
    extra = ["--out", str(tmp_path / "figure.png")] if writes_figure else []
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--smoke", *extra],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
    if extra:
        assert (tmp_path / "figure.png").stat().st_size > 1000


def test_stable_diffusion_vae_example_smoke(tmp_path):
    """A tiny random AutoencoderKL on synthetic images: scores printed, directions saved."""
    pytest.importorskip("diffusers")
    pytest.importorskip("PIL")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PULLGEOM_AUTOTUNE": "0"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "stable_diffusion_vae.py"), "--smoke",
                             "--out", str(tmp_path / "directions")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "top-5 eigenvalues" in result.stdout
    assert len(list((tmp_path / "directions").glob("*-top-eigenvector.png"))) == 2
