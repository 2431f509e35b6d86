"""The reward protocol: ``reward(images, cond) -> Tensor[B]``, images in [0, 1], higher is better."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Reward(Protocol):
    def __call__(self, images: torch.Tensor, cond: Any = None) -> torch.Tensor: ...


def check_reward_output(value: Any, batch: int, name: str = "reward") -> torch.Tensor:
    """Fail early, with the shape in the message, when a reward returns anything but a (B,) tensor."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must return a torch.Tensor of shape ({batch},), got {type(value).__name__}")
    if value.shape != (batch,):
        raise ValueError(f"{name} must return shape ({batch},) (one value per image), got {tuple(value.shape)}")
    return value


def reward_name(reward) -> str:
    return getattr(reward, "name", None) or type(reward).__name__


class Weighted:
    """A weighted sum of rewards: ``Weighted({r1: w1, r2: w2})(images, cond) = w1 r1 + w2 r2``."""

    def __init__(self, weights: dict):
        if not weights:
            raise ValueError("Weighted needs at least one reward")
        for reward, weight in weights.items():
            if not callable(reward):
                raise ValueError(f"Weighted: {reward!r} is not callable")
            if not isinstance(weight, (int, float)):
                raise ValueError(f"Weighted: weight of {reward_name(reward)} must be a number, got {weight!r}")
        self.weights = dict(weights)
        self.name = " + ".join(f"{w:g}*{reward_name(r)}" for r, w in self.weights.items())

    def __call__(self, images: torch.Tensor, cond: Any = None) -> torch.Tensor:
        total = 0.0
        for reward, weight in self.weights.items():
            total = total + weight * check_reward_output(reward(images, cond), images.shape[0], reward_name(reward))
        return total
