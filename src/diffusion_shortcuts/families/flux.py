"""FLUX.1-dev and -schnell (``flux``): double-stream then single-stream blocks over packed 2x2 latent tokens,
embedded guidance (dev) and, with ``true_cfg_scale`` and a negative prompt, a classifier-free guidance of its own in
two calls (``cond`` first, as FluxPipeline calls them), timesteps divided by 1000 after rounding to the latents'
dtype (as FluxPipeline does), sigmas linear from 1 to 1/n shifted by the token count."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxTransformer2DModel

from .base import EMBEDDED, SEPARATE, TEXT, TransformerFamily, as_kwargs, config_shape, output_of, unwrap
from .flow import accepts, dynamic_shift
from .registry import register


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """Flux's tokens: (B, C, H, W) -> (B, H/2 * W/2, 4C), one token per 2x2 patch."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of spatial size (h, w)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def flux_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Flux's rotary position ids of the packed latent tokens: (row, column) per 2x2 patch."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@register(FluxTransformer2DModel)
class Flux(TransformerFamily):
    name = "flux"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    streams = ("encoder_hidden_states", "hidden_states")
    guidance = EMBEDDED
    true_cfg = True
    cfg_calls = SEPARATE
    default_guidance = 3.5
    conditioning = TEXT
    timestep_in_latent_dtype = True

    def timestep_scale(self, model) -> float:
        return 1 / 1000

    def forward(self, model, x, timestep, cond, guidance):
        kwargs = as_kwargs(cond, None)
        h, w = x.shape[-2:]
        text = kwargs["encoder_hidden_states"]
        embedded = guidance is not None and unwrap(model).config.guidance_embeds
        out = model(hidden_states=pack_latents(x), timestep=timestep,
                    guidance=torch.full((x.shape[0],), float(guidance), device=x.device) if embedded else None,
                    img_ids=flux_image_ids(h, w, x.device, x.dtype),
                    txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=text.dtype), **kwargs)
        return unpack_latents(output_of(out), h, w)

    def latent_shape(self, model) -> tuple[int, int, int]:
        return config_shape(model, channels_divisor=4, default_size=128)

    def spatial_multiple(self, model) -> int:
        return 2

    def set_timesteps(self, scheduler, num_inference_steps, device, latent_shape, model):
        kwargs = dynamic_shift(scheduler, (latent_shape[-2] // 2) * (latent_shape[-1] // 2), 1.15)
        if accepts(scheduler.set_timesteps, "sigmas") and not scheduler.config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(device=device, sigmas=np.linspace(1.0, 1 / num_inference_steps,
                                                                      num_inference_steps), **kwargs)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)

    def encode_prompt(self, pipe, prompts, negative, device, size, **options):
        """The prompts, and the negative prompts where given (true CFG), each through FluxPipeline's own
        ``encode_prompt`` as its call encodes them."""
        def encoded(texts):
            cond, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=device, **options)
            return {"encoder_hidden_states": cond, "pooled_projections": pooled}

        return encoded(prompts), encoded(negative) if negative is not None else None
