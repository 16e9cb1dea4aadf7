"""Training: the stacked sweep (MLP and conv VAEs) equals sequential training, the losses, mixup, resume."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from pullgeom.paper.outputs import load_checkpoint
from pullgeom.paper.models import CelebAVAE, PaperVAE
from pullgeom.paper.training import (
    StackedVAE,
    StepNoise,
    SweepConfig,
    SweepGroup,
    kl_standard_normal,
    log_spaced,
    mixup_penalty,
    reconstruction_nll,
    sweep_loss,
    train_epoch,
    train_sweep,
)

SMALL = dict(hidden=[24, 16, 20, 6], latent_dim=4, input_shape=[1, 6, 6], batch_size=8, dataset="synthetic")
# The conv VAE at its smallest useful size: two stride-2 blocks (64 -> 16 pixels), 2 and 3 filters.
SMALL_CONV = dict(arch="celeba-conv", channels=[2, 3], latent_dim=3, batch_size=4, dataset="synthetic")


def _images(n=64, seed=0):
    return torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


def _conv_images(n=12, seed=0):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _weights(directory):
    return load_file(str(directory / "model.safetensors"))


def _randomised_models(arch: str, count: int = 3) -> list[torch.nn.Module]:
    """``count`` float64 models of ``arch`` with non-trivial BatchNorm statistics and affine maps."""
    torch.manual_seed(0)
    if arch == "paper-mlp":
        models = [PaperVAE((1, 6, 6), (24, 16, 20, 6), 4).double() for _ in range(count)]
    else:
        models = [CelebAVAE(3, (2, 3)).double() for _ in range(count)]
    for model in models:
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.normal_()
                module.bias.data.normal_()
    return models


def _module_outputs(model, x: torch.Tensor, z: torch.Tensor):
    """mu, logvar (B, dz) and decoder logits (B, N) of one unstacked model; x: (B, N)."""
    shape = tuple(model.config["input_shape"])
    mu, logvar = model.encoder(x.reshape(x.shape[0], *shape))
    return mu, logvar, model.decoder.logits(z).reshape(z.shape[0], -1)


# float64 throughout: the stack and the modules differ only by summation order (a batched
# matmul or grouped convolution against one per model), ~1e-15 relative; 1e-10 catches any
# wrong weight, channel block or statistic, which moves values at 1e-2.
TIGHT = dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["paper-mlp", "celeba-conv"])
def test_stacked_forward_matches_each_module_in_train_and_eval_mode(arch):
    models = _randomised_models(arch)
    stack = StackedVAE(models)
    n = 36 if arch == "paper-mlp" else 3 * 64 * 64
    dz = models[0].config["latent_dim"]
    x = torch.rand(10, n, dtype=torch.float64)
    z = torch.randn(3, 10, dz, dtype=torch.float64)
    for training in (False, True):
        stack.train(training)
        mu, logvar = stack.encode(x, update_stats=False)
        logits = stack.decode_logits(z, update_stats=False)
        assert mu.shape == (3, 10, dz) and logits.shape == (3, 10, n)
        for i, model in enumerate(models):
            model.train(training)
            with torch.no_grad():
                mu_i, logvar_i, logits_i = _module_outputs(model, x, z[i])
            torch.testing.assert_close(mu[i], mu_i, **TIGHT)
            torch.testing.assert_close(logvar[i], logvar_i, **TIGHT)
            torch.testing.assert_close(logits[i], logits_i, **TIGHT)


@pytest.mark.parametrize("arch", ["paper-mlp", "celeba-conv"])
def test_stacked_gradients_and_running_statistics_match_each_module(arch):
    models = _randomised_models(arch)
    stack = StackedVAE(models).train()
    n = 36 if arch == "paper-mlp" else 3 * 64 * 64
    dz = models[0].config["latent_dim"]
    x = torch.rand(6, n, dtype=torch.float64)
    z = torch.randn(3, 6, dz, dtype=torch.float64)

    def objective(mu, logvar, logits):  # any smooth function of every output
        return (mu.square().sum(-1) + logvar.exp().sum(-1) + logits.sin().sum(-1)).sum()

    mu, logvar = stack.encode(x)
    objective(mu, logvar, stack.decode_logits(z)).backward()
    stacked_grads = {name: p.grad for name, p in stack.named_parameters()}
    for i, model in enumerate(models):
        model.train()
        objective(*_module_outputs(model, x, z[i])).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(stacked_grads[name.replace(".", "__")][i], p.grad, **TIGHT, msg=name)
    # The batch statistics went into each model's running ones exactly as nn.BatchNorm puts them.
    stacked_state = stack.state_dict()
    for i, model in enumerate(models):
        for name, value in model.state_dict().items():
            torch.testing.assert_close(stacked_state[name.replace(".", "__")][i], value, **TIGHT, msg=name)


@pytest.mark.parametrize("arch", ["paper-mlp", "celeba-conv"])
def test_one_training_step_of_a_stack_equals_single_model_steps(arch):
    torch.set_num_threads(1)
    sizes = SMALL if arch == "paper-mlp" else SMALL_CONV
    images = (_images() if arch == "paper-mlp" else _conv_images()).flatten(1).double()
    config = SweepConfig(betas=[0.1, 1.0, 5.0], mixup=[0.5], epochs=1, **sizes)
    device = torch.device("cpu")
    stacked = SweepGroup(config, [0, 1, 2], device, torch.float64)
    train_epoch(stacked, images, progress=False, max_steps=1)
    for i in range(3):
        single = SweepGroup(config, [i], device, torch.float64)
        train_epoch(single, images, progress=False, max_steps=1)
        for (name, p), (_, q) in zip(stacked.stack.named_parameters(), single.stack.named_parameters(),
                                     strict=True):
            torch.testing.assert_close(p.grad[i], q.grad[0], **TIGHT, msg=name)
            # A bias feeding a BatchNorm has gradient 0 in exact arithmetic (rounding noise, ~1e-14,
            # here) and Adam's first step, lr * g / (|g| + 1e-8), scales that noise to <= 3e-9.
            noise_only = float(q.grad.abs().max()) < 1e-12
            tolerance = dict(rtol=0.0, atol=1e-8) if noise_only else TIGHT
            torch.testing.assert_close(p.detach()[i], q.detach()[0], **tolerance, msg=name)
    # The step moved the weights and depends on beta, so the comparisons above can fail.
    grad = stacked.stack.encoder__mu__weight.grad
    assert not torch.allclose(grad[0], grad[2], atol=1e-3)


def test_sweep_loss_is_the_sum_of_per_model_losses():
    models = _randomised_models("celeba-conv", 2)
    stack = StackedVAE(models).train()
    x = torch.rand(4, 3 * 64 * 64, dtype=torch.float64)
    eps = torch.randn(2, 4, 3, dtype=torch.float64)
    betas = torch.tensor([0.5, 2.0], dtype=torch.float64)
    total, parts = sweep_loss(stack, x, betas, torch.zeros(2, dtype=torch.float64), StepNoise(eps))
    for i, model in enumerate(models):
        mu, logvar = model.encoder(x.reshape(4, 3, 64, 64))
        recon = model.decoder.logits(mu + torch.exp(0.5 * logvar) * eps[i]).reshape(4, -1)
        # Gaussian likelihood (celeba's default): 0.5 ||x - g(z)||^2 per image
        expected = (0.5 * (recon - x).square().sum(-1) + betas[i] * kl_standard_normal(mu, logvar)).mean()
        torch.testing.assert_close(parts["loss"][i], expected.detach(), **TIGHT)
    torch.testing.assert_close(total.detach(), parts["loss"].sum(), **TIGHT)


@pytest.mark.parametrize("arch", ["paper-mlp", "celeba-conv"])
def test_unstack_roundtrip(arch):
    models = [model.float() for model in _randomised_models(arch, 2)]  # unstack() builds float32 models
    for restored, original in zip(StackedVAE(models).unstack(), models, strict=True):
        assert type(restored) is type(original) and restored.config == original.config
        for (name, a), b in zip(restored.state_dict().items(), original.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


def test_losses_against_hand_values():
    logits = torch.tensor([[0.0, 2.0]])
    x = torch.tensor([[1.0, 0.0]])
    # -log sigmoid(0) - log(1 - sigmoid(2)) = log 2 + log(1 + e^2)
    expected = torch.log(torch.tensor(2.0)) + torch.log1p(torch.exp(torch.tensor(2.0)))
    torch.testing.assert_close(reconstruction_nll(logits, x, "bernoulli"), expected.reshape(1))
    # squared error (1 - 0)^2 + (0 - 2)^2 = 5: unit-variance Gaussian halves it, "sse" does not
    torch.testing.assert_close(reconstruction_nll(logits, x, "gaussian"), torch.tensor([2.5]))
    torch.testing.assert_close(reconstruction_nll(logits, x, "sse"), torch.tensor([5.0]))
    with pytest.raises(ValueError, match="likelihood='poisson'"):
        reconstruction_nll(logits, x, "poisson")
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # 0.5 * sum(mu^2 + e^logvar - 1 - logvar) = 0.5 * (1 + e - 2)
    torch.testing.assert_close(kl_standard_normal(mu, logvar), torch.tensor([0.5 * (torch.e - 1)]))


def test_summed_squared_error_sweep_loss_and_decoder_mean():
    """likelihood "sse": each model's loss is sum ||x - g(z)||^2 + beta KL with g the raw decoder
    output, which is also the decoder's mean (no sigmoid), in the stack and in the module."""
    torch.manual_seed(0)
    models = [PaperVAE((1, 6, 6), (24, 16, 20, 6), 4, likelihood="sse").double() for _ in range(2)]
    stack = StackedVAE(models).train()
    x = torch.rand(5, 36, dtype=torch.float64)
    eps = torch.randn(2, 5, 4, dtype=torch.float64)
    betas = torch.tensor([0.5, 7.5], dtype=torch.float64)
    _, parts = sweep_loss(stack, x, betas, torch.zeros(2, dtype=torch.float64), StepNoise(eps))
    for i, model in enumerate(models):
        mu, logvar = model.encoder(x)
        recon = model.decoder.logits(mu + torch.exp(0.5 * logvar) * eps[i]).reshape(5, -1)
        expected = ((recon - x).square().sum(-1) + betas[i] * kl_standard_normal(mu, logvar)).mean()
        torch.testing.assert_close(parts["loss"][i], expected.detach(), **TIGHT)
    z = torch.randn(2, 5, 4, dtype=torch.float64)
    stack.eval()
    torch.testing.assert_close(stack.decode_mean(z), stack.decode_logits(z), **TIGHT)
    model = models[0].eval()
    with torch.no_grad():
        mean = model.decoder(z[0])
        assert float(mean.min()) < 0  # not squashed into [0, 1]
        torch.testing.assert_close(mean, model.decoder.logits(z[0]), **TIGHT)


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


@pytest.mark.parametrize("arch, mixup", [("paper-mlp", 0.0), ("paper-mlp", 0.5), ("celeba-conv", 0.5)])
def test_stacked_sweep_equals_sequential_training(tmp_path, arch, mixup):
    torch.set_num_threads(1)
    images, sizes = (_images(), SMALL) if arch == "paper-mlp" else (_conv_images(), SMALL_CONV)
    betas = [0.1, 1.0, 5.0]
    config = SweepConfig(betas=betas, mixup=[mixup], epochs=2, **sizes)
    stacked = train_sweep(config, images, tmp_path / "stacked", dtype=torch.float64, progress=False)
    for i, beta in enumerate(betas):
        single = SweepConfig(betas=[beta], mixup=[mixup], epochs=2, **sizes)
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


def test_cosine_schedule_follows_closed_form_and_resumes_exactly(tmp_path):
    """CosineAnnealingLR stepped per epoch: epoch e runs at lr (1 + cos(pi e / T)) / 2; a run killed
    after an epoch resumes at the rate (and scheduler state) it had reached, bit for bit."""
    torch.set_num_threads(1)
    images = _images()
    config = SweepConfig(betas=[0.5, 2.0], mixup=[0.2], epochs=3, lr=0.01, lr_schedule="cosine",
                         cosine_t_max=4, **SMALL)
    expected = [0.01 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(3)]  # 0.01, 0.00854, 0.005
    rates = []
    reference = train_sweep(config, images, tmp_path / "ref", progress=False,
                            on_epoch_end=lambda g: rates.append(g.history[-1]["lr"]))
    assert rates == pytest.approx(expected, rel=1e-12)

    def stop_after_first_epoch(group):
        if group.epochs_done == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_sweep(config, images, tmp_path / "run", progress=False, on_epoch_end=stop_after_first_epoch)
    saved = json.loads((tmp_path / "run" / "state" / "group.json").read_text())["schedule"]
    assert saved["last_epoch"] == 1 and saved["T_max"] == 4
    resumed_rates = []
    resumed = train_sweep(config, images, tmp_path / "run", progress=False,
                          on_epoch_end=lambda g: resumed_rates.append(g.history[-1]["lr"]))
    assert resumed_rates == rates[1:]
    for got, want in zip(resumed, reference, strict=True):
        a, b = _weights(got), _weights(want)
        for name in a:
            assert torch.equal(a[name], b[name]), name
    _, checkpoint = load_checkpoint(reference[0])
    assert (checkpoint["lr_schedule"], checkpoint["cosine_t_max"], checkpoint["lr"]) == ("cosine", 4, 0.01)
    # The schedule changes the result, so the comparisons above can fail.
    constant = SweepConfig(betas=[0.5], mixup=[0.2], epochs=3, lr=0.01, **SMALL)
    [flat] = train_sweep(constant, images, tmp_path / "constant", progress=False)
    assert not torch.equal(_weights(flat)["encoder.mu.weight"], _weights(reference[0])["encoder.mu.weight"])


def test_schedule_settings_are_checked_and_part_of_the_sweep(tmp_path):
    assert SweepConfig(betas=[1.0], mixup=[0.0], lr_schedule="cosine").cosine_t_max == 200  # the authors'
    assert SweepConfig(betas=[1.0], mixup=[0.0]).cosine_t_max is None
    with pytest.raises(ValueError, match="lr_schedule='linear'"):
        SweepConfig(betas=[1.0], mixup=[0.0], lr_schedule="linear")
    with pytest.raises(ValueError, match="applies to lr_schedule='cosine' only"):
        SweepConfig(betas=[1.0], mixup=[0.0], cosine_t_max=100)
    with pytest.raises(ValueError, match="positive number of epochs"):
        SweepConfig(betas=[1.0], mixup=[0.0], lr_schedule="cosine", cosine_t_max=0)
    images = _images(16)
    train_sweep(SweepConfig(betas=[1.0], mixup=[0.0], epochs=1, **SMALL), images, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different settings \(cosine_t_max, lr_schedule\)"):
        cosine = SweepConfig(betas=[2.0], mixup=[0.0], epochs=1, lr_schedule="cosine", **SMALL)
        train_sweep(cosine, images, tmp_path, progress=False)


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


def test_conv_config_defaults_and_validation():
    config = SweepConfig(betas=[1.0], mixup=[0.0], arch="celeba-conv")
    assert config.model_config() == {"arch": "celeba-conv", "input_shape": [3, 64, 64],
                                     "channels": [32, 64, 128, 256, 512], "latent_dim": 128,
                                     "likelihood": "gaussian"}
    assert SweepConfig(betas=[1.0], mixup=[0.0]).model_config()["likelihood"] == "bernoulli"
    with pytest.raises(ValueError, match="hidden does not apply"):
        SweepConfig(betas=[1.0], mixup=[0.0], arch="celeba-conv", hidden=[8])
    with pytest.raises(ValueError, match="channels does not apply"):
        SweepConfig(betas=[1.0], mixup=[0.0], channels=[8])
    with pytest.raises(ValueError, match="conv widths"):
        SweepConfig(betas=[1.0], mixup=[0.0], arch="celeba-conv", channels=[8] * 7)
    with pytest.raises(ValueError, match="takes"):
        SweepConfig(betas=[1.0], mixup=[0.0], arch="celeba-conv", input_shape=[1, 28, 28])
    with pytest.raises(ValueError, match="arch"):
        SweepConfig(betas=[1.0], mixup=[0.0], arch="resnet")
    with pytest.raises(ValueError, match="images are"):
        train_sweep(SweepConfig(betas=[1.0], mixup=[0.0], epochs=1, **SMALL_CONV), _images(8), "unused")


def test_a_sweep_json_written_before_arch_existed_resumes(tmp_path):
    images = _images(16)
    config = SweepConfig(betas=[1.0], mixup=[0.0], epochs=1, **SMALL)
    train_sweep(config, images, tmp_path, progress=False)
    old = json.loads((tmp_path / "sweep.json").read_text())
    del old["arch"], old["channels"], old["lr_schedule"], old["cosine_t_max"]
    (tmp_path / "sweep.json").write_text(json.dumps(old))
    more = SweepConfig(betas=[1.0, 2.0], mixup=[0.0], epochs=1, **SMALL)
    assert len(train_sweep(more, images, tmp_path, progress=False)) == 2
