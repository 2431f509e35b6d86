"""Optimizers that drive sampling with a gradient policy: latents and conditioning (``latents.py``), weights
and LoRA adapters (``finetune.py``)."""

from .finetune import FinetuneError, FinetuneResult, add_lora, finetune, load_lora, save_lora
from .heldout import HeldOut
from .latents import OptimizationError, OptimizeResult, optimize_latents

__all__ = ["OptimizationError", "OptimizeResult", "optimize_latents", "FinetuneError", "FinetuneResult", "add_lora",
           "finetune", "load_lora", "save_lora", "HeldOut"]
