"""Training the paper's VAEs: beta-VAE loss, latent mixup and a vectorised beta sweep.

Objective per model (paper Eq. 1), averaged over the batch:

    L = E_q[-log p(x | z)] + beta * KL(q(z | x) || N(0, I))   (+ w * C, Eq. 9-10)

with a Bernoulli decoder (binary cross-entropy on logits, summed over pixels; the MLP's default),
a Gaussian one (unit variance: 0.5 ||x - g(z)||^2; CelebA's default) or the summed squared error
||x - g(z)||^2 ("sse", a Gaussian of variance 1/2; the ``paper`` profile's, see
docs/reproduction.md). Adam at a constant learning rate, or on a cosine schedule
(``CosineAnnealingLR``, T_max = ``cosine_t_max`` epochs, stepped once per epoch). Latent mixup:
alpha ~ Beta(0.5, 0.5) per pair, x_m = alpha x_i + (1 - alpha) x_j and
z_m = alpha z_i + (1 - alpha) z_j with the same pairs and alpha,
C = ||z_m - f(x_m)||_2 + ||g(z_m) - x_m||_2 (f = encoder mean, g = decoder mean).

The sweep trains M models at once: ``StackedVAE`` holds every weight with a leading model axis
(M, ...) and runs each layer once for all M models: a Linear as one batched matmul
(``torch.baddbmm``), a Conv2d / ConvTranspose2d as one grouped convolution (groups=M, model m's
filters in channel block m), a BatchNorm over M times the channels, so M small models become one
wide computation. A grouped convolution never mixes channel blocks, so it is exactly M
independent convolutions. The models' losses are summed, which leaves each model's gradient its
own; Adam is elementwise, so one Adam over the stacked tensors is exactly M independent Adams.
Training a stack of M therefore equals training the M models one after another (same init,
batches and noise), only faster. Both architectures of ``pullgeom.paper.models`` stack: the MNIST MLP
(``arch="paper-mlp"``) and the CelebA conv VAE (``arch="celeba-conv"``).

Sweep directory layout (everything written atomically):
    OUT/sweep.json                 the sweep's settings
    OUT/models/<tag>/              one finished model: model.safetensors + config.json
    OUT/state/group.safetensors    the unfinished group at its last finished epoch (weights, Adam
                                   moments, RNG states and, in its metadata, the epoch count,
                                   history and learning-rate schedule state: one file, so resume
                                   is exact)
    OUT/state/group.json           a readable copy of that progress record
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from pullgeom.paper.outputs import atomic_save_tensors, atomic_write_json, is_checkpoint, save_checkpoint
from pullgeom.paper.models import ARCHITECTURES, LIKELIHOODS, SIZE_FIELDS, build_model

# How the learning rate moves over the epochs: "constant", or "cosine" (CosineAnnealingLR from
# ``lr`` towards 0 over ``cosine_t_max`` epochs, stepped after each epoch, as the authors' code).
LR_SCHEDULES = ("constant", "cosine")
AUTHORS_COSINE_T_MAX = 200  # the authors' T_max; their runs stop at 100 epochs, half way down


@dataclass
class SweepConfig:
    """Everything that defines a sweep; ``betas[i]`` and ``mixup[i]`` describe model i.

    ``arch`` picks the model (``pullgeom.paper.models.ARCHITECTURES``); ``input_shape``,
    ``latent_dim``, ``likelihood`` and the arch's size field (``hidden`` for paper-mlp,
    ``channels`` for celeba-conv) default to its paper values when None; the other size field
    stays None. ``cosine_t_max`` applies to ``lr_schedule="cosine"`` only (default
    ``AUTHORS_COSINE_T_MAX``) and stays None otherwise.
    """

    betas: list[float]
    mixup: list[float]
    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0
    likelihood: str | None = None
    dataset: str = "mnist"
    limit: int | None = None
    input_shape: list[int] | None = None
    hidden: list[int] | None = None
    latent_dim: int | None = None
    arch: str = "paper-mlp"
    channels: list[int] | None = None
    lr_schedule: str = "constant"
    cosine_t_max: int | None = None

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch={self.arch!r}: pass one of {tuple(ARCHITECTURES)}")
        arch = ARCHITECTURES[self.arch]
        for foreign in SIZE_FIELDS:
            if foreign != arch.size_field and getattr(self, foreign) is not None:
                raise ValueError(f"{foreign} does not apply to arch {self.arch!r}; leave it unset")
        for key, value in arch.paper_config().items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood={self.likelihood!r}: pass one of {LIKELIHOODS}")
        if arch.check_sizes is not None:
            arch.check_sizes(getattr(self, arch.size_field))
        if arch.fixed_input and list(self.input_shape) != list(arch.input_shape):
            raise ValueError(f"input_shape={self.input_shape}: the {self.arch} VAE takes "
                             f"{list(arch.input_shape)} images")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim={self.latent_dim}: pass a positive latent size")
        if len(self.mixup) == 1 and len(self.betas) > 1:
            self.mixup = self.mixup * len(self.betas)
        if len(self.mixup) != len(self.betas):
            raise ValueError(f"{len(self.betas)} betas but {len(self.mixup)} mixup weights; "
                             "pass one mixup weight or one per beta")
        if not self.betas or min(self.betas) <= 0:
            raise ValueError("betas must be a non-empty list of positive numbers")
        if min(self.mixup) < 0:
            raise ValueError("mixup weights must be >= 0")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2 (BatchNorm needs two samples)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}: pass one of {LR_SCHEDULES}")
        if self.lr_schedule == "cosine" and self.cosine_t_max is None:
            self.cosine_t_max = AUTHORS_COSINE_T_MAX
        if self.lr_schedule != "cosine" and self.cosine_t_max is not None:
            raise ValueError(f"cosine_t_max={self.cosine_t_max} applies to lr_schedule='cosine' only; "
                             "leave it unset or pass lr_schedule='cosine'")
        if self.cosine_t_max is not None and self.cosine_t_max < 1:
            raise ValueError(f"cosine_t_max={self.cosine_t_max}: pass a positive number of epochs")

    def model_config(self) -> dict:
        """The ``config`` of every model of the sweep (what ``pullgeom.paper.models.build_model`` takes)."""
        size = ARCHITECTURES[self.arch].size_field
        return {"arch": self.arch, "input_shape": list(self.input_shape), size: list(getattr(self, size)),
                "latent_dim": self.latent_dim, "likelihood": self.likelihood}

    def tags(self) -> list[str]:
        return [model_tag(b, w) for b, w in zip(self.betas, self.mixup, strict=True)]

    def identity(self) -> dict:
        """The settings a resumed sweep must share (everything but the model list)."""
        return sweep_identity(asdict(self))


def sweep_identity(settings: dict) -> dict:
    """The settings of a sweep.json a resumed sweep must share: all but the model list and unset
    fields; a file written before ``arch`` existed is a paper-mlp sweep, one written before
    ``lr_schedule`` existed trained at a constant rate."""
    kept = {k: v for k, v in settings.items() if k not in ("betas", "mixup") and v is not None}
    return {"arch": "paper-mlp", "lr_schedule": "constant", **kept}


def model_tag(beta: float, mixup: float) -> str:
    """Directory name of one model, e.g. ``beta=0.01_mixup=0``."""
    return f"beta={beta:.6g}_mixup={mixup:.6g}"


def model_seed(seed: int, tag: str) -> int:
    """Per-model seed: a model's init and noise depend on its own tag, not its stack position."""
    return (seed * 1_000_003 + zlib.crc32(tag.encode())) % 2**62


def log_spaced(low: float, high: float, count: int) -> list[float]:
    """``count`` values log-spaced over [low, high], rounded to 6 significant digits."""
    if count == 1:
        return [float(f"{low:.6g}")]
    ratio = math.log(high / low) / (count - 1)
    return [float(f"{low * math.exp(i * ratio):.6g}") for i in range(count)]


# ----------------------------------------------------------------------------------------
# The stacked model.

# Layers ``StackedVAE`` knows how to run for M models at once.
STACKABLE = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Tanh, nn.Flatten,
             nn.Unflatten)


def _layer_chain(module: nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """The leaf layers of ``module`` but ``skip`` in registration order (= forward order for the
    models of ``pullgeom.paper.models``), each with its parameter-name prefix in the stack."""
    chain = []
    for name, layer in module.named_modules():
        if next(layer.children(), None) is not None or name in skip:
            continue
        if not isinstance(layer, STACKABLE):
            raise TypeError(f"{prefix}.{name} is a {type(layer).__name__}; StackedVAE runs only "
                            f"{', '.join(t.__name__ for t in STACKABLE)} layers")
        chain.append((f"{prefix}__{name.replace('.', '__')}", layer))
    return chain


class StackedVAE(torch.nn.Module):
    """M VAEs of one architecture (``pullgeom.paper.models``) with a leading model axis on every tensor.

    Input x: (B, N) shared by all models (an MLP also takes (M, B, N)); encode -> mu, logvar
    (M, B, dz); decode_logits(z: (M, B, dz)) -> (M, B, N). Parameter names are the model's
    state-dict names with '.' replaced by '__', each tensor stacked to (M, *shape).

    Between layers the M models' activations are either (M, B, F) (fully connected layers) or
    (B, M * C, H, W) (conv layers: model m's channels in block m, so a convolution with groups=M
    and a BatchNorm2d over M * C channels are M independent ones). The chain's layers are the
    models' own modules, kept for their hyperparameters (stride, padding, eps, momentum, shapes)
    only: their tensors are those of model 0 and are never used.
    """

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.model_config = dict(models[0].config)
        self.input_shape = tuple(self.model_config["input_shape"])
        self.count = len(models)
        states = [m.state_dict() for m in models]
        for name in states[0]:
            stacked = torch.stack([s[name] for s in states]).clone()
            key = name.replace(".", "__")
            if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                self.register_buffer(key, stacked)
            else:
                self.register_parameter(key, torch.nn.Parameter(stacked))
        first = models[0]
        self.encoder_chain = _layer_chain(first.encoder, "encoder", skip=("mu", "logvar"))
        self.decoder_chain = _layer_chain(first.decoder, "decoder")

    def _tensor(self, name: str) -> Tensor:
        return getattr(self, name)

    def _linear(self, h: Tensor, name: str) -> Tensor:
        """(B, i) shared or (M, B, i) -> (M, B, o)."""
        weight, bias = self._tensor(name + "__weight"), self._tensor(name + "__bias")  # (M, o, i), (M, o)
        if h.dim() == 2:  # shared input (B, i): one (B, i) x (i, M*o) matmul
            out = h @ weight.reshape(-1, weight.shape[-1]).T
            return out.reshape(h.shape[0], self.count, -1).transpose(0, 1) + bias.unsqueeze(1)
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))

    def _batchnorm1d(self, h: Tensor, name: str, layer: nn.BatchNorm1d, update_stats: bool) -> Tensor:
        """(M, B, F): BatchNorm1d per model, batch statistics in training mode, running ones in eval."""
        weight, bias = self._tensor(name + "__weight"), self._tensor(name + "__bias")
        running_mean = self._tensor(name + "__running_mean")
        running_var = self._tensor(name + "__running_var")
        if self.training:
            var, mean = torch.var_mean(h, dim=1, correction=0, keepdim=True)
            if update_stats:
                with torch.no_grad():
                    n, momentum = h.shape[1], layer.momentum
                    running_mean.mul_(1 - momentum).add_(momentum * mean.squeeze(1))
                    running_var.mul_(1 - momentum).add_(momentum * var.squeeze(1) * n / (n - 1))
                    self._tensor(name + "__num_batches_tracked").add_(1)
        else:
            mean, var = running_mean.unsqueeze(1), running_var.unsqueeze(1)
        return (h - mean) * torch.rsqrt(var + layer.eps) * weight.unsqueeze(1) + bias.unsqueeze(1)

    def _batchnorm2d(self, h: Tensor, name: str, layer: nn.BatchNorm2d, update_stats: bool) -> Tensor:
        """(B, M * C, H, W): one BatchNorm over the M * C channels, which is M independent ones."""
        flat = {key: self._tensor(f"{name}__{key}").reshape(-1)  # views: running stats update in place
                for key in ("weight", "bias", "running_mean", "running_var")}
        track = update_stats or not self.training  # eval mode reads the running statistics
        if self.training and update_stats:
            self._tensor(name + "__num_batches_tracked").add_(1)
        running_mean, running_var = (flat["running_mean"], flat["running_var"]) if track else (None, None)
        return F.batch_norm(h, running_mean, running_var,
                            flat["weight"], flat["bias"], self.training, layer.momentum, layer.eps)

    def _conv(self, h: Tensor, name: str, layer: nn.Conv2d | nn.ConvTranspose2d) -> Tensor:
        """Grouped (transposed) convolution: (B, M * C_in, H, W), or the shared (B, N) input, ->
        (B, M * C_out, H', W')."""
        # Conv2d (M, C_out, C_in, k, k); ConvTranspose2d (M, C_in, C_out, k, k)
        weight = self._tensor(name + "__weight")
        weight = weight.reshape(-1, *weight.shape[2:])  # the grouped layouts of both
        bias = self._tensor(name + "__bias").reshape(-1)
        if isinstance(layer, nn.ConvTranspose2d):
            return F.conv_transpose2d(h, weight, bias, layer.stride, layer.padding, layer.output_padding,
                                      self.count, layer.dilation)
        groups = self.count
        if h.dim() == 2:  # the shared input: one convolution with M * C_out filters
            h, groups = h.reshape(h.shape[0], *self.input_shape), 1
        return F.conv2d(h, weight, bias, layer.stride, layer.padding, layer.dilation, groups)

    def _run(self, h: Tensor, chain: list[tuple[str, nn.Module]], update_stats: bool) -> Tensor:
        """Apply ``chain`` to h: (B, N) shared, (M, B, F) or (B, M * C, H, W); returns (M, B, F)."""
        for name, layer in chain:
            if isinstance(layer, nn.Linear):
                h = self._linear(h, name)
            elif isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                h = self._conv(h, name, layer)
            elif isinstance(layer, nn.BatchNorm1d):
                h = self._batchnorm1d(h, name, layer, update_stats)
            elif isinstance(layer, nn.BatchNorm2d):
                h = self._batchnorm2d(h, name, layer, update_stats)
            elif isinstance(layer, nn.Tanh):
                h = torch.tanh(h)
            elif isinstance(layer, nn.Unflatten):  # (M, B, C*H*W) -> (B, M*C, H, W)
                channels, *spatial = layer.unflattened_size
                h = h.transpose(0, 1).reshape(h.shape[1], self.count * channels, *spatial)
            else:  # nn.Flatten: inputs arrive flat, so only conv features need it
                h = self._per_model(h)
        return self._per_model(h)

    def _per_model(self, h: Tensor) -> Tensor:
        """(B, M * C, H, W) -> (M, B, C * H * W); other layouts are already flat per model."""
        return h.reshape(h.shape[0], self.count, -1).transpose(0, 1) if h.dim() == 4 else h

    def encode(self, x: Tensor, update_stats: bool = True) -> tuple[Tensor, Tensor]:
        """x: (B, N) (MLP: or (M, B, N)) -> mu, logvar: (M, B, dz)."""
        h = self._run(x, self.encoder_chain, update_stats)
        return self._linear(h, "encoder__mu"), self._linear(h, "encoder__logvar")

    def decode_logits(self, z: Tensor, update_stats: bool = True) -> Tensor:
        """z: (M, B, dz) -> (M, B, N) pre-activations."""
        return self._run(z, self.decoder_chain, update_stats)

    def decode_mean(self, z: Tensor, update_stats: bool = True) -> Tensor:
        logits = self.decode_logits(z, update_stats)
        return torch.sigmoid(logits) if self.model_config["likelihood"] == "bernoulli" else logits

    def unstack(self) -> list[nn.Module]:
        """The M models as ordinary modules (eval mode, detached copies)."""
        models = []
        for m in range(self.count):
            model = build_model(self.model_config)
            state = {name.replace("__", "."): value[m].detach().clone()
                     for name, value in self.state_dict().items()}
            model.load_state_dict(state)
            models.append(model.eval())
        return models


# ----------------------------------------------------------------------------------------
# Losses.

def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last axis: (..., dz) -> (...)."""
    return -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(-1)


def reconstruction_nll(logits: Tensor, x: Tensor, likelihood: str) -> Tensor:
    """-log p(x | z) up to a constant, summed over pixels: logits, x (..., N) -> (...).

    ``likelihood`` as in ``pullgeom.paper.models.LIKELIHOODS``: "bernoulli" binary cross-entropy on
    logits, "gaussian" 0.5 ||x - g(z)||^2, "sse" ||x - g(z)||^2.
    """
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    squared_error = (logits - x).square().sum(-1)
    if likelihood == "sse":
        return squared_error
    if likelihood == "gaussian":
        return 0.5 * squared_error
    raise ValueError(f"likelihood={likelihood!r}: pass one of {LIKELIHOODS}")


def mixup_penalty(x: Tensor, z: Tensor, alpha: Tensor, partner: Tensor,
                  encode_mean: Callable[[Tensor], Tensor], decode_mean: Callable[[Tensor], Tensor]) -> Tensor:
    """Latent mixup regulariser C (Eq. 9-10), averaged over the batch, per model.

    x: (B, N) inputs; z: (M, B, dz) their latent codes; alpha: (B,) mixing weights;
    partner: (B,) index of each sample's pair. encode_mean: (B, N) -> (M, B, dz);
    decode_mean: (M, B, dz) -> (M, B, N). Returns (M,):
    mean_b ||z_m - f(x_m)||_2 + ||g(z_m) - x_m||_2.
    """
    a = alpha.to(x.dtype)
    x_mix = a[:, None] * x + (1 - a[:, None]) * x[partner]
    z_mix = a[None, :, None] * z + (1 - a[None, :, None]) * z[:, partner]
    latent_gap = (z_mix - encode_mean(x_mix)).norm(dim=-1)
    image_gap = (decode_mean(z_mix) - x_mix).norm(dim=-1)
    return (latent_gap + image_gap).mean(-1)


@dataclass
class StepNoise:
    """The randomness of one step: eps (M, B, dz); alpha (B,) and partner (B,) when mixing."""

    eps: Tensor
    alpha: Tensor | None = None
    partner: Tensor | None = None


def sweep_loss(stack: StackedVAE, x: Tensor, betas: Tensor, mixup: Tensor,
               noise: StepNoise) -> tuple[Tensor, dict]:
    """Sum over models of each model's batch-mean loss; x: (B, N), betas, mixup: (M,).

    Returns (scalar total, {"loss", "recon", "kl", "mixup"}: (M,) detached per-model values).
    """
    likelihood = stack.model_config["likelihood"]
    mu, logvar = stack.encode(x)
    z = mu + torch.exp(0.5 * logvar) * noise.eps
    recon = reconstruction_nll(stack.decode_logits(z), x, likelihood).mean(-1)
    kl = kl_standard_normal(mu, logvar).mean(-1)
    loss = recon + betas * kl
    penalty = torch.zeros_like(loss)
    if noise.alpha is not None:
        penalty = mixup_penalty(x, z, noise.alpha, noise.partner,
                                lambda xm: stack.encode(xm, update_stats=False)[0],
                                lambda zm: stack.decode_mean(zm, update_stats=False))
        loss = loss + mixup * penalty
    parts = {"loss": loss, "recon": recon, "kl": kl, "mixup": penalty}
    return loss.sum(), {k: v.detach() for k, v in parts.items()}


# ----------------------------------------------------------------------------------------
# The training loop and its resumable state.

class SweepGroup:
    """A stack of unfinished models with its optimiser and every RNG it draws from."""

    def __init__(self, config: SweepConfig, indices: list[int], device: torch.device, dtype: torch.dtype):
        self.config = config
        self.indices = indices
        self.tags = [config.tags()[i] for i in indices]
        models = []
        for tag in self.tags:
            torch.manual_seed(model_seed(config.seed, tag))
            models.append(build_model(config.model_config()))
        self.stack = StackedVAE(models).to(device=device, dtype=dtype).train()
        self.optimizer = torch.optim.Adam(self.stack.parameters(), lr=config.lr)
        self.scheduler = None
        if config.lr_schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                                        T_max=config.cosine_t_max)
        self.betas = torch.tensor([config.betas[i] for i in indices], device=device, dtype=dtype)
        self.mixup = torch.tensor([config.mixup[i] for i in indices], device=device, dtype=dtype)
        self.noise_generators = [torch.Generator().manual_seed(model_seed(config.seed, t)) for t in self.tags]
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.mixup_generator = torch.Generator().manual_seed(config.seed + 1)
        self.epochs_done = 0
        self.history: list[dict] = []

    def draw_noise(self, batch: int) -> StepNoise:
        dz = self.config.latent_dim
        eps = torch.stack([torch.randn(batch, dz, generator=g) for g in self.noise_generators])
        eps = eps.to(device=self.betas.device, dtype=self.betas.dtype)
        if not bool((self.mixup > 0).any()):
            return StepNoise(eps)
        # alpha ~ Beta(0.5, 0.5) as X / (X + Y), X, Y ~ Gamma(0.5): drawn from our own generator
        # so that a resumed run draws exactly what the uninterrupted one would have.
        gx = _gamma_half(batch, self.mixup_generator)
        gy = _gamma_half(batch, self.mixup_generator)
        alpha = (gx / (gx + gy)).to(device=self.betas.device, dtype=self.betas.dtype)
        partner = torch.randperm(batch, generator=self.mixup_generator).to(self.betas.device)
        return StepNoise(eps, alpha, partner)

    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"model.{k}": v for k, v in self.stack.state_dict().items()}
        names = dict(self.stack.named_parameters())
        for name, param in names.items():
            for key, value in self.optimizer.state.get(param, {}).items():
                tensors[f"adam.{name}.{key}"] = value.reshape(-1) if key == "step" else value
        tensors["rng.data"] = self.data_generator.get_state()
        tensors["rng.mixup"] = self.mixup_generator.get_state()
        for i, g in enumerate(self.noise_generators):
            tensors[f"rng.noise.{i}"] = g.get_state()
        return tensors

    def schedule_state(self) -> dict | None:
        """The learning-rate scheduler's state (JSON-safe numbers), None at a constant rate."""
        return None if self.scheduler is None else self.scheduler.state_dict()

    def load_schedule_state(self, state: dict | None) -> None:
        """Restore ``schedule_state``'s record, and the optimiser's rate with it: Adam's param
        groups are not in ``state_tensors``, and a scheduler's state alone does not set them."""
        if self.scheduler is None:
            return
        if state is None:
            raise ValueError("the saved group state has no learning-rate schedule state but this sweep uses "
                             f"lr_schedule={self.config.lr_schedule!r}; it was written by another version")
        self.scheduler.load_state_dict(state)
        for param_group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            param_group["lr"] = lr

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.stack.load_state_dict(model_state, strict=True)
        for name, param in self.stack.named_parameters():
            state = {}
            for key in ("step", "exp_avg", "exp_avg_sq"):
                value = tensors.get(f"adam.{name}.{key}")
                if value is not None:
                    state[key] = value.reshape(()) if key == "step" else value.to(param)
            if state:
                self.optimizer.state[param] = state
        self.data_generator.set_state(tensors["rng.data"])
        self.mixup_generator.set_state(tensors["rng.mixup"])
        for i, g in enumerate(self.noise_generators):
            g.set_state(tensors[f"rng.noise.{i}"])


def _gamma_half(count: int, generator: torch.Generator) -> Tensor:
    """Gamma(0.5, 1) samples as Z^2 / 2 with Z ~ N(0, 1) (chi-square with one degree of freedom / 2)."""
    return torch.randn(count, generator=generator, dtype=torch.float64).square() / 2


def train_epoch(group: SweepGroup, images: Tensor, progress: bool = True,
                max_steps: int | None = None) -> dict:
    """One pass over ``images`` (n, N) in shuffled batches (the last incomplete batch dropped), then
    one step of the learning-rate schedule; the metrics record the rate the epoch ran at."""
    config, stack = group.config, group.stack
    order = torch.randperm(images.shape[0], generator=group.data_generator)
    steps = images.shape[0] // config.batch_size
    if max_steps is not None:
        steps = min(steps, max_steps)
    totals = None
    lr = group.optimizer.param_groups[0]["lr"]
    bar = tqdm(range(steps), desc=f"epoch {group.epochs_done + 1}/{config.epochs} ({len(group.tags)} models)",
               leave=False, disable=not progress)
    for step in bar:
        index = order[step * config.batch_size:(step + 1) * config.batch_size]
        x = images[index].to(device=group.betas.device, dtype=group.betas.dtype)
        noise = group.draw_noise(x.shape[0])
        total, parts = sweep_loss(stack, x, group.betas, group.mixup, noise)
        group.optimizer.zero_grad(set_to_none=True)
        total.backward()
        group.optimizer.step()
        totals = parts if totals is None else {k: totals[k] + v for k, v in parts.items()}
    if group.scheduler is not None:
        group.scheduler.step()
    group.epochs_done += 1
    return {"lr": lr, **{k: (v / max(steps, 1)).tolist() for k, v in (totals or {}).items()}}


def _state_paths(out: Path) -> tuple[Path, Path]:
    return out / "state" / "group.safetensors", out / "state" / "group.json"


def _saved_progress(state_file: Path) -> dict | None:
    """The progress record (tags, epochs_done, history, schedule) stored with the group state, or None."""
    if not state_file.is_file():
        return None
    with safe_open(str(state_file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return json.loads(metadata["progress"]) if "progress" in metadata else None


def _record_sweep(out: Path, config: SweepConfig) -> None:
    """Write OUT/sweep.json, merging the models of an earlier sweep with the same settings."""
    path = out / "sweep.json"
    merged = asdict(config)
    if path.exists():
        previous = json.loads(path.read_text())
        stored = sweep_identity(previous)
        if stored != config.identity():
            changed = sorted(k for k in set(stored) | set(config.identity())
                             if stored.get(k) != config.identity().get(k))
            raise ValueError(f"'{out}' holds a sweep with different settings ({', '.join(changed)}); "
                             "pass a new --out or the same settings to resume it")
        pairs = list(zip(previous["betas"], previous["mixup"], strict=True))
        pairs += [p for p in zip(config.betas, config.mixup, strict=True) if p not in pairs]
        merged["betas"], merged["mixup"] = [p[0] for p in pairs], [p[1] for p in pairs]
    atomic_write_json(path, merged)


def train_sweep(config: SweepConfig, images: Tensor, out: str | Path, *, device: str = "cpu",
                dtype: torch.dtype = torch.float32, progress: bool = True,
                on_epoch_end: Callable[[SweepGroup], None] | None = None,
                max_steps_per_epoch: int | None = None) -> list[Path]:
    """Train every model of ``config`` not yet finished under ``out``; returns their checkpoint dirs.

    images: (n, *input_shape) (or flattened, (n, N)) in [0, 1]. All unfinished models train
    together as one stack.
    The group's full state is saved atomically after every epoch, so an interruption loses
    at most the epoch in progress; finished models are never retrained.
    """
    if images[0].numel() != math.prod(config.input_shape):
        raise ValueError(f"images are {list(images.shape[1:])} but the sweep's models take "
                         f"{list(config.input_shape)}; pass images of that shape or set input_shape")
    out = Path(out)
    _record_sweep(out, config)
    tags = config.tags()
    directories = [out / "models" / tag for tag in tags]
    pending = [i for i, d in enumerate(directories) if not is_checkpoint(d)]
    if not pending:
        # A run killed after its last checkpoint but before it removed its state: finish the cleanup.
        for path in _state_paths(out):
            path.unlink(missing_ok=True)
        return directories
    flat = images.reshape(images.shape[0], -1)
    state_file, state_json = _state_paths(out)
    saved = _saved_progress(state_file)
    if saved is not None and {tags[i] for i in pending} <= set(saved["tags"]) <= set(tags):
        # A run killed while writing its checkpoints: finish its group from the saved state,
        # since the models it had not saved yet would not train bit-identically in a smaller stack.
        pending = [tags.index(t) for t in saved["tags"]]
    group = SweepGroup(config, pending, torch.device(device), dtype)
    if saved is not None and saved["tags"] == group.tags:
        group.load_state_tensors(load_file(str(state_file)))
        group.load_schedule_state(saved.get("schedule"))
        group.epochs_done, group.history = saved["epochs_done"], saved["history"]
    start = time.perf_counter()
    bar = tqdm(total=config.epochs, initial=group.epochs_done, desc=f"training {len(pending)} models",
               disable=not progress)
    while group.epochs_done < config.epochs:
        group.stack.train()
        metrics = train_epoch(group, flat, progress, max_steps_per_epoch)
        group.history.append({"epoch": group.epochs_done, **metrics})
        progress_record = {"tags": group.tags, "epochs_done": group.epochs_done, "history": group.history,
                           "schedule": group.schedule_state()}
        # The record travels inside the tensor file (one atomic write); group.json is a readable copy.
        atomic_save_tensors(state_file, group.state_tensors(), {"progress": json.dumps(progress_record)})
        atomic_write_json(state_json, progress_record)
        bar.update(1)
        if on_epoch_end is not None:
            on_epoch_end(group)
    bar.close()
    seconds = time.perf_counter() - start
    for position, (model, tag) in enumerate(zip(group.stack.unstack(), group.tags, strict=True)):
        index = tags.index(tag)
        final = {k: group.history[-1][k][position] for k in ("loss", "recon", "kl", "mixup")}
        save_checkpoint(directories[index], model.to(torch.float32),
                        {"beta": config.betas[index], "mixup": config.mixup[index], "epochs": config.epochs,
                         "dataset": config.dataset, "limit": config.limit, "seed": config.seed,
                         "batch_size": config.batch_size, "lr": config.lr, "lr_schedule": config.lr_schedule,
                         "cosine_t_max": config.cosine_t_max,
                         "train_seconds_group": seconds, "group_size": len(group.tags), "final_train": final})
    state_file.unlink(missing_ok=True)
    state_json.unlink(missing_ok=True)
    return directories
