"""Qwen-Image: an MM-DiT on Qwen2.5-VL embeddings, true CFG in two calls rescaled to the conditional norm, a Wan-style
VAE one frame deep with per-channel latent statistics."""

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers import QwenImageTransformer2DModel
from tiny_pipelines import WORDS, tokenizer
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from diffusion_shortcuts.families import pack_latents, unpack_latents
from tiny import Tiny


def qwenimage_pipeline(seed: int = 0):
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                 latents_std=[1.5, 0.8, 1.0, 2.0]).eval()
    torch.manual_seed(seed)
    vocab = len(WORDS) + 4
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": vocab, "bos_token_id": 2, "eos_token_id": 3,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=vocab, vision_end_token_id=1, vision_start_token_id=1, vision_token_id=1)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return QwenImagePipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                             text_encoder=text_encoder, tokenizer=tokenizer(clip=False, max_length=64))


# its VAE compresses 4x here: 32-pixel images, 8x8 latents of 4 channels (16 once packed)
TINY = Tiny("qwenimage", "qwenimage", qwenimage_pipeline, (4, 8, 8), ["transformer_blocks.0", "transformer_blocks.1"],
            call={"height": 32, "width": 32, "max_sequence_length": 16},
            guidance={"true_cfg_scale": 4.0, "negative_prompt": "blue sky"},
            prompt_options={"max_sequence_length": 16}, pack=pack_latents,
            unpack=lambda tokens: unpack_latents(tokens, 8, 8), fd_step=1e-2, tolerance=2e-3)
