"""csrc/common/chain_codes.h, the one C++ list of the MLP chain's codes (used by the CPU and CUDA
plan_gram kernels), names the same activations and sigma conventions in the same order as the
Python lists whose indices the native ops receive: a reordering on either side would make the
kernels silently apply the wrong formula."""

from __future__ import annotations

import re
from pathlib import Path

from pullgeom.encoder_output import SIGMA_CONVENTIONS
from pullgeom.tracing.activations import ACTIVATIONS

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "common" / "chain_codes.h"


def enumerators(name: str) -> list[str]:
    """The enumerators of ``enum class name`` in chain_codes.h, as snake_case names without the
    ``k`` prefix (kGeluTanh -> gelu_tanh), in order, checked to carry no explicit values."""
    match = re.search(rf"enum class {name}\s*:\s*int64_t\s*\{{([^}}]*)\}}", HEADER.read_text())
    assert match, f"enum class {name} not found in {HEADER}"
    names = [item.strip() for item in match.group(1).split(",") if item.strip()]
    assert all(re.fullmatch(r"k[A-Z]\w*", item) for item in names), f"{name}: {names} (no '= value' allowed)"
    return [re.sub(r"(?<!^)(?=[A-Z])", "_", item[1:]).lower() for item in names]


def test_activation_codes_match_python():
    assert enumerators("Activation") == [*ACTIVATIONS, "count"]


def test_sigma_codes_match_python():
    assert enumerators("Sigma") == [*SIGMA_CONVENTIONS, "count"]


def test_both_plan_gram_kernels_use_the_header_and_keep_no_copy():
    csrc = HEADER.parents[1]
    for source in (csrc / "cpu" / "plan_gram_cpu.cpp", csrc / "cuda" / "plan_gram_cuda.cu"):
        text = source.read_text()
        assert '#include "../common/chain_codes.h"' in text, source.name
        assert not re.search(r"\benum\b|\bswitch\b", text), f"{source.name} keeps its own codes"
