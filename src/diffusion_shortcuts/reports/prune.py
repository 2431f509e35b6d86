"""``prune``: a cache schedule calibrated or searched, and compared with the full model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .. import conditions as C
from .. import distributed
from ..metrics import FID_MIN_SAMPLES, peak_memory_mb
from ..usage import UsageError
from .common import (check_resume, checkpointed_blocks, load_schedule, mean_reward, parse_gradient,
                     parse_search_objective, side_by_side_sheets)


DEFAULT_TRAINING_SET = 16  # prune's fixed training set: what benchmarks/search_cost.py measured best with


def prune_report(out: Path, subject, *, ratio: float, iterations: int, batch_size: int, lr: float, gradient: str,
                 steps: int, samples: int, seed: int, resume: bool, checkpoint_every: int = 25,
                 guidance: float | None = None, reuse_mode: str = "copy", start_every: int | str | None = None,
                 start_from: str | None = None, objective: str = "ssim", validation: int = 8,
                 compile: bool = False, calibrate_only: bool = False, calibration_batch: int | None = None,
                 calibration_generations: int = 1, training_set: int | None = 0, granularity: str = "block",
                 search_steps: int = 0, search_frames: int | None = None, block_checkpointing: bool = False) -> dict:
    """DiP-GO: search a cache schedule at ``ratio`` over the conditions, compare it with the full model; with
    ``start_every`` N the search starts from the rule table that computes every block every N-th step (``"auto"``:
    the N whose table prunes nearest ``ratio``); ``compile``: the comparison (quality and speed) through compiled
    blocks on both sides. ``start_from``: where the search starts (``"calibrated"``, the ``prune`` command's
    default; None or ``"full"``: the full model; or a schedule, e.g. for a refit); ``objective``: what the gates keep
    (``ssim``, ``reward:SPEC``, ``ssim+reward:SPEC:W``; with a reward the comparison reports it for both sides);
    ``validation``: the fresh samples on which the searched table is compared with the start. ``calibrate_only``:
    no search, the table calibrated on ``calibration_generations`` full generations of ``calibration_batch``
    samples (:func:`~diffusion_shortcuts.prune.calibrate`). ``search_frames``: a video pipeline's search (its start,
    rollouts and validation) at this many frames, the schedule thresholded on the MACs at the sampled frames and
    compared there; ``block_checkpointing``: the search recomputes each block in its backward pass (one block's
    activations at a time, the memory of a video model's search near one generation's).
    Under ``accelerate launch`` the search is data parallel (``--batch-size`` per process) and the main process
    alone writes and makes the comparison."""
    from ..prune.compiling import compile_options

    if compile:  # before an hour of search, not after it
        compile_options(True, False, torch.device(subject.device))
    if not 0.0 < ratio < 1.0:
        raise UsageError(f"--ratio must be in (0, 1), got {ratio}")
    if iterations < 1 or samples < 1:
        raise UsageError("--iterations and --samples must be at least 1")
    sampler = subject.sampler(steps, guidance)
    distinct = subject.distinct_conditions()
    conditions = subject.encode(distinct) if distinct is not None else None
    if calibrate_only:
        schedule, figures = calibrated_schedule(sampler, conditions, ratio, reuse_mode, calibration_batch,
                                                calibration_generations, seed)
        goal = None
    else:
        goal = parse_search_objective(objective, subject)
        checkpointed_blocks(subject, block_checkpointing)
        searched = searched_schedule(out, subject, sampler_at_frames(subject, sampler, search_frames), conditions,
                                     distinct, ratio=ratio, iterations=iterations,
                                     batch_size=batch_size, lr=lr, gradient=gradient, seed=seed, resume=resume,
                                     checkpoint_every=checkpoint_every, reuse_mode=reuse_mode, start_every=start_every,
                                     start_from=start_from, goal=goal, validation=validation,
                                     training_set=training_set, granularity=granularity, search_steps=search_steps)
        if searched is None:  # under `accelerate launch` every process holds the same gates: the main one writes
            return {}
        schedule, figures = searched
        if search_frames is not None:
            figures.update(search_frames=search_frames, frames=subject.num_frames)
    return compared(out, subject, sampler, schedule, ratio, samples, seed, compile, goal, figures)


def sampler_at_frames(subject, sampler, frames: int | None):
    """``sampler`` for videos of ``frames`` frames (``--search-frames``; itself where None)."""
    from ..families import latent_frames, vae_time_scale
    from ..pipelines import check_frames

    if frames is None:
        return sampler
    try:
        if subject.num_frames is None:
            raise ValueError(f"--search-frames: {subject.name} makes images, not videos")
        check_frames(sampler.pipeline, sampler.family, frames, None)
    except ValueError as exc:
        raise UsageError(str(exc).replace("--frames", "--search-frames")) from None
    shape = dict(zip(sampler.family.latent_layout, sampler.sample_shape))
    shape["F"] = latent_frames(frames, vae_time_scale(sampler.pipeline))
    searching = copy.copy(sampler)
    searching.sample_shape = tuple(shape[axis] for axis in sampler.family.latent_layout)
    return searching


def calibrated_schedule(sampler, conditions, ratio: float, mode: str, batch: int | None, generations: int,
                        seed: int):
    """``prune --calibrate-only``: the table calibrated at ``1 - ratio`` of the MACs, and its figures."""
    from ..prune import CalibrationError, calibrate

    try:
        schedule = calibrate(sampler, conditions, macs=1.0 - ratio, generations=generations, batch_size=batch,
                             mode=mode, seed=seed)
    except CalibrationError as exc:
        raise UsageError(f"--calibrate-only: {str(exc).replace('batch_size', '--calibration-batch')}") from None
    info = schedule.info
    return schedule, {"calibration_seconds": info["seconds"], "calibration_generations": info["generations"],
                      "calibration_batch": info["batch"], "calibration_threshold": info["threshold"]}


def searched_schedule(out: Path, subject, sampler, conditions, distinct, *, ratio, iterations, batch_size, lr,
                      gradient, seed, resume, checkpoint_every, reuse_mode, start_every, start_from, goal, validation,
                      training_set=0, granularity="block", search_steps=0):
    """``prune``'s search: the schedule and its figures (None on the other processes of a launch)."""
    from ..prune import CacheSchedule, SearchError, profile, train_pruner

    policy = parse_gradient(gradient)
    check_resume(resume, out, "search_checkpoint.pt")
    if training_set is None:  # prune's default: 16 samples, at least one iteration's global batch
        training_set = max(DEFAULT_TRAINING_SET, batch_size * distributed.num_processes())
    if start_every is not None:
        example = torch.zeros(1, *sampler.sample_shape, device=subject.device)
        prof = profile(sampler.model, example, C.first(conditions))
        start = (CacheSchedule.every_for_ratio(sampler.timesteps, prof, ratio) if start_every == "auto" else
                 CacheSchedule.every(sampler.timesteps, prof, start_every))
    elif start_from in (None, "full"):  # DiP-GO's start, the full model (None: through the library)
        start = None
    elif start_from == "calibrated":  # train_pruner calibrates at the search's ratio, mode and seed
        start = "calibrated"
    else:
        start = load_schedule(start_from, subject, sampler, True, "--start-from")
    try:
        result = train_pruner(sampler, conditions, ratio, iterations=iterations, batch_size=batch_size, lr=lr,
                              gradient=policy, seed=seed, checkpoint_dir=out, checkpoint_every=checkpoint_every,
                              reuse_mode=reuse_mode, start=start, resume=resume, objective=goal,
                              reward_conditions=distinct, validation=validation, training_set=training_set,
                              granularity=granularity, search_steps=search_steps)
    except (SearchError, ValueError) as exc:
        raise UsageError(f"{exc} (checkpoint: {out / 'search_checkpoint.pt'})") from None
    search_memory = peak_memory_mb(subject.device)
    if not distributed.is_main_process():
        return None
    sampled = None
    if tuple(sampler.sample_shape) != tuple(subject.sample_shape):  # searched at fewer frames: the MACs sampled
        sampled = profile(sampler.model, torch.zeros(1, *subject.sample_shape, device=subject.device),
                          C.first(conditions))
    schedule = result.schedule(ratio, profile=sampled)
    result.pruner.save_pretrained(out / "pruner")
    (out / "search.json").write_text(json.dumps(result.history) + "\n")
    history = result.history
    return schedule, {
        "pruner": "pruner", "search_seconds": sum(history["seconds"]), "search_iterations": len(history["loss"]),
        "search_settings": history["settings"], "search_ssim": history.get("ssim"),
        "search_latent_distance": history.get("latent_distance"),
        "search_macs_ratio": history["macs_ratio"], "search_validation": history.get("validation"),
        "num_processes": history["settings"]["num_processes"], "search_peak_memory_mb": search_memory,
        "objective": goal.name, "search_reward": history.get("reward"),
        "search_reward_full": history.get("reward_full")}


def compared(out: Path, subject, sampler, schedule, ratio: float, samples: int, seed: int, compile: bool, goal,
             figures: dict) -> dict:
    """Write a schedule, its heatmap and its comparison with the full model; the metrics."""
    from ..plots import schedule_heatmap
    from ..prune.compare import compare_schedule

    schedule.save(out / "schedule.json")
    schedule_heatmap(schedule, out / "heatmap.png", label=f"{subject.name}, ratio {ratio}")
    conditions = subject.conditions(samples)
    noise = subject.noise(samples, torch.Generator().manual_seed(seed + 1))
    metrics, full, pruned = compare_schedule(sampler, schedule, subject.encode, conditions, noise,
                                             subject.schedule_judge(), compile=compile)
    if subject.accuracy_judge:
        metrics.update(accuracy_judge=subject.accuracy_judge,
                       fid_features="digits-classifier" if "fid_full" in metrics else None)
    if goal is not None and goal.reward is not None:  # the reward the gates were trained on, for both sides
        metrics.update(reward_full=mean_reward(goal.reward, full, conditions, subject.device),
                       reward_pruned=mean_reward(goal.reward, pruned, conditions, subject.device))
    show = slice(0, min(4 if subject.num_frames else 20, samples))
    captions = subject.captions(C.take(conditions, torch.arange(samples)[show])) if conditions is not None else None
    side_by_side_sheets({"full model": full[show], f"schedule: {metrics['speedup']:.1f}x faster": pruned[show]},
                        out / "full_vs_pruned.png", captions if subject.num_frames else None, nrow=10)
    if subject.num_frames:  # each video beside its scheduled one, one MP4 each
        from ..videos import save_videos

        metrics["videos"] = [p.relative_to(out).as_posix() for p in save_videos(
            torch.cat([full[show], pruned[show]], dim=-1), out / "videos", subject.fps, stem="full_vs_pruned")]
    warnings = [] if schedule.info["within_tolerance"] else [
        f"the schedule prunes {1 - schedule.macs_ratio:.3f} of the MACs, not the {ratio} asked for: no threshold "
        "lands closer (more --iterations, or another --ratio)"]
    if subject.accuracy_judge and "fid_full" not in metrics:
        metrics["fid_left_out"] = f"FID needs at least {FID_MIN_SAMPLES} samples, --samples is {samples}"
        warnings.append(metrics["fid_left_out"])
    return {"model": subject.name, "ratio": ratio, "warning": "; ".join(warnings) or None,
            "schedule": "schedule.json", "heatmap": "heatmap.png", "picture": "full_vs_pruned.png",
            "within_tolerance": schedule.info["within_tolerance"], "method": schedule.info.get("method"),
            "lora": subject.adapter, **figures, "seed": seed + 1, **metrics}
