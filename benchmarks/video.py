"""Video on the CPU: what SDO and the search cost in memory on a Wan-class model, and whether a schedule searched at
fewer frames (or a lower resolution) holds where it is sampled.

    OMP_NUM_THREADS=2 python benchmarks/video.py            # about 10 minutes on 2 cores
    OMP_NUM_THREADS=2 python benchmarks/video.py --parts memory

The model: a random ``WanTransformer3DModel`` of 8 blocks (hidden 128) with a random ``AutoencoderKLWan`` (base_dim
16), 17 frames at 256x256 (5 latent frames of 32x32: 1,280 tokens a call), UniPC flow sampling, 10 steps, guidance 5
in two calls a step. Random weights keep no quality, so the memory and time parts are the figures here; the transfer
part is what a random model can say (how much of the full model's output a schedule keeps).

- ``memory``: each configuration in a fresh process: the peak resident memory it adds over the loaded model (this
  process's high-water mark minus its memory before the work), the graph's saved tensors per iteration (SDO), seconds
  per iteration, and the norm of the initial noise's gradient. SDO (one reward gradient with respect to a rank-4 LoRA
  and the initial noise, a brightness reward): Shortcut,
  ``truncated:1`` (VADER's last step), Checkpointed and Full, scoring the first frame (one latent frame decoded) or
  every frame, with the blocks checkpointed, and Shortcut without; the search (``train_pruner``, latent objective, a
  training set of one, batch 1, Checkpointed) with and without checkpointed blocks, against one generation with the
  rule table (as near 0.3 of the MACs as 10 steps allow), decoded and latents out.
- ``transfer``: the search at 5 frames and at 17 (both from the full model, 20 iterations, ratio 0.7), each schedule
  sampled at 17 frames on 4 fresh seeds: SSIM, temporal error and latent distance to the full model, with the rule
  at the same MACs; and on the zoo's ``digits-unet`` (a UNet takes any multiple of 8), the search at 8x8 against the
  search at 16x16, each sampled at 16x16 on 64 seeds.

Writes benchmarks/results/video.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, emit, peak_rss_mb, run_child, write_results  # noqa: E402

import diffusion_shortcuts as ds  # noqa: E402
from diffusion_shortcuts.metrics import latent_distance, quality_to  # noqa: E402
from diffusion_shortcuts.prune import CacheSchedule  # noqa: E402
from diffusion_shortcuts.rewards.frames import FrameScoring  # noqa: E402

FRAMES, SEARCH_FRAMES, SIZE, STEPS, TEXT = 17, 5, 256, 10, (16, 64)


def current_rss_mb() -> float:
    """This process's resident memory now (``/proc/self/statm``), in MB."""
    import resource

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def wan(frames: int = FRAMES, size: int = SIZE):
    """The random Wan-class pipeline and a sampler for ``frames`` frames of ``size`` pixels, its conditions."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=TEXT[1], freq_dim=64, ffn_dim=512, num_layers=8, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64).eval().requires_grad_(False)
    vae = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval().requires_grad_(False)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    shape = (16, ds.families.latent_frames(frames, 4), size // 8, size // 8)
    text = torch.randn(1, *TEXT, generator=torch.Generator().manual_seed(1))
    negative = torch.randn(1, *TEXT, generator=torch.Generator().manual_seed(2))
    sampler = ds.Sampler.from_pipeline(pipe, STEPS, 5.0, uncond={"encoder_hidden_states": negative},
                                       sample_shape=shape)
    return pipe, sampler, {"encoder_hidden_states": text}


def brightness(images, cond=None):
    return images.float().flatten(1).mean(1)


def rule_table(sampler, cond) -> CacheSchedule:
    prof = ds.prune.profile(sampler.model, torch.zeros(1, *sampler.sample_shape), cond)
    return CacheSchedule.every_for_ratio(sampler.timesteps, prof, 0.7)


# ---- memory: one configuration per process ---------------------------------------------------------------

def child(config: dict) -> dict:
    pipe, sampler, cond = wan()
    if config.get("blocks_checkpointed"):
        pipe.transformer.enable_gradient_checkpointing()
    noise = torch.randn(1, *sampler.sample_shape, generator=torch.Generator().manual_seed(3))
    kind = config["kind"]
    if kind == "generation":
        rule = rule_table(sampler, cond)
        if not config.get("decoded", True):
            sampler.decode = None  # the denoising loop alone, as the search's latent objective runs it
        before = current_rss_mb()
        start = time.perf_counter()
        with ds.prune.apply(sampler.model, rule, sampler), torch.no_grad():
            sampler(noise, cond)
        return {"added_peak_mb": peak_rss_mb() - before, "seconds": time.perf_counter() - start,
                "macs_ratio": rule.macs_ratio}
    if kind == "search":
        before = current_rss_mb()
        result = ds.prune.train_pruner(sampler, cond, 0.7, iterations=2, batch_size=1, training_set=1, target_batch=1,
                                       validation=1, objective=ds.prune.Objective("latent"), progress=False)
        return {"added_peak_mb": peak_rss_mb() - before, "seconds_per_iteration": result.history["seconds"][-1]}
    return sdo_iteration(sampler, cond, noise, config["policy"], config["frames"])


def sdo_iteration(sampler, cond, noise, policy: str, frames) -> dict:
    """One reward gradient (with respect to a rank-4 LoRA and, where the policy reaches it, the noise), as gpu.py's
    Wan rows take it, with this process's added peak memory."""
    from gpu_wan import reward_gradient

    ds.add_lora(sampler.model, rank=4)
    scoring = FrameScoring(frames, FRAMES, 4, prefix_decode=True)
    before = current_rss_mb()
    figures = reward_gradient(scoring.sampler(sampler), scoring.reward(brightness), cond, noise, policy)
    return {"added_peak_mb": peak_rss_mb() - before, **figures, "decoded_latent_frames": scoring.decoded_latent_frames}


MEMORY = {
    **{f"sdo {policy}, {frames} frame{'s' if frames is None else ''}, blocks checkpointed":
       dict(kind="sdo", policy=policy, frames=frames, blocks_checkpointed=True)
       for policy in ("shortcut", "truncated:1", "checkpointed", "full") for frames in ("first", None)},
    "sdo shortcut, first frame, blocks not checkpointed": dict(kind="sdo", policy="shortcut", frames="first"),
    "search, blocks checkpointed": dict(kind="search", blocks_checkpointed=True),
    "search, blocks not checkpointed": dict(kind="search"),
    "one generation, rule table, decoded": dict(kind="generation"),
    "one generation, rule table, latents out": dict(kind="generation", decoded=False),
}


def memory() -> dict:
    rows = {}
    for name, config in MEMORY.items():
        rows[name.replace("None frames", "every frame")] = run_child(__file__, [json.dumps(config)])
        print(name, rows[name.replace("None frames", "every frame")], flush=True)
    return rows


# ---- transfer ----------------------------------------------------------------------------------------------

def at_frames(sampler, frames: int):
    import copy

    shape = list(sampler.sample_shape)
    shape[1] = ds.families.latent_frames(frames, 4)
    searching = copy.copy(sampler)
    searching.sample_shape = tuple(shape)
    return searching


def compared(sampler, schedule, cond, seeds: int) -> dict:
    noise = torch.randn(seeds, *sampler.sample_shape, generator=torch.Generator().manual_seed(100))
    conds = {"encoder_hidden_states": cond["encoder_hidden_states"].expand(seeds, -1, -1)}
    with torch.no_grad():
        full, full_z = sampler(noise, conds, return_latents=True)
        with ds.prune.apply(sampler.model, schedule, sampler):
            pruned, pruned_z = sampler(noise, conds, return_latents=True)
    return {"macs_ratio": schedule.macs_ratio, **quality_to(pruned.clamp(0, 1), full.clamp(0, 1)),
            "latent_distance": float(latent_distance(pruned_z, full_z).mean())}


def searched(sampler, cond, sampled_shape, iterations: int, ratio: float):
    start = time.perf_counter()
    result = ds.prune.train_pruner(sampler, cond, ratio, iterations=iterations, batch_size=1, training_set=4,
                                   target_batch=1, validation=2, objective=ds.prune.Objective("latent"),
                                   progress=False)
    seconds = time.perf_counter() - start
    sampled = None
    if tuple(sampler.sample_shape) != tuple(sampled_shape):
        sampled = ds.prune.profile(sampler.model, torch.zeros(1, *sampled_shape), ds.conditions.first(cond))
    return result.schedule(ratio, profile=sampled), seconds


def transfer() -> dict:
    _, sampler, cond = wan()
    rows = {}
    for frames in (SEARCH_FRAMES, FRAMES):
        schedule, seconds = searched(at_frames(sampler, frames), cond, sampler.sample_shape, 20, 0.7)
        rows[f"searched at {frames} frames"] = {**compared(sampler, schedule, cond, 4), "search_seconds": seconds}
        print(rows, flush=True)
    rows["rule table"] = compared(sampler, rule_table(sampler, cond), cond, 4)
    return {"wan": rows, "digits-unet": zoo_transfer()}


def zoo_transfer() -> dict:
    model = ds.zoo.load("digits-unet")
    sampler = model.sampler(50)
    labels = torch.arange(10)
    cond = model.encode(labels)
    rows = {}
    for size in (8, 16):
        searching = at_size(sampler, size)
        schedule, seconds = searched(searching, cond, sampler.sample_shape, 40, 0.8)
        noise = torch.randn(64, *sampler.sample_shape, generator=torch.Generator().manual_seed(7))
        conds = model.encode(labels.repeat(7)[:64])
        with torch.no_grad():
            full = sampler(noise, conds)
            with ds.prune.apply(sampler.model, schedule, sampler):
                pruned = sampler(noise, conds)
        rows[f"searched at {size}x{size}"] = {"macs_ratio": schedule.macs_ratio, "search_seconds": seconds,
                                              **quality_to(pruned.clamp(0, 1), full.clamp(0, 1))}
        print(rows, flush=True)
    return rows


def at_size(sampler, size: int):
    import copy

    searching = copy.copy(sampler)
    searching.sample_shape = (sampler.sample_shape[0], size, size)
    return searching


def main(parts: list[str]) -> dict:
    out = {"model": "random Wan-class: 8 blocks, hidden 128; AutoencoderKLWan base_dim 16",
           "frames": FRAMES, "size": SIZE, "steps": STEPS}
    if "memory" in parts:
        out["memory"] = memory()
    if "transfer" in parts:
        out["transfer"] = transfer()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["memory", "transfer"], choices=["memory", "transfer"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        emit(child(json.loads(args.child)))
    else:
        path = RESULTS / "video.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        result = main(args.parts)
        write_results(path, "video", {**{k: v for k, v in previous.items() if k in ("memory", "transfer")},
                                      **result})
        print(json.dumps({k: v for k, v in result.items() if k in ("memory", "transfer")}, indent=1))
