"""Atomic file writes and safe checkpoints (safetensors + JSON config, never pickle).

Every file is written to a temporary name in the same directory and renamed with
``os.replace``, so a reader (or a resumed run) sees either the old file or the new one,
never half of one. A checkpoint directory holds ``model.safetensors`` and ``config.json``;
``config.json`` is written last and marks the checkpoint complete.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from pullgeom.paper.models import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match its config."""


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    # mkstemp makes the file 0600; give it the permissions a plain open() would (0666 minus umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as strict JSON, written atomically: NaN and +-inf (an undefined Spearman, a ratio
    over a zero baseline) become null, since standard JSON has no such numbers and strict
    parsers reject Python's NaN / Infinity."""
    text = json.dumps(_finite_or_null(obj), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _finite_or_null(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_null(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(value) for value in obj]
    return obj


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor],
                        metadata: dict | None = None) -> None:
    """safetensors file of contiguous CPU copies of ``tensors``, written atomically."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, extra: dict | None = None) -> None:
    """``directory/model.safetensors`` + ``directory/config.json`` (model.config plus ``extra``)."""
    directory = Path(directory)
    atomic_save_tensors(directory / WEIGHTS, model.state_dict())
    atomic_write_json(directory / CONFIG, {**model.config, **(extra or {})})


def is_checkpoint(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return (directory / CONFIG).is_file() and (directory / WEIGHTS).is_file()


def load_checkpoint(directory: str | os.PathLike,
                    device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, config dict) from a checkpoint directory; weights via safetensors only."""
    directory = Path(directory)
    if not is_checkpoint(directory):
        raise CheckpointError(f"'{directory}' is not a pullgeom checkpoint (needs {WEIGHTS} and {CONFIG}); "
                              "pass a directory written by `pullgeom train` (e.g. OUT/models/<name>)")
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"'{directory / CONFIG}' is not valid JSON ({error}); the checkpoint is "
                              "corrupt: train it again with `pullgeom train`") from None
    try:
        model = build_model(config)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"'{directory / CONFIG}' does not describe a pullgeom model ({error!r}); "
                              "pass a directory written by `pullgeom train`") from None
    try:
        # safetensors only parses a JSON header and raw tensor bytes: nothing in the file can run code.
        state = load_file(str(directory / WEIGHTS), device=str(device))
    except SafetensorError as error:
        raise CheckpointError(f"'{directory / WEIGHTS}' is not a readable safetensors file ({error}): it is "
                              "truncated, corrupt or another format (pullgeom never loads pickles); "
                              "train it again with `pullgeom train`") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"the weights in '{directory}' do not match its config.json "
                              f"({error})") from None
    return model.to(device).eval(), config


def find_checkpoints(path: str | os.PathLike) -> list[Path]:
    """A checkpoint directory itself, or every checkpoint under ``path/models/`` (a sweep), sorted."""
    path = Path(path)
    if is_checkpoint(path):
        return [path]
    models = path / "models"
    return sorted(p for p in models.iterdir() if is_checkpoint(p)) if models.is_dir() else []
