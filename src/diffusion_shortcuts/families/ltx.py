"""LTX-Video (``ltx``): a video DiT over ``(C, F, H, W)`` latents packed into tokens inside its call (``patch_size_t`` x
``patch_size`` x ``patch_size``), T5 embeddings with their mask, classifier-free guidance batched in one call, flow
matching on sigmas linear from 1 to 1/n shifted by the token count; rotary positions scaled by the VAE's
compression and the frame rate (``frame_rate``, 25 by default, a prompt option as in the stock call); a VAE
normalised per channel and scaled (``latents * std / scaling + mean``), timestep-conditioned from 0.9.1 on (decoded
at the stock call's ``decode_timestep`` 0.0)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import LTXVideoTransformer3DModel

from .base import TEXT, VideoFamily, as_kwargs, output_of, unwrap
from .codecs import normalized_codec
from .flow import accepts, dynamic_shift
from .registry import register

FRAME_RATE = 25  # LTXPipeline's default


def pack(x: torch.Tensor, p: int, pt: int) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, F/pt * H/p * W/p, C * pt * p * p), the tokens LTX's transformer takes."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f // pt, pt, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack(tokens: torch.Tensor, f: int, h: int, w: int, p: int, pt: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``f`` frames and size ``h`` x ``w``."""
    b = tokens.shape[0]
    x = tokens.reshape(b, f // pt, h // p, w // p, -1, pt, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


@register(LTXVideoTransformer3DModel)
class LTXVideo(VideoFamily):
    name = "ltx"
    default_guidance = 3.0
    conditioning = TEXT
    default_video = (161, 512, 704)  # LTXPipeline's frames, height and width
    compression = (8, 32)            # its VAE's, in time and in space
    default_fps = 24                 # its model card's export_to_video(fps=24)

    def forward(self, model, x, timestep, cond, guidance):
        config = unwrap(model).config
        p, pt = config.patch_size, config.patch_size_t
        f, h, w = x.shape[-3:]
        out = model(hidden_states=pack(x, p, pt), timestep=timestep, num_frames=f // pt, height=h // p,
                    width=w // p, **as_kwargs(cond, "encoder_hidden_states"))
        return unpack(output_of(out), f, h, w, p, pt)



    def set_timesteps(self, scheduler, num_inference_steps, device, latent_shape, model):
        tokens = int(np.prod(latent_shape[-3:]))
        kwargs = dynamic_shift(scheduler, tokens, 1.15)
        if accepts(scheduler.set_timesteps, "sigmas"):
            scheduler.set_timesteps(device=device, sigmas=np.linspace(1.0, 1 / num_inference_steps,
                                                                      num_inference_steps), **kwargs)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)

    def codec(self, pipe):
        timestep = 0.0 if pipe.vae.config.get("timestep_conditioning", False) else None
        return normalized_codec(pipe.vae, scaling=True, decode_timestep=timestep)

    def encode_prompt(self, pipe, prompts, negative, device, size, **options):
        """Embeddings and masks through LTXPipeline's own ``encode_prompt``, with the rotary scale its call hands the
        transformer (``frame_rate``: a prompt option, 25 by default)."""
        frame_rate = options.pop("frame_rate", FRAME_RATE)
        cond, mask, uncond, neg_mask = pipe.encode_prompt(prompts, negative_prompt=negative or "",
                                                          do_classifier_free_guidance=True, device=device, **options)
        spatial = pipe.vae_spatial_compression_ratio
        rope = (pipe.vae_temporal_compression_ratio / frame_rate, spatial, spatial)
        return ({"encoder_hidden_states": cond, "encoder_attention_mask": mask, "rope_interpolation_scale": rope},
                {"encoder_hidden_states": uncond, "encoder_attention_mask": neg_mask, "rope_interpolation_scale": rope})
