"""LTX-Video: a video DiT on packed tokens and T5 embeddings, CFG batched in one call, a VAE with per-channel statistics
and a scale."""

import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
from tiny_pipelines import t5_encoder, tokenizer

from diffusion_shortcuts.families.ltx import pack, unpack
from tiny import Tiny


def ltx_pipeline(seed: int = 0):
    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=2, caption_channels=32).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1), patch_size=1, patch_size_t=1, encoder_causal=True,
        decoder_causal=False).eval()
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    return LTXPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                       text_encoder=t5_encoder(), tokenizer=tokenizer(clip=False))


# 9 frames of 32x32 pixels: 3 latent frames of 8x8 (this VAE compresses time and space 4x)
TINY = Tiny("ltx", "ltx", ltx_pipeline, (8, 3, 8, 8), ["transformer_blocks.0", "transformer_blocks.1"],
            call={"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 12},
            guidance={"guidance_scale": 3.0, "negative_prompt": "blue sky"},
            prompt_options={"max_sequence_length": 12}, pack=lambda x: pack(x, 1, 1),
            unpack=lambda tokens: unpack(tokens, 3, 8, 8, 1, 1), fd_step=1e-2, tolerance=2e-3)
