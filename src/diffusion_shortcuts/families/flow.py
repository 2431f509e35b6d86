"""Timesteps of flow-matching pipelines that shift them with the resolution (SD3.5, Flux)."""

from __future__ import annotations

import inspect


def shift_mu(scheduler, image_seq_len: int, max_shift: float) -> float:
    """The resolution-dependent shift of flow-matching schedulers (Esser et al. 2024; diffusers'
    ``calculate_shift``): linear in the token count between (base_seq_len, base_shift) and
    (max_seq_len, max_shift)."""
    config = scheduler.config
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def accepts(fn, name: str) -> bool:
    """True when ``fn`` takes a parameter called ``name`` (schedulers differ in what ``set_timesteps`` takes)."""
    return name in inspect.signature(fn).parameters


def dynamic_shift(scheduler, tokens: int, max_shift: float) -> dict:
    """``{"mu": ...}`` where the scheduler shifts dynamically and takes ``mu``; else nothing."""
    if scheduler.config.get("use_dynamic_shifting", False) and accepts(scheduler.set_timesteps, "mu"):
        return {"mu": shift_mu(scheduler, tokens, max_shift)}
    return {}
