"""MACs of full-size denoisers, per gated block, from their published configurations (random weights).

Built on the meta device (shapes only: nothing is allocated, so Flux's 12B and Wan's 14B parameters fit on any
machine)
and counted with :func:`diffusion_shortcuts.metrics.count_macs` through each model family's own call, the
same path the library's schedules use. Two figures per block:

- ``paper``: attention's own matrix products (Q K^T, and the product with V) left out, as DiP-GO's
  published SD-1.5 table counts them; checked against that table (target: within 1%);
- ``full``: with them, the cost the library's ``macs_ratio`` uses.

Also counts the zoo's digits models (16x16) the same way. Writes benchmarks/results/real_architectures.json.

    python benchmarks/real_architectures.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import (CogVideoXTransformer3DModel, FluxTransformer2DModel, HunyuanVideoTransformer3DModel,
                       LTXVideoTransformer3DModel, PixArtTransformer2DModel, QwenImageTransformer2DModel,
                       SanaTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, WanTransformer3DModel)

from diffusion_shortcuts import zoo
from diffusion_shortcuts.families import EMBEDDED, family_of
from diffusion_shortcuts.metrics import count_macs
from diffusion_shortcuts.prune import default_block_names
from diffusion_shortcuts.sampling import call_denoiser

RESULTS = Path(__file__).parent / "results"

# DiP-GO (Zhu et al. 2024, arXiv 2410.16942), SD-1.5 at 512x512: GMACs per UNet call and per block
DIPGO_SD15 = {"total": 338.83, "down_blocks.0": 32.94, "down_blocks.1": 31.32, "down_blocks.2": 31.46,
              "down_blocks.3": 3.78, "mid_block": 6.03, "up_blocks.0": 12.90, "up_blocks.1": 75.14,
              "up_blocks.2": 79.12, "up_blocks.3": 66.04}

# The published configurations (diffusers' config.json of each release), and one call's inputs.
SD15 = dict(cls=UNet2DConditionModel, config=dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8),
    latent=(4, 64, 64), cond={"encoder_hidden_states": (77, 768)}, resolution="512x512")
SDXL = dict(cls=UNet2DConditionModel, config=dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    latent=(4, 128, 128), cond={"encoder_hidden_states": (77, 2048), "text_embeds": (1280,), "time_ids": (6,)},
    resolution="1024x1024")
PIXART = dict(cls=PixArtTransformer2DModel, config=dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True,
    use_additional_conditions=True), latent=(4, 128, 128),
    cond={"encoder_hidden_states": (120, 4096), "resolution": (2,), "aspect_ratio": (1,)}, resolution="1024x1024")
SANA = dict(cls=SanaTransformer2DModel, config=dict(  # Sana_1600M_1024px: the class defaults, written out
    in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
    mlp_ratio=2.5, sample_size=32, patch_size=1), latent=(32, 32, 32),
    cond={"encoder_hidden_states": (300, 2304), "encoder_attention_mask": (300,)}, resolution="1024x1024")
SD3 = dict(cls=SD3Transformer2DModel, config=dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192), latent=(16, 128, 128),
    cond={"encoder_hidden_states": (333, 4096), "pooled_projections": (2048,)}, resolution="1024x1024")
FLUX = dict(cls=FluxTransformer2DModel, config=dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56)), latent=(16, 128, 128),
    cond={"encoder_hidden_states": (512, 4096), "pooled_projections": (768,)}, resolution="1024x1024")
QWEN_IMAGE = dict(cls=QwenImageTransformer2DModel, config=dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)), latent=(16, 128, 128),
    cond={"encoder_hidden_states": (256, 3584)}, resolution="1024x1024")
WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                  freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_1_3B = dict(cls=WanTransformer3DModel, config=dict(num_attention_heads=12, ffn_dim=8960, num_layers=30,
                                                       **WAN_COMMON),
                latent=(16, 21, 60, 104), cond={"encoder_hidden_states": (512, 4096)}, resolution="480x832x81")
WAN_14B = dict(cls=WanTransformer3DModel, config=dict(num_attention_heads=40, ffn_dim=13824, num_layers=40,
                                                      **WAN_COMMON),
               latent=(16, 21, 60, 104), cond={"encoder_hidden_states": (512, 4096)}, resolution="480x832x81")
HUNYUAN_VIDEO = dict(cls=HunyuanVideoTransformer3DModel, config=dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56)), latent=(16, 33, 90, 160),
    cond={"encoder_hidden_states": (256, 4096), "encoder_attention_mask": (256,), "pooled_projections": (768,)},
    resolution="720x1280x129")
LTX_VIDEO = dict(cls=LTXVideoTransformer3DModel, config=dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=64,
    cross_attention_dim=2048, num_layers=28, caption_channels=4096), latent=(128, 21, 16, 22),
    cond={"encoder_hidden_states": (128, 4096), "encoder_attention_mask": (128,)},
    extra={"rope_interpolation_scale": (8 / 25, 32, 32)}, resolution="512x704x161")
COGVIDEOX_5B = dict(cls=CogVideoXTransformer3DModel, config=dict(
    num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
    text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True),
    latent=(13, 16, 60, 90), cond={"encoder_hidden_states": (226, 4096)}, resolution="480x720x49")
ARCHITECTURES = {"sd-1.5-unet": SD15, "sdxl-unet": SDXL, "pixart-alpha-xl-1024": PIXART, "sana-1600m-1024": SANA,
                 "sd3-medium": SD3, "flux.1-dev": FLUX, "qwen-image": QWEN_IMAGE, "wan2.1-t2v-1.3b": WAN_1_3B,
                 "wan2.1-t2v-14b": WAN_14B, "hunyuanvideo": HUNYUAN_VIDEO, "ltx-video-0.9": LTX_VIDEO,
                 "cogvideox-5b": COGVIDEOX_5B}


def block_macs(model, latent, cond, device) -> dict:
    """Per-block and total MACs of one call on one sample, with and without attention's matrix products."""
    family = family_of(model)
    x = torch.zeros(1, *latent, device=device)
    t = torch.tensor(500.0, device=device)
    guidance = family.default_guidance if family.guidance == EMBEDDED else None
    root = type(model).__name__
    figures = {}
    for kind, attention in (("paper", False), ("full", True)):
        total, per_module = count_macs(call_denoiser, model, x, t, cond, guidance, attention=attention)
        figures[kind] = {"total": total, **{name: per_module.get(f"{root}.{name}", 0)
                                            for name in default_block_names(model)}}
    return figures


def real(name: str) -> dict:
    spec = ARCHITECTURES[name]
    start = time.perf_counter()
    with torch.device("meta"):
        model = spec["cls"](**spec["config"]).eval()
    cond = {key: torch.zeros(1, *shape, device="meta") for key, shape in spec["cond"].items()}
    if set(cond) == {"encoder_hidden_states"} and "extra" not in spec:
        cond = cond["encoder_hidden_states"]
    else:
        cond.update(spec.get("extra", {}))  # plain values the family passes on (LTX's rotary scale)
    figures = block_macs(model, spec["latent"], cond, "meta")
    params = sum(p.numel() for p in model.parameters())
    return {"family": family_of(model).name, "resolution": spec["resolution"], "latent": list(spec["latent"]),
            "parameters": params, "seconds": time.perf_counter() - start, **figures}


def digits(name: str) -> dict:
    m = zoo.load(name)
    cond = m.encode(torch.tensor([3]))
    figures = block_macs(m.model, m.sample_shape, cond, "cpu")
    return {"family": family_of(m.model).name, "latent": list(m.sample_shape), **figures}


def compare_with_dipgo(figures: dict) -> dict:
    rows = {}
    for key, published in DIPGO_SD15.items():
        ours = figures["paper"][key] / 1e9
        rows[key] = {"dipgo_gmacs": published, "ours_gmacs": round(ours, 3),
                     "relative_error": round(ours / published - 1, 5),
                     "full_gmacs": round(figures["full"][key] / 1e9, 3)}
    worst = max(abs(r["relative_error"]) for r in rows.values())
    return {"rows": rows, "worst_relative_error": worst, "within_1_percent": worst <= 0.01}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--out", default=str(RESULTS / "real_architectures.json"))
    args = parser.parse_args(argv)
    results = {"command": "python benchmarks/real_architectures.py " + " ".join(sys.argv[1:]),
               "torch": torch.__version__, "architectures": {}, "zoo": {}}
    for name in args.models:
        results["architectures"][name] = real(name)
        figures = results["architectures"][name]
        print(f"{name}: {figures['full']['total'] / 1e9:.2f} GMACs full, {figures['paper']['total'] / 1e9:.2f} "
              f"without attention products ({figures['seconds']:.1f} s)", flush=True)
    if "sd-1.5-unet" in results["architectures"]:
        results["sd15_vs_dipgo"] = compare_with_dipgo(results["architectures"]["sd-1.5-unet"])
        print(f"SD-1.5 vs DiP-GO's table: worst relative error {results['sd15_vs_dipgo']['worst_relative_error']:.4f}")
    for name in ("digits-unet", "digits-dit"):
        results["zoo"][name] = digits(name)
        z = results["zoo"][name]
        print(f"{name}: {z['full']['total'] / 1e6:.2f} MMACs full, {z['paper']['total'] / 1e6:.2f} without attention")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
