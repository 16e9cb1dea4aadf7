"""Build and run pullgeom's CUDA kernels under the host-side CUDA emulation (cuda_emulation.h).

``build(op)`` copies csrc/cuda and csrc/common to a build folder, rewrites the CUDA syntax g++
cannot take or the emulation must see (launches ``k<<<grid, block, shared, stream>>>(args)``, and
``__shared__`` declarations, which become per-block poisoned storage; nothing else is touched),
and compiles the op's driver (tests/cuda_emulation/<op>_driver.cpp, which includes the rewritten
<op>_cuda.cu: the launchers and kernels as shipped) with g++, one translation unit. The binary is
cached under the hash of everything that went into it, so only a source change recompiles.
``run(binary, cases, schedules)`` writes the cases, runs the binary once for all of them, and
reads back one ``Run`` per case and schedule.

``mutations`` edit the sources before the rewrite (the tests use them to remove a barrier and
check that the emulation notices).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
OPS = ("sym_eigh", "lanczos", "plan_gram")
# Thread orders between barriers: thread 0 first, last first, and a seeded random permutation
# drawn anew for every phase (block orders follow the same rule).
SCHEDULES = ("forward", "reverse", "random:20231124")
CXX = os.environ.get("PULLGEOM_EMULATION_CXX") or shutil.which("g++")
# -O1: quick to compile, and fast enough to run. -ffp-contract=off: no fused multiply-adds, so
# results are the same on every host (nvcc does contract a * b + c into FMAs on the GPU: the
# emulation's float rounding differs from the GPU's in the last bits, which the tests' tolerances,
# set by the algorithms' accuracy, absorb).
FLAGS = ("-O1", "-std=c++20", "-g0", "-Wall", "-Wno-unknown-pragmas", "-ffp-contract=off")
if platform.machine() in ("x86_64", "AMD64"):
    # The fibers' own context switch (cuda_emulation.h) returns to addresses it pushed: keep the
    # binary off CET shadow stacks, which some toolchains mark binaries ready for by default.
    FLAGS += ("-fcf-protection=none",)
SUPPORTED = sys.platform.startswith("linux") and CXX is not None

# kernel<T><<<grid, block, shared, stream>>>(  ->  ::cuda_emu::launch(kernel<T>, grid, ...)(
LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:\s*<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
# extern __shared__ T name[];  ->  T* name = static_cast<T*>(::cuda_emu::dynamic_shared_memory());
EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:]*(?:\s+[A-Za-z_]\w*)*?)\s+(\w+)\s*\[\s*\]\s*;")


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` (which must occur exactly once) in csrc/``path`` (e.g. "cuda/x.cu") by
    ``new``, which may test ``::cuda_emu::mutant("name")`` to break the kernel only when ``run``
    turns that mutant on."""
    path: str
    old: str
    new: str

    @staticmethod
    def without(name: str, path: str, old: str, barrier: str = "__syncthreads();") -> "Mutation":
        """The mutant ``name``: ``old`` with its one ``barrier`` skipped while the mutant is on."""
        if old.count(barrier) != 1:
            raise ValueError(f"{old!r} must hold exactly one {barrier}")
        guarded = f"if (!::cuda_emu::mutant({name!r})) {barrier}".replace("'", '"')
        return Mutation(path, old, old.replace(barrier, guarded))


# __shared__ T a[N][M], b;  ->  auto& a = ::cuda_emu::shared_variable<T[N][M], __COUNTER__>(); auto& b = ...
STATIC_SHARED = re.compile(r"(?<!\w)__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([^;{}()]+);")
DECLARATOR = re.compile(r"^(?:(.*?)\s*\b)?([A-Za-z_]\w*)\s*((?:\[[^\]]*\]\s*)*)$")


def _static_shared(match: re.Match) -> str:
    declarators, depth, start = [], 0, 0
    body = match[1]
    for i, c in enumerate(body):
        if c in "[<":
            depth += 1
        elif c in "]>":
            depth -= 1
        if c == "," and depth == 0:
            declarators.append(body[start:i])
            start = i + 1
    declarators.append(body[start:])
    first = DECLARATOR.match(declarators[0].strip())
    if first is None or not first[1]:
        raise ValueError(f"a __shared__ declaration the emulation's rewrite does not know: {match[0]!r}")
    element_type = first[1]
    out = []
    for d in declarators:
        parts = DECLARATOR.match(d.strip())
        if parts is None or (d is not declarators[0] and parts[1]):
            raise ValueError(f"a __shared__ declaration the emulation's rewrite does not know: {match[0]!r}")
        dims = "".join(parts[3].split())
        out.append(f"auto& {parts[2]} = ::cuda_emu::shared_variable<{element_type}{dims}, __COUNTER__>();")
    return " ".join(out)


def emulation_text(text: str) -> tuple[str, dict[str, int]]:
    """The source with launches and shared memory declarations rewritten; the counts of each."""
    text, externs = EXTERN_SHARED.subn(
        lambda m: f"{m[1]}* {m[2]} = static_cast<{m[1]}*>(::cuda_emu::dynamic_shared_memory());", text)
    text, statics = STATIC_SHARED.subn(_static_shared, text)
    text, launches = LAUNCH.subn(lambda m: f"::cuda_emu::launch({m[1]}, {m[2]})(", text)
    if "<<<" in text or "extern __shared__" in text:
        raise ValueError("a launch or extern __shared__ declaration the emulation's rewrite does not know")
    return text, {"launches": launches, "extern_shared": externs, "static_shared": statics}


def prepared_sources(mutations: Sequence[Mutation] = ()) -> dict[str, str]:
    """Relative path (cuda/..., common/...) -> the text g++ compiles."""
    sources = {}
    for folder in ("cuda", "common"):
        for path in sorted((CSRC / folder).iterdir()):
            if path.suffix in (".h", ".cuh", ".cu"):
                sources[f"{folder}/{path.name}"] = path.read_text()
    for m in mutations:
        count = sources[m.path].count(m.old)
        if count != 1:
            raise ValueError(f"mutation of {m.path}: {m.old!r} occurs {count} times, not once")
        sources[m.path] = sources[m.path].replace(m.old, m.new)
    return {name: emulation_text(text)[0] for name, text in sources.items()}


# The emulation's own files that every binary depends on.
_EMULATION_FILES = (HERE / "cuda_emulation.h", HERE / "driver.h", HERE / "include" / "cuda_runtime.h")


def _compiler_version() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout


def default_cache_dir() -> Path:
    return Path(os.environ.get("PULLGEOM_EMULATION_CACHE")
                or Path(tempfile.gettempdir()) / f"pullgeom-cuda-emulation-{os.getuid()}")


def build(driver: str | Path, cache_dir: Path | None = None, mutations: Sequence[Mutation] = (),
          extra_flags: Sequence[str] = ()) -> Path:
    """The emulated binary of ``driver`` (an op of OPS: its tests/cuda_emulation/<op>_driver.cpp;
    or the path of a C++/CUDA file), built or taken from the cache. The driver's own text goes
    through the same rewrite as the kernel sources."""
    if not SUPPORTED:
        raise RuntimeError("the CUDA emulation needs Linux and g++")
    driver = HERE / f"{driver}_driver.cpp" if driver in OPS else Path(driver)
    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    sources = prepared_sources(mutations)
    driver_text = emulation_text(driver.read_text())[0]
    digest = hashlib.sha256()
    for part in [_compiler_version(), *FLAGS, *extra_flags, driver.name, driver_text]:
        digest.update(part.encode() + b"\0")
    for path in _EMULATION_FILES:
        digest.update(path.read_bytes() + b"\0")
    for name, text in sorted(sources.items()):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    binary = cache_dir / f"{driver.stem}-{digest.hexdigest()[:20]}"
    if binary.is_file():
        return binary
    with tempfile.TemporaryDirectory(dir=cache_dir) as work:
        work = Path(work)
        for name, text in sources.items():
            (work / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            (work / "src" / name).write_text(text)
        (work / driver.name).write_text(driver_text)
        target = work / "binary"
        # -fmacro-prefix-map: __FILE__ in the emulator's reports reads csrc/..., not the build folder
        command = [CXX, *FLAGS, *extra_flags, f"-fmacro-prefix-map={work / 'src'}/=csrc/",
                   "-x", "c++", "-include", str(HERE / "cuda_emulation.h"),
                   "-I", str(HERE / "include"), "-I", str(HERE), "-I", str(work / "src" / "cuda"),
                   "-o", str(target), str(work / driver.name)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"g++ failed on the emulated {driver.name}:\n{result.stderr[-20000:]}")
        os.replace(target, binary)  # atomic: parallel test workers may build the same binary
    return binary


# ---------------------------------------------------------------- record files (driver.h)

_DTYPES = {torch.float32: 0, torch.float64: 1, torch.int64: 2, torch.uint8: 3}
_FROM_CODE = {code: dtype for dtype, code in _DTYPES.items()}


def _encode(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().clone(memory_format=torch.contiguous_format)  # its own storage, exactly its elements
    header = struct.pack(f"<qq{t.dim()}q", _DTYPES[t.dtype], t.dim(), *t.shape)
    return header + bytes(t.untyped_storage())


def ints(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def doubles(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _decode_all(data: bytes) -> list[torch.Tensor]:
    arrays, offset = [], 0
    while offset < len(data):
        code, ndim = struct.unpack_from("<qq", data, offset)
        offset += 16
        shape = struct.unpack_from(f"<{ndim}q", data, offset)
        offset += 8 * ndim
        dtype = _FROM_CODE[code]
        count = 1
        for s in shape:
            count *= s
        size = count * torch.empty((), dtype=dtype).element_size()
        raw = bytearray(data[offset:offset + size])
        offset += size
        flat = torch.frombuffer(raw, dtype=dtype) if size else torch.empty(0, dtype=dtype)
        arrays.append(flat.reshape(shape).clone())
    return arrays


@dataclass
class Run:
    """One case under one schedule: the outputs, or why there are none."""
    schedule: str
    outputs: list[torch.Tensor] | None
    error: str = ""


def run(binary: Path, cases: Sequence[Sequence[torch.Tensor]], schedules: Sequence[str] = SCHEDULES,
        timeout: float = 600, mutant: str | None = None) -> list[list[Run]]:
    """Runs every case (its arrays as the driver reads them) under every schedule, with the
    mutant of that name on (see ``Mutation``) or none."""
    with tempfile.TemporaryDirectory() as work:
        source, target = Path(work) / "in.bin", Path(work) / "out.bin"
        source.write_bytes(b"".join(_encode(t) for case in cases for t in case))
        env = {key: value for key, value in os.environ.items() if key != "CUDA_EMU_MUTANT"}
        if mutant is not None:
            env["CUDA_EMU_MUTANT"] = mutant
        result = subprocess.run([str(binary), str(source), str(target), *schedules],
                                capture_output=True, text=True, timeout=timeout, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{binary.name} exited with {result.returncode}:\n{result.stderr[-5000:]}")
        arrays = _decode_all(target.read_bytes())
    runs, position = [], 0
    for _ in cases:
        per_case = []
        for schedule in schedules:
            (status, count), message = arrays[position].tolist(), arrays[position + 1]
            position += 2
            outputs = arrays[position:position + count]
            position += count
            per_case.append(Run(schedule, outputs if status == 0 else None,
                                bytes(message.tolist()).decode(errors="replace")))
        runs.append(per_case)
    if position != len(arrays):
        raise RuntimeError(f"{binary.name} wrote {len(arrays)} arrays, {position} expected")
    return runs


# ---------------------------------------------------------------- the ops' cases

# The eigensolvers' cases take a workspace budget in bytes (csrc/cuda/kernels.h, workspace_chunk):
# None runs with the shipped budget (2 GiB: every test batch in one chunk); a small one splits
# the batch into chunks that take turns on one workspace, as B = 100,000 does on the GPU.

def sym_eigh_case(a: torch.Tensor, workspace_budget: int | None = None) -> list[torch.Tensor]:
    return [ints(_DTYPES[a.dtype], workspace_budget or 0), a]


def lanczos_case(a: torch.Tensor, k: int, max_steps: int | None = None, tol: float | None = None,
                 workspace_budget: int | None = None) -> list[torch.Tensor]:
    """As pullgeom.kernels.native.lanczos_topk fills in its defaults."""
    if tol is None:
        tol = 1e-6 if a.dtype == torch.float32 else 1e-10
    max_steps = max_steps if max_steps is not None else max(a.shape[-1], k)
    return [ints(_DTYPES[a.dtype], k, max_steps, workspace_budget or 0), doubles(tol), a]


def plan_gram_case(plan, x2d: torch.Tensor, *, sigma: str = "logvar", stochastic: bool = True,
                   latent_sqrt: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The arguments pullgeom.kernels.native.plan_gram passes to the op."""
    from pullgeom.encoder_output import SIGMA_CODES

    layers = plan.layers
    widths = [x2d.shape[1]] + [layer.weight.shape[0] for layer in layers]
    header = ints(_DTYPES[x2d.dtype], len(layers), SIGMA_CODES[sigma], int(stochastic),
                  int(latent_sqrt is not None))
    return [header, ints(*widths), ints(*[layer.activation_code for layer in layers]),
            doubles(*[float(layer.param) for layer in layers]),
            doubles(*[float(layer.threshold) for layer in layers]),
            x2d, *[layer.weight for layer in layers], *[layer.bias for layer in layers], plan.mu_weight,
            plan.s_weight, plan.s_bias, *([] if latent_sqrt is None else [latent_sqrt]),
            plan.first_layer_gram]
