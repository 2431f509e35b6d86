"""Stable Diffusion XL (``sdxl-unet``): a ``UNet2DConditionModel`` with text-time added conditioning (pooled
text embeddings and size/crop time ids), told apart from SD 1.x/2.x by its ``addition_embed_type``."""

from __future__ import annotations

from diffusers import UNet2DConditionModel

from .base import unwrap
from .registry import register
from .unet import StableDiffusionUNet


@register(UNet2DConditionModel)
class StableDiffusionXLUNet(StableDiffusionUNet):
    name = "sdxl-unet"
    default_guidance = 5.0

    def matches(self, model) -> bool:
        return unwrap(model).config.get("addition_embed_type") == "text_time"

    def encode_prompt(self, pipe, prompts, negative, device, size, **options):
        cond, uncond, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative, **options)
        projection = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                      else int(pooled.shape[-1]))
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=cond.dtype, text_encoder_projection_dim=projection)
        time_ids = time_ids.to(device).repeat(len(prompts), 1)
        return ({"encoder_hidden_states": cond, "text_embeds": pooled, "time_ids": time_ids},
                {"encoder_hidden_states": uncond, "text_embeds": neg_pooled, "time_ids": time_ids})
