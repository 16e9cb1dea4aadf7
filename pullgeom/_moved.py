"""Old import paths of modules that moved, kept working for one release with a DeprecationWarning.

``import pullgeom.plan`` (say) finds no file any more; the finder installed here answers for the
names in ``MOVED`` with the module at its new path, after a warning naming that path. A module
that was split answers with a module holding the public names of its parts. The
pipeline's new home, ``pullgeom.paper``, is imported only when an old pipeline path is asked for:
the library itself never imports it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {
    "pullgeom.ops": "pullgeom.kernels.native",
    "pullgeom.triton": "pullgeom.kernels.triton",
    "pullgeom.plan": ("pullgeom.tracing.mlp_plan", "pullgeom.tracing.fx_trace",
                      "pullgeom.tracing.activations"),
    "pullgeom.layer_chain": "pullgeom.tracing.layer_chain",
    "pullgeom.encoder": "pullgeom.encoder_output",
    "pullgeom.decoder_metric": "pullgeom.latent_metric",
    "pullgeom.backends.mlp_chain": "pullgeom.backends.torch_backend",
    "pullgeom.backends.native": "pullgeom.backends.cpp_cuda_backends",
    "pullgeom.backends.autograd": "pullgeom.backends.autograd_backend",
    "pullgeom.backends.lanczos": "pullgeom.backends.lanczos_backend",
    "pullgeom.attack": "pullgeom.paper.attacks",
    "pullgeom.cli": "pullgeom.paper.cli",
    "pullgeom.data": "pullgeom.paper.datasets",
    "pullgeom.models": "pullgeom.paper.models",
    "pullgeom.train": "pullgeom.paper.training",
    "pullgeom.report": ("pullgeom.paper.report", "pullgeom.paper.evaluation"),
    "pullgeom.figures": "pullgeom.paper.figures",
    "pullgeom.distributed": "pullgeom.paper.distributed",
    "pullgeom.io": "pullgeom.paper.outputs",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        parts = (new,) if isinstance(new, str) else new
        warnings.warn(f"{spec.name} moved to {' and '.join(parts)}; the old path will be removed in the next "
                      "release", DeprecationWarning, stacklevel=2)
        if len(parts) == 1:
            return importlib.import_module(new)
        merged = types.ModuleType(spec.name, f"Deprecated: the public names of {', '.join(parts)}.")
        for part in reversed(parts):  # the first part wins a name both define
            module = importlib.import_module(part)
            merged.__dict__.update({name: value for name, value in vars(module).items()
                                    if not name.startswith("_")})
        return merged

    def exec_module(self, module) -> None:
        """The module was executed under its new name already."""


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
