"""The parts the tiny random pipelines share (``tests/tiny/``, one module per family), built from configs: nothing
downloads. Like diffusers' own pipeline tests (``get_dummy_components``): a word-level tokenizer written here from a
small vocabulary, tiny CLIP and T5 text encoders, a small AutoencoderKL, Stable Diffusion's DDIM; and a tiny CLIP
reward model folder.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusion_shortcuts.zoo.flux import word_tokenizer
from tiny_models import ddim
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast, T5Config,
                          T5EncoderModel)

WORDS = ("a an the red green blue car cat dog photo of on in painting tree house sky small big digit three seven "
         "astronaut horse riding").split()
PROMPTS = ["a red car", "a photo of a cat on the tree"]
SIZE = 16  # image pixels; the tiny VAEs halve it to 8x8 latents


def tokenizer(max_length: int = 12, clip: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS`: CLIP-style (start and end tokens, padded with the end token) or
    T5-style (end token, padded with <pad>); the zoo's digits-flux is made with the same one."""
    return word_tokenizer(WORDS, max_length, clip)


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
