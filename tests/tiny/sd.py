"""Stable Diffusion 1.x (epsilon) and 2.x (v-prediction): a two-level UNet, a tiny CLIP text encoder."""

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from tiny_pipelines import SIZE, clip_encoder, sd_ddim, tokenizer, vae

from tiny import Tiny

BLOCKS = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]


def sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """The pipeline and the stock call's image size."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4).eval()
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=clip_encoder(), tokenizer=tokenizer(), unet=unet,
                                   scheduler=sd_ddim(prediction_type), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe, {"height": SIZE, "width": SIZE}


TINIES = [
    Tiny("sd-unet", "sd-unet", lambda: sd_pipeline()[0], (4, 8, 8), BLOCKS, call={"height": SIZE, "width": SIZE}),
    Tiny("sd2-v", "sd-unet", lambda: sd_pipeline(prediction_type="v_prediction")[0], (4, 8, 8), BLOCKS,
         call={"height": SIZE, "width": SIZE}),
]
