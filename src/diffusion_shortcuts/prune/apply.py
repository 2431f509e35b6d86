"""Sampling with a cache schedule: ``with ds.prune.apply(model, schedule): sampler(noise, cond)``."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .blocks import model_id, resolve_blocks
from .schedule import CacheSchedule, ScheduleError
from .supernet import ExpertNets, SuperNet


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
    check_model(model, schedule)
    denoisers = [(None, model)]
    if sampler is not None:
        if sampler.model is not model:
            raise ValueError("the sampler drives another model than the one the schedule is applied to")
        schedule = schedule.fitted(sampler.timesteps, strict=strict)
        if sampler.experts:
            denoisers = list(zip(sampler.expert_names, sampler.models))
            check_experts(schedule, sampler.expert_names, sampler.experts[0][1])
            if schedule.experts is None:
                schedule = schedule.for_experts(sampler.expert_names, sampler.experts[0][1])
    return gated(denoisers, schedule, full_graph_steps=full_graph_steps, compile=compile).attach()


def gated(denoisers: list[tuple[str | None, torch.nn.Module]], schedule: CacheSchedule, **options):
    """The SuperNet that makes ``denoisers`` (name, model) follow ``schedule``, not yet attached: one, or one per
    expert driven as one (:class:`ExpertNets`); ``options``: the SuperNet's (``full_graph_steps``, ``compile``)."""
    owner = schedule.expert_of if schedule.experts is not None else None
    nets = []
    for name, model in denoisers:
        net = SuperNet(model, schedule.timesteps, schedule.blocks, schedule.kinds, whole_steps=schedule.whole_steps,
                       mode=schedule.mode, expert=name, owner=owner, **options)
        net.use_table(schedule.reuse)
        nets.append(net)
    return nets[0] if len(nets) == 1 else ExpertNets(nets)


def check_experts(schedule: CacheSchedule, names: list[str], boundary: float) -> None:
    """Refuse a schedule made for other experts, or for experts that switch at another timestep, naming both."""
    if schedule.experts is None:
        return
    if list(schedule.experts["names"]) != list(names):
        raise ScheduleError(f"the schedule is for the denoisers {schedule.experts['names']}, the pipeline's are "
                            f"{list(names)}")
    if abs(schedule.experts["boundary"] - boundary) > 1e-4 * max(1.0, abs(boundary)):
        first = schedule.experts["names"][0]
        raise ScheduleError(f"the schedule hands over from {first} to {schedule.experts['names'][1]} at timestep "
                            f"{schedule.experts['boundary']:g}, the pipeline at {boundary:g}: a table for one expert "
                            "would run on the other")


def check_model(model: torch.nn.Module, schedule: CacheSchedule) -> None:
    """Refuse a schedule made for other blocks or another model configuration, naming both."""
    if not isinstance(schedule, CacheSchedule):
        raise TypeError(f"schedule must be a CacheSchedule, got {type(schedule).__name__}")
    try:
        names = [n for n, _ in resolve_blocks(model, schedule.blocks)]
    except ValueError as exc:
        raise ScheduleError(f"the schedule's blocks do not fit this model: {exc}") from None
    schedule.check_model(model_id(model), names)


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
    family = family_of(model)
    if num_inference_steps is not None:  # the timesteps our Sampler would run, which are the stock call's
        shape = list(family.latent_shape(model))
        factor = vae_scale(pipe)
        shape[-2:] = [height // factor if height else shape[-2], width // factor if width else shape[-1]]
        schedule = schedule.fitted(Sampler(model, pipe.scheduler, num_inference_steps,
                                           sample_shape=tuple(shape)).timesteps)
    denoisers, boundary = family.experts(pipe)
    if len(denoisers) == 1:
        return enable(model, schedule, compile=compile)
    for _, expert in denoisers:
        check_model(expert, schedule)
    check_experts(schedule, [name for name, _ in denoisers], boundary)
    if schedule.experts is None:
        schedule = schedule.for_experts([name for name, _ in denoisers], boundary)
    return gated(denoisers, schedule, compile=compile).attach()


def summary(net: SuperNet) -> dict:
    """What a scheduled run computed and reused, per block and in all (as cache-dit's summary tells its users)."""
    calls = net.calls
    reused = {name: calls - computed for name, computed in zip(net.names, net.computed)}
    return {"denoiser_calls": calls, "calls_skipped": net.skipped_calls,
            "block_calls_computed": int(sum(net.computed)), "block_calls_reused": int(sum(reused.values())),
            "per_block": {name: {"computed": c, "reused": reused[name]} for name, c in zip(net.names, net.computed)}}
