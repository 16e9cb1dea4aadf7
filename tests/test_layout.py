"""The package's shape: the library apart from the paper pipeline, names that say what they are,
and the old import paths that keep working (with a DeprecationWarning) for one release."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

import pullgeom

PACKAGE = Path(pullgeom.__file__).resolve().parent
PIPELINE_ONLY = ("pullgeom.paper", "tqdm", "safetensors")


def core_modules() -> list[Path]:
    """Every module but the pipeline's, and but ``__main__`` (``python -m pullgeom``: the CLI's
    entry point, which nothing imports)."""
    return [path for path in PACKAGE.rglob("*.py")
            if "paper" not in path.relative_to(PACKAGE).parts and path.name != "__main__.py"]


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_core_module_imports_the_pipeline():
    offenders = {str(path.relative_to(PACKAGE)): sorted(name for name in imported_names(path)
                                                       if name.startswith(PIPELINE_ONLY))
                 for path in core_modules()}
    assert not {path: names for path, names in offenders.items() if names}


def test_a_spectrum_loads_no_pipeline_module():
    """The import closure of a whole ``spectrum`` call, in a fresh interpreter."""
    code = ("import sys, torch, pullgeom\n"
            "enc = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))\n"
            "class E(torch.nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__(); self.body = enc\n"
            "    def forward(self, x):\n"
            "        return self.body(x).chunk(2, dim=-1)\n"
            "pullgeom.spectrum(E().eval(), torch.rand(3, 6), k=2, backend='torch')\n"
            "pullgeom.entropy_estimate(E().eval(), torch.rand(3, 6), probes=2)\n"
            # tqdm is left out: torch itself imports it when it is installed (torch.hub).
            "print(sorted(m for m in sys.modules if m.startswith(('pullgeom.paper', 'safetensors'))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_core_depends_on_torch_alone():
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text())["project"]
    # ninja: the first-use compile of the C++ kernels (pullgeom.kernels.native).
    assert sorted(dep.split(">")[0].split("=")[0] for dep in project["dependencies"]) == ["ninja", "torch"]
    assert project["scripts"]["pullgeom"] == "pullgeom.__main__:main"
    assert {"numpy", "tqdm", "safetensors"} <= set(project["optional-dependencies"]["paper"])


def all_modules() -> list[str]:
    return [info.name for info in pkgutil.walk_packages(pullgeom.__path__, "pullgeom.")]


def test_no_module_is_named_like_a_standard_library_module():
    clashes = [name for name in all_modules() if name.rsplit(".", 1)[1] in sys.stdlib_module_names]
    assert not clashes


def test_no_attribute_shadows_a_submodule():
    """``pkg.name`` is the module ``pkg.name`` itself, never a function that hides it."""
    shadowed = []
    for name in all_modules():
        if name.startswith("pullgeom.kernels.triton"):
            continue  # needs triton; walked below only when importable
        module = importlib.import_module(name)
        parent, _, child = name.rpartition(".")
        if getattr(sys.modules[parent], child) is not module:
            shadowed.append(name)
    assert not shadowed


@pytest.mark.parametrize("old, new", [
    ("pullgeom.ops", "pullgeom.kernels.native"),
    ("pullgeom.encoder", "pullgeom.encoder_output"),
    ("pullgeom.backends.mlp_chain", "pullgeom.backends.torch_backend"),
    ("pullgeom.models", "pullgeom.paper.models"),
    ("pullgeom.io", "pullgeom.paper.outputs"),
])
def test_old_import_paths_work_with_a_deprecation_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


@pytest.mark.parametrize("old, name, new", [
    ("pullgeom.plan", "trace_chains", "pullgeom.tracing.fx_trace"),
    ("pullgeom.plan", "ACTIVATIONS", "pullgeom.tracing.activations"),
    ("pullgeom.plan", "MLPPlan", "pullgeom.tracing.mlp_plan"),
    ("pullgeom.report", "score_dataset", "pullgeom.paper.evaluation"),
    ("pullgeom.report", "scores_csv", "pullgeom.paper.report"),
])
def test_split_modules_keep_their_names_at_the_old_path(old, name, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_backends_call_is_deprecated_for_list_backends():
    with pytest.warns(DeprecationWarning, match="list_backends"):
        old = pullgeom.backends("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert old == pullgeom.list_backends("cpu")


def test_the_command_without_the_paper_extra_says_what_to_install():
    code = ("import sys; sys.modules['safetensors'] = None  # as if the paper extra were not installed\n"
            "from pullgeom.__main__ import main; sys.exit(main(['--help']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("pullgeom: the pullgeom paper pipeline (and the `pullgeom` command) needs "
                                     "safetensors: pip install 'pullgeom[paper,plots]'")
