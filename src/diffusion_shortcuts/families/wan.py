"""Wan 2.1 and Wan 2.2 A14B text-to-video (``wan``): a video DiT over ``(C, F, H, W)`` latents in 1x2x2 patches, UMT5
embeddings, classifier-free guidance in two calls per step (``cond`` then ``uncond``, as WanPipeline calls them,
each inside ``cache_context(..., step_index=i)``), a VAE normalised per channel (``latents_mean`` / ``latents_std``)
that compresses time 4x and space 8x.

Wan 2.2 A14B has two denoisers: ``transformer`` at scheduler timesteps at or above ``boundary_ratio *
num_train_timesteps`` (the high-noise expert), ``transformer_2`` below it, each with its own guidance scale
(``guidance_scale``, ``guidance_scale_2``). A cache schedule's rows are the steps; each expert follows the rows of
the steps it runs. Wan's image-to-video, VACE, animation, video-to-video and TI2V-5B (per-token timesteps) variants
are not driven here.
"""

from __future__ import annotations

from diffusers import WanTransformer3DModel

from .base import SEPARATE, TEXT, VideoFamily, as_kwargs, output_of
from .codecs import normalized_codec
from .registry import register

SUPPORTED = "WanPipeline (text-to-video: Wan 2.1, and Wan 2.2 A14B with transformer_2)"


@register(WanTransformer3DModel)
class Wan(VideoFamily):
    name = "wan"
    block_lists = ("blocks",)
    cfg_calls = SEPARATE
    default_guidance = 5.0
    conditioning = TEXT
    default_video = (81, 480, 832)  # WanPipeline's frames, height and width
    default_fps = 16                 # the Wan model cards' export_to_video(fps=16)
    prefix_decode = True             # a causal VAE with a frame cache: the first k latent frames decode alone

    def forward(self, model, x, timestep, cond, guidance):
        return output_of(model(hidden_states=x, timestep=timestep, **as_kwargs(cond, "encoder_hidden_states")))

    def codec(self, pipe):
        return normalized_codec(pipe.vae)

    def experts(self, pipe):
        denoisers = [(name, getattr(pipe, name)) for name in ("transformer", "transformer_2")
                     if getattr(pipe, name, None) is not None]
        ratio = pipe.config.get("boundary_ratio", None)
        if len(denoisers) < 2 or ratio is None:
            return denoisers[:1], None
        return denoisers, float(ratio) * pipe.scheduler.config.num_train_timesteps

    def check_pipeline(self, pipe) -> None:
        if type(pipe).__name__ != "WanPipeline":
            raise ValueError(f"{type(pipe).__name__} is not supported for wan; supported: {SUPPORTED}")
        if pipe.config.get("expand_timesteps", False):
            raise ValueError(f"WanPipeline with expand_timesteps (Wan 2.2 TI2V-5B: a timestep per token) is not "
                             f"supported for wan; supported: {SUPPORTED}")
        if getattr(pipe, "transformer", None) is None:
            raise ValueError(f"WanPipeline without its first transformer is not supported; supported: {SUPPORTED}")

    def encode_prompt(self, pipe, prompts, negative, device, size, **options):
        cond, uncond = pipe.encode_prompt(prompts, negative_prompt=negative or "", do_classifier_free_guidance=True,
                                          device=device, **options)
        return {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}
