"""``optimize``: initial noise steered against a reward (SDO by default).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from .. import distributed
from ..metrics import peak_memory_mb
from ..subjects import JUDGE
from ..usage import UsageError
from .common import (checkpointed_blocks, judged_accuracy, load_schedule, my_share, parse_gradient, parse_reward,
                     scored_frames, shards_of, side_by_side_sheets)


def optimize_report(out: Path, subject, *, reward: str, gradient: str, iterations: int, n: int, lr: float,
                    steps: int, seed: int, noise_prior: str | None, guidance: float | None = None,
                    schedule: str | None = None, strict_schedule: bool = False, tag: str = "",
                    compile: bool = False, reward_frames: str | None = None,
                    block_checkpointing: bool = False) -> dict:
    """Optimize the initial noise of n samples against a reward; write curve, before/after and latents. With a
    cache schedule, every rollout (the graph step's call included) runs pruned: both shortcuts at once; with
    ``compile``, through compiled blocks. Under ``accelerate launch`` the samples are sharded (each process
    optimizes its own, every sample's noise indexed from the seed) and the main process gathers and writes. On a video
    pipeline the reward scores ``reward_frames`` (``first``, K drawn per iteration, or every frame) and the pictures
    are contact sheets, with the MP4s before and after."""
    from safetensors.torch import save_file

    from ..optimize import OptimizationError, optimize_latents
    from ..optimize.latents import merged_history
    from ..plots import reward_curves
    from ..prune import apply
    from ..prune.compare import sampling_table
    from ..rewards import given_conditions

    reward_fn, policy = parse_reward(reward, subject), parse_gradient(gradient)
    if iterations < 1 or n < 1:
        raise UsageError(f"--iterations and --n must be at least 1, got {iterations} and {n}")
    every_noise = subject.noise(n, torch.Generator().manual_seed(seed))
    mine, conditions, noise = my_share(subject, every_noise, "--n")
    cond = subject.encode(conditions)
    sampler = subject.sampler(steps, guidance)
    cache = load_schedule(schedule, subject, sampler, strict_schedule) if schedule else None
    scored_reward, scored_sampler = scored_frames(subject, sampler, reward_fn, reward_frames, seed)
    checkpointed_blocks(subject, block_checkpointing)
    error = None
    table = sampling_table(sampler, cache, compile, subject.encode, conditions, noise)
    with apply(subject.model, table, sampler, compile=compile) if table else nullcontext():
        with torch.no_grad():
            before = sampler(noise, cond).clamp(0, 1)
        try:  # the reward sees the labels or prompts, the sampler their encoding
            result = optimize_latents(scored_sampler, given_conditions(scored_reward, conditions), noise, cond,
                                      iterations=iterations, lr=lr, gradient=policy,
                                      noise_prior=None if noise_prior == "none" else noise_prior, seed=seed,
                                      progress=distributed.is_main_process())
        except OptimizationError as exc:
            result, error = exc.result, str(exc)
    after = result.images.clamp(0, 1) if result.images is not None else before
    parts = distributed.gather({"indices": mine, "latents": result.latents.float(), "before": before.float(),
                                "after": after.float(), "history": result.history, "error": error,
                                "peak_memory_mb": peak_memory_mb(subject.device)})
    if not distributed.is_main_process():  # the main process writes what every process made
        return {}
    latents, before, after = (torch.cat([p[key] for p in parts]) for key in ("latents", "before", "after"))
    error = next((p["error"] for p in parts if p["error"]), None)
    save_file({"latents": latents.contiguous(), "initial_noise": every_noise.contiguous().cpu()},
              str(out / f"latents{tag}.safetensors"))
    history = merged_history([p["history"] for p in parts], latents)
    metrics = {"model": subject.name, "reward_spec": reward, "gradient": policy.spec, "n": n, "lr": lr,
               "num_inference_steps": steps, "seed": seed, "noise_prior": noise_prior,
               "conditions": subject.captions(subject.conditions(n)), "reward": history["reward"],
               "seconds_per_iteration": history["seconds"],
               "mean_seconds_per_iteration": sum(history["seconds"]) / max(1, len(history["seconds"])),
               "peak_memory_mb": max(p["peak_memory_mb"] for p in parts), "graph_mb": history["graph_mb"],
               "final_reward": history.get("final_reward"), "shell_drift": history.get("final_shell_drift"),
               "latents": f"latents{tag}.safetensors", "error": error, "schedule": schedule,
               "macs_ratio": cache.macs_ratio if cache else 1.0, "compiled": compile, **shards_of(parts)}
    if subject.num_frames is not None:
        from ..videos import save_videos

        metrics.update(reward_frames=reward_frames or "all", frames=int(after.shape[2]), fps=subject.fps,
                       videos={side: [p.relative_to(out).as_posix() for p in
                                      save_videos(x, out / f"videos{tag}", subject.fps, stem=side)]
                               for side, x in (("before", before), ("after", after))})
    if reward.startswith("digit:"):
        target = torch.full((n,), int(reward.split(":")[1]))
        metrics.update(success_before=judged_accuracy(before, target), success_after=judged_accuracy(after, target),
                       success_judge=JUDGE)
    if history["reward"]:
        reward_curves({gradient: history}, out / f"curve{tag}.png", title=f"{subject.name}, {reward}")
    side_by_side_sheets({"before": before, "after": after}, out / f"before_after{tag}.png")
    if error:
        raise UsageError(f"{error}; the last good latents are in {out / f'latents{tag}.safetensors'}")
    return metrics
