"""Sampling with a cache schedule: ``with ds.prune.apply(model, schedule): sampler(noise, cond)``."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .blocks import model_id, resolve_blocks
from .schedule import CacheSchedule, ScheduleError
from .supernet import SuperNet


def enable(model: torch.nn.Module, schedule: CacheSchedule, sampler=None, *, full_graph_steps: bool = False
           ) -> SuperNet:
    """Make ``model`` follow ``schedule`` until :func:`disable`: reused blocks are not computed.

    ``full_graph_steps``: a call that keeps its autograd graph (the one step of SDO's ``Shortcut``) computes
    every block, so that only the no-grad rollout is pruned.

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
        schedule.check_timesteps(sampler.timesteps)
    net = SuperNet(model, schedule.timesteps, schedule.blocks, schedule.kinds, whole_steps=schedule.whole_steps,
                   full_graph_steps=full_graph_steps)
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
def apply(model: torch.nn.Module, schedule: CacheSchedule, sampler=None, *, full_graph_steps: bool = False):
    """Context manager around :func:`enable` / :func:`disable`; yields the :class:`SuperNet`."""
    net = enable(model, schedule, sampler, full_graph_steps=full_graph_steps)
    try:
        yield net
    finally:
        net.detach()
