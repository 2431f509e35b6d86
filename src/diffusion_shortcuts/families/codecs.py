"""Latents <-> images (or videos) in [0, 1] through a pipeline's VAE, as its stock call decodes.

Two kinds of latent normalisation cover the registered families:

- :func:`scaled_codec`: an AutoencoderKL's ``scaling_factor`` and ``shift_factor`` (Stable Diffusion, SDXL, SD3,
  Flux, PixArt, DiT, Sana's DC-AE, HunyuanVideo's VAE): ``x = D(z / scaling + shift)``;
- :func:`normalized_codec`: per-channel ``latents_mean`` / ``latents_std`` of the Wan-style VAEs (Wan, Qwen-Image),
  ``x = D(z * std + mean)``, and with a ``scaling_factor`` as well (LTX-Video): ``x = D(z * std / scaling + mean)``.

Both keep the decode differentiable (no clamp), decode in the VAE's precision and check a half-precision decode
once for an overflow. A video VAE decodes ``(B, C, F, H, W)``; an image family on one (Qwen-Image) adds and drops a
frame axis of one (``frames=False``); a frames-first family (CogVideoX) moves its frame axis (``frames_first``).
"""

from __future__ import annotations

import torch

from ..precision import check_finite


def _pixel_codec():
    """Pixel pipelines: [-1, 1] <-> [0, 1]."""
    return (lambda x: x / 2 + 0.5), (lambda images: images * 2 - 1)


def _decoded(vae, z: torch.Tensor) -> torch.Tensor:
    out = vae.decode(z.to(vae.dtype))
    images = out.sample if hasattr(out, "sample") else out[0]
    check_finite(images, vae.dtype, f"VAE decoder ({type(vae).__name__})", "images")  # SD's VAE overflows in fp16
    return images


def _encoded(vae, images: torch.Tensor) -> torch.Tensor:
    out = vae.encode(images.to(vae.dtype))
    return out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent  # DC-AE: deterministic


def _axes(frames: bool, frames_first: bool):
    """(to the VAE's layout, back to the family's) for latents of a video VAE."""
    if frames_first:  # CogVideoX: (B, F, C, H, W) <-> (B, C, F, H, W)
        return (lambda z: z.permute(0, 2, 1, 3, 4)), (lambda z: z.permute(0, 2, 1, 3, 4))
    if not frames:  # an image family on a video VAE (Qwen-Image): one frame
        return (lambda z: z.unsqueeze(2)), (lambda z: z[:, :, 0])
    return (lambda z: z), (lambda z: z)


def scaled_codec(vae, frames: bool = True, frames_first: bool = False):
    """``x = D(z / scaling + shift)``, ``z = (E(x) - shift) * scaling`` (SD3 and Flux VAEs have a shift; SD's has
    none); None (a pixel pipeline) maps [-1, 1] <-> [0, 1]."""
    if vae is None:
        return _pixel_codec()
    scale = vae.config.scaling_factor
    shift = vae.config.get("shift_factor", None) or 0.0
    to_vae, from_vae = _axes(frames, frames_first)

    def decode(z):
        return from_vae(_decoded(vae, to_vae(z / scale + shift))).to(z.dtype) / 2 + 0.5

    def encode(images):
        return from_vae((_encoded(vae, to_vae(images * 2 - 1)) - shift) * scale).to(images.dtype)

    return decode, encode


def normalized_codec(vae, frames: bool = True, scaling: bool = False):
    """``x = D(z * std + mean)`` with the VAE's per-channel ``latents_mean`` / ``latents_std`` (Wan, Qwen-Image), and
    ``x = D(z * std / scaling + mean)`` with ``scaling`` (LTX-Video); ``z = (E(x) - mean) / std`` back."""
    config = vae.config
    channels = len(config.latents_mean)
    scale = float(config.scaling_factor) if scaling else 1.0
    to_vae, from_vae = _axes(frames, False)

    def stats(z):
        view = (1, channels) + (1,) * (z.ndim - 2)
        mean = torch.tensor(config.latents_mean, device=z.device, dtype=z.dtype).view(view)
        std = torch.tensor(config.latents_std, device=z.device, dtype=z.dtype).view(view)
        return mean, std

    def decode(z):
        mean, std = stats(z)
        return from_vae(_decoded(vae, to_vae(z * std / scale + mean))).to(z.dtype) / 2 + 0.5

    def encode(images):
        latents = from_vae(_encoded(vae, to_vae(images * 2 - 1))).to(images.dtype)
        mean, std = stats(latents)
        return (latents - mean) * scale / std

    return decode, encode
