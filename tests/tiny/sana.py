"""Sana: a linear-attention DiT on a deep-compression autoencoder and Gemma embeddings, flow matching."""

import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
from tiny_pipelines import SIZE, WORDS, tokenizer
from transformers import Gemma2Config, Gemma2Model

from tiny import Tiny


def sana_pipeline(seed: int = 0):
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=8).eval()
    dc_ae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8), encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)), encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407).eval()
    torch.manual_seed(seed)
    gemma = Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                     num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(WORDS) + 4,
                                     pad_token_id=0, bos_token_id=2, eos_token_id=3)).eval()
    return SanaPipeline(tokenizer=tokenizer(clip=False), text_encoder=gemma, vae=dc_ae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


# Sana wants sizes divisible by 32: this DC-AE compresses 4x, to the same 8x8 latents as the others. Its linear
# attention computes in float32 and its ReLU kernel has kinks a long step would cross: a short step, a looser bound.
TINY = Tiny("sana", "sana", sana_pipeline, (4, 8, 8), ["transformer_blocks.0", "transformer_blocks.1"],
            call={"height": 2 * SIZE, "width": 2 * SIZE, "use_resolution_binning": False, "max_sequence_length": 12},
            prompt_options={"max_sequence_length": 12}, tolerance=2e-3)
