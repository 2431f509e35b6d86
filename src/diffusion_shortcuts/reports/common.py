"""What every verb's report shares: the subject and flags parsed, schedules loaded, a process's share of the
samples, resumes checked, images judged and drawn.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import conditions as C
from .. import distributed, gradients, rewards, zoo
from ..images import grid, labelled, save_grid, stacked
from ..metrics import accuracy
from ..subjects import JUDGE
from ..usage import UsageError


# ---- parsing what the user typed ------------------------------------------------------------------------

def subject_from(flags: dict):
    """Pop the model flags (--model, --labels, --prompt, ...) off ``flags`` and load what they name."""
    from ..subjects import load_subject

    names = ("labels", "prompt", "prompts", "negative_prompt", "true_cfg_scale", "scheduler", "height", "width",
             "device", "dtype", "vae_checkpointing", "lora", "frames", "fps")
    options = {k: flags.pop(k) for k in names if k in flags}
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return load_subject(flags.pop("model"), **options)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_gradient(text: str):
    try:
        return gradients.resolve(text)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None


def parse_reward(text: str, subject):
    """The reward a spec names, for ``subject``: on a video subject it scores every frame (the mean of its frames';
    :func:`scored_frames` narrows that)."""
    try:
        reward = rewards.from_spec(text, subject.reward_context())
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None
    return for_subject(reward, subject)


def for_subject(reward, subject):
    """An image reward as ``subject``'s samples need it: by frames (the mean over each video's) for a video subject."""
    from ..rewards.frames import ByFrames

    return ByFrames(reward) if subject.num_frames is not None else reward


def scored_frames(subject, sampler, reward, frames: str | None, seed: int):
    """``(reward, sampler)`` scoring the frames ``--reward-frames`` names (``first``, K drawn per iteration, or all),
    the sampler decoding only those while the gradient flows where its VAE allows
    (:class:`~diffusion_shortcuts.rewards.frames.FrameScoring`); unchanged for a subject that makes images."""
    from ..rewards.frames import FrameScoring, parse_frames

    try:
        pick = parse_frames(frames, subject.num_frames)
    except ValueError as exc:
        raise UsageError(f"{exc} ({subject.name})" if subject.num_frames is None else str(exc)) from None
    if subject.num_frames is None:
        return reward, sampler
    scoring = FrameScoring.for_sampler(sampler, pick, subject.num_frames, seed)
    return scoring.reward(reward), scoring.sampler(sampler)


def checkpointed_blocks(subject, enabled: bool) -> None:
    """``--block-checkpointing``: the denoiser recomputes each block in the backward pass (diffusers' gradient
    checkpointing), so that the one graph step holds one block's activations at a time; same gradient, more time."""
    if not enabled:
        return
    model = subject.model
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise UsageError(f"--block-checkpointing: {type(model).__name__} does not support gradient checkpointing")
    model.enable_gradient_checkpointing()


def parse_search_objective(text: str, subject):
    """``--objective``: ``ssim``, ``latent``, ``reward:SPEC`` or ``ssim+reward:SPEC:W``, its reward loaded for
    ``subject``."""
    from ..prune import Objective, parse_objective

    try:
        kind, spec, weight = parse_objective(text)
        reward = for_subject(rewards.from_spec(spec, subject.reward_context()), subject) if spec is not None else None
    except ValueError as exc:
        raise UsageError(f"--objective {text}: {exc}") from None
    return Objective(kind, reward, weight)


def mean_reward(reward, images: torch.Tensor, conditions, device, batch_size: int = 100) -> float:
    """The mean of ``reward`` over ``images`` (``conditions`` as the reward sees them), ``batch_size`` at a time."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            rows = torch.arange(i, min(i + batch_size, len(images)))
            total += float(reward(images[rows].to(device), C.take(conditions, rows)).sum())
    return total / len(images)


def load_schedule(path: str, subject, sampler, strict: bool = False, flag: str = "--schedule"):
    """A schedule file (or ``zoo`` / ``zoo:RATIO``: a zoo model's shipped schedule for 0.8 / that ratio), checked
    against the model and fitted to the sampler's timesteps (resampled to another step count unless ``strict``); an
    error names ``flag``, the option that gave the path."""
    from ..prune import CacheSchedule, ScheduleError, apply

    try:
        shipped = path == "zoo" or path.startswith("zoo:")
        if shipped:
            ratio = path.partition(":")[2] or "0.8"
            try:
                value = float(ratio)
            except ValueError:
                raise ValueError(f"zoo:RATIO takes a number, got {ratio!r}") from None
            schedule = subject.shipped_schedule(value)
        else:
            schedule = CacheSchedule.load(path)
        with apply(subject.model, schedule, sampler, strict=strict):  # the model first, then the timesteps
            pass
        schedule = schedule.fitted(sampler.timesteps, strict=strict)
    except (ScheduleError, ValueError, FileNotFoundError) as exc:
        raise UsageError(f"{flag}: {exc}") from None
    return schedule


def my_share(subject, noise: torch.Tensor, flag: str) -> tuple[list[int], object, torch.Tensor]:
    """This process's samples of ``len(noise)`` (all of them in one process): their indices, conditions and noise.
    Every sample's noise and condition follow its index, so its result does not depend on the process count."""
    n = len(noise)
    try:
        distributed.check_shardable(n, f"{flag} {n} samples")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    mine = distributed.shard(n)
    rows = torch.tensor(mine)
    return mine, C.take(subject.conditions(n), rows), noise[rows.to(noise.device)]


def shards_of(parts: list[dict]) -> dict:
    """What ``metrics.json`` says of the processes: how many ran, and which samples each took (``[first, end)``)."""
    return {"num_processes": len(parts), "shards": [[p["indices"][0], p["indices"][-1] + 1] for p in parts]}


def check_resume(resume: bool, out: Path, checkpoint: str) -> None:
    """``--resume`` with nothing to resume is an error: starting afresh is done by leaving it out."""
    if resume and not (out / checkpoint).exists():
        raise UsageError(f"--resume: no checkpoint {out / checkpoint} to resume; leave --resume out to start afresh")


def check_finite(images: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(images).all():
        raise UsageError(f"{what}: the model produced non-finite values (NaN or inf); check --guidance and the "
                         "model's weights")
    return images


def judged_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of images the evaluation classifier (never a reward) assigns to ``labels``."""
    return accuracy(zoo.load(JUDGE), images, labels)


def captioned_grid(images: torch.Tensor, captions: list[str] | None, path: Path) -> str:
    """A grid with one row per distinct caption (a label or a prompt), the caption above each row."""
    images = images.float().cpu()
    if not captions:
        return save_grid(images, path).name
    rows = []
    for caption in dict.fromkeys(captions):
        index = [i for i, c in enumerate(captions) if c == caption]
        rows.append(labelled(grid(images[index], nrow=len(index)), caption[:60]))
    stacked(rows).save(path)
    return path.name


def sheet_or_grid(images: torch.Tensor, captions: list[str] | None, path: Path) -> str:
    """Images as a :func:`captioned_grid`; videos as a contact sheet (a few frames of each, one row each)."""
    from ..videos import contact_sheet, is_video

    if not is_video(images):
        return captioned_grid(images, captions, path)
    contact_sheet(images, captions).save(path)
    return path.name


def side_by_side_sheets(panels: dict[str, torch.Tensor], path: Path, captions: list[str] | None = None,
                        nrow: int | None = None) -> str:
    """Titled panels side by side (before and after, full and scheduled): grids of images (``nrow`` a row, default
    all in one) or contact sheets of videos."""
    from ..images import side_by_side
    from ..videos import contact_sheet, is_video

    pictures = [labelled(contact_sheet(x, captions) if is_video(x) else grid(x, nrow=nrow or len(x)), title)
                for title, x in panels.items()]
    side_by_side(pictures).save(path)
    return path.name


def summed(parts: list[dict]) -> dict:
    """Dicts of counts (one cache summary per process) added up, key by key, nested dicts too."""
    return {key: summed([p[key] for p in parts]) if isinstance(value, dict) else sum(p[key] for p in parts)
            for key, value in parts[0].items()}
