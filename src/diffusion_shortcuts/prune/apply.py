"""Sampling with a cache schedule: ``with ds.prune.apply(model, schedule): sampler(noise, cond)``."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .blocks import model_id, resolve_blocks
from .schedule import CacheSchedule, ScheduleError
from .supernet import SuperNet


def enable(model: torch.nn.Module, schedule: CacheSchedule, sampler=None, *, full_graph_steps: bool = False,
           strict: bool = True, compile: bool | dict = False) -> SuperNet:
    """Make ``model`` follow ``schedule`` until :func:`disable`: reused blocks are not computed.

    ``full_graph_steps``: a call that keeps its autograd graph (the one step of SDO's ``Shortcut``) computes
    every block, so that only the no-grad rollout is pruned. ``strict=False`` (with a ``sampler``) resamples a
    schedule made for other timesteps to the sampler's (:meth:`CacheSchedule.resampled`) instead of refusing.
    ``compile``: compile each gated block with ``fullgraph=True`` (a dict: more ``torch.compile`` options), the
    schedule's decision outside the compiled regions (see :class:`SuperNet`); a model compiled whole works too.

    Fails with :class:`~diffusion_shortcuts.prune.ScheduleError` when the schedule was made for other
    blocks or another model configuration, or (given ``sampler``, or at the first call otherwise) for
    other timesteps.
    """
    if not isinstance(schedule, CacheSchedule):
        raise TypeError(f"schedule must be a CacheSchedule, got {type(schedule).__name__}")
    try:
        names = [n for n, _ in resolve_blocks(model, schedule.blocks)]
    except ValueError as exc:
        raise ScheduleError(f"the schedule's blocks do not fit this model: {exc}") from None
    schedule.check_model(model_id(model), names)
    if sampler is not None:
        if sampler.model is not model:
            raise ValueError("the sampler drives another model than the one the schedule is applied to")
        schedule = schedule.fitted(sampler.timesteps, strict=strict)
    net = SuperNet(model, schedule.timesteps, schedule.blocks, schedule.kinds, whole_steps=schedule.whole_steps,
                   full_graph_steps=full_graph_steps, mode=schedule.mode, compile=compile)
    net.use_table(schedule.reuse)
    return net.attach()


def disable(model: torch.nn.Module) -> bool:
    """Remove the schedule from ``model`` (False if none was applied)."""
    net = SuperNet.of(model)
    if net is None:
        return False
    net.detach()
    return True


@contextmanager
def apply(model: torch.nn.Module, schedule: CacheSchedule, sampler=None, *, full_graph_steps: bool = False,
          strict: bool = True, compile: bool | dict = False):
    """Context manager around :func:`enable` / :func:`disable`; yields the :class:`SuperNet`."""
    net = enable(model, schedule, sampler, full_graph_steps=full_graph_steps, strict=strict, compile=compile)
    try:
        yield net
    finally:
        net.detach()


def enable_cache(pipe, schedule: CacheSchedule | str | Path, num_inference_steps: int | None = None,
                 height: int | None = None, width: int | None = None, compile: bool | dict = False) -> SuperNet:
    """``enable`` on a diffusers pipeline: finds its denoiser (``unet`` or ``transformer``); with
    ``num_inference_steps`` the schedule is resampled to the timesteps the pipeline's scheduler will use for
    that many steps (at ``height`` x ``width`` pixels, for schedulers that shift with the resolution), so that a
    stock ``pipe(..., num_inference_steps=M)`` call runs with it. ``compile``: as in :func:`enable`.

    ``schedule`` may be a schedule file or a folder holding ``schedule.json``: the LoRA folder ``finetune
    --schedule`` writes ships the schedule refit to that adapter beside it (``enable_cache(pipe, "tuned/lora")``
    after ``pipe.load_lora_weights("tuned/lora")``); a schedule made for another base model is refused, naming
    both."""
    from ..families import denoiser_of, family_of, vae_scale
    from ..sampling import Sampler

    if isinstance(schedule, (str, Path)):
        schedule = CacheSchedule.load(schedule)
    _, model = denoiser_of(pipe)
    if num_inference_steps is not None:  # the timesteps our Sampler would run, which are the stock call's
        channels, h, w = family_of(model).latent_shape(model)
        factor = vae_scale(pipe)
        shape = (channels, height // factor if height else h, width // factor if width else w)
        schedule = schedule.fitted(Sampler(model, pipe.scheduler, num_inference_steps, sample_shape=shape).timesteps)
    return enable(model, schedule, compile=compile)


def summary(net: SuperNet) -> dict:
    """What a scheduled run computed and reused, per block and in all (as cache-dit's summary tells its users)."""
    calls = net.calls
    reused = {name: calls - computed for name, computed in zip(net.names, net.computed)}
    return {"denoiser_calls": calls, "calls_skipped": net.skipped_calls,
            "block_calls_computed": int(sum(net.computed)), "block_calls_reused": int(sum(reused.values())),
            "per_block": {name: {"computed": c, "reused": reused[name]} for name, c in zip(net.names, net.computed)}}
