"""UNets: diffusers' ``UNet2DModel`` (DDPM/DDIM pixel models, ``ddpm-unet``) and ``UNet2DConditionModel`` of
Stable Diffusion 1.x/2.x (``sd-unet``). Their gated blocks are ``down_blocks.*``, ``mid_block`` and
``up_blocks.*``; a reused block returns its cached output (a down block: with its skip residuals)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from .base import LABELS, OUTPUT, TEXT, Family, as_kwargs, nest, output_of, unwrap
from .registry import register


class UNetFamily(Family):
    """What every diffusers UNet shares: its blocks, its multiple, and when a whole step can be reused."""

    block_kind = OUTPUT

    def blocks(self, model) -> list[str]:
        model = unwrap(model)
        names = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
        names += ["mid_block"] if model.mid_block is not None else []
        return names + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]

    def spatial_multiple(self, model) -> int:
        return 2 ** (len(unwrap(model).config.down_block_types) - 1)

    def whole_step_reuse(self, model) -> bool:
        """A UNet's output is norm, activation and convolution of its last up block's: nothing else enters, except
        UNet2DModel's Fourier time embedding, which divides the output by the timestep."""
        return unwrap(model).config.get("time_embedding_type", "positional") != "fourier"


@register(UNet2DModel)
class PixelUNet(UNetFamily):
    """DDPM / DDIM pixel-space UNets: no conditioning, or class labels."""

    name = "ddpm-unet"
    conditioning = LABELS

    def forward(self, model, x, timestep, cond, guidance):
        return output_of(model(x, timestep, **as_kwargs(cond, "class_labels")))


@register(UNet2DConditionModel)
class StableDiffusionUNet(UNetFamily):
    """Stable Diffusion 1.x / 2.x: prompt embeddings through cross-attention."""

    name = "sd-unet"
    conditioning = TEXT
    default_guidance = 7.5

    def matches(self, model) -> bool:
        return unwrap(model).config.get("addition_embed_type") != "text_time"  # SDXL's (sdxl.py)

    def forward(self, model, x, timestep, cond, guidance):
        kwargs = nest(as_kwargs(cond, "encoder_hidden_states"), ("text_embeds", "time_ids"), "added_cond_kwargs")
        return output_of(model(x, timestep, **kwargs))

    def encode_prompt(self, pipe, prompts, negative, device, size, **options):
        return pipe.encode_prompt(prompts, device, 1, True, negative, **options)

    def check_cond(self, model, cond) -> None:
        if cond is None:
            raise ValueError(f"cond: {type(model).__name__} needs conditioning (prompt embeddings), got None")
        states = cond.get("encoder_hidden_states") if isinstance(cond, dict) else cond
        width = model.config.cross_attention_dim
        if isinstance(states, torch.Tensor) and model.config.get("encoder_hid_dim") is None \
                and isinstance(width, int) and states.shape[-1] != width:
            raise ValueError(f"cond: embeddings of width {states.shape[-1]}, but the model's cross-attention "
                             f"takes {width}")
