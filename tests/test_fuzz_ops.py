"""Seeded fuzz of the native ops' argument space: a clean error naming the argument, or the right answer.

``torch.ops.pullgeom.{sym_eigh, lanczos_topk, plan_gram}`` are called directly (the surface any
caller reaches) with random shapes, strides (transposed, sliced, expanded), dtypes (float16,
bfloat16, integer, bool, float32, float64), devices (``meta``) and mismatched arguments. Every call
must either raise RuntimeError/ValueError/TypeError whose message names the offending argument,
or return results that match the float64 reference (``torch.linalg.eigh``; for plan_gram, the
plain-torch chain ``pullgeom.backends.torch_backend.chain_rows``) without writing into any input.
The loop runs in a subprocess so that a crash (segfault, abort) fails the test instead of
killing pytest.

Run by hand: ``python tests/test_fuzz_ops.py SEED COUNT`` prints a JSON summary.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SEED, COUNT = 20261124, 900  # ~300 calls per op; a few seconds on one CPU thread
ARGUMENTS = {
    "sym_eigh": ("a",),
    "lanczos_topk": ("a", "k", "max_steps", "tol"),
    "plan_gram": ("x", "weights", "biases", "activations", "params", "thresholds", "mu_weight",
                  "s_weight", "s_bias", "sigma", "stochastic", "latent_sqrt", "first_gram"),
}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool]
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}  # relative to the largest |eigenvalue|


def clean_error(op: str, error: Exception) -> bool:
    """An expected exception type whose message names one of ``op``'s arguments."""
    if not isinstance(error, (RuntimeError, ValueError, TypeError)):
        return False
    message = str(error)
    for name in ARGUMENTS[op]:
        # "a" is also an English word: it counts only as "a must ...", "a = ...", "a has ...".
        pattern = r"\ba (must|=|has)\b" if name == "a" else rf"(?<![\w.]){re.escape(name)}\b"
        if re.search(pattern, message):
            return True
    return False


class InputModified(AssertionError):
    """An op wrote into one of its inputs (e.g. the caller's encoder weights)."""


def call(op: str, *args):
    """``torch.ops.pullgeom.<op>(*args)``, checking afterwards that no input tensor was written to."""
    tensors = [t for a in args for t in (a if isinstance(a, list) else [a])
               if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    before = [t.clone() for t in tensors]
    result = getattr(torch.ops.pullgeom, op)(*args)
    for i, (t, saved) in enumerate(zip(tensors, before, strict=True)):
        if not torch.equal(t, saved) and not (t.isnan() & saved.isnan()).any():
            raise InputModified(f"{op} modified its input tensor #{i} (shape {tuple(t.shape)})")
    return result


def layout(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The same values in a random memory layout: contiguous, transposed, strided slice or expanded."""
    kind = rng.choice(["contiguous", "contiguous", "transposed", "sliced", "expanded"])
    if kind == "transposed" and t.dim() >= 2:
        return t.mT.contiguous().mT
    if kind == "sliced":
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    if kind == "expanded" and t.dim() >= 1 and t.shape[0] == 1:
        return t.expand(3, *t.shape[1:])
    return t


def random_square(rng: random.Random, gen: torch.Generator) -> torch.Tensor:
    """A batch of symmetric matrices, sometimes with a wrong rank or non-square trailing dims."""
    batch, n = rng.choice([0, 1, 1, 2, 4]), rng.choice([0, 1, 2, 3, 5, 8, 13])
    shape = rng.choice([(batch, n, n)] * 6 + [(n, n), (batch, n, n + 1), (batch, 1, n, n), (n,)])
    a = torch.randn(*shape, dtype=torch.float64, generator=gen)
    if len(shape) >= 2 and shape[-1] == shape[-2]:
        a = a + a.mT
        a = a * 10.0 ** rng.uniform(-6, 6)
    a = a.to(rng.choice(DTYPES)) if rng.random() < 0.35 else a.to(rng.choice(DTYPES[:2]))
    if rng.random() < 0.03:
        a = a.to("meta")
    return layout(a, rng)


def check_eigenpairs(a: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor, k: int) -> str | None:
    """None when the top-k (algebraically largest) eigenpairs of a match float64 eigh, else why not."""
    if values.dtype != a.dtype or vectors.dtype != a.dtype:
        return f"output dtype {values.dtype} for input {a.dtype}"
    a64 = a.double()
    reference = torch.linalg.eigvalsh((a64 + a64.mT) / 2).flip(-1)[..., :k]
    if values.shape != reference.shape or vectors.shape != (*a.shape[:-1], k):
        return f"shapes {tuple(values.shape)}, {tuple(vectors.shape)} for a {tuple(a.shape)} and k={k}"
    if a.shape[0] == 0 or a.shape[-1] == 0:
        return None
    scale = torch.linalg.eigvalsh(a64).abs().amax(-1, keepdim=True).clamp_min(1e-300)
    tol = TOLERANCE[a.dtype]
    error = ((values.double() - reference).abs() / scale).max().item()
    if not error <= tol:
        return f"eigenvalues off by {error:.2e} relative ({a.dtype})"
    v = vectors.double()
    residual = ((a64 @ v - v * values.double().unsqueeze(-2)).norm(dim=-2) / scale).max().item()
    orthogonality = (v.mT @ v - torch.eye(k, dtype=torch.float64)).abs().max().item()
    if not (residual <= 50 * tol and orthogonality <= 50 * tol):
        return f"eigenvectors: residual {residual:.2e}, orthogonality {orthogonality:.2e} ({a.dtype})"
    return None


def fuzz_sym_eigh(rng, gen):
    a = random_square(rng, gen)
    values, vectors = call("sym_eigh", a)
    if a.device.type == "meta":
        return None
    return check_eigenpairs(a, values, vectors, a.shape[-1])


def fuzz_lanczos(rng, gen):
    a = random_square(rng, gen)
    n = a.shape[-1] if a.dim() >= 1 else 0
    k = rng.choice([-1, 0, 1, 1, 2, 3, n, n + 1])
    steps = rng.choice([k - 1, k, n, n, n + 5])
    tol = rng.choice([1e-12, 1e-10, 1e-6, 1e-6, 0.0, -1.0, float("nan"), 2.0])
    if rng.random() < 0.05:
        k = float(k)  # a wrong type for an int argument
    values, vectors, residuals, taken = call("lanczos_topk", a, k, steps, tol)
    if a.device.type == "meta":
        return None
    if steps < n or tol > 1e-6 or a.dtype not in TOLERANCE:
        # Fewer Krylov steps than n (or a loose tol) may stop early: then the residuals must be honest.
        v, lam = vectors.double(), values.double()
        if a.numel() == 0:
            return None
        actual = (a.double() @ v - v * lam.unsqueeze(-2)).norm(dim=-2)
        slack = 1e-6 * a.double().abs().amax().clamp_min(1e-300).item()
        return None if bool((actual <= residuals.double() + slack).all()) else "residuals understated"
    return check_eigenpairs(a, values, vectors, k)




def random_plan(rng, gen):
    """A traced float64 MLP plan with random widths, activation and BatchNorm, and its input."""
    from torch import nn

    from pullgeom.tracing.mlp_plan import trace_plan

    widths = [rng.randint(1, 9) for _ in range(rng.randint(2, 4))]
    latent = rng.randint(1, 4)
    act = rng.choice([nn.Tanh(), nn.ReLU(), nn.ELU(0.5), nn.GELU(), nn.SiLU(), nn.Sigmoid(), nn.Softplus()])
    layers = [nn.Flatten()]
    for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(w_in, w_out)] + ([nn.BatchNorm1d(w_out)] if rng.random() < 0.5 else []) + [act]
    torch.manual_seed(rng.randint(0, 2**31))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.mu, self.out2 = nn.Sequential(*layers), nn.Linear(widths[-1], latent), \
                nn.Linear(widths[-1], latent)

        def forward(self, x):
            h = self.trunk(x)
            return self.mu(h), self.out2(h)

    encoder = Encoder().eval().double()
    with torch.no_grad():
        plan = trace_plan(encoder)
    x = torch.randn(rng.choice([0, 1, 3, 5]), widths[0], dtype=torch.float64, generator=gen)
    return plan, x, latent


def fuzz_plan_gram(rng, gen):
    from pullgeom.backends.torch_backend import chain_rows

    plan, x, latent = random_plan(rng, gen)
    dtype = rng.choice([torch.float64, torch.float32])
    stochastic = rng.random() < 0.7
    sigma = rng.randint(0, 3)
    latent_sqrt = None
    if rng.random() < 0.3:
        root = torch.randn(x.shape[0], latent, latent, dtype=torch.float64, generator=gen)
        latent_sqrt = root @ root.mT / latent
    first = plan.layers[0].weight
    args = [x, [layer.weight for layer in plan.layers], [layer.bias for layer in plan.layers],
            [layer.activation_code for layer in plan.layers], [float(layer.param) for layer in plan.layers],
            [float(layer.threshold) for layer in plan.layers], plan.mu_weight, plan.s_weight, plan.s_bias,
            sigma, stochastic, latent_sqrt, first @ first.T]
    args = [a.to(dtype) if isinstance(a, torch.Tensor) else
            [t.to(dtype) for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a
            for a in args]
    mutated = rng.random() < 0.6
    if mutated:  # one argument made wrong (or merely re-laid-out, which must give the same answer)
        position = rng.choice([0, 0, 1, 2, 3, 6, 7, 8, 9, 11, 12])
        value = args[position]
        if isinstance(value, list):
            if position == 3:
                value = rng.choice([value[:-1], [99] + value[1:], value + value[:1]])
            else:
                i = rng.randrange(len(value))
                value = [*value[:i], rng.choice([value[i][..., :-1], layout(value[i], rng),
                                                 value[i].to(rng.choice(DTYPES))]), *value[i + 1:]]
        elif position == 9:
            value = rng.choice([-1, 4, 7])
        elif value is None:
            value = torch.zeros(max(x.shape[0], 1), latent + 1, latent + 1, dtype=dtype)
        else:
            value = rng.choice([value[..., :-1], layout(value, rng), value.to(rng.choice(DTYPES)),
                                value.to("meta"), value.unsqueeze(0)])
        args[position] = value
    gram, left = call("plan_gram", *args)
    if any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
        return None
    if gram.dtype != dtype or left.dtype != dtype:
        return f"output dtype {gram.dtype} for {dtype} inputs"
    # Accepted: it must be the right answer for the (valid) arguments it was given.
    from pullgeom.encoder_output import SIGMA_CODES

    sigma_name = {code: name for name, code in SIGMA_CODES.items()}[sigma]
    x64 = args[0].double()
    rows = chain_rows(plan, x64, sigma_name, stochastic, latent_sqrt)
    expected = rows.mT @ rows
    scale = expected.abs().amax().clamp_min(1e-300).item() if expected.numel() else 1.0
    tol = TOLERANCE[dtype]
    if left.shape[:1] != rows.shape[:1] or left.shape[-1] != rows.shape[-1]:
        return f"left {tuple(left.shape)} against the chain's {tuple(rows.shape)}"
    got = left.double().mT @ left.double()
    error = (got - expected).abs().max().item() / scale if expected.numel() else 0.0
    return None if error <= 10 * tol else f"plan_gram off by {error:.2e} relative ({dtype})"


FUZZERS = {"sym_eigh": fuzz_sym_eigh, "lanczos_topk": fuzz_lanczos, "plan_gram": fuzz_plan_gram}


def fuzz(seed: int, count: int) -> dict:
    """``count`` seeded calls spread over the ops; a summary with every failure described."""
    import pullgeom.kernels.native  # noqa: F401  (registers torch.ops.pullgeom.*)

    torch.set_num_threads(1)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    summary = {"calls": 0, "matched": 0, "clean_errors": 0, "failures": []}
    for i in range(count):
        op = list(FUZZERS)[i % len(FUZZERS)]
        summary["calls"] += 1
        try:
            problem = FUZZERS[op](rng, gen)
        except Exception as error:  # judged below: clean only if the type and message are right
            if not isinstance(error, InputModified) and clean_error(op, error):
                summary["clean_errors"] += 1
            else:
                summary["failures"].append(f"call {i} {op}: unclean {type(error).__name__}: {error}"[:400])
            continue
        if problem is None:
            summary["matched"] += 1
        else:
            summary["failures"].append(f"call {i} {op}: {problem}")
    return summary


def test_fuzz_ops_raise_clean_errors_or_match_the_reference():
    from pullgeom.kernels import native as ops

    if ops.EXTENSION_ERROR is not None:
        pytest.skip(ops.EXTENSION_ERROR)
    # The child imports the same pullgeom as this process (and its compiled extension).
    env = {**os.environ, "PYTHONPATH": str(Path(ops.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, __file__, str(SEED), str(COUNT)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, f"fuzz process died (status {result.returncode}): {result.stderr[-2000:]}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nfuzz: {summary['calls']} calls, {summary['matched']} matched the reference, "
          f"{summary['clean_errors']} clean errors")
    assert summary["failures"] == [], "\n".join(summary["failures"][:20])
    # Both outcomes are exercised, so neither check is vacuous.
    assert summary["matched"] > COUNT // 5 and summary["clean_errors"] > COUNT // 5, summary


def test_plan_gram_never_writes_into_mu_weight():
    """Regression (found by this fuzz): with one sample, stochastic=False and no latent metric, the
    CPU kernel's head rows aliased mu_weight, and the in-place chain overwrote the caller's weights."""
    from pullgeom.kernels import native as ops

    if ops.EXTENSION_ERROR is not None:
        pytest.skip(ops.EXTENSION_ERROR)
    plan, _, _ = random_plan(random.Random(3), torch.Generator().manual_seed(3))
    x = torch.randn(1, plan.layers[0].weight.shape[1], dtype=torch.float64)
    saved = plan.mu_weight.clone()
    _, first_call = ops.plan_gram(plan, x, stochastic=False)
    _, second_call = ops.plan_gram(plan, x, stochastic=False)
    assert torch.equal(plan.mu_weight, saved)
    assert torch.equal(first_call, second_call)


if __name__ == "__main__":
    print(json.dumps(fuzz(int(sys.argv[1]), int(sys.argv[2]))))
