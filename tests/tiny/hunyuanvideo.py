"""HunyuanVideo: a video MM-DiT on Llama embeddings and CLIP's pooled text, embedded guidance, and true CFG in two calls
with a negative prompt."""

import torch
from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
from diffusers import HunyuanVideoTransformer3DModel
from tiny_pipelines import WORDS, clip_encoder, tokenizer
from transformers import LlamaConfig, LlamaModel

from tiny import Tiny


def hunyuanvideo_pipeline(seed: int = 0):
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=32, rope_axes_dim=(2, 4, 4)).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True).eval()
    torch.manual_seed(seed)
    llama = LlamaModel(LlamaConfig(bos_token_id=2, eos_token_id=3, hidden_size=16, intermediate_size=37,
                                   num_attention_heads=4, num_hidden_layers=2, pad_token_id=0,
                                   vocab_size=len(WORDS) + 4, hidden_act="gelu")).eval()
    return HunyuanVideoPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder=llama, text_encoder_2=clip_encoder(positions=77),
                                tokenizer=tokenizer(clip=False), tokenizer_2=tokenizer(max_length=77))


TEMPLATE = {"template": "{}", "crop_start": 0}  # the stock template's system prompt is Llama's, not these words'
TINY = Tiny("hunyuanvideo", "hunyuanvideo", hunyuanvideo_pipeline, (4, 3, 2, 2),
            ["transformer_blocks.0", "single_transformer_blocks.0"],
            call={"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 12, "prompt_template": TEMPLATE},
            guidance={"guidance_scale": 4.5, "true_cfg_scale": 2.0, "negative_prompt": "blue sky"},
            prompt_options={"max_sequence_length": 12, "prompt_template": TEMPLATE}, fd_step=1e-2, tolerance=2e-3)
