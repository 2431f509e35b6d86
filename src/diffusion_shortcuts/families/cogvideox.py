"""CogVideoX 1.0 and 1.5 text-to-video (``cogvideox``): an expert-adaptive DiT over frames-first ``(F, C, H, W)``
latents, T5 embeddings, classifier-free guidance batched in one call, integer timesteps of CogVideoXDDIMScheduler
(v-prediction), 3-D rotary positions (5B and 1.5 checkpoints) made here from the transformer's configuration as
CogVideoXPipeline makes them; its VAE scaled by ``scaling_factor``, compressing time 4x and space 8x.

Not driven: the stock call's ``use_dynamic_cfg`` (a guidance scale that changes every step; the Sampler's is
fixed), CogVideoXDPMScheduler (its step takes the previous x0 estimate), and the image-to-video variants."""

from __future__ import annotations

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from .base import TEXT, VideoFamily, as_kwargs, output_of, unwrap
from .codecs import scaled_codec
from .registry import register

SUPPORTED = "CogVideoXPipeline (text-to-video) with CogVideoXDDIMScheduler or another one-step scheduler"


def crop_region(grid: tuple[int, int], base_width: int, base_height: int):
    """The region of a ``base_height`` x ``base_width`` grid a ``grid``-shaped one is resized and centred into (the
    rotary crop coordinates of CogVideoX 1.0)."""
    h, w = grid
    if h / w > base_height / base_width:
        height, width = base_height, int(round(base_height / h * w))
    else:
        height, width = int(round(base_width / w * h)), base_width
    top, left = int(round((base_height - height) / 2.0)), int(round((base_width - width) / 2.0))
    return (top, left), (top + height, left + width)


@register(CogVideoXTransformer3DModel)
class CogVideoX(VideoFamily):
    name = "cogvideox"
    streams = ("hidden_states", "encoder_hidden_states")
    default_guidance = 6.0
    conditioning = TEXT
    latent_layout = "FCHW"
    default_video = (49, 480, 720)  # CogVideoXPipeline's frames, height and width
    default_fps = 8                  # its model cards' export_to_video(fps=8)

    def forward(self, model, x, timestep, cond, guidance):
        return output_of(model(hidden_states=x, timestep=timestep, image_rotary_emb=self.rotary(model, x),
                               **as_kwargs(cond, "encoder_hidden_states")))

    @staticmethod
    def rotary(model, x: torch.Tensor):
        """The 3-D rotary embedding of latents ``x`` (B, F, C, H, W), None where the model has none (2B)."""
        config = unwrap(model).config
        if not config.use_rotary_positional_embeddings:
            return None
        p, pt = config.patch_size, config.patch_size_t
        frames, grid = x.shape[1], (x.shape[-2] // p, x.shape[-1] // p)
        base_width, base_height = config.sample_width // p, config.sample_height // p
        if pt is None:  # CogVideoX 1.0
            return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim,
                                           crops_coords=crop_region(grid, base_width, base_height), grid_size=grid,
                                           temporal_size=frames, device=x.device)
        return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None, grid_size=grid,
                                       temporal_size=(frames + pt - 1) // pt, grid_type="slice",
                                       max_size=(base_height, base_width), device=x.device)



    def codec(self, pipe):
        return scaled_codec(pipe.vae, frames_first=True)

    def check_pipeline(self, pipe) -> None:
        if type(pipe).__name__ != "CogVideoXPipeline" or type(pipe.scheduler).__name__ == "CogVideoXDPMScheduler":
            raise ValueError(f"{type(pipe).__name__} with {type(pipe.scheduler).__name__} is not supported for "
                             f"cogvideox; supported: {SUPPORTED}")

    def encode_prompt(self, pipe, prompts, negative, device, size, **options):
        cond, uncond = pipe.encode_prompt(prompts, negative_prompt=negative or "", do_classifier_free_guidance=True,
                                          device=device, **options)
        return {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}
