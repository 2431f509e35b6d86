"""Image rewards on videos, by frames, and the partial decode that makes a video reward's gradient affordable.

Every image reward (``clip``, ``aesthetic``, ``pickscore``, ``reference``, a weighted sum) scores a video ``(B, 3, F, H,
W)`` as the mean of its frames' rewards: each frame is scored as an image with its video's condition. Which frames
(``--reward-frames``):

- all of them (the default): the reward is the mean over the video;
- ``first``: the first frame alone, always;
- ``K``: while the gradient flows (an optimization or fine-tuning iteration), K frames drawn afresh each time, an
  unbiased estimate of the mean over the video at K frames' cost; without gradient (the reports' rewards, held-out
  evaluations), all frames: the figure the estimate estimates.

The decode: a video VAE decodes every latent frame before a reward sees one, and its backward holds all of them. Where
the VAE allows it (:attr:`~diffusion_shortcuts.families.VideoFamily.prefix_decode`: a causal decoder whose first k
latent frames decode alone to the whole video's first frames, as Wan's does, checked in the tests), only the latent
frames up to the last scored frame are decoded; ``first`` decodes one latent frame. HunyuanVideo's, LTX's and
CogVideoX's decoders look at later latent frames (their prefix decodes differ), so they decode the whole video and the
reward takes its frames from it (the reward's cost falls, the decoder's does not). VADER's recipe (one random frame,
gradient through the last step) is ``--reward-frames 1 --gradient truncated:1``; SDO's is the same with
``--gradient shortcut``, which also moves the initial noise.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .. import conditions as C
from .base import check_reward_output, reward_name

FIRST = "first"


def parse_frames(text: str | int | None, num_frames: int | None, flag: str = "--reward-frames") -> str | int | None:
    """``first``, a whole number of frames 1..F, or None (all frames); a ValueError names ``flag`` otherwise, and a
    count on a model that makes images (``num_frames`` None)."""
    if text is None:
        return None
    if num_frames is None:
        raise ValueError(f"{flag}: the model makes images, not videos")
    if text == FIRST:
        return FIRST
    try:
        count = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} takes `first` or a number of frames, got {text!r}") from None
    if not 1 <= count <= num_frames:
        raise ValueError(f"{flag} {count}: the videos have {num_frames} frames; give 1 to {num_frames} or `first`")
    return count


class FrameScoring:
    """Which frames of a video a reward scores (:func:`parse_frames`'s ``pick``: ``first``, K or None for all), the
    reward wrapped to score them (:meth:`reward`) and the sampler's decode wrapped to decode only them where the VAE
    allows (:meth:`sampler`). ``seed`` fixes the sequence of K-frame draws."""

    def __init__(self, pick: str | int | None, num_frames: int, time_scale: int, prefix_decode: bool,
                 frame_axis: int = 2, seed: int = 0):
        self.pick, self.num_frames, self.time_scale = pick, int(num_frames), int(time_scale)
        self.prefix_decode, self.frame_axis = bool(prefix_decode), frame_axis
        self.generator = torch.Generator().manual_seed(seed)
        self.decoded_latent_frames: int | None = None  # how many latent frames the latest partial decode decoded

    @classmethod
    def for_sampler(cls, sampler, pick, num_frames: int, seed: int = 0) -> "FrameScoring":
        from ..families import vae_time_scale

        family = sampler.family
        return cls(pick, num_frames, vae_time_scale(sampler.pipeline), getattr(family, "prefix_decode", False),
                   family.frame_axis(), seed)

    def frames(self, grad: bool) -> list[int]:
        """The frames scored: drawn afresh for K while the gradient flows, else every frame."""
        if self.pick == FIRST:
            return [0]
        if self.pick is None or not grad or self.pick >= self.num_frames:
            return list(range(self.num_frames))
        return sorted(torch.randperm(self.num_frames, generator=self.generator)[:self.pick].tolist())

    def sampler(self, sampler):
        """A copy of ``sampler`` whose decode gives only the scored frames (``(B, 3, K, H, W)``) while the gradient
        flows, decoding the fewest latent frames the VAE allows; without gradient it decodes whole videos."""
        if sampler.decode is None:
            raise ValueError("scoring frames needs a sampler that decodes (it has no decode)")
        decode, scoring = sampler.decode, self

        def decode_scored(z: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return decode(z)
            frames = scoring.frames(grad=True)
            latent_count = z.shape[scoring.frame_axis]
            if scoring.prefix_decode:
                latent_count = min(latent_count, scoring.latent_frames_needed(max(frames)))
                z = z.narrow(scoring.frame_axis, 0, latent_count)
            scoring.decoded_latent_frames = latent_count
            video = decode(z)
            return video[:, :, frames]

        scored = copy.copy(sampler)
        scored.decode = decode_scored
        return scored

    def reward(self, reward):
        """``reward`` on videos: the mean of the scored frames' rewards, each frame with its video's condition.
        A whole video (``num_frames`` frames) is scored at :meth:`frames` (``first``: its first frame; else all); a
        video of fewer frames is what :meth:`sampler`'s decode picked, and is scored whole. A reward already scoring
        by frames is re-aimed at these."""
        return ByFrames(reward.image_reward if isinstance(reward, ByFrames) else reward, self)

    def latent_frames_needed(self, frame: int) -> int:
        """The latent frames a causal VAE decodes to reach pixel frame ``frame`` (0-based)."""
        return 1 if frame == 0 else (frame - 1) // self.time_scale + 2


class ByFrames:
    """An image reward scoring videos by frames (see :class:`FrameScoring`); images pass through unchanged."""

    def __init__(self, reward, scoring: FrameScoring | None = None):
        self.image_reward, self.scoring = reward, scoring
        self.name = reward_name(reward)

    def __call__(self, videos: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if videos.ndim != 5:
            return self.image_reward(videos, cond)
        batch, frames = videos.shape[0], videos.shape[2]
        if self.scoring is not None and frames == self.scoring.num_frames:
            videos = videos[:, :, self.scoring.frames(grad=False)]
            frames = videos.shape[2]
        images = videos.transpose(1, 2).flatten(0, 1)  # (B * K, 3, H, W), each video's frames in order
        rows = torch.arange(batch).repeat_interleave(frames)
        per_frame = check_reward_output(self.image_reward(images, C.take(cond, rows) if cond is not None else None),
                                        batch * frames, self.name)
        return per_frame.view(batch, frames).mean(1)
