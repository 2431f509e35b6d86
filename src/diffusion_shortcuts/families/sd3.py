"""Stable Diffusion 3 and 3.5 (``sd3``): an MM-DiT whose joint blocks update the image and the text stream,
flow matching shifted by the token count where the scheduler shifts dynamically (SD3.5 configurations)."""

from __future__ import annotations

from diffusers import SD3Transformer2DModel

from .base import TEXT, TransformerFamily, as_kwargs, output_of
from .flow import dynamic_shift
from .registry import register


@register(SD3Transformer2DModel)
class StableDiffusion3(TransformerFamily):
    name = "sd3"
    streams = ("encoder_hidden_states", "hidden_states")
    default_guidance = 7.0
    conditioning = TEXT

    def forward(self, model, x, timestep, cond, guidance):
        return output_of(model(hidden_states=x, timestep=timestep, **as_kwargs(cond, None)))

    def set_timesteps(self, scheduler, num_inference_steps, device, latent_shape, model):
        patch = self.spatial_multiple(model)
        tokens = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
        scheduler.set_timesteps(num_inference_steps, device=device, **dynamic_shift(scheduler, tokens, 1.16))

    def encode_prompt(self, pipe, prompts, negative, device, size, **options):
        cond, uncond, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=True,
            negative_prompt=negative, **options)
        return ({"encoder_hidden_states": cond, "pooled_projections": pooled},
                {"encoder_hidden_states": uncond, "pooled_projections": neg_pooled})
