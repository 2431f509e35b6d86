"""Stable Diffusion 3: an MM-DiT with joint blocks on two CLIP encoders, flow matching shifted by 3."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from tiny_pipelines import SIZE, clip_encoder, tokenizer, vae

from tiny import Tiny


def sd3_pipeline(seed: int = 0):
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift=0.0609, scaling=1.5305), text_encoder=clip_encoder(projection=32),
        tokenizer=tokenizer(), text_encoder_2=clip_encoder(projection=32, seed=1), tokenizer_2=tokenizer(),
        text_encoder_3=None, tokenizer_3=None)


# flow-matching Euler steps in float32 whatever the model's dtype: finite differences need a longer step there
TINY = Tiny("sd3", "sd3", sd3_pipeline, (4, 8, 8), ["transformer_blocks.0", "transformer_blocks.1"],
            call={"height": SIZE, "width": SIZE, "max_sequence_length": 12},
            prompt_options={"max_sequence_length": 12}, fd_step=1e-2, tolerance=2e-3)
