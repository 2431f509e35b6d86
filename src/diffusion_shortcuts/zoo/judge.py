"""Judging digit samples, and a cache schedule against the full model, with the zoo's classifiers.

Accuracy is by ``digits-classifier-eval`` (never used as a reward); FID is on ``digits-classifier``
features against the held-out digits. A schedule is compared with the full model on the same noise and
labels: SSIM/PSNR to the full model's images, both models' accuracy and FID, and the wall-clock speedup
of sampling a batch, timed alternately in one process (this machine is shared and noisy).
"""

from __future__ import annotations

import torch

from ..metrics import FID_MIN_SAMPLES, accuracy, features, frechet_distance
from . import ZooModel, load
from .data import load_digits


class DigitJudge:
    """``judge(images, labels) -> {"accuracy", "fid"}`` for images in [0, 1]; FID is left out of fewer than two
    images (a covariance needs two)."""

    def __init__(self):
        self.eval_classifier = load("digits-classifier-eval")
        self.feature_classifier = load("digits-classifier")
        heldout, _ = load_digits("heldout")
        self.heldout_features = features(self.feature_classifier, (heldout + 1) / 2)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict:
        result = {}
        if len(images) >= FID_MIN_SAMPLES:
            result["fid"] = frechet_distance(features(self.feature_classifier, images), self.heldout_features)
        if labels is not None:
            result["accuracy"] = accuracy(self.eval_classifier, images, labels)
        return result


def compare_with_full(m: ZooModel, schedule, n: int = 1000, seed: int = 0, batch_size: int = 100,
                      judge: DigitJudge | None = None, speed_batch: int = 16, progress: bool = True,
                      full_images: torch.Tensor | None = None, sampler=None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Quality and speed of ``schedule`` against the full model, from the same seeds and labels (cycling
    through the classes); the judge is :class:`DigitJudge`. Returns (metrics, full images, pruned images).
    ``sampler`` defaults to ``m.sampler()``."""
    from ..prune.compare import compare_schedule

    sampler = sampler or m.sampler()
    labels = torch.arange(n) % m.num_classes if m.conditional else None
    noise = m.noise(n, torch.Generator().manual_seed(seed))
    metrics, full, pruned = compare_schedule(sampler, schedule, m.encode, labels, noise, judge or DigitJudge(),
                                             batch_size, speed_batch, progress, full_images)
    metrics.update(seed=seed, accuracy_judge="digits-classifier-eval", fid_features="digits-classifier")
    return metrics, full, pruned
