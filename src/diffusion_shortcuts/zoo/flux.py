"""``digits-flux``: a FluxPipeline trained here on the digits: the flow-matching MMDiT users run, in the zoo.

    python -m diffusion_shortcuts.zoo.flux --out src/diffusion_shortcuts/zoo/digits-flux   # about 30 minutes on 2 cores

What is trained, in this order, all from scratch on the 16x16 digits (grey, repeated to RGB as Flux's VAE takes):

1. a small ``AutoencoderKL`` in Flux's style (no quant convolutions, a shift and a scale measured on the encoded
   training set, as FLUX.1's VAE has them): 16x16 pixels <-> 4x8x8 latents (16 tokens of 16 channels once packed);
2. a ``FluxTransformer2DModel`` of 12 blocks (4 double-stream, 8 single-stream, width 64) by rectified flow
   (Liu et al. 2022; Esser et al. 2024: ``x_t = (1 - s) x_0 + s e``, the model predicts ``e - x_0``, ``s`` drawn
   logit-normal), jointly with its two text encoders (a CLIP text model whose pooled output conditions the blocks and
   a T5 encoder whose tokens the double blocks attend to) from word-level tokenizers over the prompts' words.
   Prompts name the digit in words or figures ("a handwritten seven", "the digit 7", "7"); 10% are dropped to the
   empty prompt, so that the pipeline's true classifier-free guidance works.

Guidance: **true CFG** (``guidance_embeds=False``; the stock call's ``true_cfg_scale`` with a ``negative_prompt``), not
FLUX.1-dev's embedded guidance, which is distilled from a CFG teacher (a second training the size of the first); the
families contract drives both, and the tiny pipelines test both.

The tokens: the text encoders are trained and called at ``TEXT_LENGTH`` T5 tokens (FluxPipeline's
``max_sequence_length``; its default, 512, would make every call 30 times the work of the 16 image tokens). Sampling
therefore passes ``max_sequence_length=16`` and the size: ``pipe("a handwritten 7", height=16, width=16,
max_sequence_length=16, negative_prompt="", true_cfg_scale=2.0)``; ``ds.zoo.load("digits-flux")`` does so by
itself (``GUIDANCE``: the stock call's default, no guidance, draws the prompted digit less often).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import load_digits

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("{d}", "{w}", "a handwritten {d}", "a handwritten {w}", "the digit {d}", "the digit {w}",
             "the number {w}", "an image of a {w}")
VOCAB = sorted({word for template in TEMPLATES for word in template.split() if "{" not in word} |
               set(WORDS) | {str(d) for d in range(10)})
TEXT_LENGTH = 16
SIZE = 16
PROMPT_DROPOUT = 0.1
STEPS = 28  # FluxPipeline's default
GUIDANCE = 2.0  # the zoo's true CFG weight: unguided, 82 of 100 samples are the prompted digit; at 2, all 100


def prompt_for(digit: int, template: int = 4) -> str:
    """The prompt for ``digit`` in one of :data:`TEMPLATES` (default: "the digit 7")."""
    return TEMPLATES[template].format(d=digit, w=WORDS[digit])


def tokenizer(clip: bool):
    """The word-level tokenizer over :data:`VOCAB` (:func:`word_tokenizer`) at :data:`TEXT_LENGTH` tokens."""
    return word_tokenizer(VOCAB, TEXT_LENGTH, clip)


def word_tokenizer(words, max_length: int, clip: bool):
    """A word-level tokenizer over ``words``: CLIP-style (start and end tokens, padded with the end token) or
    T5-style (an end token, padded with ``<pad>``); lower case; an unknown word is ``<unk>``. Ids 0-3 are ``<pad>``,
    ``<unk>``, ``<s>``, ``</s>``; the words follow in order."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<s> $A </s>" if clip else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>" if clip else "<pad>", model_max_length=max_length)


def text_encoders(seed: int = 0):
    """(CLIP text model, T5 encoder), width 64, two layers each."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vocab = len(VOCAB) + 4
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=TEXT_LENGTH, bos_token_id=2,
                                        eos_token_id=3, pad_token_id=3, projection_dim=64, hidden_act="gelu"))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=64, d_ff=128, d_kv=32, num_layers=2, num_heads=2,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3,
                                 decoder_start_token_id=0))
    return clip, t5


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=SIZE, scaling_factor=1.0, shift_factor=0.0,
                         use_quant_conv=False, use_post_quant_conv=False)


def transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=4, num_single_layers=8,
                                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                                  pooled_projection_dim=64, axes_dims_rope=(8, 12, 12), guidance_embeds=False)


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


# ---- training ----------------------------------------------------------------------------------------------

def rgb(images: torch.Tensor) -> torch.Tensor:
    """Digits in [-1, 1], (B, 1, H, W) -> (B, 3, H, W)."""
    return images.expand(-1, 3, -1, -1)


def train_vae(images: torch.Tensor, steps: int, seed: int, log: dict):
    """The autoencoder by reconstruction (L1 + MSE) with a small KL term; then its shift and scale, measured on the
    encoded training set, written into its configuration."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = vae()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for step in tqdm(range(steps), desc="train digits-flux VAE"):
        x = rgb(images[torch.randint(0, len(images), (64,), generator=gen)])
        posterior = model.encode(x).latent_dist
        recon = model.decode(posterior.sample(gen)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        losses.append(loss.item())
    model.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([model.encode(rgb(images[i:i + 500])).latent_dist.mean for i in range(0, len(images), 500)])
    shift, scale = float(latents.mean()), float(1 / latents.std())
    model.register_to_config(shift_factor=shift, scaling_factor=scale)
    log.update(vae_steps=steps, vae_loss=losses[:: max(1, steps // 100)], vae_shift_factor=shift,
               vae_scaling_factor=scale)
    return model, (latents - shift) * scale


def all_prompts() -> list[str]:
    """Every training prompt: each digit in each template, then the empty prompt (the last row)."""
    return [prompt_for(d, t) for d in range(10) for t in range(len(TEMPLATES))] + [""]


def encode_prompts(clip, t5, clip_ids, t5_ids):
    pooled = clip(clip_ids, output_hidden_states=False).pooler_output
    return pooled, t5(t5_ids, output_hidden_states=False)[0]


def train_flux(latents: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, seed: int, log: dict):
    """The transformer and both text encoders, jointly, by rectified flow; an EMA of all three is what is kept."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import EMAModel

    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    model, (clip, t5) = transformer(), text_encoders(seed)
    clip_tok, t5_tok = tokenizer(clip=True), tokenizer(clip=False)
    prompts = all_prompts()
    clip_ids = clip_tok(prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
    t5_ids = t5_tok(prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    modules = torch.nn.ModuleList([model, clip, t5])
    ema = EMAModel(modules.parameters(), decay=0.999)
    opt = torch.optim.AdamW(modules.parameters(), lr=1e-3, weight_decay=0.0)
    packed_ids = FluxPipeline._prepare_latent_image_ids(1, SIZE // 4, SIZE // 4, "cpu", torch.float32)
    txt_ids = torch.zeros(TEXT_LENGTH, 3)
    per_digit = len(TEMPLATES)
    losses, start = [], time.perf_counter()
    modules.train()
    for step in tqdm(range(steps), desc="train digits-flux"):
        rows = torch.randint(0, len(latents), (batch,), generator=gen)
        z0, digit = latents[rows], labels[rows]
        choice = digit * per_digit + torch.randint(0, per_digit, (batch,), generator=gen)
        choice[torch.rand(batch, generator=gen) < PROMPT_DROPOUT] = len(prompts) - 1
        used, inverse = choice.unique(return_inverse=True)
        pooled, tokens = encode_prompts(clip, t5, clip_ids[used], t5_ids[used])
        noise = torch.randn(z0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(batch, generator=gen)).view(-1, 1, 1, 1)  # logit-normal (SD3)
        x = (1 - sigma) * z0 + sigma * noise
        out = model(hidden_states=pack(x), timestep=sigma.view(-1), pooled_projections=pooled[inverse],
                    encoder_hidden_states=tokens[inverse], txt_ids=txt_ids, img_ids=packed_ids, guidance=None).sample
        loss = F.mse_loss(out, pack(noise - z0))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        ema.step(modules.parameters())
        losses.append(loss.item())
    ema.copy_to(modules.parameters())
    modules.eval().requires_grad_(False)
    log.update(steps=steps, batch=batch, loss=losses[:: max(1, steps // 200)],
               flux_seconds=time.perf_counter() - start)
    return model, clip, t5, clip_tok, t5_tok


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> Flux's (B, H/2 * W/2, 4C) tokens."""
    from ..families import pack_latents

    return pack_latents(latents)


def train(out: Path, vae_steps: int = 1500, steps: int = 4000, batch: int = 64, seed: int = 0) -> dict:
    from diffusers import FluxPipeline

    start = time.perf_counter()
    images, labels = load_digits("train")
    log = {"seed": seed, "data": "digits16 train split", "images": len(images)}
    autoencoder, latents = train_vae(images, vae_steps, seed, log)
    model, clip, t5, clip_tok, t5_tok = train_flux(latents, labels, steps, batch, seed, log)
    pipe = FluxPipeline(scheduler=scheduler(), vae=autoencoder, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=model)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    meta = {"kind": "flux", "num_inference_steps": STEPS, "guidance_scale": GUIDANCE,
            "max_sequence_length": TEXT_LENGTH, "height": SIZE, "width": SIZE, "prompt": TEMPLATES[4],
            "num_classes": 10}
    (out / "zoo.json").write_text(json.dumps(meta, indent=1) + "\n")
    log["seconds"] = time.perf_counter() - start
    (out / "train_log.json").write_text(json.dumps(log) + "\n")
    return log


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = train(Path(args.out), args.vae_steps, args.steps, args.batch, args.seed)
    print(json.dumps({k: v for k, v in result.items() if k in ("seconds", "images")}))
