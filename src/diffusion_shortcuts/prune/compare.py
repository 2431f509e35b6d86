"""A cache schedule against the full model: the same noise and conditions, quality and wall-clock.

SSIM and PSNR of the scheduled samples to the full model's (of their frames, with the temporal error, for videos:
:func:`~diffusion_shortcuts.metrics.quality_to`), the distance of their final latents, whatever a
``judge(images, conditions)`` reports for both (the zoo's: accuracy and FID), and the speedup of sampling one batch
with and without the schedule, timed alternately in one process (this machine is shared and noisy).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import conditions as C
from ..metrics import latent_distance, quality_to, timed_pair
from .apply import apply
from .blocks import profile
from .schedule import CacheSchedule


def generate(sampler, encode: Callable, conditions, noise: torch.Tensor, batch_size: int = 100, schedule=None,
             progress: bool = False, desc: str = "", compile: bool = False,
             finished: Callable | None = None, latents: list | None = None) -> torch.Tensor:
    """Images (or videos) in [0, 1] for ``noise`` and ``conditions`` (None, labels or prompts), ``batch_size`` at a
    time; ``compile``: the gated blocks compiled (:func:`~diffusion_shortcuts.prune.apply`), with or without a
    schedule; ``finished(rows, images)``: called with each batch as it is made (to write it before the next);
    ``latents``: a list the final latents are appended to, batch by batch."""
    out = []
    schedule = sampling_table(sampler, schedule, compile, encode, conditions, noise)
    with apply(sampler.model, schedule, sampler, compile=compile) if schedule is not None else nullcontext():
        for i in tqdm(range(0, len(noise), batch_size), desc=desc, disable=not progress, leave=False):
            rows = torch.arange(i, min(i + batch_size, len(noise)))
            cond = encode(C.take(conditions, rows)) if conditions is not None else None
            images, final = sampler(noise[i:i + batch_size], cond, return_latents=True)
            out.append(images.clamp(0, 1))
            if latents is not None:
                latents.append(final)
            if finished is not None:
                finished(rows, out[-1])
    return torch.cat(out)


def sampling_table(sampler, schedule, compile: bool, encode: Callable, conditions, noise: torch.Tensor):
    """The table to sample with: ``schedule``, or with ``compile`` and none, the keep-everything table (so that the
    blocks are compiled the same way with and without a schedule); None without either."""
    if schedule is not None or not compile:
        return schedule
    first = encode(C.take(conditions, torch.arange(1))) if conditions is not None else None
    return keep_everything(sampler, noise, first)


def keep_everything(sampler, noise: torch.Tensor, cond) -> CacheSchedule:
    """The table that computes every block: the full model, through the same hooks as a schedule."""
    return CacheSchedule.keep_all(sampler.timesteps, profile(sampler.model, noise, C.first(cond)))


def timed_speedup(sampler, schedule, noise: torch.Tensor, cond, repeats: int = 5, compile: bool = False) -> dict:
    """Seconds to sample one batch with and without ``schedule``, alternated; median of each. With ``compile`` both
    run with compiled blocks (the full model as the keep-everything table), after one compiling run each."""
    def run(table):
        def go():
            with apply(sampler.model, table, sampler, compile=compile) if table is not None else nullcontext():
                sampler(noise, cond)
        return go

    full, fast = timed_pair(run(keep_everything(sampler, noise, cond) if compile else None), run(schedule), repeats)
    return {"batch": len(noise), "seconds_full": full, "seconds_pruned": fast, "speedup": full / fast,
            "compiled": compile}


def compare_schedule(sampler, schedule, encode: Callable, conditions, noise: torch.Tensor,
                     judge: Callable | None = None, batch_size: int = 100, speed_batch: int = 16, progress: bool = True,
                     full_images: torch.Tensor | None = None,
                     compile: bool = False) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(metrics, full images, scheduled images) from the same ``noise`` and ``conditions``; pass
    ``full_images`` made earlier from the same inputs to skip regenerating them. ``compile``: both sides with
    compiled blocks (quality and speed)."""
    full_latents, pruned_latents = [], []
    if full_images is None:
        full_images = generate(sampler, encode, conditions, noise, batch_size, progress=progress, desc="full model",
                               compile=compile, latents=full_latents)
    pruned = generate(sampler, encode, conditions, noise, batch_size, schedule, progress, desc="with schedule",
                      compile=compile, latents=pruned_latents)
    metrics = {"samples": len(noise), "macs_ratio": schedule.macs_ratio, **quality_to(pruned, full_images)}
    if full_latents:  # not when the full model's images were given
        metrics["latent_distance"] = float(latent_distance(torch.cat(pruned_latents), torch.cat(full_latents)).mean())
    if judge is not None:
        full_q, pruned_q = judge(full_images, conditions), judge(pruned, conditions)
        metrics.update({f"{k}_full": v for k, v in full_q.items()})
        metrics.update({f"{k}_pruned": v for k, v in pruned_q.items()})
    rows = torch.arange(min(speed_batch, len(noise)))
    speed_noise = noise[rows]
    speed_cond = encode(C.take(conditions, rows)) if conditions is not None else None
    metrics.update(timed_speedup(sampler, schedule, speed_noise, speed_cond, compile=compile))
    return metrics, full_images, pruned
