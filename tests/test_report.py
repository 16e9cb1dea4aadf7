"""Report helpers that choose which models get the expensive evaluations."""

from pullgeom.report import _pick


def test_pick_spreads_over_the_sweep_with_the_ends_included():
    betas = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
    assert _pick(betas, 3) == [0.01, 0.3, 10.0]
    assert _pick(betas, 2) == [0.01, 10.0]
    assert _pick(betas, 1) == [0.01]  # once divided by zero
    assert _pick(betas, 9) == betas
    assert _pick(betas, 0) == []
