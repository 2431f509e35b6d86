"""Sana (``sana``): a linear-attention flow-matching transformer on a deep-compression autoencoder, Gemma
embeddings with their mask; its pipeline scales the timestep by the configuration's ``timestep_scale``."""

from __future__ import annotations

import inspect

from diffusers import SanaTransformer2DModel

from .base import TEXT, TransformerFamily, as_kwargs, output_of, unwrap
from .registry import register


@register(SanaTransformer2DModel)
class Sana(TransformerFamily):
    name = "sana"
    learned_sigma = True
    default_guidance = 4.5
    conditioning = TEXT

    def timestep_scale(self, model) -> float:
        return float(unwrap(model).config.get("timestep_scale", 1.0))

    def forward(self, model, x, timestep, cond, guidance):
        return output_of(model(x, timestep=timestep, **as_kwargs(cond, "encoder_hidden_states")))

    def encode_prompt(self, pipe, prompts, negative, device, size, **options):
        """SanaPipeline's own call prefixes prompts with its "complex human instruction" by default: so do we."""
        default = inspect.signature(pipe.__call__).parameters["complex_human_instruction"].default
        options.setdefault("complex_human_instruction", default)
        cond, mask, uncond, neg_mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=True,
                                                          negative_prompt=negative or "", device=device, **options)
        return ({"encoder_hidden_states": cond, "encoder_attention_mask": mask},
                {"encoder_hidden_states": uncond, "encoder_attention_mask": neg_mask})
