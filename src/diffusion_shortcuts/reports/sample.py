"""``sample``: samples of a model (with a schedule or without), judged and drawn.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from .. import distributed
from ..metrics import Timer
from ..usage import UsageError
from .common import (check_finite, load_schedule, my_share, shards_of, sheet_or_grid, summed)


def sample_report(out: Path, subject, *, n: int, seed: int, steps: int, guidance: float | None,
                  schedule: str | None = None, strict_schedule: bool = False, tag: str = "",
                  progress: bool = True, compile: bool = False) -> dict:
    """Sample n images cycling through the conditions, judge them, write a captioned grid; with a schedule,
    what it computed and reused; with ``compile``, the gated blocks compiled (the first batch pays for it). Under
    ``accelerate launch`` the samples are sharded (every sample's noise indexed from the seed) and the main process
    gathers, judges and writes. A video pipeline's videos are written as MP4s (``videos/video_007.mp4``, by each
    process as its batches finish, so that an interrupted run keeps them) and pictured as a contact sheet."""
    from ..prune import apply, summary
    from ..prune.compare import generate, sampling_table
    from ..videos import save_videos, video_name

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    mine, conditions, noise = my_share(subject, subject.noise(n, torch.Generator().manual_seed(seed)), "--n")
    sampler = subject.sampler(steps, guidance)
    cache = load_schedule(schedule, subject, sampler, strict_schedule) if schedule else None
    table = sampling_table(sampler, cache, compile, subject.encode, conditions, noise)
    video = subject.num_frames is not None
    videos = out / f"videos{tag}"

    def write_videos(rows, batch):
        save_videos(batch, videos, subject.fps, [mine[int(r)] for r in rows])

    with Timer() as timer, apply(subject.model, table, sampler, compile=compile) if table else nullcontext() as net:
        images = generate(sampler, subject.encode, conditions, noise, batch_size=min(len(mine), 4 if video else 100),
                          progress=progress and distributed.is_main_process(), desc=f"sampling {subject.name}",
                          finished=write_videos if video else None)
    check_finite(images, "sample")
    parts = distributed.gather({"indices": mine, "images": images.float(), "seconds": timer.seconds,
                                "cache_summary": summary(net) if cache else None})
    if not distributed.is_main_process():  # the main process writes what every process made
        return {}
    images, conditions = torch.cat([p["images"] for p in parts]), subject.conditions(n)
    metrics = {"model": subject.name, "n": n, "seed": seed, "num_inference_steps": steps,
               "guidance_scale": sampler.guidance_scale, "true_cfg_scale": sampler.true_cfg_scale,
               "scheduler": type(sampler.scheduler).__name__,
               "seconds": max(p["seconds"] for p in parts), "schedule": schedule, "lora": subject.adapter,
               "macs_ratio": cache.macs_ratio if cache else 1.0,
               "schedule_resampled_from": cache.info.get("resampled_from") if cache else None,
               "cache_summary": summed([p["cache_summary"] for p in parts]) if cache else None, "compiled": compile,
               "prompts": subject.distinct_conditions() if subject.text else None, **shards_of(parts)}
    if video:
        metrics.update(frames=int(images.shape[2]), fps=subject.fps,
                       videos=[f"{videos.name}/{video_name(i)}" for i in range(n)])
    judged = subject.judge(images, conditions)
    if judged:
        metrics.update(judged, accuracy_judge=subject.accuracy_judge)
    if conditions is not None and not subject.text:  # one row per label
        order = torch.argsort(conditions, stable=True)
        images, conditions = images[order], conditions[order]
    picture = "sheet" if video else "grid"
    metrics[picture] = sheet_or_grid(images, subject.captions(conditions), out / f"{picture}{tag}.png")
    return metrics
