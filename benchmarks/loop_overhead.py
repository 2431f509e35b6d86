"""The sampling loop's own cost: seconds per step with a denoiser of negligible cost, our Sampler against the
stock StableDiffusionPipeline loop, full and under a rule schedule that skips whole steps.

On a GPU at batch 1 the SD-1.5 UNet is launch-bound, so whatever a loop does between kernel launches shows in
the wall-clock; a tiny UNet on the CPU makes that cost the whole cost (the CPU proxy of the GPU issue). Both
loops run the same tiny UNet (SD-style, 8x8 latents, 77 prompt tokens given as embeddings), DDIM 50 steps,
guidance 7.5, batch 1, no VAE decode (latents out), the schedule enabled before each call the same way for both,
timed round-robin in one process; the fastest round of each (medians beside), and the median seconds per step spent
outside the denoiser call (the loop's own cost, measured with forward hooks around the whole call).
Writes benchmarks/results/loop_overhead.json.

    OMP_NUM_THREADS=1 python benchmarks/loop_overhead.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _common import RESULTS, write_results
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

import diffusion_shortcuts as ds
from diffusion_shortcuts.metrics import Timer

STEPS, GUIDANCE = 50, 7.5


def tiny_pipeline() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4).eval().requires_grad_(False)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def runs(pipe, schedule) -> dict:
    """Each way to sample one latent: the stock call and our Sampler, full and under ``schedule``."""
    unet = pipe.unet
    cond, uncond = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    noise = torch.randn(1, 4, 8, 8)
    sampler = ds.Sampler(unet, pipe.scheduler, STEPS, GUIDANCE, uncond=uncond)

    def stock():
        pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise.clone(), num_inference_steps=STEPS,
             guidance_scale=GUIDANCE, height=64, width=64, output_type="latent")

    def ours():
        sampler(noise, cond)

    def scheduled(run):
        def go():
            net = ds.prune.enable(unet, schedule)  # the same for both: our Sampler announces its steps
            try:
                run()
            finally:
                ds.prune.disable(unet)
            return net
        return go

    return {"stock, full": stock, "ours, full": ours,
            "stock, schedule": scheduled(stock), "ours, schedule": scheduled(ours)}


class DenoiserClock:
    """Seconds spent inside the denoiser's calls (torch forward hooks around the whole call, cache hooks included):
    the rest of a generation is the loop's own cost."""

    def __init__(self, model):
        self.inside, self.started = 0.0, 0.0
        model.register_forward_pre_hook(lambda *_: setattr(self, "started", time.perf_counter()))
        model.register_forward_hook(
            lambda *_: setattr(self, "inside", self.inside + time.perf_counter() - self.started))


def round_robin(named: dict, rounds: int, clock: DenoiserClock) -> tuple[dict, dict]:
    """Seconds of each run and the seconds outside its denoiser calls, timed in turn for ``rounds`` rounds after a
    warm-up round."""
    times, outside = {name: [] for name in named}, {name: [] for name in named}
    for r in range(rounds + 1):
        for name, run in named.items():
            clock.inside = 0.0
            with torch.no_grad(), Timer() as t:
                run()
            if r:
                times[name].append(t.seconds)
                outside[name].append(t.seconds - clock.inside)
    return times, outside


def main(rounds: int) -> dict:
    pipe = tiny_pipeline()
    sampler = ds.Sampler(pipe.unet, pipe.scheduler, STEPS)
    prof = ds.prune.profile(pipe.unet, torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 32))
    schedule = ds.prune.CacheSchedule.every_for_ratio(sampler.timesteps, prof, 0.8)
    clock = DenoiserClock(pipe.unet)
    times, outside = round_robin(runs(pipe, schedule), rounds, clock)
    loop = {name: statistics.median(v) for name, v in outside.items()}
    # the fastest round is the loop's own cost with the least of the shared machine's noise in it; the median beside it
    best = {name: min(v) for name, v in times.items()}
    median = {name: statistics.median(v) for name, v in times.items()}
    per_step = {name: s / STEPS for name, s in best.items()}
    return {"steps": STEPS, "guidance": GUIDANCE, "rounds": rounds, "schedule": schedule.info.get("method"),
            "schedule_macs_ratio": schedule.macs_ratio, "whole_steps": int(schedule.reuse.all(1).sum()),
            "seconds_per_step": per_step, "median_seconds_per_step": {n: s / STEPS for n, s in median.items()},
            "loop_seconds_per_step": {n: s / STEPS for n, s in loop.items()},
            "loop_ours_over_stock": {"full": loop["ours, full"] / loop["stock, full"],
                                     "schedule": loop["ours, schedule"] / loop["stock, schedule"]},
            "ours_over_stock": {"full": best["ours, full"] / best["stock, full"],
                                "schedule": best["ours, schedule"] / best["stock, schedule"]},
            "ours_over_stock_median": {"full": median["ours, full"] / median["stock, full"],
                                       "schedule": median["ours, schedule"] / median["stock, schedule"]},
            "targets": {"ours no slower than the stock loop, full": best["ours, full"] <= best["stock, full"],
                        "ours no slower than the stock loop, schedule":
                            best["ours, schedule"] <= best["stock, schedule"]}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = main(args.rounds)
    write_results(RESULTS / "loop_overhead.json", "loop_overhead", out)
    for name, seconds in out["seconds_per_step"].items():
        print(f"{name:18s} {seconds * 1e3:7.3f} ms per step, {out['loop_seconds_per_step'][name] * 1e3:6.3f} ms of it "
              "outside the denoiser call")
    for name, ratio in out["ours_over_stock"].items():
        print(f"ours / stock, {name}: {ratio:.3f} (medians: {out['ours_over_stock_median'][name]:.3f}; "
              f"outside the denoiser: {out['loop_ours_over_stock'][name]:.3f})")
    sys.exit(0)
