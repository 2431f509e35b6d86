"""Tiny random text-to-image pipelines of every registered family, built from configs (nothing downloads).

Like diffusers' own pipeline tests (``get_dummy_components``): a few-channel denoiser, a small VAE, tiny
CLIP and T5 text encoders and a word-level tokenizer written here from a small vocabulary. Each builder
returns ``(pipe, stock_kwargs)``: what the stock pipeline call needs besides the prompt, latents, steps
and guidance (its image size).
"""

from __future__ import annotations

import torch
from diffusers import (AutoencoderDC, AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel,
                       SanaPipeline, SanaTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from tiny_models import ddim
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Gemma2Config, Gemma2Model,
                          PreTrainedTokenizerFast, T5Config, T5EncoderModel)

WORDS = ("a an the red green blue car cat dog photo of on in painting tree house sky small big digit three seven "
         "astronaut horse riding").split()
PROMPTS = ["a red car", "a photo of a cat on the tree"]
SIZE = 16  # image pixels; the tiny VAEs halve it to 8x8 latents


def tokenizer(max_length: int = 12, clip: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: CLIP-style (start and end tokens, padded with the end token) or T5-style
    (end token, padded with <pad>). Unknown words map to <unk>."""
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<s> $A </s>" if clip else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>" if clip else "<pad>", model_max_length=max_length)


def clip_encoder(hidden: int = 32, projection: int | None = None, seed: int = 0, positions: int = 16):
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(WORDS) + 4, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=positions,
                            bos_token_id=2, eos_token_id=3, pad_token_id=3, projection_dim=projection or hidden,
                            hidden_act="gelu")
    return (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)).eval()


def t5_encoder(d_model: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(WORDS) + 4, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=1,
                      num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3,
                      decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def vae(latent_channels: int = 4, shift: float | None = None, scaling: float = 0.18215, seed: int = 0):
    torch.manual_seed(seed)
    flow = shift is not None  # SD3 and Flux VAEs: a shift, no quant convolutions
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        latent_channels=latent_channels, norm_num_groups=4, sample_size=SIZE, scaling_factor=scaling,
        shift_factor=shift, use_quant_conv=not flow, use_post_quant_conv=not flow,
    ).eval()


def sd_ddim(prediction_type: str = "epsilon"):
    """DDIM as Stable Diffusion's scheduler configuration sets it."""
    return ddim(set_alpha_to_one=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                prediction_type=prediction_type)


def sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4).eval()
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=clip_encoder(), tokenizer=tokenizer(), unet=unet,
                                   scheduler=sd_ddim(prediction_type), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe, {"height": SIZE, "width": SIZE}


def sdxl_pipeline(seed: int = 0):
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


def pixart_pipeline(seed: int = 0, sigma: bool = False):
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=8, sample_size=8, patch_size=2, caption_channels=32, norm_type="ada_norm_single",
        use_additional_conditions=False, norm_num_groups=2).eval()
    pipeline = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = pipeline(tokenizer=tokenizer(clip=False), text_encoder=t5_encoder(), vae=vae(), transformer=transformer,
                    scheduler=sd_ddim())
    return pipe, {"height": SIZE, "width": SIZE, "use_resolution_binning": False, "max_sequence_length": 12,
                  "clean_caption": False}


def sd3_pipeline(seed: int = 0):
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift=0.0609, scaling=1.5305), text_encoder=clip_encoder(projection=32),
        tokenizer=tokenizer(), text_encoder_2=clip_encoder(projection=32, seed=1), tokenizer_2=tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    return pipe, {"height": SIZE, "width": SIZE, "max_sequence_length": 12}


def flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae(shift=0.1159, scaling=0.3611), text_encoder=clip_encoder(),
                        tokenizer=tokenizer(), text_encoder_2=t5_encoder(), tokenizer_2=tokenizer(clip=False),
                        transformer=transformer)
    return pipe, {"height": SIZE, "width": SIZE, "max_sequence_length": 12}


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
    pipe = SanaPipeline(tokenizer=tokenizer(clip=False), text_encoder=gemma, vae=dc_ae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    # Sana wants sizes divisible by 32: this DC-AE compresses 4x, to the same 8x8 latents as the others
    return pipe, {"height": 2 * SIZE, "width": 2 * SIZE, "use_resolution_binning": False, "max_sequence_length": 12}


def clip_model_folder(path) -> str:
    """A tiny random CLIP model (text and vision towers) with a character-level CLIP tokenizer, saved to
    ``path`` as a reward model folder."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return str(path)


BUILDERS = {"sd-unet": sd_pipeline, "sdxl-unet": sdxl_pipeline, "pixart": pixart_pipeline, "sd3": sd3_pipeline,
            "flux": flux_pipeline, "sana": sana_pipeline}
# other members of the same families: SD 2.x's v-prediction, PixArt-sigma, Flux-schnell (no guidance embedding)
VARIANTS = {"sd2-v": ("sd-unet", lambda: sd_pipeline(prediction_type="v_prediction")),
            "pixart-sigma": ("pixart", lambda: pixart_pipeline(sigma=True)),
            "flux-schnell": ("flux", lambda: flux_pipeline(guidance_embeds=False))}
