#!/usr/bin/env python3
"""Prove pullgeom's GPU path on an H100/H200 in one command, under 8 minutes, without network.

Run from anywhere (``scripts/gpu_check.sh`` is the wrapper); the steps run in the repository root:

    python3 scripts/gpu_check.py OUTDIR                 # on the GPU machine
    python3 scripts/gpu_check.py --cpu-dry-run OUTDIR   # here: every step that needs no GPU

Steps, each its own subprocess with its own time limit and log file ``OUTDIR/<step>.log``, so
one failure does not hide the others:

1. ``build``: the extension in place for sm_90 (``FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0
   python3 setup.py build_ext --inplace``), since the GPU machine has no pullgeom installed.
2. ``cuda_tests``: the cuda parametrisations of the native-op tests, plus the op fuzz, against
   that build (``PYTHONPATH`` = the repository root).
3. ``triton_tests``: the Triton op and backend tests on the GPU.
4. ``triton_sm90_compile``: ``scripts/compile_triton_sm90.py`` (every Triton kernel compiled for
   sm_90, shared memory checked), when that script is present.
5. ``timings``: this file's own harness (``--timings-worker``), no pytest-benchmark: the paper's
   encoder on every backend against the torch.func recipe and autograd (with the cuda backend's
   kernels by time, from torch.profiler: cuBLAS's GEMMs beside pullgeom's own kernels), and the
   batched eigensolvers against ``torch.linalg.eigh``.

Writes ``OUTDIR/gpu_check.json`` (steps, timings, environment) and ``OUTDIR/gpu_check.md``.
Exit status 0 only if no step failed. ``--cpu-dry-run`` runs steps 4 and 5 (on CPU, small
sizes) and reports the GPU-only steps as skipped, so the harness is exercised on every CI run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SM90_SCRIPT = "scripts/compile_triton_sm90.py"
SM90_STEP = "triton_sm90_compile"
EMULATED_STEP = "cuda_emulated"
STEP_NAMES = ("build", "cuda_tests", "triton_tests", EMULATED_STEP, SM90_STEP, "timings")
GPU_ONLY_STEPS = ("build", "cuda_tests", "triton_tests")
# The CUDA kernels run on the CPU under tests/cuda_emulation: what the dry run can prove of them.
# On a GPU the real kernels are tested instead, and the step would only spend device time.
DRY_ONLY_STEPS = (EMULATED_STEP,)
DRY_RUN_REASON = "--cpu-dry-run"
GPU_RUN_REASON = "GPU run: the CUDA kernels themselves are tested (cuda_tests)"

# The whole GPU run must finish within 8 minutes (the device time one task gets); every limit
# below is a ceiling, not an estimate, and the worst case (worst_case_s) stays under this.
TOTAL_LIMIT_S = 480
ENVIRONMENT_LIMIT_S = 20  # importing torch and triton, once
GPU_LIMITS_S = {
    # A guess: ten translation units; the three .cu files take ~2 s each, the seven C++ files that
    # include torch's headers ~20 s each, measured one at a time on a slow 2-core machine. With
    # ninja and MAX_JOBS=16 they run in parallel (~30 s); without ninja torch falls back to a
    # serial compile (~150 s there), which this limit still just allows.
    "build": 150,
    "cuda_tests": 60,  # ~100 small cuda cases and a ~900-call CPU fuzz; pytest start-up included
    # A guess: Triton compiles one kernel per shape/dtype case (~100 cases, 1-2 s each on the
    # host's CPU), and the Jacobi kernels for n = 255/256 are the largest.
    "triton_tests": 100,
    # Runs in the background from the start (CPU only, one core), overlapping the three steps
    # above. Measured: 144 configurations in ~200 s with triton 3.9 on a busy 2-core machine.
    SM90_STEP: 240,
    # Worker start-up (torch, pullgeom: ~5 s), 5 spectrum backends and 3 eigensolvers x 2 sizes,
    # Triton compiles in the warm-ups; the harness stops starting measurements 10 s before this.
    "timings": 120,
}
# The dry run is not bound by device time; its limits only stop a hang. The timing step may
# include pullgeom's first-use compile of the C++ CPU kernels (about a minute on two cores).
DRY_LIMITS_S = {EMULATED_STEP: 400, SM90_STEP: 400, "timings": 240}


def worst_case_s(limits: dict[str, float]) -> float:
    """Wall time of the GPU run if every step used its whole limit: the sm_90 compile overlaps
    the build and both test steps; everything else runs one after another."""
    foreground = limits["build"] + limits["cuda_tests"] + limits["triton_tests"]
    return ENVIRONMENT_LIMIT_S + max(foreground, limits[SM90_STEP]) + limits["timings"]


assert worst_case_s(GPU_LIMITS_S) < TOTAL_LIMIT_S

CUDA_TEST_FILES = ["tests/test_ops_eigh.py", "tests/test_ops_lanczos.py", "tests/test_ops_plan_gram.py",
                   "tests/test_native_backends.py", "tests/test_fuzz_ops.py"]
# The device-parametrised tests carry "cuda" in their ids; test_fuzz_ops has no device axis (it
# fuzzes the CPU and meta paths of the freshly built extension), so it is selected by its module.
CUDA_TEST_SELECTION = "cuda or fuzz_ops"
TRITON_TEST_FILES = ["tests/test_triton_ops.py", "tests/test_triton_backend.py"]

K = 5
GPU_SIZES = {"inputs": 10_000, "matrices": 10_000}
DRY_SIZES = {"inputs": 256, "matrices": 512}
EIGH_SIZES = (64, 128)
GPU_SPECTRUM_BACKENDS = ("cuda", "triton", "torch", "autograd")
CPU_SPECTRUM_BACKENDS = ("cpp", "torch", "autograd")
RECIPE = "recipe"  # pullgeom.reference.jacrev_spectrum, the hand-written torch.func baseline
BASELINES = (RECIPE, "autograd")
EIGH_BASELINE = "torch.linalg.eigh"


# --------------------------------------------------------------------------------------------
# The steps


@dataclass
class StepResult:
    name: str
    status: str  # "passed" | "failed" | "skipped"
    seconds: float
    detail: str
    limit_s: float | None = None
    log: str | None = None
    extra: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        out = {"name": self.name, "status": self.status, "seconds": round(self.seconds, 2),
               "detail": self.detail}
        if self.limit_s is not None:
            out["limit_s"] = self.limit_s
        if self.log is not None:
            out["log"] = self.log
        return out


@dataclass
class Finished:
    returncode: int | None  # None: killed at its time limit
    seconds: float
    log: Path

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def tail(self, lines: int = 3) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(line.strip() for line in text[-lines:] if line.strip())[-600:]


def step_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every step: the checkout first on the import path (the GPU machine has
    no pullgeom installed, and here the checkout is what is being checked)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # A TRITON_INTERPRET=1 inherited from a CI shell would silently run the GPU tests on the CPU.
    env.pop("TRITON_INTERPRET", None)
    env.update(extra or {})
    return env


class Logged:
    """A step's subprocess: started in the repository root with stdout+stderr to
    ``OUTDIR/<name>.log``, its whole process group killed at ``limit_s`` after its start (a build
    leaves nvcc/ninja children behind otherwise). ``finish`` waits for it; starting one, running
    others and finishing it later runs it in the background."""

    def __init__(self, name: str, command: list[str], outdir: Path, limit_s: float,
                 env: dict[str, str] | None = None):
        self.limit_s = limit_s
        self.log = outdir / f"{name}.log"
        self.handle = self.log.open("w")
        self.handle.write(f"$ {shlex.join(command)}\n# limit {limit_s:.0f} s, cwd {ROOT}\n")
        self.handle.flush()
        self.start = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=ROOT, env=env or step_env(), stdout=self.handle,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def finish(self) -> Finished:
        remaining = self.start + self.limit_s - time.perf_counter()
        try:
            returncode: int | None = self.process.wait(timeout=max(remaining, 0.01))
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            returncode = None
            self.handle.write(f"\n# killed at its {self.limit_s:.0f} s limit\n")
        self.handle.close()
        return Finished(returncode, time.perf_counter() - self.start, self.log)


def run_logged(name: str, command: list[str], outdir: Path, limit_s: float,
               env: dict[str, str] | None = None) -> Finished:
    return Logged(name, command, outdir, limit_s, env).finish()


def _failed_run(name: str, done: Finished, limit_s: float, what: str) -> StepResult:
    why = (f"timed out after {limit_s:.0f} s" if done.timed_out
           else f"{what} exited with status {done.returncode}")
    return StepResult(name, "failed", done.seconds, f"{why}: {done.tail()}", limit_s, done.log.name)


def _ninja_path_dir() -> tuple[bool, str | None]:
    """(ninja found, a folder to put on PATH for it): the package's own lookup (torch's build runs
    ``ninja`` from PATH, and the pip package's binary is not on PATH in an unactivated venv)."""
    sys.path.insert(0, str(ROOT))  # pullgeom is not installed on the GPU machines: the checkout's
    from pullgeom.kernels.native import ninja_directory

    return ninja_directory()


def build_step(outdir: Path, limit_s: float) -> StepResult:
    found, ninja_dir = _ninja_path_dir()
    extra = {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16"}
    env = step_env(extra)
    env.pop("PULLGEOM_NO_CUDA", None)  # would drop the CUDA kernels this step exists to build
    if ninja_dir is not None:
        env["PATH"] = ninja_dir + os.pathsep + env.get("PATH", "")
    started = time.time()
    done = run_logged("build", [sys.executable, "setup.py", "build_ext", "--inplace"], outdir, limit_s, env)
    ninja = "ninja, 16 jobs" if found else "no ninja: torch's serial fallback compile"
    if done.returncode != 0:
        result = _failed_run("build", done, limit_s, "setup.py build_ext")
        result.detail = f"({ninja}) {result.detail}"
        return result
    built = [path for path in (ROOT / "pullgeom").glob("_C.*") if path.stat().st_mtime >= started - 1]
    if not built:
        return StepResult("build", "failed", done.seconds, f"setup.py succeeded but wrote no pullgeom/_C.* "
                          f"({ninja})", limit_s, done.log.name)
    return StepResult("build", "passed", done.seconds, f"pullgeom/{built[0].name} for sm_90 ({ninja})",
                      limit_s, done.log.name)


def _junit_counts(path: Path) -> dict[str, int]:
    """passed/failed/skipped counts from pytest's junit XML, and how many cases ran on cuda."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "cuda_passed": 0}
    if not path.is_file():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        counts[outcome] += 1
        if outcome == "passed" and "cuda" in case.get("name", ""):
            counts["cuda_passed"] += 1
    return counts


def pytest_step(name: str, files: list[str], outdir: Path, limit_s: float, selection: str | None,
                need_cuda_cases: bool) -> StepResult:
    junit = outdir / f"{name}.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]
    if selection is not None:
        command[4:4] = ["-k", selection]
    done = run_logged(name, command, outdir, limit_s)
    counts = _junit_counts(junit)
    summary = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if need_cuda_cases:
        summary += f" ({counts['cuda_passed']} cuda cases passed)"
    if done.returncode != 0:
        result = _failed_run(name, done, limit_s, "pytest")
        result.detail = f"{summary}; {result.detail}"
        return result
    if need_cuda_cases and counts["cuda_passed"] == 0:
        # The op tests add their cuda cases only when the extension has CUDA kernels and a GPU is
        # visible; a green run without them proves nothing about the GPU.
        return StepResult(name, "failed", done.seconds, f"{summary}: no cuda case ran (the build has no CUDA "
                          "kernels, or torch sees no GPU)", limit_s, done.log.name)
    return StepResult(name, "passed", done.seconds, summary, limit_s, done.log.name)


def start_sm90_step(outdir: Path, limit_s: float) -> StepResult | Logged:
    """Start the sm_90 compile check in the background, or its result if it cannot run. It needs
    CPU only (one core, minutes for every kernel), so it overlaps the build and the tests."""
    if not (ROOT / SM90_SCRIPT).is_file():
        return StepResult(SM90_STEP, "skipped", 0.0, f"{SM90_SCRIPT} not present", limit_s)
    return Logged(SM90_STEP, [sys.executable, SM90_SCRIPT], outdir, limit_s)


def finish_sm90_step(started: StepResult | Logged) -> StepResult:
    if isinstance(started, StepResult):
        return started
    done = started.finish()
    if done.returncode != 0:
        return _failed_run(SM90_STEP, done, started.limit_s, SM90_SCRIPT)
    return StepResult(SM90_STEP, "passed", done.seconds, done.tail(1), started.limit_s, done.log.name)


def timings_step(outdir: Path, limit_s: float, device: str, sizes: dict[str, int]) -> StepResult:
    name = "timings"
    out = outdir / "timings.json"
    out.unlink(missing_ok=True)
    # The worker stops starting new measurements this many seconds before the step's limit, so
    # it ends on its own and its JSON is complete; it also rewrites the JSON after each one.
    budget = max(limit_s - 10, 5)
    command = [sys.executable, str(Path(__file__).resolve()), "--timings-worker", "--device", device,
               "--inputs", str(sizes["inputs"]), "--matrices", str(sizes["matrices"]),
               "--budget-s", str(budget), "--out", str(out)]
    done = run_logged(name, command, outdir, limit_s)
    try:
        timings = json.loads(out.read_text()) if out.is_file() else {}
    except ValueError:
        timings = {}
    failed = [f"{label}: {entry.get('error', '')}"[:200] for label, entry in _entries(timings)
              if entry.get("status") == "failed"]
    skipped = [f"{label} ({entry.get('error', '')})"[:200] for label, entry in _entries(timings)
               if entry.get("status") == "skipped"]
    result = StepResult(name, "passed", done.seconds, "", limit_s, done.log.name, {"timings": timings})
    if done.returncode != 0 or not timings:
        result.status = "failed"
        result.detail = _failed_run(name, done, limit_s, "the timing harness").detail
    elif failed:
        result.status = "failed"
        result.detail = f"{len(failed)} failed: " + "; ".join(failed)
    else:
        result.detail = headline(timings)
    if skipped:
        result.detail += f"; skipped: {'; '.join(skipped)}"
    return result


# --------------------------------------------------------------------------------------------
# The timing harness (runs in its own process: ``--timings-worker``)


def _entries(timings: dict):
    """(label, entry) for every measurement in a timings dict."""
    for backend, entry in timings.get("spectrum", {}).items():
        yield f"spectrum/{backend}", entry
    for n, solvers in timings.get("eigh", {}).items():
        for solver, entry in solvers.items():
            yield f"eigh{n}/{solver}", entry


def headline(timings: dict) -> str:
    ratios = timings.get("ratios", {})
    parts = [f"{key} x{value:.1f}" for key, value in ratios.items() if value is not None]
    return "; ".join(parts[:6]) or "no ratio (a baseline did not run)"


class Harness:
    """Times callables on one device: a warm-up call (compiles kernels, creates solver handles,
    grows the allocator's cache), then the median of up to ``repeats`` calls."""

    def __init__(self, device: str, budget_s: float, out: Path):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.deadline = time.perf_counter() + budget_s
        self.out = out
        # Per measurement: calls stop once this much time is spent; a call predicted to exceed it
        # (from a tenth and a fifth of the batch) is extrapolated instead of run, e.g.
        # torch.linalg.eigh for n > 32, which cuSOLVER runs one matrix at a time (seconds per
        # 10,000 matrices), so that one slow baseline cannot eat the other measurements' time.
        self.cap_s = 12.0 if self.device.type == "cuda" else 4.0
        self.repeats = 3
        # The warm-up runs on this many items, and its output is what the solvers are
        # cross-checked on; small on CPU, where the dry run only has to keep the harness working.
        self.check_batch = 256 if self.device.type == "cuda" else 32

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def timed(self, fn, n: int) -> tuple[float, object]:
        self.sync()
        start = time.perf_counter()
        result = fn(n)
        self.sync()
        return time.perf_counter() - start, result

    def measure(self, fn, batch: int) -> tuple[dict, object]:
        """fn(n) runs on the first n items. Returns (entry, fn(check_batch)'s output)."""
        if time.perf_counter() + 2 > self.deadline:
            return {"status": "skipped", "error": "out of the step's time budget"}, None
        try:
            _, check = self.timed(fn, min(batch, self.check_batch))  # the warm-up, kept for the cross-check
            entry = {"status": "passed", "batch": batch, "measured_batch": batch, "extrapolated": False}
            if batch >= 320:
                # A tenth of the batch, a multiple of 16 as the full batch is, so that Triton (which
                # specialises integer arguments on divisibility by 16) compiles nothing new for it.
                probe = batch // 10 // 16 * 16
                small = self.timed(fn, probe)[0]
                predicted, calls = small * batch / probe, 1
                if self.cap_s < predicted <= 2 * self.cap_s:
                    # Maybe too slow for whole-batch calls: predict from a line through two probes,
                    # so a fixed per-call cost is not multiplied by the batch. (Far over the cap,
                    # no fixed cost could explain it, and the second probe would cost the most.)
                    large = self.timed(fn, 2 * probe)[0]
                    slope = max(large - small, 0.0) / probe
                    predicted = large + slope * (batch - 2 * probe)
                    probe, calls = 2 * probe, 2
                if predicted > self.cap_s:
                    entry.update(ms=1000 * predicted, calls=calls, measured_batch=probe, extrapolated=True)
                    return entry, check
            times = [self.timed(fn, batch)[0]]
            while (len(times) < self.repeats and sum(times) + times[0] <= self.cap_s
                   and time.perf_counter() + times[0] < self.deadline):
                times.append(self.timed(fn, batch)[0])
            entry.update(ms=1000 * statistics.median(times), calls=len(times))
            return entry, check
        except Exception as error:  # noqa: BLE001 -- any backend error is a result to report
            return {"status": "failed", "error": f"{type(error).__name__}: {error}"[:500]}, None
        finally:
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()  # one solver's cached blocks must not starve the next

    def save(self, timings: dict) -> None:
        # Write-then-rename: the step may kill this process at its limit, mid-write.
        partial = self.out.with_suffix(".partial")
        partial.write_text(json.dumps(timings, indent=1))
        os.replace(partial, self.out)


def paper_encoder(torch, device):
    """The paper's MNIST encoder (784-256-256-512-32, BatchNorm + tanh) with random weights and
    randomised BatchNorm statistics (so the folded affine maps are not identities), eval mode."""
    from pullgeom.paper.models import PaperVAE

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    encoder = PaperVAE().encoder
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.1, 0.1, generator=generator)
    return encoder.eval().to(device)


def unavailable(reason: str, on_gpu: bool) -> dict:
    """The entry of a solver that cannot run here: on the GPU that is what the check is for (a
    failure); in the CPU dry run, a machine without a C++ compiler still checks the harness."""
    return {"status": "failed" if on_gpu else "skipped", "error": f"unavailable: {reason}"[:500]}


def _relative_gap(values, reference) -> float:
    """max |values - reference| relative to each sample's largest |eigenvalue| (both descending)."""
    scale = reference.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    return float(((values - reference).abs() / scale).max())


# The backend whose kernels the timings break down: on the GPU the cuda backend, whose GEMMs are
# cuBLAS's (torch's matmul inside the op) and whose other kernels are ours; on CPU the cpp backend,
# so the dry run keeps this code working.
PROFILED = {"cuda": "cuda", "cpu": "cpp"}
TOP_KERNELS = 10


def top_kernels(torch, fn, n: int, on_gpu: bool) -> list:
    """[[name, ms], ...]: the kernels (GPU) or ops (CPU) of one fn(n) call under torch.profiler,
    most time first, self time (a GPU kernel's own time; a CPU op's without its children)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        fn(n)
        if on_gpu:
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        # On the GPU the kernels themselves (a CPU op's device time is its kernels', counted there).
        if on_gpu and event.device_type == DeviceType.CPU:
            continue
        us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if us > 0:
            rows.append([event.key[:120], us / 1000])
    return sorted(rows, key=lambda row: -row[1])[:TOP_KERNELS]


def cross_check(entries: dict, checks: dict, reference: str, label: str, tolerance: float = 1e-3) -> None:
    """Mark as failed any solver whose eigenvalues on the warm-up batch differ from ``reference``'s
    by more than ``tolerance`` (float32: a right answer is ~1e-5 off): a fast wrong kernel must
    not pass the check."""
    if checks.get(reference) is None:
        return
    entries[reference]["reference"] = True
    for name, values in checks.items():
        if name == reference or values is None or entries[name].get("status") != "passed":
            continue
        gap = _relative_gap(values, checks[reference])
        entries[name]["max_rel_diff_vs_" + reference] = gap
        if not gap <= tolerance:  # NaN fails too
            entries[name]["status"] = "failed"
            entries[name]["error"] = (f"{label}: eigenvalues differ from {reference}'s by {gap:.2e} "
                                      f"(relative to the largest), more than {tolerance:g}")


def run_timings(device: str, inputs: int, matrices: int, budget_s: float, out: Path) -> dict:
    import torch

    import pullgeom
    from pullgeom.backends import REGISTRY
    from pullgeom.reference import jacrev_spectrum

    harness = Harness(device, budget_s, out)
    on_gpu = harness.device.type == "cuda"
    if not on_gpu:
        # The dry run checks the harness, not CPU speed: one thread keeps it from stalling in
        # OpenMP/LAPACK spin-waits when the CI machine's few cores are busy with other jobs.
        torch.set_num_threads(1)
    timings: dict = {"device": device, "dtype": "float32", "k": K, "inputs": inputs, "matrices": matrices,
                     "threads": torch.get_num_threads(), "spectrum": {}, "eigh": {}, "ratios": {},
                     # The cuda backend's GEMMs (cuBLAS), like the torch backend's, follow this
                     # (TF32 where "high" or "medium"); the timings are of the setting shown.
                     "float32_matmul_precision": torch.get_float32_matmul_precision()}

    # The paper's encoder, k = 5 plus the full nonzero spectrum (all_eigenvalues) per sample.
    encoder = paper_encoder(torch, harness.device)
    x = torch.rand(inputs, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(harness.device)
    backends = GPU_SPECTRUM_BACKENDS if on_gpu else CPU_SPECTRUM_BACKENDS
    checks: dict = {}
    for backend in (*backends, RECIPE):
        reason = None if backend == RECIPE else REGISTRY[backend].unavailable_reason(harness.device)
        if reason is not None:
            timings["spectrum"][backend] = unavailable(reason, on_gpu)
            checks[backend] = None
            continue
        if backend == RECIPE:
            def fn(n):
                return jacrev_spectrum(encoder, x[:n], k=K)[0][:, :K]
        else:
            def fn(n, backend=backend):
                # chunk_size: the whole batch in one pass, as the recipe (which has no chunking) does
                result = pullgeom.spectrum(encoder, x[:n], k=K, backend=backend, chunk_size=inputs)
                if result.backend != backend:
                    raise RuntimeError(f"asked for backend {backend!r}, {result.backend!r} ran")
                return result.eigenvalues
        entry, values = harness.measure(fn, inputs)
        if backend == PROFILED[harness.device.type] and entry["status"] == "passed":
            try:
                entry["top_kernels"] = top_kernels(torch, fn, inputs if on_gpu else harness.check_batch, on_gpu)
            except Exception as error:  # noqa: BLE001 -- the breakdown is extra; its failure is noted
                entry["top_kernels_error"] = f"{type(error).__name__}: {error}"[:300]
        timings["spectrum"][backend] = entry
        checks[backend] = None if values is None else values.float().cpu()
        harness.save(timings)
    # The torch backend is the reference; the recipe if torch failed (its eigh is of A A^T).
    reference = "torch" if checks.get("torch") is not None else RECIPE
    cross_check(timings["spectrum"], checks, reference, "the paper's encoder")

    # Batched symmetric eigensolvers on random symmetric matrices.
    from pullgeom.kernels import native

    # The baseline last: on the GPU it is the slowest (extrapolated), so a short budget cuts it
    # rather than one of pullgeom's solvers.
    solvers: dict = {"sym_eigh": native.sym_eigh}
    missing: dict[str, str] = {}
    if native.EXTENSION_ERROR is not None:
        missing["sym_eigh"] = native.EXTENSION_ERROR
    elif on_gpu and not native.extension_with_cuda():
        missing["sym_eigh"] = "the native extension has no CUDA kernels (built without FORCE_CUDA=1?)"
    if on_gpu:
        try:
            from pullgeom.kernels.triton import load_ops

            load_ops()
            solvers["triton_eigh"] = torch.ops.pullgeom.triton_eigh
        except Exception as error:  # noqa: BLE001 -- reported as this solver's failure
            solvers["triton_eigh"] = None
            missing["triton_eigh"] = f"{type(error).__name__}: {error}"[:500]
    solvers[EIGH_BASELINE] = torch.linalg.eigh
    generator = torch.Generator().manual_seed(2)
    for n in EIGH_SIZES:
        a = torch.randn(matrices, n, n, generator=generator)
        a = ((a + a.mT) / 2).to(harness.device)
        entries: dict = {}
        checks = {}
        timings["eigh"][str(n)] = entries
        for name, solver in solvers.items():
            if name in missing:
                entries[name], checks[name] = unavailable(missing[name], on_gpu), None
                continue

            def fn(m, solver=solver, a=a):
                values = solver(a[:m])[0]
                return values.sort(dim=1, descending=True).values  # eigh ascends, the others descend

            entries[name], values = harness.measure(fn, matrices)
            checks[name] = None if values is None else values.float().cpu()
            harness.save(timings)
        cross_check(entries, checks, EIGH_BASELINE, f"{n} x {n}")
        del a

    timings["ratios"] = ratios(timings)
    harness.save(timings)
    return timings


def _ms(entry: dict | None) -> float | None:
    if entry is None or entry.get("status") != "passed":
        return None
    return entry.get("ms")


def ratios(timings: dict) -> dict:
    """Speedups: each fast backend over the recipe and over autograd; each eigensolver over
    torch.linalg.eigh. None where either side did not run."""
    out: dict = {}
    spectrum = timings.get("spectrum", {})
    for backend in spectrum:
        if backend in BASELINES:
            continue
        for baseline in BASELINES:
            fast, slow = _ms(spectrum.get(backend)), _ms(spectrum.get(baseline))
            out[f"{backend} over {baseline}"] = None if not fast or slow is None else slow / fast
    for n, solvers in timings.get("eigh", {}).items():
        for name in solvers:
            if name == EIGH_BASELINE:
                continue
            fast, slow = _ms(solvers.get(name)), _ms(solvers.get(EIGH_BASELINE))
            out[f"{name} over {EIGH_BASELINE} (n={n})"] = None if not fast or slow is None else slow / fast
    return out


# --------------------------------------------------------------------------------------------
# Environment and report

ENVIRONMENT_PROBE = """
import json, platform, torch
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available()}
try:
    import triton
    env["triton"] = triton.__version__
except Exception as error:
    env["triton"] = f"unavailable: {error}"
if env["cuda_available"]:
    env["device"] = torch.cuda.get_device_name(0)
    env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
else:
    env["device"] = "cpu (" + (platform.processor() or platform.machine()) + ")"
print(json.dumps(env))
"""


def environment() -> dict:
    """Versions and the device, read in a child process: the driver itself imports no torch, so a
    broken install shows up as a step failure instead of killing the report."""
    env: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        probe = subprocess.run([sys.executable, "-c", ENVIRONMENT_PROBE], capture_output=True, text=True,
                               timeout=ENVIRONMENT_LIMIT_S, cwd=ROOT, env=step_env())
        env.update(json.loads(probe.stdout.strip().splitlines()[-1]))
    except (subprocess.SubprocessError, ValueError, IndexError) as error:
        env["error"] = f"environment probe failed: {error}"
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        try:
            version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=10).stdout
            env["nvcc"] = version.strip().splitlines()[-1] if version.strip() else "unknown"
        except (subprocess.SubprocessError, OSError):
            env["nvcc"] = "unknown"
    return env


def _format_ms(entry: dict) -> str:
    if entry.get("status") != "passed":
        return entry.get("status", "?")
    return f"{entry['ms']:.1f}"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu_check ({report['mode']})", "",
             f"{env.get('date')}: torch {env.get('torch')} (CUDA {env.get('cuda')}), "
             f"triton {env.get('triton')}, device {env.get('device')}", "",
             "| step | status | seconds | detail |", "|---|---|---:|---|"]
    for step in report["steps"]:
        detail = step["detail"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']:.1f} | {detail} |")
    timings = report.get("timings") or {}
    if timings:
        lines += ["", f"Timings on {timings.get('device')}, {timings.get('dtype')}, k = {timings.get('k')} "
                  "plus the full spectrum; median of up to 3 calls after a warm-up.", "",
                  "| what | batch | ms | calls | note |", "|---|---:|---:|---:|---|"]
        for label, entry in _entries(timings):
            note = entry.get("error", "")
            if entry.get("reference"):
                note = "reference of the eigenvalue cross-check"
            if entry.get("extrapolated"):
                note = f"extrapolated from calls on up to {entry['measured_batch']} items"
            gaps = [f"{value:.1e}" for key, value in entry.items() if key.startswith("max_rel_diff")]
            if gaps and not note:
                note = f"max rel. diff {gaps[0]}"
            note = note.replace("|", "\\|").replace("\n", " ")[:160]
            lines.append(f"| {label} | {entry.get('batch', '')} | {_format_ms(entry)} | "
                         f"{entry.get('calls', '')} | {note} |")
        for backend, entry in timings.get("spectrum", {}).items():
            if entry.get("top_kernels"):
                lines += ["", f"Where {backend}'s time goes (one call, torch.profiler, self time; float32 "
                          f"matmul precision {timings.get('float32_matmul_precision')!r}):", "",
                          "| kernel | ms |", "|---|---:|"]
                lines += [f"| `{name.replace('|', '/')}` | {ms:.2f} |" for name, ms in entry["top_kernels"]]
        lines += ["", "| speedup | x |", "|---|---:|"]
        for key, value in timings.get("ratios", {}).items():
            lines.append(f"| {key} | {'' if value is None else f'{value:.1f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="run only what needs no GPU, small sizes")
    parser.add_argument("--skip", action="append", choices=STEP_NAMES, metavar="STEP",
                        help=f"report STEP as skipped (repeatable; one of {', '.join(STEP_NAMES)})")
    parser.add_argument("outdir", nargs="?", type=Path)
    # The timing harness, run by the driver in a child process.
    parser.add_argument("--timings-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=int, default=GPU_SIZES["inputs"], help=argparse.SUPPRESS)
    parser.add_argument("--matrices", type=int, default=GPU_SIZES["matrices"], help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.timings_worker:
        run_timings(args.device, args.inputs, args.matrices, args.budget_s, args.out)
        return 0
    if args.outdir is None:
        parser.error("OUTDIR is required")

    outdir = args.outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    dry = args.cpu_dry_run
    env = environment()
    gpu_visible = bool(env.get("cuda_available"))
    no_gpu = "torch.cuda.is_available() is False here: " + env.get("error", "no CUDA device visible")

    limits = DRY_LIMITS_S if dry else GPU_LIMITS_S
    skip = set(args.skip or ())

    def skipped(name: str) -> StepResult | None:
        if name in skip:
            return StepResult(name, "skipped", 0.0, "--skip")
        if dry and name in GPU_ONLY_STEPS:
            return StepResult(name, "skipped", 0.0, DRY_RUN_REASON)
        if not dry and name in DRY_ONLY_STEPS:
            return StepResult(name, "skipped", 0.0, GPU_RUN_REASON)
        return None

    sm90 = skipped(SM90_STEP) or start_sm90_step(outdir, limits[SM90_STEP])
    steps: list[StepResult] = [skipped("build") or build_step(outdir, limits["build"])]
    for name, files, selection in (("cuda_tests", CUDA_TEST_FILES, CUDA_TEST_SELECTION),
                                   ("triton_tests", TRITON_TEST_FILES, None)):
        result = skipped(name)
        if result is None and not gpu_visible:  # the tests would pass on CPU (Triton interpreted)
            result = StepResult(name, "failed", 0.0, no_gpu, limits[name])
        steps.append(result or pytest_step(name, files, outdir, limits[name], selection,
                                           need_cuda_cases=name == "cuda_tests"))
    steps.append(skipped(EMULATED_STEP) or pytest_step(EMULATED_STEP, ["tests/test_cuda_emulated.py"], outdir,
                                                       limits[EMULATED_STEP], None, need_cuda_cases=False))
    # Joined before the timings, so no compile competes with the measured calls.
    steps.append(finish_sm90_step(sm90))
    result = skipped("timings")
    if result is None and not dry and not gpu_visible:
        result = StepResult("timings", "failed", 0.0, no_gpu, limits["timings"])
    steps.append(result or timings_step(outdir, limits["timings"], "cpu" if dry else "cuda",
                                        DRY_SIZES if dry else GPU_SIZES))

    timings = next((step.extra.get("timings", {}) for step in steps if step.name == "timings"), {})
    report = {"mode": "cpu-dry-run" if dry else "gpu", "steps": [step.as_json() for step in steps],
              "timings": timings, "environment": env,
              "limits_s": {"total": TOTAL_LIMIT_S, "environment": ENVIRONMENT_LIMIT_S, **limits}}
    if not dry:
        report["limits_s"]["worst_case"] = worst_case_s(limits)
    (outdir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (outdir / "gpu_check.md").write_text(markdown(report))
    for step in steps:
        print(f"{step.name:20s} {step.status:8s} {step.seconds:7.1f} s  {step.detail}")
    print(f"report: {outdir / 'gpu_check.md'}")
    return 1 if any(step.status == "failed" for step in steps) else 0


if __name__ == "__main__":
    sys.exit(main())
