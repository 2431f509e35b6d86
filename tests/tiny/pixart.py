"""PixArt-alpha and -sigma: a learned-variance DiT on T5 embeddings with their mask."""

import torch
from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
from tiny_pipelines import SIZE, sd_ddim, t5_encoder, tokenizer, vae

from tiny import Tiny


def pixart_pipeline(seed: int = 0, sigma: bool = False):
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=8, sample_size=8, patch_size=2, caption_channels=32, norm_type="ada_norm_single",
        use_additional_conditions=False, norm_num_groups=2).eval()
    pipeline = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    return pipeline(tokenizer=tokenizer(clip=False), text_encoder=t5_encoder(), vae=vae(), transformer=transformer,
                    scheduler=sd_ddim())


CALL = {"height": SIZE, "width": SIZE, "use_resolution_binning": False, "max_sequence_length": 12,
        "clean_caption": False}
BLOCKS = ["transformer_blocks.0", "transformer_blocks.1"]
OPTIONS = {"max_sequence_length": 12}
TINIES = [Tiny("pixart", "pixart", pixart_pipeline, (4, 8, 8), BLOCKS, call=CALL, prompt_options=OPTIONS),
          Tiny("pixart-sigma", "pixart", lambda: pixart_pipeline(sigma=True), (4, 8, 8), BLOCKS, call=CALL,
               prompt_options=OPTIONS)]
