"""SDXL: a text-time UNet, two CLIP text encoders (the second with a projection: pooled text)."""

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from tiny_pipelines import SIZE, clip_encoder, sd_ddim, tokenizer, vae

from tiny import Tiny


def sdxl_pipeline(seed: int = 0):
    """The pipeline and the stock call's image size."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=2, norm_num_groups=4, transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        use_linear_projection=True).eval()
    pipe = StableDiffusionXLPipeline(vae=vae(), text_encoder=clip_encoder(), tokenizer=tokenizer(),
                                     text_encoder_2=clip_encoder(projection=32, seed=1), tokenizer_2=tokenizer(),
                                     unet=unet, scheduler=sd_ddim(), force_zeros_for_empty_prompt=False)
    return pipe, {"height": SIZE, "width": SIZE}


TINY = Tiny("sdxl-unet", "sdxl-unet", lambda: sdxl_pipeline()[0], (4, 8, 8),
            ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"],
            call={"height": SIZE, "width": SIZE})
