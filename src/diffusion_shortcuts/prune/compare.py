"""A cache schedule against the full model: the same noise and conditions, quality and wall-clock.

SSIM and PSNR of the scheduled samples to the full model's, whatever a ``judge(images, conditions)``
reports for both (the zoo's: accuracy and FID), and the speedup of sampling one batch with and without
the schedule, timed alternately in one process (this machine is shared and noisy).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import conditions as C
from ..metrics import psnr, ssim, timed_pair
from .apply import apply


def generate(sampler, encode: Callable, conditions, noise: torch.Tensor, batch_size: int = 100, schedule=None,
             progress: bool = False, desc: str = "") -> torch.Tensor:
    """Images in [0, 1] for ``noise`` and ``conditions`` (None, labels or prompts), ``batch_size`` at a time."""
    out = []
    with apply(sampler.model, schedule, sampler) if schedule is not None else nullcontext():
        for i in tqdm(range(0, len(noise), batch_size), desc=desc, disable=not progress, leave=False):
            rows = torch.arange(i, min(i + batch_size, len(noise)))
            cond = encode(C.take(conditions, rows)) if conditions is not None else None
            out.append(sampler(noise[i:i + batch_size], cond).clamp(0, 1))
    return torch.cat(out)


def timed_speedup(sampler, schedule, noise: torch.Tensor, cond, repeats: int = 5) -> dict:
    """Seconds to sample one batch with and without ``schedule``, alternated; median of each."""
    def pruned():
        with apply(sampler.model, schedule, sampler):
            sampler(noise, cond)

    full, fast = timed_pair(lambda: sampler(noise, cond), pruned, repeats)
    return {"batch": len(noise), "seconds_full": full, "seconds_pruned": fast, "speedup": full / fast}


def compare_schedule(sampler, schedule, encode: Callable, conditions, noise: torch.Tensor, judge: Callable | None = None,
                     batch_size: int = 100, speed_batch: int = 16, progress: bool = True,
                     full_images: torch.Tensor | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(metrics, full images, scheduled images) from the same ``noise`` and ``conditions``; pass
    ``full_images`` made earlier from the same inputs to skip regenerating them."""
    if full_images is None:
        full_images = generate(sampler, encode, conditions, noise, batch_size, progress=progress, desc="full model")
    pruned = generate(sampler, encode, conditions, noise, batch_size, schedule, progress, desc="with schedule")
    metrics = {"samples": len(noise), "macs_ratio": schedule.macs_ratio,
               "ssim": float(ssim(pruned, full_images).mean()), "psnr": float(psnr(pruned, full_images).mean())}
    if judge is not None:
        full_q, pruned_q = judge(full_images, conditions), judge(pruned, conditions)
        metrics.update({f"{k}_full": v for k, v in full_q.items()})
        metrics.update({f"{k}_pruned": v for k, v in pruned_q.items()})
    rows = torch.arange(min(speed_batch, len(noise)))
    speed_noise = noise[rows]
    speed_cond = encode(C.take(conditions, rows)) if conditions is not None else None
    metrics.update(timed_speedup(sampler, schedule, speed_noise, speed_cond))
    return metrics, full_images, pruned
