"""Schedules that follow the model users run: a schedule refit after a LoRA, and gates trained against a reward.

    python benchmarks/refit_reward.py [--parts refit,objective,refit_strong,refit_validation] [--samples 256] [--tiny]

``refit`` (per zoo model): a LoRA fine-tuned with the README's command (``finetune --reward label --guidance 1
--params lora --iterations 50``); on the tuned model, the shipped 0.8 schedule as it is, refit to it (``refit``: 50
iterations from the schedule), and a full search on it made as the shipped one was (from the rule at 0.8, 200
iterations, the same reuse mode, gradient full): SSIM to the tuned model's own images and evaluation-classifier
accuracy on the same ``--samples`` seeds, and the seconds of each search. ``refit_strong``: the same with a LoRA
that moves the model further (``--lr 1e-2 --iterations 100``: ten times the default learning rate, twice the steps).
``refit_validation``: that LoRA's digits-unet refit with the start validation on 8 and on 64 samples.

``objective`` (per zoo model, ratios 0.7, 0.8 and 0.85): from the same rule table and with the same budget (60
iterations, gradient full, the shipped schedules' reuse mode), a search trained on SSIM (DiP-GO's objective) and one
trained on the reward ``label`` (the reward classifier's log-probability of each sample's own class, as a hinge on
its drop from the full model's sample), against the rule table itself and the shipped (SSIM, 200 iterations)
schedule: by the reward, by the evaluation classifier's accuracy (never a reward) and by SSIM to the full model, all
at the MACs each table has.

Results: benchmarks/results/refit_reward.json (the parts not run this time are kept from it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402

import diffusion_shortcuts as ds  # noqa: E402
from diffusion_shortcuts.metrics import accuracy, ssim  # noqa: E402
from diffusion_shortcuts.prune import CacheSchedule, Objective, profile  # noqa: E402
from diffusion_shortcuts.prune.compare import generate  # noqa: E402
from diffusion_shortcuts.rewards import SpecContext, from_spec  # noqa: E402
from diffusion_shortcuts.subjects import JUDGE, load_subject  # noqa: E402

MODELS = ("digits-unet", "digits-dit")
PARTS = ("refit", "objective", "refit_strong", "refit_validation")
STRONG_LORA = (100, 1e-2)  # the fine-tuning's iterations and learning rate of the LoRA that moves the model further


class Bench:
    """One zoo model's sampler, fixed evaluation seeds and labels, and the measures of a schedule on them."""

    def __init__(self, subject, steps: int, samples: int):
        self.subject, self.m = subject, subject.m
        self.sampler = subject.sampler(steps)
        self.sampler.progress = False
        self.labels = torch.arange(samples) % 10
        self.noise = self.m.noise(samples, torch.Generator().manual_seed(12345))
        self.reward = from_spec("label", SpecContext(self.m.sample_shape, True, "cpu"))
        self.judge = ds.zoo.load(JUDGE)
        self.full = self.images(None)
        self.distinct = torch.arange(10)
        self.conditions = self.m.encode(self.distinct)
        self.profile = profile(self.m.model, self.noise[:1], self.m.encode(self.labels[:1]))

    def images(self, schedule) -> torch.Tensor:
        return generate(self.sampler, self.m.encode, self.labels, self.noise, 128, schedule)

    def measure(self, schedule) -> dict:
        images = self.images(schedule)
        with torch.no_grad():
            reward = float(self.reward(images, self.labels).mean())
        return {"macs_ratio": schedule.macs_ratio if schedule is not None else 1.0,
                "ssim": float(ssim(images, self.full).mean()), "accuracy": accuracy(self.judge, images, self.labels),
                "reward": reward}

    def search(self, ratio: float, start: CacheSchedule, iterations: int, objective=None) -> tuple:
        with_seconds = time.perf_counter()
        result = ds.prune.train_pruner(self.sampler, self.conditions, ratio, iterations=iterations, batch_size=2,
                                       gradient="full", start=start, reuse_mode=start.mode, objective=objective,
                                       reward_conditions=self.distinct, progress=False)
        return result.schedule(ratio), time.perf_counter() - with_seconds


def finetuned_lora(model: str, work: Path, iterations: int, steps: int, lr: float) -> Path:
    """The README's LoRA fine-tuning command, in its own process; its output folder."""
    out = work / f"lora-{model}-{iterations}-{lr:g}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "diffusion_shortcuts.cli", "finetune", "--model", model, "--reward", "label",
            "--guidance", "1", "--params", "lora", "--iterations", str(iterations), "--steps", str(steps),
            "--lr", str(lr), "--out", str(out)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"finetune {model} failed:\n{done.stderr[-3000:]}")
    return out


def tuned(model: str, work: Path, samples: int, tiny: bool, lora_iterations: int, lora_lr: float) -> tuple:
    """(the LoRA's folder, the :class:`Bench` of the model with it loaded, the shipped 0.8 schedule fitted to it)."""
    lora = finetuned_lora(model, work, 2 if tiny else lora_iterations, 4 if tiny else 50, lora_lr)
    bench = Bench(load_subject(model, labels="0-9", lora=str(lora)), 4 if tiny else 50, samples)
    base = bench.m.cache_schedule(0.8).fitted(bench.sampler.timesteps) if not tiny else \
        CacheSchedule.every(bench.sampler.timesteps, bench.profile, 2, warmup=1).with_mode("taylor1")
    return lora, bench, base


def timed_refit(bench: Bench, base: CacheSchedule, tiny: bool, validation: int = 8) -> tuple:
    """``ds.prune.refit`` of ``base`` on the bench's model (50 iterations) and its seconds."""
    start = time.perf_counter()
    refitted = ds.prune.refit(bench.sampler, base, bench.conditions, iterations=2 if tiny else 50, batch_size=2,
                              gradient="full", reward_conditions=bench.distinct, validation=validation,
                              progress=False)
    return refitted, time.perf_counter() - start


def refit_part(work: Path, samples: int, tiny: bool, lora_iterations: int = 50, lora_lr: float = 1e-3) -> dict:
    rows = {}
    for model in MODELS[:1] if tiny else MODELS:
        lora, bench, base = tuned(model, work, samples, tiny, lora_iterations, lora_lr)
        refitted, refit_seconds = timed_refit(bench, base, tiny)
        ratio = base.pruned_fraction  # what refit searches at
        rule = CacheSchedule.every_for_ratio(bench.sampler.timesteps, bench.profile, ratio)
        searched, search_seconds = bench.search(ratio, rule.with_mode(base.mode), 2 if tiny else 200)
        rows[model] = {"lora": lora.name, "full (tuned model)": bench.measure(None),
                       "shipped schedule on the tuned model": bench.measure(base),
                       "refit (50 iterations from it)": {**bench.measure(refitted), "seconds": refit_seconds,
                                                         "kept": refitted.info["refit"]["kept"]},
                       "full search on the tuned model (200 iterations from the rule)": {
                           **bench.measure(searched), "seconds": search_seconds}}
    return rows


def refit_validation_part(work: Path, samples: int, tiny: bool) -> dict:
    """The strong LoRA's digits-unet refit again, validated on 8 (the default) and on 64 fresh samples: whether the
    start validation's sample count decides which table a refit returns."""
    model = MODELS[0]
    _, bench, base = tuned(model, work, samples, tiny, *STRONG_LORA)
    rows = {"shipped schedule on the tuned model": bench.measure(base)}
    for validation in (8, 64):
        refitted, seconds = timed_refit(bench, base, tiny, validation)
        rows[f"refit, validation {validation}"] = {**bench.measure(refitted), "seconds": seconds,
                                                   "validation": refitted.info["refit"]}
    return {model: rows}


def objective_part(samples: int, tiny: bool) -> dict:
    rows = {}
    for model in MODELS[:1] if tiny else MODELS:
        bench = Bench(load_subject(model, labels="0-9"), 4 if tiny else 50, samples)
        rows[model] = {"full": bench.measure(None)}
        for ratio in (0.8,) if tiny else (0.7, 0.8, 0.85):
            mode = "taylor1" if tiny else bench.m.cache_schedule(ratio).mode
            rule = CacheSchedule.every_for_ratio(bench.sampler.timesteps, bench.profile, ratio).with_mode(mode)
            iterations = 2 if tiny else 60
            by_ssim, ssim_seconds = bench.search(ratio, rule, iterations)
            by_reward, reward_seconds = bench.search(ratio, rule, iterations, Objective("reward", bench.reward))
            rows[model][str(ratio)] = {
                "rule": bench.measure(rule),
                "shipped (SSIM, 200 iterations)": None if tiny else bench.measure(bench.m.cache_schedule(ratio)),
                f"SSIM-trained ({iterations} iterations)": {**bench.measure(by_ssim), "seconds": ssim_seconds},
                f"reward-trained ({iterations} iterations)": {**bench.measure(by_reward), "seconds": reward_seconds}}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="a few seconds a configuration: checks the script runs")
    parser.add_argument("--results", default=str(RESULTS / "refit_reward.json"))
    args = parser.parse_args()
    parts = args.parts.split(",")
    results = Path(args.results)
    payload = {k: v for k, v in json.loads(results.read_text()).items() if k in PARTS
               and k not in parts} if results.exists() and not args.tiny else {}
    with tempfile.TemporaryDirectory() as work:
        if "refit" in parts:
            payload["refit"] = refit_part(Path(work), args.samples, args.tiny)
        if "refit_strong" in parts:
            payload["refit_strong"] = refit_part(Path(work), args.samples, args.tiny, *STRONG_LORA)
        if "refit_validation" in parts:
            payload["refit_validation"] = refit_validation_part(Path(work), args.samples, args.tiny)
        if "objective" in parts:
            payload["objective"] = objective_part(args.samples, args.tiny)
    write_results(Path(args.results), "refit_reward", payload)
    for part, models in payload.items():
        for model, rows in models.items():
            print(f"\n{part} / {model}")
            for name, row in rows.items():
                print(f"  {name}: {row}")


if __name__ == "__main__":
    main()
