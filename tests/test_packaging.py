"""Packaging: what ``pip install .`` ships, and how the native kernels reach a fresh install.

- A wheel built in pip's isolated build environment (no torch there) is pure Python plus the C++
  kernel sources as ``pullgeom/_csrc``, never a compiled ``_C``, not even one that an earlier
  build left in the checkout's ``build/`` folder. The sdist carries ``csrc/``.
- Without a loadable prebuilt ``pullgeom._C``, the first use compiles the CPU kernels against the
  running torch (``pullgeom.kernels.native``, step 3), a later process loads that build at import (step 2),
  and the compiled kernels agree with the ``torch`` backend. Without a C++ compiler the error says
  so and the pure-torch backends still serve.
- pullgeom and its CLI run without matplotlib (the ``plots`` extra).

The builds run in subprocesses on copies of the checkout, so the checkout and this process's
loaded extension are left alone. About a minute and a half on two cores, most of it the compile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from pullgeom.kernels import native as ops

CHECKOUT = Path(__file__).resolve().parents[1]
# What setup.py and MANIFEST.in build from; tests/, benchmarks/ and results/ play no part.
BUILD_INPUTS = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "csrc", "pullgeom"]
# The prebuilt extension or the first-use build must not leak into a copy built from.
NOT_SOURCES = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "_csrc")

needs_checkout = pytest.mark.skipif(not (CHECKOUT / "setup.py").is_file(),
                                    reason="the tests are not inside a pullgeom checkout")

# Makes `import pullgeom._C` fail in a child process as if the extension were not built.
HIDE_PREBUILT = textwrap.dedent("""
    import importlib.abc, sys

    class HidePrebuilt(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "pullgeom._C":
                raise ModuleNotFoundError("hidden by the test", name=name)
            return None

    sys.meta_path.insert(0, HidePrebuilt())
""")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that imports the same pullgeom as this one."""
    return {**os.environ, "PYTHONPATH": str(Path(ops.__file__).parents[1]), **extra}


def run_python(code: str, env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd,
                            timeout=timeout)
    assert result.returncode == 0, (f"child failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    """The build inputs of the checkout, copied without any compiled file."""
    root = tmp_path_factory.mktemp("checkout")
    for name in BUILD_INPUTS:
        source = CHECKOUT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=NOT_SOURCES)
        else:
            shutil.copy2(source, root / name)
    return root


def test_kernel_sources_are_found_and_complete():
    root = ops.kernel_sources_dir()
    assert root is not None, "neither pullgeom/_csrc nor the checkout's csrc/ is there"
    names = {path.relative_to(root).as_posix() for path in ops._cpu_sources(root)}
    # setup.py's CppExtension sources, as the first-use build lists them.
    assert {"pullgeom.cpp", "cpu/plan_gram_cpu.cpp", "cpu/sym_eigh_cpu.cpp", "cpu/lanczos_cpu.cpp"} <= names
    assert not any(name.startswith("cuda/") for name in names)
    assert (root / "checks.h").is_file() and (root / "cuda" / "kernels.h").is_file()


def test_ninja_from_the_ninja_package_is_found_off_path(monkeypatch, tmp_path):
    """A virtualenv's python run without activating it has no ninja on PATH; the ``ninja``
    dependency's own binary is put on PATH for the build."""
    pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", str(tmp_path))
    found, directory = ops.ninja_directory()
    assert found and directory is not None and shutil.which("ninja", path=directory) is not None


@needs_checkout
def test_isolated_wheel_ships_the_sources_and_no_binary(source_copy, tmp_path):
    # A binary that an earlier build left behind must not reach the wheel.
    stale = source_copy / "build" / "lib" / "pullgeom" / "_C.cpython-311-x86_64-linux-gnu.so"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    wheels = tmp_path / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir", str(wheels),
               str(source_copy)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = wheels.glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # nothing compiled
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(path.relative_to(CHECKOUT / "csrc").as_posix() for path in (CHECKOUT / "csrc").rglob("*")
                     if path.suffix in (".h", ".cuh", ".cpp", ".cu"))
    missing = [name for name in sources if f"pullgeom/_csrc/{name}" not in names]
    assert sources and not missing, f"kernel sources missing from the wheel: {missing}"
    binaries = [name for name in names if Path(name).name.startswith("_C.")]
    assert binaries == [], binaries
    assert "pullgeom/paper/assets/t10k-images-idx3-ubyte.gz" in names


@needs_checkout
def test_sdist_ships_csrc(source_copy, tmp_path):
    code = f"import setuptools.build_meta as backend; print(backend.build_sdist({str(tmp_path)!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=source_copy,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sdist = tmp_path / result.stdout.strip().splitlines()[-1]
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    for name in ("csrc/pullgeom.cpp", "csrc/cpu/plan_gram_cpu.cpp", "csrc/cuda/plan_gram_cuda.cu",
                 "csrc/cuda/block_reduce.cuh", "csrc/checks.h", "setup.py", "MANIFEST.in",
                 "pullgeom/paper/assets/t10k-labels-idx1-ubyte.gz"):
        assert name in names, f"{name} missing from the sdist"
    assert not any(name.endswith((".so", ".pyd", ".o")) for name in names)


def test_first_use_compiles_the_cpu_kernels_then_loads_them_at_import(tmp_path):
    """ops step 3 in one process, step 2 in the next, both with the prebuilt extension hidden."""
    env = child_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    first = run_python(HIDE_PREBUILT + textwrap.dedent("""
        import os, torch, pullgeom
        from pullgeom.kernels import native as ops
        from torch import nn

        assert ops._extension is None, "loaded something before first use"
        available = {info.name: info for info in pullgeom.list_backends()}  # the first use: compiles
        assert available["cpp"].available, available["cpp"].reason
        assert ops._extension.__file__.startswith(os.environ["TORCH_EXTENSIONS_DIR"]), ops._extension.__file__

        torch.manual_seed(0)
        encoder = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 12),
                                nn.Linear(12, 10)).double().eval()
        class Heads(nn.Module):  # mu and logvar from one split head
            def __init__(self):
                super().__init__()
                self.body = encoder
            def forward(self, x):
                return self.body(x).chunk(2, dim=-1)
        x = torch.randn(6, 20, dtype=torch.float64)
        compiled = pullgeom.spectrum(Heads().eval(), x, k=3, backend="cpp")
        reference = pullgeom.spectrum(Heads().eval(), x, k=3, backend="torch")
        assert compiled.backend == "cpp"
        # float64 throughout: both paths agree to round-off of the largest eigenvalue.
        torch.testing.assert_close(compiled.all_eigenvalues, reference.all_eigenvalues, rtol=1e-10,
                                   atol=1e-12 * float(reference.all_eigenvalues.max()))
        overlap = (compiled.eigenvectors * reference.eigenvectors).sum(-1)
        torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-8)
    """), env, tmp_path, timeout=540)
    assert "compiling the C++ CPU kernels" in first.stderr, first.stderr[-2000:]

    second = run_python(HIDE_PREBUILT + textwrap.dedent("""
        import os
        from pullgeom.kernels import native as ops

        assert ops._extension is not None, "the cached build did not load at import"
        assert ops._extension.__file__.startswith(os.environ["TORCH_EXTENSIONS_DIR"])
        assert ops.EXTENSION_ERROR is None
    """), env, tmp_path)
    assert "compiling" not in second.stderr, second.stderr[-2000:]


def test_without_a_compiler_the_error_says_so_and_torch_backends_serve(tmp_path):
    env = child_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"), CXX="no-such-c++-compiler")
    run_python(HIDE_PREBUILT + textwrap.dedent("""
        import torch, pullgeom
        from pullgeom.kernels import native as ops
        from torch import nn

        error = ops.EXTENSION_ERROR
        assert error is not None and "C++ compiler" in error and "no-such-c++-compiler" in error, error
        assert ops.load_extension() == error  # answered once, not retried
        reasons = {info.name: info.reason for info in pullgeom.list_backends()}
        assert reasons["cpp"] == error, reasons

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.body, self.mu, self.logvar = nn.Linear(12, 8), nn.Linear(8, 3), nn.Linear(8, 3)
            def forward(self, x):
                h = torch.tanh(self.body(x))
                return self.mu(h), self.logvar(h)
        encoder = Encoder().double().eval()
        x = torch.randn(4, 12, dtype=torch.float64)
        assert pullgeom.spectrum(encoder, x, k=2).backend != "cpp"
        try:
            ops.sym_eigh(torch.eye(3, dtype=torch.float64)[None])
        except RuntimeError as failure:
            assert "C++ compiler" in str(failure), failure
        else:
            raise AssertionError("an op ran without kernels")
    """), env, tmp_path)
    assert not (tmp_path / "extensions").exists() or not any((tmp_path / "extensions").rglob("*.so"))


def test_pullgeom_and_its_cli_run_without_matplotlib(tmp_path):
    """matplotlib is the optional ``plots`` extra: training and scoring write their numbers and
    skip the figures."""
    run_python(textwrap.dedent(f"""
        import sys
        sys.modules["matplotlib"] = None  # `import matplotlib` raises ImportError
        import pullgeom
        from pullgeom.paper import cli
        from pullgeom.paper.figures import pyplot_or_none

        assert pyplot_or_none() is None
        out = {str(tmp_path)!r}
        assert cli.main(["--quiet", "train", "--dataset", "mnist-small", "--beta", "1", "--limit", "64",
                         "--batch-size", "32", "--epochs", "1", "--out", out + "/train"]) == 0
        import contextlib, io
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert cli.main(["--quiet", "score", "--checkpoint", out + "/train/models/beta=1_mixup=0",
                             "--dataset", "mnist-small", "--limit", "8", "--out", out + "/scores"]) == 0
        assert "matplotlib is not installed, so no figures were drawn" in err.getvalue(), err.getvalue()
        assert "matplotlib" not in sys.modules or sys.modules["matplotlib"] is None
    """), child_env(), tmp_path)
    assert (tmp_path / "scores" / "scores.csv").is_file()
    assert not list(tmp_path.rglob("*.png"))
