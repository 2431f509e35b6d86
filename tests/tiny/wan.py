"""Wan 2.1 (one transformer) and Wan 2.2 A14B (a second one below the boundary timestep, its own guidance scale):
a video DiT on UMT5 embeddings, CFG in two calls, UniPC flow sampling, a VAE with per-channel statistics."""

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline
from diffusers import WanTransformer3DModel
from tiny_pipelines import t5_encoder, tokenizer

from tiny import Tiny


def transformer(seed: int):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32).eval()


def wan_pipeline(experts: bool = False):
    torch.manual_seed(0)
    # base_dim 8: at 3 the decoder's upsampling left 1-channel RMS norms, sign functions that made the decode jump
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.1 * (i % 5) for i in range(16)],
                           latents_std=[1.0 + 0.1 * (i % 3) for i in range(16)]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tokenizer(clip=False), text_encoder=t5_encoder(), vae=vae, transformer=transformer(0),
                       scheduler=scheduler, transformer_2=transformer(1) if experts else None,
                       boundary_ratio=0.875 if experts else None)


def flow_euler(pipe):
    """A one-step flow scheduler for the gradient proofs (UniPC's steps mix earlier model outputs)."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


# 9 frames of 16x16 pixels: 3 latent frames of 2x2 (the VAE compresses time 4x, space 8x)
COMMON = dict(call={"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 12},
              prompt_options={"max_sequence_length": 12}, gradient_scheduler=flow_euler, fd_step=1e-2,
              tolerance=2e-3)
BLOCKS = ["blocks.0", "blocks.1"]
TINIES = [
    Tiny("wan", "wan", wan_pipeline, (16, 3, 2, 2), BLOCKS,
         guidance={"guidance_scale": 4.0, "negative_prompt": "blue sky"}, **COMMON),
    Tiny("wan22", "wan", lambda: wan_pipeline(experts=True), (16, 3, 2, 2), BLOCKS,
         guidance={"guidance_scale": 4.0, "guidance_scale_2": 3.0, "negative_prompt": "blue sky"}, **COMMON),
]
