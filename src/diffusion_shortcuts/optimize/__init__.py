"""Optimizers that drive sampling with a gradient policy: latents and conditioning (``latents.py``)."""

from .latents import OptimizationError, OptimizeResult, optimize_latents

__all__ = ["OptimizationError", "OptimizeResult", "optimize_latents"]
