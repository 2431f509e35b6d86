"""Tiny models built from configs (nothing downloads) and the samplers and cases the tests share: one place for each.

``ddim(**config)`` is the one scheduler builder (the SD-style pipelines of ``tiny_pipelines.py`` pass their
configuration); ``unet_sampler`` a Sampler on the tiny conditional UNet; ``unet_case`` / ``dit_case`` a sampler
with its noise and conditioning (two samples, guidance 2 by default).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

import diffusion_shortcuts as ds
from diffusion_shortcuts.prune import CacheSchedule, profile


def tiny_cond_unet(in_channels: int = 1, sample_size: int = 8, cross_dim: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=2, norm_num_groups=4,
    ).eval()


def tiny_unet(in_channels: int = 1, sample_size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()


def tiny_dit(in_channels: int = 2, learned_sigma: bool = True, num_classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=in_channels,
        out_channels=2 * in_channels if learned_sigma else in_channels, num_layers=2, norm_num_groups=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes,
    ).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
    ).eval()


def ddim(**config) -> DDIMScheduler:
    """DDIM over 1000 training steps without clipping (gradients through clipped pixels vanish), and ``config``."""
    return DDIMScheduler(**{"num_train_timesteps": 1000, "clip_sample": False, **config})


def unet_sampler(steps: int = 3, guidance_scale: float = 1.0, **kwargs) -> ds.Sampler:
    """The tiny conditional UNet (1 channel, 8x8, prompt tokens (3, 8)) under DDIM; with guidance, a zero uncond."""
    if guidance_scale != 1.0:
        kwargs.setdefault("uncond", torch.zeros(1, 3, 8))
    return ds.Sampler(tiny_cond_unet(), ddim(), steps, guidance_scale=guidance_scale, **kwargs)


def unet_case(dtype=torch.float32, guidance: float = 2.0, steps: int = 6):
    """(sampler, noise, cond) on the tiny conditional UNet: two samples, random prompt tokens and uncond."""
    model = tiny_cond_unet().to(dtype)
    gen = torch.Generator().manual_seed(3)
    uncond = torch.randn(1, 3, 8, generator=gen, dtype=dtype)
    sampler = ds.Sampler(model, ddim(), steps, guidance_scale=guidance, uncond=uncond)
    noise = torch.randn(2, 1, 8, 8, generator=gen, dtype=dtype)
    cond = torch.randn(2, 3, 8, generator=gen, dtype=dtype)
    return sampler, noise, cond


def dit_case(dtype=torch.float32, guidance: float = 2.0, steps: int = 6):
    """(sampler, noise, cond) on the tiny DiT: two samples of classes 1 and 7, the null class 10 as uncond."""
    model = tiny_dit(in_channels=2, learned_sigma=True, num_classes=10).to(dtype)
    sampler = ds.Sampler(model, ddim(), steps, guidance_scale=guidance, uncond=torch.tensor([10]))
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(4), dtype=dtype)
    return sampler, noise, torch.tensor([1, 7])


STEPS = 6  # the prune tests' step count
CASES = {"unet": unet_case, "dit": dit_case}


def schedule_for(sampler, noise, cond, reuse=None):
    prof = profile(sampler.model, noise, cond)
    if reuse is None:
        return CacheSchedule.keep_all(sampler.timesteps, prof)
    return CacheSchedule.from_table(reuse, sampler.timesteps, prof)


def record_outputs(module, store):
    """A plain forward hook: sees what the block returns, computed or reused."""
    return module.register_forward_hook(lambda mod, args, out: store.append(out))
