"""Train latentrt's built-in demo model from scratch on the procedural shapes dataset.

    python tools/train_demo.py --out latentrt/plugins/demo/latentrt-demo.safetensors

Two stages, both on the CPU by default and reproducible from ``--seed``:

1. the VAE (64x64x3 <-> 4x16x16): L1 reconstruction, weighted up on the shape's pixels,
   plus a small KL term (LDM's ``AutoencoderKL`` objective without the GAN and LPIPS parts,
   which flat shapes do not need), mostly on 32x32 crops (the autoencoder is convolutional;
   crops cost a quarter) and for its last steps on whole images; then the latent scale is
   measured as ``1 / std`` of the training latents (LDM's ``scale_by_std``);
2. the UNet and the CLIP text encoder together, on those latents with DDPM's eps objective
   (Ho et al. 2020, eq. 14) over SD's 1000-step scaled-linear schedule, weighted by Min-SNR-5
   (Hang et al. 2023) and with 10% of captions dropped to "" so classifier-free guidance
   works. An exponential moving average of the weights is what gets saved.

The output is one ``.safetensors`` in the single-file LDM layout of SD 1.x checkpoints
(``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.transformer.`` and a
top-level ``scale_factor``), stored in float16, which ``latentrt.load`` reads like any other
checkpoint. Losses are printed and written as JSON lines to ``--log``.

On 2 otherwise idle CPU cores the default settings take about 75 minutes (the shipped run
took 107, sharing the cores). A report judges the VAE's reconstructions (``vae_report``).
``--device cuda`` exists for
experiments; the shipped weights come from the CPU run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from latentrt.core.model_sampling import sd_model_sampling
from latentrt.plugins.demo.dataset import DemoShapes
from latentrt.plugins.demo.model import DEMO_UNET, DEMO_VAE, demo_text_model, demo_token_ids
from latentrt.plugins.stable_diffusion.prompt import tokenize_weighted
from latentrt.plugins.stable_diffusion.tokenizer import CLIPTokenizer
from latentrt.plugins.stable_diffusion.unet import UNet
from latentrt.plugins.stable_diffusion.vae import AutoencoderKL

VAE_SEED_OFFSET = 1  # dataset seeds: the VAE, the UNet and evaluation see different images
UNET_SEED_OFFSET = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults are the settings of the shipped weights)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("latentrt/plugins/demo/latentrt-demo.safetensors"))
    parser.add_argument("--log", type=Path, default=Path("tools/train_demo.log.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (results depend slightly on it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--vae-crop", type=int, default=32, help="VAE steps train on crops this size ...")
    parser.add_argument("--vae-full-steps", type=int, default=300, help="... except the last ones")
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=3e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--mse-weight", type=float, default=1.0, help="VAE loss: weighted L1 + this x weighted MSE")
    parser.add_argument("--shape-weight", type=float, default=10.0, help="VAE loss weight of shape pixels")
    parser.add_argument("--vae-only", action="store_true", help="stop after the VAE stage and its report")
    parser.add_argument("--latents", type=int, default=40000, help="training images encoded for stage 2")
    parser.add_argument("--unet-steps", type=int, default=5000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--uncond", type=float, default=0.1, help="fraction of captions replaced by ''")
    parser.add_argument("--min-snr", type=float, default=5.0)
    return parser.parse_args(argv)


class Logger:
    """Prints losses and appends them as JSON lines."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", encoding="utf-8")
        self.start = time.monotonic()

    def __call__(self, bar: Any, **record: Any) -> None:
        record["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if isinstance(v, float) and k != "elapsed_s"})


def batches(dataset: DemoShapes, batch: int, rng: random.Random) -> Iterator[Tensor]:
    """Endless random batches of images from ``dataset``."""
    while True:
        yield torch.stack([dataset[rng.randrange(len(dataset))][0] for _ in range(batch)])


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_vae(args: argparse.Namespace, log: Logger, device: torch.device) -> AutoencoderKL:
    """Stage 1: the autoencoder, L1 + KL on fresh dataset images."""
    vae = AutoencoderKL(DEMO_VAE).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, args.vae_steps, args.warmup))
    images = batches(DemoShapes(args.seed * 10 + VAE_SEED_OFFSET, 10**6), args.vae_batch, random.Random(args.seed))
    generator = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.vae_steps), desc="VAE", file=sys.stdout, mininterval=5)
    for step in bar:
        x = next(images).to(device)
        if step < args.vae_steps - args.vae_full_steps:
            x = random_crop(x, args.vae_crop, generator)
        posterior = vae.posterior(x)
        z = posterior.mean + posterior.std * torch.randn_like(posterior.mean)
        reconstruction = vae._decode_unscaled(z)
        weights = shape_weights(x, args.shape_weight)
        l1 = ((reconstruction - x).abs() * weights).mean()
        mse = ((reconstruction - x).square() * weights).mean()
        # KL(q(z|x) || N(0, I)) per latent element (LDM's DiagonalGaussianDistribution.kl).
        kl = 0.5 * (posterior.mean.square() + posterior.logvar.exp() - 1.0 - posterior.logvar).mean()
        loss = l1 + args.mse_weight * mse + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            log(bar, stage="vae", step=step, l1=l1.item(), kl=kl.item())
    return vae.eval()


def random_crop(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """One random ``size`` x ``size`` window of each batch (the same window for the whole batch)."""
    top, left = (int(torch.randint(0, images.shape[-1] - size + 1, (1,), generator=generator)) for _ in range(2))
    return images[..., top : top + size, left : left + size]


def shape_weights(images: Tensor, weight: float) -> Tensor:
    """Per-pixel loss weights: ``weight`` where a pixel differs from its image's border colour, else 1.

    Shapes cover a few percent of each image; unweighted, the autoencoder learns the
    backgrounds and blurs the shapes away.
    """
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    differs = ((images - background).abs() > 0.1).any(dim=1, keepdim=True)
    return 1.0 + (weight - 1.0) * differs.to(images.dtype)


@torch.no_grad()
def encode_dataset(
    vae: AutoencoderKL, tokenizer: CLIPTokenizer, args: argparse.Namespace, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Posterior-mean latents (unscaled) and 77-token ids of ``--latents`` training images."""
    dataset = DemoShapes(args.seed * 10 + UNET_SEED_OFFSET, args.latents)
    latents, ids = [], []
    for start in tqdm(range(0, len(dataset), 256), desc="encode", file=sys.stdout, mininterval=5):
        items = [dataset[i] for i in range(start, min(start + 256, len(dataset)))]
        latents.append(vae.posterior(torch.stack([image for image, _ in items]).to(device)).mean.cpu())
        ids.append(caption_ids(tokenizer, [caption for _, caption in items]))
    return torch.cat(latents), torch.cat(ids)


def caption_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> Tensor:
    """``[n, 77]`` CLIP ids exactly as the pipeline tokenizes prompts (one chunk each)."""
    return torch.tensor([tokenize_weighted(tokenizer, caption)[0].ids for caption in captions])


def min_snr_weights(alphas_cumprod: Tensor, timesteps: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma loss weights for eps prediction: ``min(SNR, gamma) / SNR``."""
    snr = alphas_cumprod[timesteps] / (1.0 - alphas_cumprod[timesteps])
    return torch.clamp(snr, max=gamma) / snr


def train_unet(
    args: argparse.Namespace, log: Logger, device: torch.device, latents: Tensor, ids: Tensor, empty: Tensor
) -> tuple[UNet, nn.Module]:
    """Stage 2: UNet + text encoder on scaled latents; returns their EMA copies."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    unet = UNet(DEMO_UNET).to(device)
    text = demo_text_model(torch.tensor(demo_token_ids(CLIPTokenizer.from_package()))).to(device)
    params = [*unet.parameters(), *text.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, args.unet_steps, args.warmup))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    alphas_cumprod = sd_model_sampling().alphas_cumprod.to(torch.float32)
    bar = tqdm(range(args.unet_steps), desc="UNet", file=sys.stdout, mininterval=5)
    for step in bar:
        pick = torch.randint(0, len(latents), (args.unet_batch,), generator=generator)
        x0, tokens = latents[pick], ids[pick].clone()
        tokens[torch.rand(args.unet_batch, generator=generator) < args.uncond] = empty
        t = torch.randint(0, len(alphas_cumprod), (args.unet_batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1.0 - a).sqrt() * noise  # q(x_t | x_0), DDPM eq. 4
        context = text(tokens.to(device)).hidden
        eps = unet(noisy.to(device), t.to(device), context, None)
        per_image = (eps - noise.to(device)).square().mean(dim=(1, 2, 3))
        loss = (per_image * min_snr_weights(alphas_cumprod, t, args.min_snr).to(device)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        update_ema(ema_unet, unet, decay)
        update_ema(ema_text, text, decay)
        if step % 50 == 0 or step == args.unet_steps - 1:
            log(bar, stage="unet", step=step, loss=loss.item(), lr=schedule.get_last_lr()[0])
    return ema_unet, ema_text


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for every floating-point tensor."""
    for target, source in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
        if target.is_floating_point():
            target.lerp_(source, 1.0 - decay)


def single_file_state(unet: UNet, vae: AutoencoderKL, text: nn.Module, scale: float) -> dict[str, Tensor]:
    """The three networks under SD 1.x single-file names, floats stored as float16."""
    state: dict[str, Tensor] = {"scale_factor": torch.tensor(scale, dtype=torch.float32)}
    parts = (
        ("model.diffusion_model.", unet),
        ("first_stage_model.", vae),
        ("cond_stage_model.transformer.text_model.", text),
    )
    for prefix, module in parts:
        for key, tensor in module.state_dict().items():
            value = tensor.detach().cpu()
            state[prefix + key] = (value.half() if value.is_floating_point() else value).contiguous()
    return state


def vae_report(vae: AutoencoderKL, device: torch.device, count: int = 64) -> dict[str, float]:
    """How often the judge reads the right colour and shape in the VAE's reconstructions."""
    from latentrt.plugins.demo.classify import judge
    from latentrt.plugins.demo.shapes import tensor_to_image

    dataset = DemoShapes(-1, count)  # seed -1: images no training stage sees
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(count)]).to(device)
        reconstructions = vae._decode_unscaled(vae.posterior(images).mean).cpu()
    verdicts = [(judge(tensor_to_image(r)), dataset.spec(i)) for i, r in enumerate(reconstructions)]
    return {
        "colour": sum(j.colour == spec.colour for j, spec in verdicts) / count,
        "shape": sum(j.shape == spec.shape for j, spec in verdicts) / count,
    }


def main(argv: list[str] | None = None) -> int:
    """Train both stages and write the single-file checkpoint."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    log = Logger(args.log)
    vae = train_vae(args, log, device)
    report = vae_report(vae, device)
    print(f"VAE reconstructions judged: colour {report['colour']:.0%}, shape {report['shape']:.0%}")
    log(tqdm(disable=True), stage="vae_report", **report)
    if args.vae_only:
        return 0
    tokenizer = CLIPTokenizer.from_package()
    latents, ids = encode_dataset(vae, tokenizer, args, device)
    scale = 1.0 / latents.std().item()
    log(tqdm(disable=True), stage="scale", scale_factor=scale, latent_mean=latents.mean().item())
    unet, text = train_unet(args, log, device, latents * scale, ids, caption_ids(tokenizer, [""])[0])
    state = single_file_state(unet, vae, text, scale)
    metadata = {"latentrt.model": "demo", "training": json.dumps({k: str(v) for k, v in vars(args).items()})}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata=metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB), latent scale {scale:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
