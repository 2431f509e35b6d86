"""Held-out evaluation of a model being fine-tuned: fixed noise and conditions, sampled without gradients.

A reward that rises on the training batches can rise by collapse (every sample of a condition turning
into the one image the reward likes best). :class:`HeldOut` measures, on noise and conditions that never
change: the reward, any judge's figures (e.g. ``digits-classifier-eval`` accuracy, never a reward) and the
diversity of samples that share a condition, which falls when the model collapses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..metrics import diversity
from ..rewards.base import check_reward_output
from .. import conditions as C


@dataclass
class HeldOut:
    """What :func:`~diffusion_shortcuts.finetune` evaluates every ``every`` iterations.

    Attributes:
        noise: (N, C, H, W) initial noise, fixed for the whole run.
        conditions: N conditions as the reward sees them (labels, prompts), or None.
        groups: (N,) integers; samples with equal group share a condition and are compared for diversity.
            None: all samples form one group.
        judge: ``judge(images, conditions) -> dict`` of further figures, e.g. an evaluation classifier's
            accuracy; it must not be the training reward.
        every: evaluate after every ``every`` iterations (and before the first and after the last).
        batch_size: samples per no-grad rollout.
    """

    noise: torch.Tensor
    conditions: Any = None
    groups: torch.Tensor | None = None
    judge: Callable[[torch.Tensor, Any], dict] | None = None
    every: int = 10
    batch_size: int = 50

    def __post_init__(self):
        n = len(self.noise)
        if self.conditions is not None and C.count(self.conditions) != n:
            raise ValueError(f"HeldOut: {C.count(self.conditions)} conditions for {n} noise samples")
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"HeldOut: {len(self.groups)} group ids for {n} noise samples")
        if self.every < 1 or self.batch_size < 1:
            raise ValueError("HeldOut: every and batch_size must be >= 1")

    @classmethod
    def per_condition(cls, conditions, samples: int, noise_shape: tuple[int, ...], seed: int = 12345, **kwargs):
        """``samples`` seeded noises for each of ``conditions`` (grouped by condition for diversity)."""
        if samples < 2:
            raise ValueError("HeldOut.per_condition: diversity needs at least 2 samples per condition")
        index = torch.arange(C.count(conditions)).repeat_interleave(samples)
        noise = torch.randn((len(index), *noise_shape), generator=torch.Generator().manual_seed(seed))
        return cls(noise, C.take(conditions, index), index, **kwargs)

    @torch.no_grad()
    def evaluate(self, sampler, reward, encode: Callable | None = None) -> dict:
        """Sample every held-out noise with ``sampler`` (no gradients) and measure it."""
        device = next(sampler.model.parameters()).device
        images, rewards = [], []
        for start in range(0, len(self.noise), self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, len(self.noise)))
            cond = C.take(self.conditions, index)
            x = sampler(self.noise[index].to(device), encode(cond) if encode is not None and cond is not None else cond)
            rewards.append(check_reward_output(reward(x, cond), len(x), "reward").float().cpu())
            images.append(x.float().cpu())
        images, rewards = torch.cat(images), torch.cat(rewards)
        groups = self.groups if self.groups is not None else torch.zeros(len(images), dtype=torch.long)
        figures = {"reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
                   "diversity": diversity(images.clamp(0, 1), groups)}
        if self.judge is not None:
            figures.update({k: float(v) for k, v in self.judge(images.clamp(0, 1), self.conditions).items()})
        return figures
