"""Rewards: callables ``reward(images, cond) -> Tensor[B]``, images in [0, 1], higher is better."""

from .base import SpecContext, Weighted, check_reward_output, from_spec, given_conditions, known_specs, register_spec
from .clip import Aesthetic, ClipScore, PickScore
from .digits import DigitClass, Reference
from .frames import ByFrames, FrameScoring

__all__ = ["Weighted", "check_reward_output", "from_spec", "known_specs", "register_spec", "SpecContext",
           "DigitClass", "Reference", "ClipScore", "Aesthetic", "PickScore", "given_conditions", "ByFrames",
           "FrameScoring"]
