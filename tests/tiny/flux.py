"""FLUX.1-dev (embedded guidance), -schnell (none) and -dev with true CFG (a negative prompt, two calls a step)."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tiny_pipelines import SIZE, clip_encoder, t5_encoder, tokenizer, vae

from diffusion_shortcuts.families import pack_latents, unpack_latents
from tiny import Tiny


def flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(scheduler=scheduler, vae=vae(shift=0.1159, scaling=0.3611), text_encoder=clip_encoder(),
                        tokenizer=tokenizer(), text_encoder_2=t5_encoder(), tokenizer_2=tokenizer(clip=False),
                        transformer=transformer)


BLOCKS = ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]
COMMON = dict(call={"height": SIZE, "width": SIZE, "max_sequence_length": 12},
              prompt_options={"max_sequence_length": 12}, pack=pack_latents,
              unpack=lambda tokens: unpack_latents(tokens, 8, 8), fd_step=1e-2, tolerance=2e-3)
TINIES = [
    Tiny("flux", "flux", flux_pipeline, (4, 8, 8), BLOCKS, **COMMON),
    Tiny("flux-schnell", "flux", lambda: flux_pipeline(guidance_embeds=False), (4, 8, 8), BLOCKS, **COMMON),
    Tiny("flux-true-cfg", "flux", flux_pipeline, (4, 8, 8), BLOCKS,
         guidance={"guidance_scale": 3.0, "true_cfg_scale": 2.5, "negative_prompt": "blue sky"}, **COMMON),
]
