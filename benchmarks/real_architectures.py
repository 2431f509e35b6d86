"""MACs of full-size denoisers, per gated block, from their published configurations (random weights).

Built on the meta device (shapes only: nothing is allocated, so Flux's 12B parameters fit on any machine)
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
from diffusers import (FluxTransformer2DModel, PixArtTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel,
                       UNet2DConditionModel)

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
ARCHITECTURES = {"sd-1.5-unet": SD15, "sdxl-unet": SDXL, "pixart-alpha-xl-1024": PIXART, "sana-1600m-1024": SANA,
                 "sd3-medium": SD3, "flux.1-dev": FLUX}


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
    if set(cond) == {"encoder_hidden_states"}:
        cond = cond["encoder_hidden_states"]
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
