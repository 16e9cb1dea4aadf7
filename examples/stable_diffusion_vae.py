"""Score a Stable Diffusion VAE (any diffusers ``AutoencoderKL``) on your own images.

For each image: the top-k eigenvalues of the encoder's pullback metric G(x) (the input
directions whose change moves the latent distribution most), their residuals
||G v - lambda v|| / lambda_1, and the top eigenvector saved as an image: the most effective
small perturbation of that image against this encoder (an attack direction).

    # your weights, from a local folder (the VAE's own, or a pipeline's with --subfolder vae)
    python examples/stable_diffusion_vae.py --model path/to/vae --images my_photos/
    # the SD architecture with random weights (a demo: nothing is downloaded)
    python examples/stable_diffusion_vae.py --random-config --images my_photos/
    python examples/stable_diffusion_vae.py --smoke   # a tiny configuration, seconds (CI)

Needs diffusers, Pillow and tqdm. A 256 x 256 image has N = 196,608 inputs and r = 8,192
nonzero eigenvalues: ``backend="auto"`` runs matrix-free Lanczos to the top k only (the whole
spectrum would take r products), so entropy is not reported (``pullgeom.entropy_estimate``
estimates it). Minutes per image on a CPU; BENCHMARKS.md, "Stable Diffusion's VAE encoder".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import pullgeom

SUFFIXES = (".png", ".jpg", ".jpeg")


def random_sd_vae(tiny: bool = False):
    """The SD 1.x/2.x VAE architecture with random weights, or a tiny one of the same blocks."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    if tiny:
        return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                             layers_per_block=1, latent_channels=2,
                             norm_num_groups=4, sample_size=16)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, latent_channels=4, sample_size=256)


def load_image(path: Path, size: int) -> torch.Tensor:
    """An image file as (3, size, size) in [-1, 1] (SD's input range): the shorter side resized
    to ``size``, then the centre cropped."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def save_direction(vector: torch.Tensor, path: Path) -> None:
    """A unit eigenvector (3, H, W) as an RGB image, 0 at mid-grey, scaled to its largest entry."""
    from PIL import Image

    scaled = (vector / (2 * vector.abs().max().clamp_min(1e-30)) + 0.5).clamp(0, 1)
    pixels = (scaled * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    Image.fromarray(pixels.numpy()).save(path)


def smoke_images(size: int, count: int = 2) -> list[tuple[str, torch.Tensor]]:
    """Smooth synthetic images (a colour ramp and a blob), for --smoke."""
    ramp = torch.linspace(-1, 1, size)
    grid_y, grid_x = torch.meshgrid(ramp, ramp, indexing="ij")
    blob = torch.exp(-4 * (grid_x ** 2 + grid_y ** 2)) * 2 - 1
    images = [torch.stack([grid_x, grid_y, -grid_x]), torch.stack([blob, blob.flip(0), blob.flip(1)])]
    return [(f"synthetic-{i}", image) for i, image in enumerate(images[:count])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path,
                        help="a local diffusers AutoencoderKL folder (config.json + weights)")
    source.add_argument("--random-config", action="store_true",
                        help="the SD VAE architecture, random weights")
    parser.add_argument("--subfolder", default=None, help="e.g. 'vae' inside a whole pipeline's folder")
    parser.add_argument("--images", type=Path, help="a folder of PNG/JPG images")
    parser.add_argument("--size", type=int, default=256,
                        help="images resized and centre-cropped to this side")
    parser.add_argument("--k", type=int, default=5, help="eigenpairs per image")
    parser.add_argument("--tol", type=float, default=None,
                        help="stop each image once its top-k residuals are <= tol * lambda_1 "
                             "(default 1e-5; 1e-3 takes fewer products where the top is flat)")
    parser.add_argument("--out", type=Path, default=Path("sd-vae-directions"),
                        help="folder for the top eigenvectors as images")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny random VAE on 16 x 16 synthetic images (CI)")
    args = parser.parse_args(argv)
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        vae, size = random_sd_vae(tiny=True), 16
    elif args.model is not None:
        vae, size = AutoencoderKL.from_pretrained(args.model, subfolder=args.subfolder), args.size
    elif args.random_config:
        vae, size = random_sd_vae(), args.size
    else:
        parser.error("pass --model FOLDER (your AutoencoderKL), --random-config or --smoke")
    vae = vae.float().eval().requires_grad_(False)
    if args.smoke:
        named = smoke_images(size)
    elif args.images is None or not args.images.is_dir():
        parser.error("pass --images FOLDER, a folder of .png/.jpg files")
    else:
        files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            parser.error(f"{args.images} holds no {'/'.join(SUFFIXES)} files")
        named = [(p.stem, load_image(p, size)) for p in files]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, image in tqdm(named, desc="images", unit="image"):
        result = pullgeom.spectrum(vae, image.unsqueeze(0), k=args.k, tol=args.tol)
        values = result.eigenvalues[0]
        # Direct backends (a small VAE, A materialised) have no residuals: exact to round-off.
        residuals = None if result.residuals is None else result.residuals[0] / values[0]
        save_direction(result.eigenvectors[0, 0], args.out / f"{name}-top-eigenvector.png")
        rows.append((name, result.backend, values, residuals))
    for name, backend, values, residuals in rows:
        print(f"{name} ({backend}): top-{args.k} eigenvalues "
              + " ".join(f"{v:.4g}" for v in values.tolist())
              + ("; direct solve" if residuals is None
                 else "; residuals / lambda_1 " + " ".join(f"{r:.1e}" for r in residuals.tolist())))
    print(f"top eigenvectors (attack directions) saved in {args.out}/")


if __name__ == "__main__":
    main()
