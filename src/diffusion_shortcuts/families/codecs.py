"""Latents <-> images (or videos) in [0, 1] through a pipeline's VAE, as its stock call decodes.

Two kinds of latent normalisation cover the registered families:

- :func:`scaled_codec`: an AutoencoderKL's ``scaling_factor`` and ``shift_factor`` (Stable Diffusion, SDXL, SD3,
  Flux, PixArt, DiT, Sana's DC-AE, HunyuanVideo's VAE): ``x = D(z / scaling + shift)``;
- :func:`normalized_codec`: per-channel ``latents_mean`` / ``latents_std`` of the Wan-style VAEs (Wan, Qwen-Image),
  ``x = D(z * std + mean)``, and with a ``scaling_factor`` as well (LTX-Video): ``x = D(z * std / scaling + mean)``.

Both keep the decode differentiable (no clamp), decode in the VAE's precision and check a half-precision decode
once for an overflow. A video VAE decodes ``(B, C, F, H, W)`` latents to ``(B, 3, F, H, W)`` videos, the layout every
video leaves the library's decoders in; an image family on one (Qwen-Image) adds and drops a frame axis of one
(``frames=False``); a frames-first family (CogVideoX) moves its latents' frame axis (``frames_first``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..precision import check_finite


def _pixel_codec():
    """Pixel pipelines: [-1, 1] <-> [0, 1]."""
    return (lambda x: x / 2 + 0.5), (lambda images: images * 2 - 1)


def _decoded(vae, z: torch.Tensor, timestep: float | None = None) -> torch.Tensor:
    """``vae.decode``; ``timestep``: the decode timestep of a timestep-conditioned decoder (LTX-Video 0.9.1+)."""
    if timestep is not None:
        out = vae.decode(z.to(vae.dtype), torch.full((z.shape[0],), timestep, device=z.device, dtype=vae.dtype))
    else:
        out = vae.decode(z.to(vae.dtype))
    images = out.sample if hasattr(out, "sample") else out[0]
    check_finite(images, vae.dtype, f"VAE decoder ({type(vae).__name__})", "images")  # SD's VAE overflows in fp16
    return images


def _encoded(vae, images: torch.Tensor) -> torch.Tensor:
    out = vae.encode(images.to(vae.dtype))
    return out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent  # DC-AE: deterministic


class Axes(NamedTuple):
    """How a family's tensors meet a video VAE: latents in and out, pixels out and in. Videos leave the codec as
    ``(B, 3, F, H, W)``, whatever the family's latent layout."""

    latents_in: Callable
    latents_out: Callable
    pixels_out: Callable
    pixels_in: Callable


def _same(x):
    return x


def _axes(frames: bool, frames_first: bool) -> Axes:
    if frames_first:  # CogVideoX's latents: (B, F, C, H, W) <-> (B, C, F, H, W)
        def swap(z):
            return z.permute(0, 2, 1, 3, 4)
        return Axes(swap, swap, _same, _same)
    if not frames:  # an image family on a video VAE (Qwen-Image): one frame
        def add(x):
            return x.unsqueeze(2)

        def drop(x):
            return x[:, :, 0]
        return Axes(add, drop, drop, add)
    return Axes(_same, _same, _same, _same)


def scaled_codec(vae, frames: bool = True, frames_first: bool = False):
    """``x = D(z / scaling + shift)``, ``z = (E(x) - shift) * scaling`` (SD3 and Flux VAEs have a shift; SD's has
    none); None (a pixel pipeline) maps [-1, 1] <-> [0, 1]."""
    if vae is None:
        return _pixel_codec()
    scale = vae.config.scaling_factor
    shift = vae.config.get("shift_factor", None) or 0.0
    axes = _axes(frames, frames_first)

    def decode(z):
        return axes.pixels_out(_decoded(vae, axes.latents_in(z / scale + shift))).to(z.dtype) / 2 + 0.5

    def encode(images):
        return axes.latents_out((_encoded(vae, axes.pixels_in(images * 2 - 1)) - shift) * scale).to(images.dtype)

    return decode, encode


def normalized_codec(vae, frames: bool = True, scaling: bool = False, decode_timestep: float | None = None):
    """``x = D(z * std + mean)`` with the VAE's per-channel ``latents_mean`` / ``latents_std`` (Wan, Qwen-Image), and
    ``x = D(z * std / scaling + mean)`` with ``scaling`` (LTX-Video); ``z = (E(x) - mean) / std`` back.
    ``decode_timestep``: the timestep a timestep-conditioned decoder is handed (LTX-Video 0.9.1+; its pipeline's
    default 0.0 adds no noise)."""
    config = vae.config
    buffers = dict(vae.named_buffers())  # LTX keeps them as buffers, Wan in its configuration
    means = buffers["latents_mean"].tolist() if "latents_mean" in buffers else list(config.latents_mean)
    stds = buffers["latents_std"].tolist() if "latents_std" in buffers else list(config.latents_std)
    scale = float(config.scaling_factor) if scaling else 1.0
    axes = _axes(frames, False)

    def stats(z):
        view = (1, len(means)) + (1,) * (z.ndim - 2)
        mean = torch.tensor(means, device=z.device, dtype=z.dtype).view(view)
        std = torch.tensor(stds, device=z.device, dtype=z.dtype).view(view)
        return mean, std

    def decode(z):
        mean, std = stats(z)
        images = _decoded(vae, axes.latents_in(z * std / scale + mean), decode_timestep)
        return axes.pixels_out(images).to(z.dtype) / 2 + 0.5

    def encode(images):
        latents = axes.latents_out(_encoded(vae, axes.pixels_in(images * 2 - 1))).to(images.dtype)
        mean, std = stats(latents)
        return (latents - mean) * scale / std

    return decode, encode
