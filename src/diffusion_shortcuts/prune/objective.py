"""What the pruner search keeps of the full model: its images (DiP-GO), a reward, or both.

DiP-GO trains the gates to copy the full model's final images (``1 - SSIM``, Zhu et al. 2024, eq. 6). A user who
cares about a reward (the CLIP score of the prompt, a preference model, a classifier) wants the schedule that keeps
the reward at the fewest MACs, and the search is a gradient search through the same differentiable rewards the
optimizer uses. The reward objective is a hinge on the reward's drop from the full model's sample from the same
noise and conditions:

    L_reward = mean_i max(0, r(x_full_i, c_i) - r(x_gated_i, c_i))

so a gated sample that rewards at least as well as the full one costs nothing, whatever it looks like; the
sparsity term (eq. 8) is added by the search as for SSIM. ``ssim+reward`` adds ``weight * L_reward`` to
``1 - SSIM``, keeping the images near the full model's while protecting the reward.

``latent`` keeps the full model's final latents, with no decoding: the search's rollouts stop before the VAE (and
its backward), and the loss is the relative squared distance ``|z - z_full|^2 / |z_full|^2``; cheaper where the VAE
is large, and judged against the decoded SSIM in BENCHMARKS.md.

Objectives are written as the command line takes them: ``ssim``, ``latent``, ``reward:SPEC`` and
``ssim+reward:SPEC:W``, SPEC any reward spec (``clip:DIR``, ``digit:3``, ``label``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..metrics import latent_distance, ssim
from ..rewards.base import check_reward_output, reward_name

KINDS = ("ssim", "reward", "ssim+reward", "latent")


def parse_objective(text: str) -> tuple[str, str | None, float]:
    """``"ssim"`` -> ("ssim", None, 1.0); ``"reward:SPEC"`` -> ("reward", SPEC, 1.0); ``"ssim+reward:SPEC:W"`` ->
    ("ssim+reward", SPEC, W) (SPEC may hold colons itself: W is the last field). A ValueError names what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"objective must be ssim, latent, reward:SPEC or ssim+reward:SPEC:W (a string), got "
                         f"{text!r}")
    if text in ("ssim", "latent"):
        return text, None, 1.0
    kind, _, rest = text.partition(":")
    if kind not in ("reward", "ssim+reward") or not rest:
        raise ValueError(f"objective must be ssim, latent, reward:SPEC or ssim+reward:SPEC:W, got {text!r}")
    if kind == "reward":
        return kind, rest, 1.0
    spec, _, weight = rest.rpartition(":")
    try:
        value = float(weight)
    except ValueError:
        value = float("nan")
    if not spec or not value > 0 or value == float("inf"):
        raise ValueError(f"objective ssim+reward:SPEC:W takes a positive weight W last, got {text!r}")
    return kind, spec, value


@dataclass
class Objective:
    """One search objective: ``kind`` (one of :data:`KINDS`), the ``reward`` callable ``reward(images, cond) ->
    Tensor[B]`` where the kind names one, and the ``weight`` of the reward term in ``ssim+reward``."""

    kind: str = "ssim"
    reward: Callable | None = None
    weight: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"objective must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if (self.reward is None) != (self.kind in ("ssim", "latent")):
            raise ValueError(f"objective {self.kind!r} " + ("needs a reward" if self.reward is None else
                                                            "takes no reward (use 'reward' or 'ssim+reward')"))
        if not self.weight > 0:
            raise ValueError(f"the reward's weight must be positive, got {self.weight}")

    @property
    def name(self) -> str:
        """How a checkpoint and the metrics name it: ``ssim``, ``reward:NAME``, ``ssim+reward:NAME:W``."""
        if self.kind in ("ssim", "latent"):
            return self.kind
        return f"reward:{reward_name(self.reward)}" if self.kind == "reward" else \
            f"ssim+reward:{reward_name(self.reward)}:{self.weight:g}"

    def loss(self, images: torch.Tensor, target: torch.Tensor, cond) -> tuple[torch.Tensor, dict]:
        """(the loss without the sparsity term, its figures as 0-d tensors) for the gated ``images`` against the full
        model's ``target`` images from the same noise (final latents, for ``latent``); ``cond`` as the reward sees
        them (labels, prompts)."""
        if self.kind == "latent":
            distance = latent_distance(images, target).mean()
            return distance, {"latent_distance": distance.detach()}
        similarity = ssim(images, target).mean()
        figures = {"ssim": similarity.detach()}
        if self.kind == "ssim":
            return 1 - similarity, figures
        gated = check_reward_output(self.reward(images, cond), len(images), reward_name(self.reward))
        with torch.no_grad():
            full = check_reward_output(self.reward(target, cond), len(target), reward_name(self.reward))
        drop = torch.relu(full.detach().to(gated.dtype) - gated).mean()
        figures.update(reward=gated.detach().mean(), reward_full=full.mean(), reward_drop=drop.detach())
        return (drop if self.kind == "reward" else (1 - similarity) + self.weight * drop), figures
