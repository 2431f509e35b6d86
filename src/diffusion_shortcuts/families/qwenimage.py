"""Qwen-Image (``qwenimage``): an MM-DiT whose double-stream blocks update the image and the text stream, over 2x2
latent tokens packed as Flux packs them; Qwen2.5-VL embeddings with their mask; flow matching shifted as Flux's.

Its guidance is a CFG of its own (the stock call's ``true_cfg_scale`` with a negative prompt, default 4.0), in two
calls (``cond`` first, then ``uncond``), whose combination is rescaled to the conditional prediction's norm per
token (QwenImagePipeline): ``g = u + s (c - u)``, then ``g * |c| / |g|`` over each token's channels. The model's
``guidance`` input exists only on guidance-distilled checkpoints (``guidance_embeds``). The VAE is Wan's, one frame
deep: latents normalised per channel by ``latents_mean`` / ``latents_std``.
"""

from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel

from .base import as_kwargs, output_of, unwrap
from .codecs import normalized_codec
from .flux import Flux, pack_latents, unpack_latents
from .registry import register


@register(QwenImageTransformer2DModel)
class QwenImage(Flux):
    name = "qwenimage"
    block_lists = ("transformer_blocks",)
    default_guidance = 1.0   # the model input of guidance-distilled checkpoints only
    default_true_cfg = 4.0   # QwenImagePipeline's true_cfg_scale, applied where a negative prompt is given

    def forward(self, model, x, timestep, cond, guidance):
        kwargs = as_kwargs(cond, "encoder_hidden_states")
        h, w = x.shape[-2:]
        embedded = guidance is not None and unwrap(model).config.guidance_embeds
        out = model(hidden_states=pack_latents(x), timestep=timestep,
                    guidance=torch.full((x.shape[0],), float(guidance), device=x.device) if embedded else None,
                    img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0], **kwargs)
        return unpack_latents(output_of(out), h, w)

    def combine(self, uncond, cond, scale):
        """CFG rescaled to the conditional prediction's norm per token (the norm over a packed token's channels,
        where QwenImagePipeline takes it): the same figures on our unpacked latents."""
        guided = super().combine(uncond, cond, scale)
        h, w = cond.shape[-2:]
        tokens_c, tokens_g = pack_latents(cond), pack_latents(guided)
        ratio = torch.norm(tokens_c, dim=-1, keepdim=True) / torch.norm(tokens_g, dim=-1, keepdim=True)
        return unpack_latents(tokens_g * ratio, h, w)

    def latent_shape(self, model) -> tuple[int, int, int]:
        return unwrap(model).config.in_channels // 4, 128, 128

    def codec(self, pipe):
        return normalized_codec(pipe.vae, frames=False)

    def encode_prompt(self, pipe, prompts, negative, device, size, **options):
        """The prompts, and the negative prompts where given, each through QwenImagePipeline's own
        ``encode_prompt`` (embeddings and their mask, None where every token counts)."""
        def encoded(texts):
            cond, mask = pipe.encode_prompt(texts, device=device, **options)
            return {"encoder_hidden_states": cond, "encoder_hidden_states_mask": mask}

        return encoded(prompts), encoded(negative) if negative is not None else None
