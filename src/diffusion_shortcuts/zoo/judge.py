"""Judging digit samples, and a cache schedule against the full model, with the zoo's classifiers.

Accuracy is by ``digits-classifier-eval`` (never used as a reward); FID is on ``digits-classifier``
features against the held-out digits. A schedule is compared with the full model on the same noise and
labels: SSIM/PSNR to the full model's images, both models' accuracy and FID, and the wall-clock speedup
of sampling a batch, timed alternately in one process (this machine is shared and noisy).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..metrics import accuracy, features, frechet_distance, psnr, ssim, timed_pair
from . import ZooModel, load
from .data import load_digits


class DigitJudge:
    """``judge(images, labels) -> {"accuracy", "fid"}`` for images in [0, 1]."""

    def __init__(self):
        self.eval_classifier = load("digits-classifier-eval")
        self.feature_classifier = load("digits-classifier")
        heldout, _ = load_digits("heldout")
        self.heldout_features = features(self.feature_classifier, (heldout + 1) / 2)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict:
        result = {"fid": frechet_distance(features(self.feature_classifier, images), self.heldout_features)}
        if labels is not None:
            result["accuracy"] = accuracy(self.eval_classifier, images, labels)
        return result


def _generate(m: ZooModel, labels, noise, batch_size: int, schedule=None, sampler=None, progress=False, desc=""):
    from tqdm.auto import tqdm

    from ..prune import apply

    sampler = sampler or m.sampler()
    out = []
    with apply(m.model, schedule, sampler) if schedule is not None else nullcontext():
        for i in tqdm(range(0, len(noise), batch_size), desc=desc, disable=not progress, leave=False):
            cond = m.encode(labels[i:i + batch_size]) if labels is not None else None
            out.append(sampler(noise[i:i + batch_size], cond).clamp(0, 1))
    return torch.cat(out)


def timed_speedup(m: ZooModel, schedule, batch: int = 16, repeats: int = 5, sampler=None) -> dict:
    """Seconds to sample ``batch`` images with and without ``schedule``, alternated; median of each."""
    from ..prune import apply

    sampler = sampler or m.sampler()
    noise = m.noise(batch, torch.Generator().manual_seed(123))
    cond = m.encode(torch.arange(batch) % m.num_classes) if m.conditional else None

    def pruned():
        with apply(m.model, schedule, sampler):
            sampler(noise, cond)

    full, fast = timed_pair(lambda: sampler(noise, cond), pruned, repeats)
    return {"batch": batch, "seconds_full": full, "seconds_pruned": fast, "speedup": full / fast}


def compare_with_full(m: ZooModel, schedule, n: int = 1000, seed: int = 0, batch_size: int = 100,
                      judge: DigitJudge | None = None, speed_batch: int = 16, progress: bool = True,
                      full_images: torch.Tensor | None = None, sampler=None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Quality and speed of ``schedule`` against the full model, from the same seeds and labels.

    Returns (metrics, full images, pruned images). Pass ``full_images`` (made by an earlier call with
    the same n and seed) to skip regenerating them. ``sampler`` defaults to ``m.sampler()``.
    """
    sampler = sampler or m.sampler()
    judge = judge or DigitJudge()
    labels = torch.arange(n) % m.num_classes if m.conditional else None
    noise = m.noise(n, torch.Generator().manual_seed(seed))
    if full_images is None:
        full_images = _generate(m, labels, noise, batch_size, sampler=sampler, progress=progress, desc="full model")
    pruned = _generate(m, labels, noise, batch_size, schedule, sampler, progress=progress, desc="with schedule")
    full_q, pruned_q = judge(full_images, labels), judge(pruned, labels)
    metrics = {"samples": n, "seed": seed, "macs_ratio": schedule.macs_ratio,
               "ssim": float(ssim(pruned, full_images).mean()), "psnr": float(psnr(pruned, full_images).mean()),
               **{f"{k}_full": v for k, v in full_q.items()}, **{f"{k}_pruned": v for k, v in pruned_q.items()},
               "accuracy_judge": "digits-classifier-eval", "fid_features": "digits-classifier",
               **timed_speedup(m, schedule, speed_batch, sampler=sampler)}
    return metrics, full_images, pruned
