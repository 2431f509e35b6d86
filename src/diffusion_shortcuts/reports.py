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

from . import gradients, rewards, zoo
from .images import grid, labelled, save_grid, side_by_side
from .metrics import Timer, accuracy

JUDGE = "digits-classifier-eval"
SDO_DEMO_MODEL = "digits-dit"


class UsageError(ValueError):
    """Bad input from the command line: reported as one line, exit status 2."""


# ---- parsing what the user typed ------------------------------------------------------------------------

def parse_labels(text: str, num_classes: int) -> list[int]:
    """'0-9', '3', '1,4,7' or '0-4,8' -> a list of labels, each checked against the model's classes."""
    labels: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                labels.extend(range(lo, hi + 1))
            else:
                labels.append(int(part))
    except ValueError:
        raise UsageError(f"--labels {text!r}: expected digits like 0-9, 3 or 1,4,7") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad or not labels:
        raise UsageError(f"--labels {text!r}: labels out of range {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                         f"the model takes 0-{num_classes - 1}")
    return labels


def cycled_labels(text: str, num_classes: int, n: int) -> torch.Tensor:
    """n labels cycling through the parsed ``--labels`` (so 0-9 with n=20 gives each digit twice)."""
    pool = parse_labels(text, num_classes)
    return torch.tensor([pool[i % len(pool)] for i in range(n)])


def load_generator(name: str) -> zoo.ZooModel:
    try:
        model = zoo.load(name)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--model: {exc}") from None
    if not isinstance(model, zoo.ZooModel):
        raise UsageError(f"--model {name}: a classifier, not a generator; generators: {', '.join(zoo.GENERATORS)}")
    return model


def parse_gradient(text: str):
    try:
        return gradients.resolve(text)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None


def parse_reward(text: str, model: zoo.ZooModel):
    try:
        return rewards.from_spec(text, rewards.SpecContext(model.sample_shape, model.conditional))
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None


def load_schedule(path: str, model: zoo.ZooModel, steps: int):
    """A schedule file (or ``zoo``: the model's shipped 0.8 schedule), checked against the model and a
    sampler with ``steps`` steps."""
    from .prune import CacheSchedule, ScheduleError, apply

    try:
        schedule = model.cache_schedule() if path == "zoo" else CacheSchedule.load(path)
        with apply(model.model, schedule, model.sampler(steps)):
            pass
    except (ScheduleError, ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--schedule: {exc}") from None
    return schedule


def judged_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of images the evaluation classifier (never a reward) assigns to ``labels``."""
    return accuracy(zoo.load(JUDGE), images, labels)


# ---- the verbs ------------------------------------------------------------------------------------------

def sample_report(out: Path, *, model: str, labels: str, n: int, seed: int, steps: int, guidance: float | None,
                  schedule: str | None = None, tag: str = "", progress: bool = True) -> dict:
    """Sample n images cycling through labels, judge them with the eval classifier, write a grid."""
    from .prune import apply

    generator = load_generator(model)
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    label_batch = cycled_labels(labels, generator.num_classes, n) if generator.conditional else None
    cache = load_schedule(schedule, generator, steps) if schedule else None
    with apply(generator.model, cache) if cache is not None else nullcontext(), Timer() as timer:
        images = generator.generate(label_batch, seed=seed, num_inference_steps=steps, guidance_scale=guidance,
                                    progress=progress, batch_size=min(n, 100))[:n]
    metrics = {"model": model, "n": n, "seed": seed, "num_inference_steps": steps,
               "guidance_scale": guidance if guidance is not None else generator.guidance_scale,
               "scheduler": type(generator.scheduler).__name__, "seconds": timer.seconds,
               "schedule": schedule, "macs_ratio": cache.macs_ratio if cache is not None else 1.0}
    nrow = None
    if label_batch is not None:
        if generator.num_classes == 10:
            metrics["accuracy"], metrics["accuracy_judge"] = judged_accuracy(images, label_batch), JUDGE
        images = images[torch.argsort(label_batch, stable=True)]  # one row per label
        nrow = -(-n // len(set(label_batch.tolist())))
    metrics["grid"] = save_grid(images, out / f"grid{tag}.png", nrow=nrow).name
    return metrics


def prune_report(out: Path, *, model: str, ratio: float, iterations: int, batch_size: int, lr: float, gradient: str,
                 steps: int, samples: int, seed: int, resume: bool) -> dict:
    """DiP-GO: search a cache schedule at ``ratio``, compare it with the full model, write everything."""
    from .plots import schedule_heatmap
    from .prune import SearchError, train_pruner
    from .zoo.judge import compare_with_full

    generator = load_generator(model)
    if not 0.0 < ratio < 1.0:
        raise UsageError(f"--ratio must be in (0, 1), got {ratio}")
    if iterations < 1 or samples < 1:
        raise UsageError("--iterations and --samples must be at least 1")
    policy = parse_gradient(gradient)
    sampler = generator.sampler(steps)
    conditions = generator.encode(torch.arange(generator.num_classes)).detach() if generator.conditional else None
    try:
        result = train_pruner(sampler, conditions, ratio, iterations=iterations, batch_size=batch_size, lr=lr,
                              gradient=policy, seed=seed, checkpoint_dir=out, resume=resume)
    except (SearchError, ValueError) as exc:
        raise UsageError(f"{exc} (checkpoint: {out / 'search_checkpoint.pt'})") from None
    schedule = result.schedule(ratio)
    schedule.save(out / "schedule.json")
    result.pruner.save_pretrained(out / "pruner")
    (out / "search.json").write_text(json.dumps(result.history) + "\n")
    schedule_heatmap(schedule, out / "heatmap.png", label=f"{model}, ratio {ratio}")
    metrics, full, pruned = compare_with_full(generator, schedule, n=samples, seed=seed + 1, sampler=sampler)
    show = slice(0, min(20, samples))
    side_by_side([labelled(grid(full[show], nrow=10), "full model"),
                  labelled(grid(pruned[show], nrow=10), f"schedule: {metrics['speedup']:.1f}x faster")]).save(
        out / "full_vs_pruned.png")
    history = result.history
    return {"model": model, "ratio": ratio, "schedule": "schedule.json", "pruner": "pruner", "heatmap": "heatmap.png",
            "picture": "full_vs_pruned.png", "search_seconds": sum(history["seconds"]),
            "search_iterations": len(history["loss"]), "search_settings": history["settings"],
            "within_tolerance": schedule.info["within_tolerance"], "search_ssim": history["ssim"],
            "search_macs_ratio": history["macs_ratio"], **metrics}


def optimize_report(out: Path, *, model: str, reward: str, gradient: str, iterations: int, n: int, lr: float,
                    steps: int, seed: int, noise_prior: str | None, labels: str, tag: str = "") -> dict:
    """Optimize the initial noise of n samples against a reward; write curve, before/after and latents."""
    from safetensors.torch import save_file

    from .optimize import OptimizationError, optimize_latents
    from .plots import reward_curves

    generator = load_generator(model)
    reward_fn, policy = parse_reward(reward, generator), parse_gradient(gradient)
    if iterations < 1 or n < 1:
        raise UsageError(f"--iterations and --n must be at least 1, got {iterations} and {n}")
    label_batch = (torch.full((n,), generator.null_label) if labels == "null"
                   else cycled_labels(labels, generator.num_classes, n))
    cond = generator.encode(label_batch).detach()
    # with the null label in both guidance branches, guidance changes nothing but doubles the cost
    sampler = generator.sampler(steps, guidance_scale=1.0 if labels == "null" else None)
    noise = generator.noise(n, torch.Generator().manual_seed(seed))
    before = sampler(noise, cond).clamp(0, 1)
    error = None
    try:
        result = optimize_latents(sampler, reward_fn, noise, cond, iterations=iterations, lr=lr, gradient=policy,
                                  noise_prior=noise_prior, seed=seed)
    except OptimizationError as exc:
        result, error = exc.result, str(exc)
    save_file({"latents": result.latents.contiguous(), "initial_noise": noise.contiguous()},
              str(out / f"latents{tag}.safetensors"))
    history = result.history
    metrics = {"model": model, "reward_spec": reward, "gradient": policy.spec, "n": n, "lr": lr,
               "num_inference_steps": steps, "seed": seed, "noise_prior": noise_prior, "labels": labels,
               "reward": history["reward"], "seconds_per_iteration": history["seconds"],
               "mean_seconds_per_iteration": sum(history["seconds"]) / max(1, len(history["seconds"])),
               "final_reward": history.get("final_reward"), "shell_drift": history.get("final_shell_drift"),
               "latents": f"latents{tag}.safetensors", "error": error}
    after = result.images.clamp(0, 1) if result.images is not None else before
    if reward.startswith("digit:"):
        target = torch.full((n,), int(reward.split(":")[1]))
        metrics.update(success_before=judged_accuracy(before, target), success_after=judged_accuracy(after, target),
                       success_judge=JUDGE)
    if history["reward"]:
        reward_curves({gradient: history}, out / f"curve{tag}.png", title=f"{model}, {reward}")
    side_by_side([labelled(grid(before, nrow=n), "before"), labelled(grid(after, nrow=n), "after")]).save(
        out / f"before_after{tag}.png")
    if error:
        raise UsageError(f"{error}; the last good latents are in {out / f'latents{tag}.safetensors'}")
    return metrics


def _heldout_set(generator: zoo.ZooModel, samples: int, every: int, seed: int):
    """Fixed noise per class (the held-out set) judged by the eval classifier, and the rows to picture."""
    from .optimize import HeldOut

    def judge(images, conditions):
        return {"accuracy": judged_accuracy(images, conditions)}

    if generator.conditional:
        labels = torch.arange(generator.num_classes)
        heldout = HeldOut.per_condition(labels, samples, generator.sample_shape, seed=10_000 + seed, every=every,
                                        judge=judge)
        return heldout, (heldout.noise[::samples], heldout.conditions[::samples])
    heldout = HeldOut(generator.noise(10 * samples, torch.Generator().manual_seed(10_000 + seed)), every=every)
    return heldout, (heldout.noise[:10], None)


def finetune_report(out: Path, *, model: str, reward: str, params: str, rank: int, gradient: str, iterations: int,
                    batch_size: int, lr: float, steps: int, guidance: float | None, seed: int, ema: float | None,
                    base_weight: float, warmup: int, eval_every: int, eval_samples: int, checkpoint_every: int,
                    resume: bool) -> dict:
    """Fine-tune a zoo generator's LoRA adapter (or all weights) against a reward; resumable; judged on a
    held-out set by the eval classifier, with the diversity of each class's samples."""
    from .optimize import FinetuneError, add_lora, finetune, save_lora
    from .plots import heldout_curves, reward_curves

    generator = load_generator(model)
    reward_fn, policy = parse_reward(reward, generator), parse_gradient(gradient)
    if min(iterations, batch_size, rank, eval_every, checkpoint_every) < 1 or eval_samples < 2:
        raise UsageError("--iterations, --batch-size, --rank, --eval-every and --checkpoint-every must be at least 1, "
                         "--eval-samples at least 2")
    sampler = generator.sampler(steps, guidance)
    encode = generator.encode if generator.conditional else None
    heldout, (show_noise, show_labels) = _heldout_set(generator, eval_samples, eval_every, seed)

    def samples():
        with torch.no_grad():
            return sampler(show_noise, encode(show_labels) if encode else None).clamp(0, 1)

    before = samples()
    if params == "lora":
        add_lora(generator.model, rank=rank, seed=seed)
    try:
        result = finetune(sampler, reward_fn, torch.arange(generator.num_classes) if generator.conditional else None,
                          noise_shape=generator.sample_shape, params=params, gradient=policy, iterations=iterations,
                          batch_size=batch_size, lr=lr, seed=seed, encode=encode, ema=ema, base_weight=base_weight,
                          warmup=warmup, heldout=heldout, checkpoint_dir=out, checkpoint_every=checkpoint_every,
                          resume=resume)
    except (FinetuneError, ValueError) as exc:
        raise UsageError(f"{exc} (checkpoint: {out / 'finetune_checkpoint.pt'})") from None
    if params == "lora":
        save_lora(generator.model, out / "adapter.safetensors")
    else:
        generator.model.save_pretrained(out / "model")
    side_by_side([labelled(grid(before, nrow=10), "base model"), labelled(grid(samples(), nrow=10), "fine-tuned")]
                 ).save(out / "before_after.png")
    reward_curves({gradient: result.history}, out / "curve.png", title=f"{model}, {reward}")
    heldout_curves(result.history["eval"], out / "heldout.png", title=f"{model}, {reward}, held out")
    return {"model": model, "reward_spec": reward, "rank": rank, "gradient_policy": policy.spec,
            "num_inference_steps": steps, "guidance_scale": sampler.guidance_scale, **result.history["settings"],
            "reward": result.history["reward"], "seconds_per_iteration": result.history["seconds"],
            "heldout": result.history["eval"], "accuracy_judge": JUDGE,
            "weights": "adapter.safetensors" if params == "lora" else "model"}


def demo_report(out: Path, *, n: int, seed: int, steps: int, digit: int, iterations: int) -> dict:
    """The embedded default: the zoo's generators sampled and judged, full and with the shipped DiP-GO
    schedules, and SDO steering unconditional samples to a digit; a short markdown report."""
    from PIL import Image

    report, panels, pruned_panels = {"models": {}}, [], []
    for name in ("digits-unet", "digits-dit"):
        m = sample_report(out, model=name, labels="0-9", n=n, seed=seed, steps=steps, guidance=None, tag=f"_{name}")
        p = sample_report(out, model=name, labels="0-9", n=n, seed=seed, steps=steps, guidance=None,
                          tag=f"_{name}_pruned", schedule="zoo")
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
    report["sdo"] = optimize_report(out, model=SDO_DEMO_MODEL, reward=f"digit:{digit}", gradient="shortcut",
                                    iterations=iterations, n=8, lr=0.05, steps=steps, seed=seed, noise_prior="sphere",
                                    labels="null", tag="_sdo")
    (out / "report.md").write_text(_demo_markdown(report, digit, iterations))
    return report


def _demo_markdown(report: dict, digit: int, iterations: int) -> str:
    lines = ["# diffusion-shortcuts demo", "", "![samples](demo.png)", "",
             f"| model | accuracy ({JUDGE}) | seconds | steps |", "|---|---|---|---|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | {m.get('accuracy', float('nan')):.3f} | {m['seconds']:.1f} | {m['num_inference_steps']} |")
    lines += ["", "## The compute shortcut: the shipped DiP-GO schedules (ratio 0.8)", "",
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
    return "\n".join(lines) + "\n"
