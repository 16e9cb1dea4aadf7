"""scripts/gpu_check.sh: the one-command GPU check, exercised here without a GPU.

The GPU run itself needs an H100/H200; what can rot without one is tested here: the dry run
(the timing harness on CPU at small sizes, the JSON and markdown reports, GPU-only steps
reported as skipped), the 8-minute budget of the GPU plan, and the failure paths of the driver.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
GPU_ONLY = ("build", "cuda_tests", "triton_tests")


def _load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load_driver()


def _run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # This interpreter's folder first on PATH: the wrapper runs python3 by default, as on the GPU
    # machine, and here that must be the test environment's python (with torch and pullgeom).
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    env.pop("PYTHON", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT / "tests")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for the module. The sm_90 compile check and the emulated CUDA tests are skipped:
    each takes minutes on two cores, and the suite runs both on their own
    (tests/test_triton_sm90_compile.py, tests/test_cuda_emulated.py)."""
    outdir = tmp_path_factory.mktemp("gpu_check")
    result = _run_script("--cpu-dry-run", "--skip", gpu_check.SM90_STEP, "--skip", gpu_check.EMULATED_STEP,
                         str(outdir), timeout=400)
    return result, outdir


def test_dry_run_passes_and_writes_both_reports(dry_run):
    result, outdir = dry_run
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((outdir / "gpu_check.json").read_text())
    assert set(report) >= {"steps", "timings", "environment"}
    assert [step["name"] for step in report["steps"]] == list(gpu_check.STEP_NAMES)
    for step in report["steps"]:
        assert set(step) >= {"name", "status", "seconds", "detail"}
        assert step["status"] in ("passed", "skipped"), step
        assert step["seconds"] >= 0
    environment = report["environment"]
    assert set(environment) >= {"torch", "triton", "cuda", "device", "date"}
    markdown = (outdir / "gpu_check.md").read_text()
    assert "| step | status | seconds | detail |" in markdown and "| speedup | x |" in markdown


def test_dry_run_skips_the_gpu_steps_with_the_reason(dry_run):
    _, outdir = dry_run
    steps = {step["name"]: step for step in json.loads((outdir / "gpu_check.json").read_text())["steps"]}
    for name in GPU_ONLY:
        assert steps[name]["status"] == "skipped" and steps[name]["detail"] == "--cpu-dry-run"
    for name in (gpu_check.SM90_STEP, gpu_check.EMULATED_STEP):
        assert steps[name]["status"] == "skipped" and steps[name]["detail"] == "--skip"
    assert steps["timings"]["status"] == "passed"


def test_dry_run_times_every_cpu_solver(dry_run):
    _, outdir = dry_run
    timings = json.loads((outdir / "gpu_check.json").read_text())["timings"]
    assert timings["device"] == "cpu" and timings["inputs"] == 256 and timings["matrices"] == 512
    from pullgeom.kernels import native

    native_ok = native.EXTENSION_ERROR is None  # without a C++ compiler cpp and sym_eigh are skipped
    expected = {"torch", "autograd", gpu_check.RECIPE} | ({"cpp"} if native_ok else set())
    spectrum = timings["spectrum"]
    assert set(spectrum) == {*gpu_check.CPU_SPECTRUM_BACKENDS, gpu_check.RECIPE}
    for backend in expected:
        assert spectrum[backend]["status"] == "passed", spectrum[backend]
        assert spectrum[backend]["ms"] > 0 and spectrum[backend]["calls"] >= 1
    # Every backend agreed with the torch backend on the warm-up batch (else it would be failed).
    assert all(spectrum[b]["max_rel_diff_vs_torch"] <= 1e-3 for b in expected - {"torch"})
    assert set(timings["eigh"]) == {str(n) for n in gpu_check.EIGH_SIZES}
    for solvers in timings["eigh"].values():
        assert set(solvers) == {"sym_eigh", gpu_check.EIGH_BASELINE}
        for name in ({"sym_eigh"} if native_ok else set()) | {gpu_check.EIGH_BASELINE}:
            assert solvers[name]["status"] == "passed" and solvers[name]["ms"] > 0, solvers[name]
    ratios = timings["ratios"]
    assert ratios["torch over recipe"] > 0 and ratios["torch over autograd"] > 0
    if native_ok:
        assert ratios["cpp over recipe"] > 0 and ratios["sym_eigh over torch.linalg.eigh (n=128)"] > 0


def test_gpu_plan_fits_eight_minutes():
    limits = gpu_check.GPU_LIMITS_S
    assert set(limits) == set(gpu_check.STEP_NAMES) - set(gpu_check.DRY_ONLY_STEPS)
    assert gpu_check.worst_case_s(limits) < gpu_check.TOTAL_LIMIT_S == 480
    # The harness stops starting measurements before its step is killed.
    assert all(limit > 10 for limit in limits.values())


def test_gpu_mode_without_a_gpu_fails_the_gpu_steps_and_exits_nonzero(tmp_path):
    """The GPU run on a machine torch sees no GPU on: the tests must not pass on CPU (Triton's
    interpreter would run them) but fail with the reason, and the exit status says so."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this checks the no-GPU path")
    result = _run_script("--skip", "build", "--skip", gpu_check.SM90_STEP, "--skip", "timings", str(tmp_path),
                         timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    steps = {step["name"]: step for step in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]}
    for name in ("cuda_tests", "triton_tests"):
        assert steps[name]["status"] == "failed"
        assert "torch.cuda.is_available() is False" in steps[name]["detail"]
    assert steps["build"]["status"] == "skipped"


def test_missing_sm90_script_is_reported_skipped(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "SM90_SCRIPT", "scripts/no_such_script.py")
    result = gpu_check.finish_sm90_step(gpu_check.start_sm90_step(tmp_path, 5))
    assert result.status == "skipped" and result.detail == "scripts/no_such_script.py not present"


def test_a_step_past_its_limit_is_killed_and_failed(tmp_path):
    done = gpu_check.run_logged("slow", [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path, 1)
    assert done.timed_out and done.seconds < 10
    assert "killed at its 1 s limit" in (tmp_path / "slow.log").read_text()


def test_junit_counts_cuda_cases(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite>'
                   '<testcase name="test_a[cuda-float32]"/><testcase name="test_a[cpu-float32]"/>'
                   '<testcase name="test_b[cuda]"><failure message="x"/></testcase>'
                   '<testcase name="test_c[cuda]"><skipped message="y"/></testcase>'
                   '</testsuite></testsuites>')
    assert gpu_check._junit_counts(xml) == {"passed": 2, "failed": 1, "skipped": 1, "cuda_passed": 1}


def test_cross_check_fails_a_solver_with_wrong_eigenvalues():
    import torch

    reference = torch.tensor([[4.0, 2.0, 1.0]])
    entries = {"ref": {"status": "passed"}, "good": {"status": "passed"}, "bad": {"status": "passed"}}
    checks = {"ref": reference, "good": reference + 1e-6, "bad": reference * 1.1}
    gpu_check.cross_check(entries, checks, "ref", "test")
    assert entries["good"]["status"] == "passed" and entries["ref"]["reference"]
    assert entries["bad"]["status"] == "failed" and "differ from ref's" in entries["bad"]["error"]
    # ratios skip what did not pass
    timings = {"spectrum": {"cuda": {"status": "passed", "ms": 2.0},
                            "recipe": {"status": "passed", "ms": 10.0}, "autograd": {"status": "failed"}}}
    assert gpu_check.ratios(timings) == {"cuda over recipe": 5.0, "cuda over autograd": None}
