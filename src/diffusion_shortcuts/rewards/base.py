"""Rewards are callables ``reward(images, cond) -> Tensor[B]``, images in [0, 1], higher is better.

Reward classes register the spec strings that make them (``"digit:3"``, ``"reference:IMG[:MASK]"``) with
:func:`register_spec`; :func:`from_spec` parses one. What a spec needs to know about the model (its sample
shape, whether it takes labels) comes in a :class:`SpecContext`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class SpecContext:
    """What a reward spec may need from the model it rewards."""

    sample_shape: tuple[int, int, int] | None = None   # (C, H, W) of the images (a video's frames) the reward sees
    conditional: bool = True                            # the model takes class labels
    device: str = "cpu"                                 # where a reward model should run


SPECS: dict[str, tuple[Callable[[str | None, SpecContext], Any], str, str]] = {}


def register_spec(name: str, arg: str = "", help: str = ""):
    """Decorator: ``factory(arg, context) -> reward`` makes the reward for ``name[:arg]``."""
    def decorate(factory):
        SPECS[name] = (factory, arg, help)
        return factory
    return decorate


def known_specs() -> str:
    """The spec strings :func:`from_spec` takes, for help texts: ``label, digit:N, ...``."""
    return ", ".join(f"{name}:{arg}" if arg else name for name, (_, arg, _) in SPECS.items())


def from_spec(text: str, context: SpecContext | None = None):
    """The reward a spec string names (see :func:`known_specs`); a ValueError naming the spec otherwise."""
    name, colon, arg = text.partition(":")
    if name not in SPECS:
        raise ValueError(f"reward {text!r}: unknown reward; known: {known_specs()}")
    factory, _, _ = SPECS[name]
    try:
        return factory(arg if colon else None, context or SpecContext())
    except ValueError as exc:
        raise ValueError(f"reward {text!r}: {exc}") from None


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


class given_conditions:  # noqa: N801 (used like a function)
    """``reward`` called with fixed ``conditions`` (the labels or prompts behind a batch) instead of the
    conditioning the sampler was given: a loop over fixed samples hands the reward their embeddings, while
    the reward wants the prompts (CLIP score of the prompt) or labels (the sample's own class)."""

    def __init__(self, reward, conditions):
        self.reward, self.conditions = reward, conditions
        self.name = reward_name(reward)

    def __call__(self, images: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.reward(images, self.conditions)
