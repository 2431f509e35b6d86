"""The ``diffusion-shortcuts`` command: one command, verbs.

    diffusion-shortcuts demo     [--out DIR]
    diffusion-shortcuts sample   --model digits-unet --labels 0-9 --n 100 [--seed 0] [--steps 50] --out DIR
    diffusion-shortcuts optimize --model digits-unet --reward digit:3 --gradient shortcut --iterations 100 --out DIR
    diffusion-shortcuts prune    --model digits-unet --ratio 0.8 --out DIR
    diffusion-shortcuts finetune --model digits-unet --reward digit:3 --params lora --rank 4 --out DIR
    diffusion-shortcuts sample   --model digits-unet --schedule DIR/schedule.json --out DIR2

Every verb writes ``DIR/metrics.json`` and PNGs, shows a progress bar on long work, and on bad input
exits with status 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

METRICS_VERSION = 1
SDO_DEMO_MODEL = "digits-dit"


class UsageError(ValueError):
    """Bad input from the command line: reported as one line, exit status 2."""


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
        raise UsageError(f"--labels {text!r}: labels out of range {bad}; the model takes 0-{num_classes - 1}")
    return labels


def cycled_labels(text: str, num_classes: int, n: int):
    """n labels cycling through the parsed ``--labels`` (so 0-9 with n=20 gives each digit twice)."""
    import torch

    pool = parse_labels(text, num_classes)
    return torch.tensor([pool[i % len(pool)] for i in range(n)])


def prepare_out(path: str | Path) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out}: output folder is not writable ({exc.strerror or exc})") from None
    return out


def write_metrics(out: Path, metrics: dict) -> Path:
    payload = {"format_version": METRICS_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "command": " ".join(["diffusion-shortcuts", *sys.argv[1:]]),
               "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()}, **metrics}
    from .checkpoints import write_json

    return write_json(out / "metrics.json", payload)


def _load_generator(name: str):
    from . import zoo

    try:
        model = zoo.load(name)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--model: {exc}") from None
    if not isinstance(model, zoo.ZooModel):
        raise UsageError(f"--model {name}: a classifier, not a generator; generators: {', '.join(zoo.GENERATORS)}")
    return model


def load_schedule(path: str, model, steps: int):
    """A schedule file (or ``zoo``: the model's shipped 0.8 schedule), checked against the model and a
    sampler with ``steps`` steps (UsageError if it does not fit)."""
    from .prune import CacheSchedule, ScheduleError, apply

    try:
        schedule = model.cache_schedule() if path == "zoo" else CacheSchedule.load(path)
        with apply(model.model, schedule, model.sampler(steps)):
            pass
    except (ScheduleError, ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--schedule: {exc}") from None
    return schedule


def sample_report(model_name: str, labels_text: str, n: int, seed: int, steps: int, guidance: float | None,
                  out: Path, progress: bool = True, tag: str = "", schedule_path: str | None = None) -> dict:
    """Sample n images cycling through labels, judge them with the eval classifier, write a grid."""
    from contextlib import nullcontext

    import torch

    from .prune import apply

    from . import zoo
    from .images import save_grid
    from .metrics import Timer, accuracy

    model = _load_generator(model_name)
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    labels = None
    if model.conditional:
        labels = cycled_labels(labels_text, model.num_classes, n)
    schedule = load_schedule(schedule_path, model, steps) if schedule_path else None
    with apply(model.model, schedule) if schedule is not None else nullcontext(), Timer() as timer:
        images = model.generate(labels, seed=seed, num_inference_steps=steps,
                                guidance_scale=guidance, progress=progress,
                                batch_size=min(n, 100))[:n]
    metrics = {"model": model_name, "n": n, "seed": seed, "num_inference_steps": steps,
               "guidance_scale": guidance if guidance is not None else model.guidance_scale,
               "scheduler": type(model.scheduler).__name__, "seconds": timer.seconds,
               "schedule": schedule_path, "macs_ratio": schedule.macs_ratio if schedule is not None else 1.0}
    if labels is not None and model.num_classes == 10:
        judge = zoo.load("digits-classifier-eval")
        metrics["accuracy"] = accuracy(judge, images, labels)
        metrics["accuracy_judge"] = "digits-classifier-eval"
    if labels is not None:  # one row per label
        images = images[torch.argsort(labels, stable=True)]
        nrow = -(-n // len(set(labels.tolist())))
    else:
        nrow = None
    grid_path = save_grid(images, out / f"grid{tag}.png", nrow=nrow)
    metrics["grid"] = grid_path.name
    return metrics


def cmd_sample(args) -> dict:
    out = prepare_out(args.out)
    metrics = sample_report(args.model, args.labels, args.n, args.seed, args.steps, args.guidance, out,
                            schedule_path=args.schedule)
    write_metrics(out, metrics)
    return metrics


def cmd_prune(args) -> dict:
    """DiP-GO: search a cache schedule at --ratio, compare it with the full model, write everything."""
    import torch

    from .images import grid, labelled, side_by_side
    from .plots import schedule_heatmap
    from .prune import SearchError, train_pruner
    from .zoo.judge import compare_with_full

    out = prepare_out(args.out)
    model = _load_generator(args.model)
    if not 0.0 < args.ratio < 1.0:
        raise UsageError(f"--ratio must be in (0, 1), got {args.ratio}")
    if args.iterations < 1 or args.samples < 1:
        raise UsageError("--iterations and --samples must be at least 1")
    policy = parse_gradient(args.gradient)
    sampler = model.sampler(args.steps)
    conditions = model.encode(torch.arange(model.num_classes)).detach() if model.conditional else None
    try:
        result = train_pruner(sampler, conditions, args.ratio, iterations=args.iterations, batch_size=args.batch_size,
                              lr=args.lr, gradient=policy, seed=args.seed, checkpoint_dir=out, resume=args.resume)
    except (SearchError, ValueError) as exc:
        raise UsageError(f"{exc} (checkpoint: {out / 'search_checkpoint.pt'})") from None
    schedule = result.schedule(args.ratio)
    schedule.save(out / "schedule.json")
    result.pruner.save_pretrained(out / "pruner")
    (out / "search.json").write_text(json.dumps(result.history) + "\n")
    schedule_heatmap(schedule, out / "heatmap.png", label=f"{args.model}, ratio {args.ratio}")
    metrics, full, pruned = compare_with_full(model, schedule, n=args.samples, seed=args.seed + 1, sampler=sampler)
    show = slice(0, min(20, args.samples))
    side_by_side([labelled(grid(full[show], nrow=10), "full model"),
                  labelled(grid(pruned[show], nrow=10), f"schedule: {metrics['speedup']:.1f}x faster")]).save(
        out / "full_vs_pruned.png")
    history = result.history
    metrics = {"model": args.model, "ratio": args.ratio, "schedule": "schedule.json", "pruner": "pruner",
            "heatmap": "heatmap.png", "picture": "full_vs_pruned.png",
            "search_seconds": sum(history["seconds"]), "search_iterations": len(history["loss"]),
            "search_settings": history["settings"], "within_tolerance": schedule.info["within_tolerance"],
            "search_ssim": history["ssim"], "search_macs_ratio": history["macs_ratio"], **metrics}
    write_metrics(out, metrics)
    return metrics


def parse_reward(text: str, model):
    """'label' -> DigitClass(None) (each sample's own class); 'digit:3' -> DigitClass(3);
    'reference:IMG[:MASK]' -> Reference(image, mask) (PNG files)."""
    from . import rewards

    kind, _, rest = text.partition(":")
    if kind == "label":
        if not model.conditional:
            raise UsageError(f"--reward label: {text!r} needs a class-conditional model")
        return rewards.DigitClass(None)
    if kind == "digit":
        try:
            digit = int(rest)
        except ValueError:
            raise UsageError(f"--reward {text!r}: expected digit:N with N in 0-9") from None
        if not 0 <= digit <= 9:
            raise UsageError(f"--reward {text!r}: digit must be 0-9")
        return rewards.DigitClass(digit)
    if kind == "reference":
        parts = rest.split(":")
        if not parts[0] or len(parts) > 2:
            raise UsageError(f"--reward {text!r}: expected reference:IMAGE.png[:MASK.png]")
        image = read_image(parts[0], model.sample_shape)
        mask = read_image(parts[1], model.sample_shape)[:, :1].gt(0.5).float() if len(parts) == 2 else None
        try:
            return rewards.Reference(image, mask)
        except ValueError as exc:
            raise UsageError(f"--reward: {exc}") from None
    raise UsageError(f"--reward {text!r}: unknown reward; known: label, digit:N, reference:IMAGE[:MASK]")


def read_image(path: str, shape: tuple[int, int, int]):
    """A PNG/JPEG file as a (1, C, H, W) tensor in [0, 1], resized to the model's sample size."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img = img.convert("L" if shape[0] == 1 else "RGB").resize((shape[2], shape[1]), Image.BOX)
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"cannot read image {path}: {exc}") from None
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return (arr[None, None] if arr.ndim == 2 else arr.permute(2, 0, 1)[None]).contiguous()


def run_optimize(model_name: str, reward_text: str, gradient: str, iterations: int, n: int, lr: float, steps: int,
                 seed: int, noise_prior: str | None, labels_text: str, out: Path, tag: str = "") -> dict:
    """Optimize the initial noise of n samples against a reward; write curve, before/after and latents."""
    import torch
    from safetensors.torch import save_file

    from . import zoo
    from .images import grid, labelled, side_by_side
    from .metrics import accuracy
    from .optimize import OptimizationError, optimize_latents
    from .plots import reward_curves

    model = _load_generator(model_name)
    reward = parse_reward(reward_text, model)
    policy = parse_gradient(gradient)
    if iterations < 1 or n < 1:
        raise UsageError(f"--iterations and --n must be at least 1, got {iterations} and {n}")
    if labels_text == "null":
        labels = torch.full((n,), model.null_label)
    else:
        labels = cycled_labels(labels_text, model.num_classes, n)
    cond = model.encode(labels).detach()
    # with the null label in both guidance branches, guidance changes nothing but doubles the cost
    sampler = model.sampler(steps, guidance_scale=1.0 if labels_text == "null" else None)
    noise = model.noise(n, torch.Generator().manual_seed(seed))
    before = sampler(noise, cond).clamp(0, 1)
    error = None
    try:
        result = optimize_latents(sampler, reward, noise, cond, iterations=iterations, lr=lr, gradient=policy,
                                  noise_prior=noise_prior, seed=seed)
    except OptimizationError as exc:
        result, error = exc.result, str(exc)
    save_file({"latents": result.latents.contiguous(), "initial_noise": noise.contiguous()},
              str(out / f"latents{tag}.safetensors"))
    history = result.history
    metrics = {"model": model_name, "reward_spec": reward_text, "gradient": repr(policy), "n": n, "lr": lr,
               "num_inference_steps": steps, "seed": seed, "noise_prior": noise_prior, "labels": labels_text,
               "reward": history["reward"], "seconds_per_iteration": history["seconds"],
               "mean_seconds_per_iteration": sum(history["seconds"]) / max(1, len(history["seconds"])),
               "final_reward": history.get("final_reward"), "shell_drift": history.get("final_shell_drift"),
               "latents": f"latents{tag}.safetensors", "error": error}
    after = result.images.clamp(0, 1) if result.images is not None else before
    if reward_text.startswith("digit:"):
        judge = zoo.load("digits-classifier-eval")
        target = torch.full((n,), int(reward_text.split(":")[1]))
        metrics["success_before"] = accuracy(judge, before, target)
        metrics["success_after"] = accuracy(judge, after, target)
        metrics["success_judge"] = "digits-classifier-eval"
    if history["reward"]:
        reward_curves({gradient: history}, out / f"curve{tag}.png", title=f"{model_name}, {reward_text}")
    side_by_side([labelled(grid(before, nrow=n), "before"), labelled(grid(after, nrow=n), "after")]).save(
        out / f"before_after{tag}.png")
    if error:
        raise UsageError(f"{error}; the last good latents are in {out / f'latents{tag}.safetensors'}")
    return metrics


def cmd_optimize(args) -> dict:
    out = prepare_out(args.out)
    metrics = run_optimize(args.model, args.reward, args.gradient, args.iterations, args.n, args.lr, args.steps,
                           args.seed, args.noise_prior, args.labels, out)
    write_metrics(out, metrics)
    return metrics


def parse_gradient(text: str):
    """A policy name, or ``sdo`` (= ``Shortcut(step="random")``), ``truncated:K``, ``random_truncated:K``."""
    from . import gradients

    name, _, arg = text.partition(":")
    try:
        if name == "sdo":
            return gradients.Shortcut(step="random")
        if name in ("truncated", "random_truncated") and arg:
            return (gradients.Truncated if name == "truncated" else gradients.RandomTruncated)(int(arg))
        return gradients.resolve(text)
    except ValueError as exc:
        raise UsageError(f"--gradient: {exc}") from None


def cmd_finetune(args) -> dict:
    """Fine-tune a zoo generator's LoRA adapter (or all weights) against a reward; resumable; judged on a
    held-out set by digits-classifier-eval (never a reward), with the diversity of each class's samples."""
    import torch

    from .images import grid, labelled, side_by_side
    from .metrics import accuracy
    from .optimize import FinetuneError, HeldOut, add_lora, finetune, save_lora
    from .plots import heldout_curves, reward_curves
    from .zoo import load

    out = prepare_out(args.out)
    model = _load_generator(args.model)
    reward = parse_reward(args.reward, model)
    policy = parse_gradient(args.gradient)
    if min(args.iterations, args.batch_size, args.rank, args.eval_every) < 1 or args.eval_samples < 2:
        raise UsageError("--iterations, --batch-size, --rank and --eval-every must be at least 1, --eval-samples 2")
    sampler = model.sampler(args.steps, args.guidance)
    labels = torch.arange(model.num_classes) if model.conditional else None
    encode = model.encode if model.conditional else None
    eval_classifier = load("digits-classifier-eval")

    def judge(images, conditions):
        return {"accuracy": accuracy(eval_classifier, images, conditions)}

    if labels is not None:
        heldout = HeldOut.per_condition(labels, args.eval_samples, model.sample_shape, seed=10_000 + args.seed,
                                        every=args.eval_every, judge=judge)
        show = heldout.noise[:: args.eval_samples], heldout.conditions[:: args.eval_samples]
    else:
        heldout = HeldOut(model.noise(10 * args.eval_samples, torch.Generator().manual_seed(10_000 + args.seed)),
                          every=args.eval_every)
        show = heldout.noise[:10], None

    def samples():
        with torch.no_grad():
            return sampler(show[0], encode(show[1]) if encode else None).clamp(0, 1)

    before = samples()
    if args.params == "lora":
        add_lora(model.model, rank=args.rank, seed=args.seed)
    try:
        result = finetune(sampler, reward, labels, noise_shape=model.sample_shape, params=args.params, gradient=policy,
                          iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          encode=encode, ema=args.ema, base_weight=args.base_weight, warmup=args.warmup,
                          heldout=heldout, checkpoint_dir=out, checkpoint_every=args.checkpoint_every,
                          resume=args.resume)
    except (FinetuneError, ValueError) as exc:
        raise UsageError(f"{exc} (checkpoint: {out / 'finetune_checkpoint.pt'})") from None
    if args.params == "lora":
        save_lora(model.model, out / "adapter.safetensors")
    else:
        model.model.save_pretrained(out / "model")
    after = samples()
    side_by_side([labelled(grid(before, nrow=10), "base model"), labelled(grid(after, nrow=10), "fine-tuned")]).save(
        out / "before_after.png")
    reward_curves({args.gradient: result.history}, out / "curve.png", title=f"{args.model}, {args.reward}")
    heldout_curves(result.history["eval"], out / "heldout.png", title=f"{args.model}, {args.reward}, held out")
    metrics = {"model": args.model, "reward_spec": args.reward, "rank": args.rank, "gradient_policy": repr(policy),
               "num_inference_steps": args.steps, "guidance_scale": sampler.guidance_scale,
               **result.history["settings"], "reward": result.history["reward"],
               "seconds_per_iteration": result.history["seconds"], "heldout": result.history["eval"],
               "accuracy_judge": "digits-classifier-eval",
               "weights": "adapter.safetensors" if args.params == "lora" else "model"}
    write_metrics(out, metrics)
    return metrics


def cmd_demo(args) -> dict:
    """The embedded default: the zoo's generators sampled and judged; a short report."""
    from PIL import Image

    from .images import labelled, side_by_side

    out = prepare_out(args.out)
    report = {"models": {}}
    panels = []
    pruned_panels = []
    for name in ("digits-unet", "digits-dit"):
        m = sample_report(name, "0-9", args.n, args.seed, args.steps, None, out, tag=f"_{name}")
        report["models"][name] = m
        panels.append(labelled(Image.open(out / m["grid"]), f"{name}: accuracy {m.get('accuracy', 0):.0%}, "
                                                            f"{m['seconds']:.1f}s"))
        # the compute shortcut: the same seeds through the shipped DiP-GO schedule (ratio 0.8)
        p = sample_report(name, "0-9", args.n, args.seed, args.steps, None, out, tag=f"_{name}_pruned",
                          schedule_path="zoo")
        p["speedup"] = m["seconds"] / p["seconds"]
        report["models"][f"{name} (schedule 0.8)"] = p
        pruned_panels.append(side_by_side([
            labelled(Image.open(out / m["grid"]), f"{name}, full: {m['seconds']:.1f}s"),
            labelled(Image.open(out / p["grid"]), f"schedule 0.8: {p['seconds']:.1f}s ({p['speedup']:.1f}x), "
                                                  f"accuracy {p.get('accuracy', 0):.0%}")]))
    side_by_side(panels).save(out / "demo.png")
    side_by_side(pruned_panels).save(out / "demo_pruned.png")
    report["picture"] = "demo.png"
    report["picture_pruned"] = "demo_pruned.png"
    # The DiT's unconditional samples are the cleaner start; the sphere prior keeps the noise on the
    # Gaussian shell, without which the steered samples drift into adversarial noise for the reward classifier.
    report["sdo"] = run_optimize(SDO_DEMO_MODEL, f"digit:{args.digit}", "shortcut", args.iterations, 8, 0.05,
                                 args.steps, args.seed, "sphere", "null", out, tag="_sdo")
    write_metrics(out, report)
    lines = ["# diffusion-shortcuts demo", "", "![samples](demo.png)", "",
             "| model | accuracy (digits-classifier-eval) | seconds | steps |", "|---|---|---|---|"]
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
    lines += ["", f"## The gradient shortcut: steering unconditional samples to a {args.digit}", "",
              "![before and after](before_after_sdo.png)", "", "![reward curve](curve_sdo.png)", "",
              f"{SDO_DEMO_MODEL}, null label, {args.iterations} iterations of SDO (`Shortcut()`: one network "
              "graph per iteration, sphere noise prior), "
              f"{sdo['mean_seconds_per_iteration']:.2f} s per iteration; judged by digits-classifier-eval "
              f"(never the reward): {sdo['success_before']:.0%} were a {args.digit} before, "
              f"{sdo['success_after']:.0%} after."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-shortcuts", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    demo = verbs.add_parser("demo", help="both shortcuts on the embedded zoo, with a report")
    demo.add_argument("--out", default="diffusion-shortcuts-demo")
    demo.add_argument("--n", type=int, default=100, help="samples per model")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=50)
    demo.add_argument("--digit", type=int, default=3, help="the digit the SDO part steers toward")
    demo.add_argument("--iterations", type=int, default=15, help="SDO iterations")
    demo.set_defaults(func=cmd_demo)

    opt = verbs.add_parser("optimize", help="optimize initial noise against a reward (SDO by default)")
    opt.add_argument("--model", default="digits-unet")
    opt.add_argument("--reward", required=True, help="digit:N or reference:IMAGE.png[:MASK.png]")
    opt.add_argument("--gradient", default="shortcut", help="shortcut, full, checkpointed, straight_through")
    opt.add_argument("--iterations", type=int, default=100)
    opt.add_argument("--n", type=int, default=8)
    opt.add_argument("--lr", type=float, default=0.05)
    opt.add_argument("--steps", type=int, default=50)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--noise-prior", choices=["chi2", "sphere"], default=None)
    opt.add_argument("--labels", default="null", help="conditioning labels; 'null' = unconditional")
    opt.add_argument("--out", required=True)
    opt.set_defaults(func=cmd_optimize)

    sample = verbs.add_parser("sample", help="sample a model and judge the samples")
    sample.add_argument("--model", default="digits-unet", help="a zoo name or a local diffusers folder")
    sample.add_argument("--labels", default="0-9", help="e.g. 0-9, 3 or 1,4,7")
    sample.add_argument("--n", type=int, default=64)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--steps", type=int, default=50)
    sample.add_argument("--guidance", type=float, default=None, help="default: the model's")
    sample.add_argument("--schedule", default=None, help="a cache schedule JSON (from `prune`) to sample with, or `zoo` for "
                        "the model's shipped 0.8 schedule")
    sample.add_argument("--out", required=True)
    sample.set_defaults(func=cmd_sample)

    tune = verbs.add_parser("finetune", help="fine-tune LoRA or all weights against a reward (SDO by default)")
    tune.add_argument("--model", default="digits-unet")
    tune.add_argument("--reward", required=True, help="label (each sample's own class), digit:N or "
                      "reference:IMAGE.png[:MASK.png]")
    tune.add_argument("--params", choices=["lora", "all"], default="lora")
    tune.add_argument("--rank", type=int, default=4)
    tune.add_argument("--gradient", default="sdo", help="sdo, full, checkpointed, truncated:K, random_truncated:K")
    tune.add_argument("--iterations", type=int, default=100, help="the total, also when resuming")
    tune.add_argument("--batch-size", type=int, default=4)
    tune.add_argument("--lr", type=float, default=1e-3)
    tune.add_argument("--steps", type=int, default=50)
    tune.add_argument("--guidance", type=float, default=None, help="default: the model's")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--ema", type=float, default=None, help="EMA decay of the trained weights, e.g. 0.99")
    tune.add_argument("--base-weight", type=float, default=0.0,
                      help="weight on the distance to the base model's samples from the same noise")
    tune.add_argument("--warmup", type=int, default=0, help="iterations of learning-rate warm-up")
    tune.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every K iterations")
    tune.add_argument("--eval-samples", type=int, default=5, help="held-out samples per class (diversity needs 2)")
    tune.add_argument("--checkpoint-every", type=int, default=10)
    tune.add_argument("--resume", action="store_true", help="continue a killed run in the same --out")
    tune.add_argument("--out", required=True)
    tune.set_defaults(func=cmd_finetune)

    prune = verbs.add_parser("prune", help="learn a cache schedule (DiP-GO) and compare it with the full model")
    prune.add_argument("--model", default="digits-unet")
    prune.add_argument("--ratio", type=float, default=0.8, help="fraction of the MACs to prune")
    prune.add_argument("--iterations", type=int, default=200)
    prune.add_argument("--batch-size", type=int, default=2)
    prune.add_argument("--lr", type=float, default=0.01)
    prune.add_argument("--gradient", default="checkpointed", help="checkpointed, full or shortcut")
    prune.add_argument("--steps", type=int, default=50)
    prune.add_argument("--samples", type=int, default=1000, help="samples for the quality comparison")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--resume", action="store_true", help="continue a search killed in the same --out")
    prune.add_argument("--out", required=True)
    prune.set_defaults(func=cmd_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except UsageError as exc:
        print(f"diffusion-shortcuts {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))} or
                     {"out": str(getattr(args, "out", ""))}, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
