"""Training: the stacked sweep equals sequential training, the losses, mixup, resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pullgeom.io import load_checkpoint
from pullgeom.models import PaperVAE
from pullgeom.train import (
    StackedMLPVAE,
    SweepConfig,
    kl_standard_normal,
    log_spaced,
    mixup_penalty,
    reconstruction_nll,
    train_sweep,
)

SMALL = dict(hidden=[24, 16, 20, 6], latent_dim=4, input_shape=[1, 6, 6], batch_size=8, dataset="synthetic")


def _images(n=64, seed=0):
    return torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


def _weights(directory):
    return load_file(str(directory / "model.safetensors"))


def test_stacked_forward_matches_each_module_in_train_and_eval_mode():
    torch.manual_seed(0)
    models = [PaperVAE((1, 6, 6), (24, 16, 20, 6), 4).double() for _ in range(3)]
    for model in models:  # non-trivial running statistics and affine parameters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.normal_()
    stack = StackedMLPVAE(models)
    x = torch.rand(10, 36, dtype=torch.float64)
    z = torch.randn(3, 10, 4, dtype=torch.float64)
    for training in (False, True):
        stack.train(training)
        mu, logvar = stack.encode(x, update_stats=False)
        logits = stack.decode_logits(z, update_stats=False)
        for i, model in enumerate(models):
            model.train(training)
            with torch.no_grad():
                mu_i, logvar_i = model.encoder(x)
                logits_i = model.decoder.logits(z[i]).reshape(10, -1)
            torch.testing.assert_close(mu[i], mu_i, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(logvar[i], logvar_i, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(logits[i], logits_i, rtol=1e-12, atol=1e-12)


def test_unstack_roundtrip():
    torch.manual_seed(1)
    models = [PaperVAE((1, 6, 6), (24, 16, 20, 6), 4) for _ in range(2)]
    for restored, original in zip(StackedMLPVAE(models).unstack(), models, strict=True):
        for (name, a), b in zip(restored.state_dict().items(), original.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


def test_losses_against_hand_values():
    logits = torch.tensor([[0.0, 2.0]])
    x = torch.tensor([[1.0, 0.0]])
    # -log sigmoid(0) - log(1 - sigmoid(2)) = log 2 + log(1 + e^2)
    expected = torch.log(torch.tensor(2.0)) + torch.log1p(torch.exp(torch.tensor(2.0)))
    torch.testing.assert_close(reconstruction_nll(logits, x, "bernoulli"), expected.reshape(1))
    torch.testing.assert_close(reconstruction_nll(logits, x, "gaussian"), torch.tensor([2.5]))
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # 0.5 * sum(mu^2 + e^logvar - 1 - logvar) = 0.5 * (1 + e - 2)
    torch.testing.assert_close(kl_standard_normal(mu, logvar), torch.tensor([0.5 * (torch.e - 1)]))


def test_mixup_penalty_against_hand_computed_value():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[[2.0], [4.0]]])  # (M=1, B=2, dz=1)
    alpha = torch.tensor([0.25, 0.5])
    partner = torch.tensor([1, 0])
    # x_m = [[0.25, 1.5], [0.5, 1.0]]; z_m = [[3.5], [3.0]]
    # f(x) = sum(x) -> [1.75, 1.5]; latent gaps |3.5 - 1.75| = 1.75, |3 - 1.5| = 1.5
    # g(z) = (z, 0) -> [[3.5, 0], [3, 0]]; image gaps ||(3.25, -1.5)|| and ||(2.5, -1)||
    penalty = mixup_penalty(x, z, alpha, partner,
                            lambda xm: xm.sum(-1, keepdim=True).unsqueeze(0),
                            lambda zm: torch.cat([zm, torch.zeros_like(zm)], dim=-1))
    image = (3.25**2 + 1.5**2) ** 0.5 + (2.5**2 + 1.0) ** 0.5
    torch.testing.assert_close(penalty, torch.tensor([(1.75 + 1.5 + image) / 2]))


@pytest.mark.parametrize("mixup", [0.0, 0.5])
def test_stacked_sweep_equals_sequential_training(tmp_path, mixup):
    torch.set_num_threads(1)
    images = _images()
    betas = [0.1, 1.0, 5.0]
    config = SweepConfig(betas=betas, mixup=[mixup], epochs=2, **SMALL)
    stacked = train_sweep(config, images, tmp_path / "stacked", dtype=torch.float64, progress=False)
    for i, beta in enumerate(betas):
        single = SweepConfig(betas=[beta], mixup=[mixup], epochs=2, **SMALL)
        [alone] = train_sweep(single, images, tmp_path / f"single{i}", dtype=torch.float64, progress=False)
        a, b = _weights(stacked[i]), _weights(alone)
        assert a.keys() == b.keys()
        for name in a:
            # float64 training saved as float32: identical up to batched-vs-single matmul rounding
            torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6, msg=name)
    # The models really differ from each other (beta matters), so the comparison above can fail.
    w0, w2 = _weights(stacked[0]), _weights(stacked[2])
    assert not torch.allclose(w0["encoder.mu.weight"], w2["encoder.mu.weight"], atol=1e-3)


class _Interrupt(Exception):
    pass


def test_resume_after_interrupt_is_exact_and_skips_finished_models(tmp_path):
    torch.set_num_threads(1)
    images = _images()
    config = SweepConfig(betas=[0.5, 2.0], mixup=[0.2], epochs=3, **SMALL)
    [ref_a, ref_b] = train_sweep(config, images, tmp_path / "ref", progress=False)

    def stop_after_first_epoch(group):
        if group.epochs_done == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_sweep(config, images, tmp_path / "run", progress=False, on_epoch_end=stop_after_first_epoch)
    state = json.loads((tmp_path / "run" / "state" / "group.json").read_text())
    assert state["epochs_done"] == 1
    epochs_seen = []
    dirs = train_sweep(config, images, tmp_path / "run", progress=False,
                       on_epoch_end=lambda g: epochs_seen.append(g.epochs_done))
    assert epochs_seen == [2, 3]  # resumed at epoch 2, did not start over
    for got, want in zip(dirs, (ref_a, ref_b), strict=True):
        a, b = _weights(got), _weights(want)
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert not (tmp_path / "run" / "state" / "group.json").exists()

    # Extending the sweep trains only the new model.
    sizes = []
    bigger = SweepConfig(betas=[0.5, 2.0, 8.0], mixup=[0.2], epochs=3, **SMALL)
    train_sweep(bigger, images, tmp_path / "run", progress=False,
                on_epoch_end=lambda g: sizes.append(len(g.tags)))
    assert sizes == [1, 1, 1]
    assert torch.equal(_weights(dirs[0])["encoder.mu.weight"], _weights(ref_a)["encoder.mu.weight"])
    model, saved = load_checkpoint(tmp_path / "run" / "models" / "beta=8_mixup=0.2")
    assert saved["beta"] == 8.0 and not model.training


def test_changed_settings_are_refused(tmp_path):
    images = _images(16)
    train_sweep(SweepConfig(betas=[1.0], mixup=[0.0], epochs=1, **SMALL), images, tmp_path, progress=False)
    with pytest.raises(ValueError, match="different settings"):
        changed = SweepConfig(betas=[1.0], mixup=[0.0], epochs=2, **SMALL)
        train_sweep(changed, images, tmp_path, progress=False)


def test_config_validation_and_grid():
    with pytest.raises(ValueError, match="mixup"):
        SweepConfig(betas=[1.0, 2.0], mixup=[0.0, 0.1, 0.2])
    with pytest.raises(ValueError, match="positive"):
        SweepConfig(betas=[0.0], mixup=[0.0])
    grid = log_spaced(0.01, 10, 6)
    assert grid[0] == 0.01 and grid[-1] == 10 and len(grid) == 6
    assert all(b / a == pytest.approx(10 ** 0.6, rel=1e-4) for a, b in zip(grid, grid[1:], strict=False))
