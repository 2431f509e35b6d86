"""HunyuanVideo (``hunyuanvideo``): a video MM-DiT over ``(C, F, H, W)`` latents, dual-stream blocks then single-stream
blocks (each updating the video and the text stream), Llama embeddings with their mask and CLIP's pooled text,
embedded guidance (``guidance_scale`` times 1000, a model input) and, with ``true_cfg_scale`` and a negative prompt, a
classifier-free guidance of its own in two calls (``cond`` first); flow matching on sigmas linear from 1 down to
1/n, shifted by the scheduler's ``shift``; a VAE scaled by its ``scaling_factor`` that compresses time 4x and space
8x."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import HunyuanVideoTransformer3DModel

from .base import EMBEDDED, SEPARATE, TEXT, VideoFamily, as_kwargs, output_of, unwrap
from .registry import register


@register(HunyuanVideoTransformer3DModel)
class HunyuanVideo(VideoFamily):
    name = "hunyuanvideo"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    streams = ("hidden_states", "encoder_hidden_states")
    guidance = EMBEDDED
    true_cfg = True
    cfg_calls = SEPARATE
    default_guidance = 6.0
    conditioning = TEXT
    default_video = (129, 720, 1280)  # HunyuanVideoPipeline's frames, height and width
    default_fps = 15                  # its model card's export_to_video(fps=15)

    def forward(self, model, x, timestep, cond, guidance):
        embedded = torch.full((x.shape[0],), float(guidance), device=x.device, dtype=x.dtype) * 1000.0 \
            if guidance is not None and unwrap(model).config.guidance_embeds else None
        return output_of(model(hidden_states=x, timestep=timestep, guidance=embedded,
                               **as_kwargs(cond, "encoder_hidden_states")))



    def set_timesteps(self, scheduler, num_inference_steps, device, latent_shape, model):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1], device=device)

    def encode_prompt(self, pipe, prompts, negative, device, size, **options):
        """The prompts, and the negative prompts where given (true CFG), each through HunyuanVideoPipeline's own
        ``encode_prompt`` (Llama embeddings and mask, CLIP's pooled text)."""
        def encoded(texts):
            cond, pooled, mask = pipe.encode_prompt(prompt=texts, prompt_2=None, device=device, **options)
            return {"encoder_hidden_states": cond, "encoder_attention_mask": mask, "pooled_projections": pooled}

        return encoded(prompts), encoded(negative) if negative is not None else None
