"""``finetune``: LoRA or all weights tuned against a reward, and a schedule refit to the tuned model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed
from ..metrics import peak_memory_mb
from ..usage import UsageError
from .common import (check_resume, checkpointed_blocks, load_schedule, parse_gradient, parse_reward, scored_frames,
                     side_by_side_sheets)


def _heldout_set(subject, samples: int, every: int, seed: int):
    """Fixed noise per condition (the held-out set), judged by the subject's judge, and the rows to picture."""
    from ..optimize import HeldOut

    conditions = subject.distinct_conditions()
    judge = subject.judge if conditions is not None else None
    if conditions is not None:
        heldout = HeldOut.per_condition(conditions, samples, subject.sample_shape, seed=10_000 + seed, every=every,
                                        judge=judge)
        index = torch.arange(0, len(heldout.noise), samples)
        return heldout, (heldout.noise[index], None if heldout.conditions is None else
                         [heldout.conditions[i] for i in index] if subject.text else heldout.conditions[index])
    heldout = HeldOut(subject.noise(10 * samples, torch.Generator().manual_seed(10_000 + seed)), every=every)
    return heldout, (heldout.noise[:10], None)


def finetune_report(out: Path, subject, *, reward: str, params: str, rank: int, gradient: str, iterations: int,
                    batch_size: int, lr: float, steps: int, guidance: float | None, seed: int, ema: float | None,
                    base_weight: float, warmup: int, eval_every: int, eval_samples: int, checkpoint_every: int,
                    resume: bool, schedule: str | None = None, refit_iterations: int = 50,
                    reward_frames: str | None = None, block_checkpointing: bool = False) -> dict:
    """Fine-tune a LoRA adapter (or all weights) against a reward; resumable; judged on a held-out set (the
    zoo's by the eval classifier), with the diversity of each condition's samples. With ``schedule`` (checked against
    the model before training, and resampled to ``steps`` where it was made for another step count, as ``sample`` and
    ``optimize`` resample it), the schedule is refit to the tuned model afterwards and written
    beside the adapter, with what it and the refit keep of the tuned model in the metrics. On a video pipeline the
    reward scores ``reward_frames`` (``first``, K drawn per iteration, or every frame; a resumed run draws afresh)."""
    from ..optimize import FinetuneError, add_lora, finetune
    from ..plots import heldout_curves, reward_curves

    reward_fn, policy = parse_reward(reward, subject), parse_gradient(gradient)
    if min(iterations, batch_size, rank, eval_every, checkpoint_every) < 1 or eval_samples < 2:
        raise UsageError("--iterations, --batch-size, --rank, --eval-every and --checkpoint-every must be at least 1, "
                         "--eval-samples at least 2")
    check_resume(resume, out, "finetune_checkpoint.pt")
    sampler = subject.sampler(steps, guidance)
    cache = load_schedule(schedule, subject, sampler) if schedule is not None else None  # resampled to --steps
    scored_reward, scored_sampler = scored_frames(subject, sampler, reward_fn, reward_frames, seed)
    checkpointed_blocks(subject, block_checkpointing)
    heldout, (show_noise, show_conditions) = _heldout_set(subject, eval_samples, eval_every, seed)
    encode = subject.encode if subject.conditional else None

    def samples():
        with torch.no_grad():
            return sampler(show_noise, encode(show_conditions) if encode else None).clamp(0, 1).float().cpu()

    before = samples()
    if params == "lora":
        add_lora(subject.model, rank=rank, seed=seed)
    try:
        result = finetune(scored_sampler, scored_reward, subject.distinct_conditions(),
                          noise_shape=subject.sample_shape, params=params, gradient=policy, iterations=iterations,
                          batch_size=batch_size, lr=lr,
                          seed=seed, encode=encode, ema=ema, base_weight=base_weight, warmup=warmup, heldout=heldout,
                          checkpoint_dir=out, checkpoint_every=checkpoint_every, resume=resume)
    except (FinetuneError, ValueError) as exc:
        raise UsageError(f"{exc} (checkpoint: {out / 'finetune_checkpoint.pt'})") from None
    main = distributed.is_main_process()  # under `accelerate launch` every process holds the same weights: one writes
    if main and params == "lora":
        weights = subject.save_adapter(out)
    elif main:
        subject.model.save_pretrained(out / "model")
        weights = "model"
    refitted = refit_schedule(subject, sampler, cache, refit_iterations, seed, out) if cache is not None else None
    if not main:
        return {}
    refit_figures = {}
    if refitted is not None:  # beside the adapter: `enable_cache(pipe, "OUT/lora")` finds it
        where = (out / weights).parent if params == "lora" else out / weights
        refitted.save(where / "schedule.json")
        refit_figures = {"schedule": (where / "schedule.json").relative_to(out).as_posix(),
                         "schedule_refit": refitted.info["refit"], "schedule_macs_ratio": refitted.macs_ratio,
                         "schedule_resampled_from": cache.info.get("resampled_from")}
    side_by_side_sheets({"base model": before, "fine-tuned": samples()}, out / "before_after.png")
    reward_curves({gradient: result.history}, out / "curve.png", title=f"{subject.name}, {reward}")
    heldout_curves(result.history["eval"], out / "heldout.png", title=f"{subject.name}, {reward}, held out")
    return {"model": subject.name, "reward_spec": reward, "rank": rank, "gradient_policy": policy.spec,
            "num_inference_steps": steps, "guidance_scale": sampler.guidance_scale, **result.history["settings"],
            "reward": result.history["reward"], "seconds_per_iteration": result.history["seconds"],
            "heldout": result.history["eval"], "accuracy_judge": subject.accuracy_judge,
            "weights": weights, "trainable_dtype": str(next(iter(result.trainable.values())).dtype),
            "peak_memory_mb": peak_memory_mb(subject.device), **refit_figures}


def refit_schedule(subject, sampler, schedule, iterations: int, seed: int, out: Path):
    """``schedule`` refit to the tuned model (:func:`~diffusion_shortcuts.prune.refit`, over the subject's
    conditions; every process of an ``accelerate launch`` takes part, data parallel)."""
    from ..prune import SearchError, refit

    distinct = subject.distinct_conditions()
    conditions = subject.encode(distinct) if distinct is not None else None
    try:
        return refit(sampler, schedule, conditions, iterations=iterations, seed=seed, batch_size=2,
                     reward_conditions=distinct, progress=distributed.is_main_process())
    except (SearchError, ValueError) as exc:
        raise UsageError(f"--schedule: the refit failed: {exc}; the fine-tuned weights are saved in {out}") from None
