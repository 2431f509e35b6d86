"""PixArt-alpha and -sigma (``pixart``): T5 embeddings with their attention mask, learned variance, and (alpha
at 1024px) resolution and aspect-ratio conditioning."""

from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel

from .base import TEXT, TransformerFamily, as_kwargs, nest, output_of
from .registry import register


@register(PixArtTransformer2DModel)
class PixArt(TransformerFamily):
    name = "pixart"
    learned_sigma = True
    default_guidance = 4.5
    conditioning = TEXT

    def forward(self, model, x, timestep, cond, guidance):
        kwargs = nest(as_kwargs(cond, "encoder_hidden_states"), ("resolution", "aspect_ratio"), "added_cond_kwargs",
                      {"resolution": None, "aspect_ratio": None})
        return output_of(model(x, timestep=timestep, **kwargs))

    def encode_prompt(self, pipe, prompts, negative, device, size, **options):
        options.setdefault("clean_caption", False)  # cleaning needs bs4 and ftfy
        cond, mask, uncond, neg_mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=True,
                                                          negative_prompt=negative or "", device=device, **options)
        extra = {}
        if getattr(pipe.transformer, "use_additional_conditions", False):
            h, w = size
            rows = len(prompts)
            extra = {"resolution": torch.tensor([[h, w]], dtype=cond.dtype, device=device).repeat(rows, 1),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=cond.dtype, device=device).repeat(rows, 1)}
        return ({"encoder_hidden_states": cond, "encoder_attention_mask": mask, **extra},
                {"encoder_hidden_states": uncond, "encoder_attention_mask": neg_mask, **extra})
