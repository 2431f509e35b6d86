"""Rewards: callables ``reward(images, cond) -> Tensor[B]``, images in [0, 1], higher is better."""

from .base import Reward, Weighted, check_reward_output
from .clip import Aesthetic, ClipScore
from .digits import DigitClass, Reference

__all__ = ["Reward", "Weighted", "check_reward_output", "DigitClass", "Reference", "ClipScore", "Aesthetic"]
