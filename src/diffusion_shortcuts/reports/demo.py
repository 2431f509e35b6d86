"""``demo``: both shortcuts on the embedded zoo, with a short markdown report.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..images import labelled, side_by_side
from ..subjects import JUDGE
from ..usage import UsageError
from .common import (parse_gradient, parse_reward)
from .sample import sample_report
from .optimize import optimize_report


SDO_DEMO_MODEL = "digits-dit"
DEMO_MODELS = ("digits-unet", "digits-dit", "digits-flux")  # a 2022 UNet, a DiT, a flow-matching MMDiT (Flux)


def demo_report(out: Path, *, n: int, seed: int, steps: int, digit: int, iterations: int) -> dict:
    """The embedded default: the zoo's generators sampled and judged, full and with the shipped DiP-GO
    schedules, and SDO steering unconditional samples to a digit; a short markdown report."""
    from PIL import Image

    from ..subjects import load_subject

    if steps != 50:  # checked before any file is written
        raise UsageError(f"--steps {steps}: the demo compares with the zoo's shipped schedules, made for 50 steps")
    report, panels, pruned_panels = {"models": {}}, [], []
    for name in DEMO_MODELS:
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
    from ..optimize import optimize_latents
    from ..rewards import given_conditions

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
    lines += ["", "## The compute shortcut: the zoo's cache schedules at ratio 0.8 (searched from a rule and "
              "forecasting; digits-flux's calibrated, no search)", "",
              "![full and pruned](demo_pruned.png)", "",
              "| model | MACs of full | speedup (same seeds, this run) | accuracy full | accuracy pruned |",
              "|---|---|---|---|---|"]
    for name in DEMO_MODELS:
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
