"""What each command-line verb does, as plain functions: sample, steer, prune and fine-tune a model, judge
the results with the evaluation classifier (never a reward), and write the pictures and figures.

Each ``*_report(out, **flags)`` takes its verb's flags as keyword arguments (the names ``cli.py`` parses)
and returns the figures that ``cli.main`` writes to ``out/metrics.json``. Bad input is a
:class:`UsageError`: one line for the user, exit status 2.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch

from . import conditions as C
from . import distributed, gradients, rewards, zoo
from .images import grid, labelled, save_grid, side_by_side
from .metrics import FID_MIN_SAMPLES, Timer, accuracy, peak_memory_mb
from .subjects import JUDGE
from .usage import UsageError

DEFAULT_TRAINING_SET = 16  # prune's fixed training set: what benchmarks/search_cost.py measured best with

SDO_DEMO_MODEL = "digits-dit"


# ---- parsing what the user typed ------------------------------------------------------------------------

def subject_from(flags: dict):
    """Pop the model flags (--model, --labels, --prompt, ...) off ``flags`` and load what they name."""
    from .subjects import load_subject

    names = ("labels", "prompt", "prompts", "negative_prompt", "true_cfg_scale", "scheduler", "height", "width",
             "device", "dtype", "vae_checkpointing", "lora")
    options = {k: flags.pop(k) for k in names if k in flags}
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return load_subject(flags.pop("model"), **options)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_gradient(text: str):
    try:
        return gradients.resolve(text)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None


def parse_reward(text: str, subject):
    try:
        return rewards.from_spec(text, subject.reward_context())
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None


def parse_search_objective(text: str, subject):
    """``--objective``: ``ssim``, ``latent``, ``reward:SPEC`` or ``ssim+reward:SPEC:W``, its reward loaded for
    ``subject``."""
    from .prune import Objective, parse_objective

    try:
        kind, spec, weight = parse_objective(text)
        reward = rewards.from_spec(spec, subject.reward_context()) if spec is not None else None
    except ValueError as exc:
        raise UsageError(f"--objective {text}: {exc}") from None
    return Objective(kind, reward, weight)


def mean_reward(reward, images: torch.Tensor, conditions, device, batch_size: int = 100) -> float:
    """The mean of ``reward`` over ``images`` (``conditions`` as the reward sees them), ``batch_size`` at a time."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            rows = torch.arange(i, min(i + batch_size, len(images)))
            total += float(reward(images[rows].to(device), C.take(conditions, rows)).sum())
    return total / len(images)


def load_schedule(path: str, subject, sampler, strict: bool = False, flag: str = "--schedule"):
    """A schedule file (or ``zoo`` / ``zoo:RATIO``: a zoo model's shipped schedule for 0.8 / that ratio), checked
    against the model and fitted to the sampler's timesteps (resampled to another step count unless ``strict``); an
    error names ``flag``, the option that gave the path."""
    from .prune import CacheSchedule, ScheduleError, apply

    try:
        shipped = path == "zoo" or path.startswith("zoo:")
        if shipped:
            ratio = path.partition(":")[2] or "0.8"
            try:
                value = float(ratio)
            except ValueError:
                raise ValueError(f"zoo:RATIO takes a number, got {ratio!r}") from None
            schedule = subject.shipped_schedule(value)
        else:
            schedule = CacheSchedule.load(path)
        with apply(subject.model, schedule, sampler, strict=strict):  # the model first, then the timesteps
            pass
        schedule = schedule.fitted(sampler.timesteps, strict=strict)
    except (ScheduleError, ValueError, FileNotFoundError) as exc:
        raise UsageError(f"{flag}: {exc}") from None
    return schedule


def my_share(subject, noise: torch.Tensor, flag: str) -> tuple[list[int], object, torch.Tensor]:
    """This process's samples of ``len(noise)`` (all of them in one process): their indices, conditions and noise.
    Every sample's noise and condition follow its index, so its result does not depend on the process count."""
    n = len(noise)
    try:
        distributed.check_shardable(n, f"{flag} {n} samples")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    mine = distributed.shard(n)
    rows = torch.tensor(mine)
    return mine, C.take(subject.conditions(n), rows), noise[rows.to(noise.device)]


def shards_of(parts: list[dict]) -> dict:
    """What ``metrics.json`` says of the processes: how many ran, and which samples each took (``[first, end)``)."""
    return {"num_processes": len(parts), "shards": [[p["indices"][0], p["indices"][-1] + 1] for p in parts]}


def check_resume(resume: bool, out: Path, checkpoint: str) -> None:
    """``--resume`` with nothing to resume is an error: starting afresh is done by leaving it out."""
    if resume and not (out / checkpoint).exists():
        raise UsageError(f"--resume: no checkpoint {out / checkpoint} to resume; leave --resume out to start afresh")


def check_finite(images: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(images).all():
        raise UsageError(f"{what}: the model produced non-finite values (NaN or inf); check --guidance and the "
                         "model's weights")
    return images


def judged_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of images the evaluation classifier (never a reward) assigns to ``labels``."""
    return accuracy(zoo.load(JUDGE), images, labels)


def captioned_grid(images: torch.Tensor, captions: list[str] | None, path: Path) -> str:
    """A grid with one row per distinct caption (a label or a prompt), the caption above each row."""
    from PIL import Image

    images = images.float().cpu()
    if not captions:
        return save_grid(images, path).name
    rows = []
    for caption in dict.fromkeys(captions):
        index = [i for i, c in enumerate(captions) if c == caption]
        rows.append(labelled(grid(images[index], nrow=len(index)), caption[:60]))
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    top = 0
    for row in rows:
        canvas.paste(row, (0, top))
        top += row.height
    canvas.save(path)
    return path.name


# ---- the verbs ------------------------------------------------------------------------------------------

def sample_report(out: Path, subject, *, n: int, seed: int, steps: int, guidance: float | None,
                  schedule: str | None = None, strict_schedule: bool = False, tag: str = "",
                  progress: bool = True, compile: bool = False) -> dict:
    """Sample n images cycling through the conditions, judge them, write a captioned grid; with a schedule,
    what it computed and reused; with ``compile``, the gated blocks compiled (the first batch pays for it). Under
    ``accelerate launch`` the samples are sharded (every sample's noise indexed from the seed) and the main process
    gathers, judges and writes."""
    from .prune import apply, summary
    from .prune.compare import generate, sampling_table

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    mine, conditions, noise = my_share(subject, subject.noise(n, torch.Generator().manual_seed(seed)), "--n")
    sampler = subject.sampler(steps, guidance)
    cache = load_schedule(schedule, subject, sampler, strict_schedule) if schedule else None
    table = sampling_table(sampler, cache, compile, subject.encode, conditions, noise)
    with Timer() as timer, apply(subject.model, table, sampler, compile=compile) if table else nullcontext() as net:
        images = generate(sampler, subject.encode, conditions, noise, batch_size=min(len(mine), 100),
                          progress=progress and distributed.is_main_process(), desc=f"sampling {subject.name}")
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
    judged = subject.judge(images, conditions)
    if judged:
        metrics.update(judged, accuracy_judge=subject.accuracy_judge)
    if conditions is not None and not subject.text:  # one row per label
        order = torch.argsort(conditions, stable=True)
        images, conditions = images[order], conditions[order]
    metrics["grid"] = captioned_grid(images, subject.captions(conditions), out / f"grid{tag}.png")
    return metrics


def summed(parts: list[dict]) -> dict:
    """Dicts of counts (one cache summary per process) added up, key by key, nested dicts too."""
    return {key: summed([p[key] for p in parts]) if isinstance(value, dict) else sum(p[key] for p in parts)
            for key, value in parts[0].items()}


def prune_report(out: Path, subject, *, ratio: float, iterations: int, batch_size: int, lr: float, gradient: str,
                 steps: int, samples: int, seed: int, resume: bool, checkpoint_every: int = 25,
                 guidance: float | None = None, reuse_mode: str = "copy", start_every: int | str | None = None,
                 start_from: str | None = None, objective: str = "ssim", validation: int = 8,
                 compile: bool = False, calibrate_only: bool = False, calibration_batch: int | None = None,
                 calibration_generations: int = 1, training_set: int | None = 0, granularity: str = "block",
                 search_steps: int = 0) -> dict:
    """DiP-GO: search a cache schedule at ``ratio`` over the conditions, compare it with the full model; with
    ``start_every`` N the search starts from the rule table that computes every block every N-th step (``"auto"``:
    the N whose table prunes nearest ``ratio``); ``compile``: the comparison (quality and speed) through compiled
    blocks on both sides. ``start_from``: where the search starts (``"calibrated"``, the ``prune`` command's
    default; None or ``"full"``: the full model; or a schedule, e.g. for a refit); ``objective``: what the gates keep
    (``ssim``, ``reward:SPEC``, ``ssim+reward:SPEC:W``; with a reward the comparison reports it for both sides);
    ``validation``: the fresh samples on which the searched table is compared with the start. ``calibrate_only``:
    no search, the table calibrated on ``calibration_generations`` full generations of ``calibration_batch``
    samples (:func:`~diffusion_shortcuts.prune.calibrate`).
    Under ``accelerate launch`` the search is data parallel (``--batch-size`` per process) and the main process
    alone writes and makes the comparison."""
    from .prune.compiling import compile_options

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
        searched = searched_schedule(out, subject, sampler, conditions, distinct, ratio=ratio, iterations=iterations,
                                     batch_size=batch_size, lr=lr, gradient=gradient, seed=seed, resume=resume,
                                     checkpoint_every=checkpoint_every, reuse_mode=reuse_mode, start_every=start_every,
                                     start_from=start_from, goal=goal, validation=validation,
                                     training_set=training_set, granularity=granularity, search_steps=search_steps)
        if searched is None:  # under `accelerate launch` every process holds the same gates: the main one writes
            return {}
        schedule, figures = searched
    return compared(out, subject, sampler, schedule, ratio, samples, seed, compile, goal, figures)


def calibrated_schedule(sampler, conditions, ratio: float, mode: str, batch: int | None, generations: int,
                        seed: int):
    """``prune --calibrate-only``: the table calibrated at ``1 - ratio`` of the MACs, and its figures."""
    from .prune import CalibrationError, calibrate

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
    from .prune import CacheSchedule, SearchError, profile, train_pruner

    policy = parse_gradient(gradient)
    check_resume(resume, out, "search_checkpoint.pt")
    if training_set is None:  # prune's default: 16 samples, at least one iteration's global batch
        training_set = max(DEFAULT_TRAINING_SET, batch_size * distributed.num_processes())
    start = None  # --start-from full (or none given through the library): DiP-GO's start, the full model
    if start_every is None and start_from == "calibrated":
        start, _ = calibrated_schedule(sampler, conditions, ratio, reuse_mode, None, 1, seed)
    elif start_every is None and start_from not in (None, "full"):
        start = load_schedule(start_from, subject, sampler, True, "--start-from")
    if start_every is not None:
        example = torch.zeros(1, *sampler.sample_shape, device=subject.device)
        prof = profile(sampler.model, example, C.first(conditions))
        start = (CacheSchedule.every_for_ratio(sampler.timesteps, prof, ratio) if start_every == "auto" else
                 CacheSchedule.every(sampler.timesteps, prof, start_every))
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
    schedule = result.schedule(ratio)
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
    from .plots import schedule_heatmap
    from .prune.compare import compare_schedule

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
    show = slice(0, min(20, samples))
    side_by_side([labelled(grid(full[show], nrow=10), "full model"),
                  labelled(grid(pruned[show], nrow=10), f"schedule: {metrics['speedup']:.1f}x faster")]).save(
        out / "full_vs_pruned.png")
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


def optimize_report(out: Path, subject, *, reward: str, gradient: str, iterations: int, n: int, lr: float,
                    steps: int, seed: int, noise_prior: str | None, guidance: float | None = None,
                    schedule: str | None = None, strict_schedule: bool = False, tag: str = "",
                    compile: bool = False) -> dict:
    """Optimize the initial noise of n samples against a reward; write curve, before/after and latents. With a
    cache schedule, every rollout (the graph step's call included) runs pruned: both shortcuts at once; with
    ``compile``, through compiled blocks. Under ``accelerate launch`` the samples are sharded (each process
    optimizes its own, every sample's noise indexed from the seed) and the main process gathers and writes."""
    from safetensors.torch import save_file

    from .optimize import OptimizationError, optimize_latents
    from .optimize.latents import merged_history
    from .plots import reward_curves
    from .prune import apply
    from .prune.compare import sampling_table
    from .rewards import given_conditions

    reward_fn, policy = parse_reward(reward, subject), parse_gradient(gradient)
    if iterations < 1 or n < 1:
        raise UsageError(f"--iterations and --n must be at least 1, got {iterations} and {n}")
    every_noise = subject.noise(n, torch.Generator().manual_seed(seed))
    mine, conditions, noise = my_share(subject, every_noise, "--n")
    cond = subject.encode(conditions)
    sampler = subject.sampler(steps, guidance)
    cache = load_schedule(schedule, subject, sampler, strict_schedule) if schedule else None
    error = None
    table = sampling_table(sampler, cache, compile, subject.encode, conditions, noise)
    with apply(subject.model, table, sampler, compile=compile) if table else nullcontext():
        with torch.no_grad():
            before = sampler(noise, cond).clamp(0, 1)
        try:  # the reward sees the labels or prompts, the sampler their encoding
            result = optimize_latents(sampler, given_conditions(reward_fn, conditions), noise, cond,
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
    if reward.startswith("digit:"):
        target = torch.full((n,), int(reward.split(":")[1]))
        metrics.update(success_before=judged_accuracy(before, target), success_after=judged_accuracy(after, target),
                       success_judge=JUDGE)
    if history["reward"]:
        reward_curves({gradient: history}, out / f"curve{tag}.png", title=f"{subject.name}, {reward}")
    side_by_side([labelled(grid(before, nrow=n), "before"),
                  labelled(grid(after, nrow=n), "after")]).save(out / f"before_after{tag}.png")
    if error:
        raise UsageError(f"{error}; the last good latents are in {out / f'latents{tag}.safetensors'}")
    return metrics


def _heldout_set(subject, samples: int, every: int, seed: int):
    """Fixed noise per condition (the held-out set), judged by the subject's judge, and the rows to picture."""
    from .optimize import HeldOut

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
                    resume: bool, schedule: str | None = None, refit_iterations: int = 50) -> dict:
    """Fine-tune a LoRA adapter (or all weights) against a reward; resumable; judged on a held-out set (the
    zoo's by the eval classifier), with the diversity of each condition's samples. With ``schedule`` (checked against
    the model before training, and resampled to ``steps`` where it was made for another step count, as ``sample`` and
    ``optimize`` resample it), the schedule is refit to the tuned model afterwards and written
    beside the adapter, with what it and the refit keep of the tuned model in the metrics."""
    from .optimize import FinetuneError, add_lora, finetune
    from .plots import heldout_curves, reward_curves

    reward_fn, policy = parse_reward(reward, subject), parse_gradient(gradient)
    if min(iterations, batch_size, rank, eval_every, checkpoint_every) < 1 or eval_samples < 2:
        raise UsageError("--iterations, --batch-size, --rank, --eval-every and --checkpoint-every must be at least 1, "
                         "--eval-samples at least 2")
    check_resume(resume, out, "finetune_checkpoint.pt")
    sampler = subject.sampler(steps, guidance)
    cache = load_schedule(schedule, subject, sampler) if schedule is not None else None  # resampled to --steps
    heldout, (show_noise, show_conditions) = _heldout_set(subject, eval_samples, eval_every, seed)
    encode = subject.encode if subject.conditional else None

    def samples():
        with torch.no_grad():
            return sampler(show_noise, encode(show_conditions) if encode else None).clamp(0, 1).float().cpu()

    before = samples()
    if params == "lora":
        add_lora(subject.model, rank=rank, seed=seed)
    try:
        result = finetune(sampler, reward_fn, subject.distinct_conditions(), noise_shape=subject.sample_shape,
                          params=params, gradient=policy, iterations=iterations, batch_size=batch_size, lr=lr,
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
    side_by_side([labelled(grid(before, nrow=10), "base model"), labelled(grid(samples(), nrow=10), "fine-tuned")]
                 ).save(out / "before_after.png")
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
    from .prune import SearchError, refit

    distinct = subject.distinct_conditions()
    conditions = subject.encode(distinct) if distinct is not None else None
    try:
        return refit(sampler, schedule, conditions, iterations=iterations, seed=seed, batch_size=2,
                     reward_conditions=distinct, progress=distributed.is_main_process())
    except (SearchError, ValueError) as exc:
        raise UsageError(f"--schedule: the refit failed: {exc}; the fine-tuned weights are saved in {out}") from None


def demo_report(out: Path, *, n: int, seed: int, steps: int, digit: int, iterations: int) -> dict:
    """The embedded default: the zoo's generators sampled and judged, full and with the shipped DiP-GO
    schedules, and SDO steering unconditional samples to a digit; a short markdown report."""
    from PIL import Image

    from .subjects import load_subject

    if steps != 50:  # checked before any file is written
        raise UsageError(f"--steps {steps}: the demo compares with the zoo's shipped schedules, made for 50 steps")
    report, panels, pruned_panels = {"models": {}}, [], []
    for name in ("digits-unet", "digits-dit"):
        subject = load_subject(name, labels="0-9")
        m = sample_report(out, subject, n=n, seed=seed, steps=steps, guidance=None, tag=f"_{name}")
        p = sample_report(out, subject, n=n, seed=seed, steps=steps, guidance=None, tag=f"_{name}_pruned",
                          schedule="zoo")
        p["speedup"] = m["seconds"] / p["seconds"]
        report["models"][name], report["models"][f"{name} (schedule 0.8)"] = m, p
        panels.append(labelled(Image.open(out / m["grid"]), f"{name}: accuracy {m.get('accuracy', 0):.0%}, "
                                                            f"{m['seconds']:.1f}s"))
        pruned_panels.append(side_by_side([
            labelled(Image.open(out / m["grid"]), f"{name}, full: {m['seconds']:.1f}s"),
            labelled(Image.open(out / p["grid"]), f"schedule 0.8: {p['seconds']:.1f}s ({p['speedup']:.1f}x), "
                                                  f"accuracy {p.get('accuracy', 0):.0%}")]))
    side_by_side(panels).save(out / "demo.png")
    side_by_side(pruned_panels).save(out / "demo_pruned.png")
    report.update(picture="demo.png", picture_pruned="demo_pruned.png")
    # The DiT's unconditional samples are the cleaner start; the sphere prior keeps the noise on the
    # Gaussian shell, without which the steered samples drift into adversarial noise for the reward classifier.
    steering = dict(reward=f"digit:{digit}", iterations=iterations, n=8, lr=0.05, steps=steps, seed=seed,
                    noise_prior="sphere")
    subject = load_subject(SDO_DEMO_MODEL, labels="null")
    report["sdo"] = optimize_report(out, subject, gradient="shortcut", tag="_sdo", **steering)
    # both shortcuts: the same steering with the shipped schedule on every rollout, timed against full
    # backpropagation (a few iterations of it are enough for its time per iteration)
    report["sdo_pruned"] = optimize_report(out, subject, gradient="shortcut", schedule="zoo", tag="_sdo_pruned",
                                           **steering)
    report["full_backprop_seconds_per_iteration"] = _seconds_per_iteration(subject, f"digit:{digit}", steps, seed)
    (out / "report.md").write_text(_demo_markdown(report, digit, iterations))
    return report


def _seconds_per_iteration(subject, reward: str, steps: int, seed: int, gradient: str = "full",
                           iterations: int = 3) -> float:
    """Median seconds of a latent-optimization iteration under ``gradient`` (the demo's yardstick)."""
    from .optimize import optimize_latents
    from .rewards import given_conditions

    conditions = subject.conditions(8)
    result = optimize_latents(subject.sampler(steps, None), given_conditions(parse_reward(reward, subject), conditions),
                              subject.noise(8, torch.Generator().manual_seed(seed)), subject.encode(conditions),
                              iterations=iterations, lr=0.05, gradient=parse_gradient(gradient), seed=seed,
                              progress=False)
    return float(torch.tensor(result.history["seconds"]).median())


def _demo_markdown(report: dict, digit: int, iterations: int) -> str:
    lines = ["# diffusion-shortcuts demo", "", "![samples](demo.png)", "",
             f"| model | accuracy ({JUDGE}) | seconds | steps |", "|---|---|---|---|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | {m.get('accuracy', float('nan')):.3f} | {m['seconds']:.1f} | "
                     f"{m['num_inference_steps']} |")
    lines += ["", "## The compute shortcut: the zoo's cache schedules at ratio 0.8 (searched from a rule, "
              "forecasting)", "",
              "![full and pruned](demo_pruned.png)", "",
              "| model | MACs of full | speedup (same seeds, this run) | accuracy full | accuracy pruned |",
              "|---|---|---|---|---|"]
    for name in ("digits-unet", "digits-dit"):
        full, pruned = report["models"][name], report["models"][f"{name} (schedule 0.8)"]
        lines.append(f"| {name} | {pruned['macs_ratio']:.3f} | {pruned['speedup']:.2f}x | "
                     f"{full.get('accuracy', float('nan')):.3f} | {pruned.get('accuracy', float('nan')):.3f} |")
    sdo = report["sdo"]
    lines += ["", f"## The gradient shortcut: steering unconditional samples to a {digit}", "",
              "![before and after](before_after_sdo.png)", "", "![reward curve](curve_sdo.png)", "",
              f"{SDO_DEMO_MODEL}, null label, {iterations} iterations of SDO (`Shortcut()`: one network "
              "graph per iteration, sphere noise prior), "
              f"{sdo['mean_seconds_per_iteration']:.2f} s per iteration; judged by {JUDGE} "
              f"(never the reward): {sdo['success_before']:.0%} were a {digit} before, "
              f"{sdo['success_after']:.0%} after."]
    both, full = report["sdo_pruned"], report["full_backprop_seconds_per_iteration"]
    lines += ["", "## Both shortcuts: the same steering on the pruned model", "",
              "![before and after, pruned](before_after_sdo_pruned.png)", "",
              "| gradient | rollout | s / iteration | vs full backpropagation | judged a " + f"{digit} after |",
              "|---|---|---|---|---|",
              f"| full backpropagation | full | {full:.2f} | 1.00x | - |",
              f"| SDO | full | {sdo['mean_seconds_per_iteration']:.2f} | "
              f"{sdo['mean_seconds_per_iteration'] / full:.2f}x | {sdo['success_after']:.0%} |",
              f"| SDO | schedule 0.8 (MACs {both['macs_ratio']:.3f}) | {both['mean_seconds_per_iteration']:.2f} | "
              f"{both['mean_seconds_per_iteration'] / full:.2f}x | {both['success_after']:.0%} |", "",
              "Full backpropagation's time per iteration is the median of a few iterations of it, measured in this "
              "run."]
    return "\n".join(lines) + "\n"
