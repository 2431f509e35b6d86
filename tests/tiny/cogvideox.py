"""CogVideoX: a DiT on frames-first latents and T5 embeddings, CFG batched in one call, integer timesteps and
v-prediction (CogVideoXDDIMScheduler), 3-D rotary positions."""

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from tiny_pipelines import t5_encoder, tokenizer

from tiny import Tiny


def cogvideox_pipeline(seed: int = 0):
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=2, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=12, use_rotary_positional_embeddings=True).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4).eval()
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                       rescale_betas_zero_snr=True, clip_sample=False, set_alpha_to_one=True,
                                       beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return CogVideoXPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=t5_encoder(),
                             tokenizer=tokenizer(clip=False))


# 9 frames of 16x16 pixels: 3 latent frames of 2x2, frames first. Its rotary positions are float32 in a float64
# model: finite differences need a longer step and a looser bound, as for the flow-matching families.
TINY = Tiny("cogvideox", "cogvideox", cogvideox_pipeline, (3, 4, 2, 2),
            ["transformer_blocks.0", "transformer_blocks.1"],
            call={"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 12},
            guidance={"guidance_scale": 3.0, "negative_prompt": "blue sky"},
            prompt_options={"max_sequence_length": 12}, fd_step=1e-2, tolerance=2e-3)
