"""The Khan & Storkey (AISTATS 2023) pipeline on top of the library: datasets, models, training,
attack evaluation, reports, figures, the ``pullgeom`` command and its torchrun sharding.

The library (``pullgeom.spectrum`` and the rest of ``pullgeom``) never imports this package; it
needs the ``paper`` extra: ``pip install 'pullgeom[paper,plots]'``.
"""

import importlib.util

_MISSING = [name for name in ("numpy", "tqdm", "safetensors") if importlib.util.find_spec(name) is None]
if _MISSING:
    raise ImportError(f"the pullgeom paper pipeline (and the `pullgeom` command) needs "
                      f"{', '.join(_MISSING)}: pip install 'pullgeom[paper,plots]'")
