"""diffusion-shortcuts: one-step gradients through diffusion sampling (SDO) and learned block caching (DiP-GO)."""

from . import conditions, families, gradients, prune, rewards, zoo
from .optimize import (FinetuneError, FinetuneResult, HeldOut, OptimizationError, OptimizeResult, add_lora, finetune,
                       optimize_latents)
from .sampling import PrecisionError, Sampler, call_denoiser

__all__ = ["Sampler", "PrecisionError", "call_denoiser", "conditions", "families", "gradients", "prune", "rewards", "zoo", "optimize_latents", "OptimizeResult",
           "OptimizationError", "finetune", "add_lora", "FinetuneResult", "FinetuneError",
           "HeldOut"]
__version__ = "0.1.0"
