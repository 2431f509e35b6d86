"""diffusion-shortcuts: one-step gradients through diffusion sampling (SDO) and learned block caching (DiP-GO).

The public API, re-exported here and imported on first use (PEP 562), so that ``import diffusion_shortcuts`` and
the command line's start cost nothing until torch is needed (and a Ctrl-C while torch loads is the command's
one line, not a traceback).
"""

import importlib

_SUBMODULES = ("conditions", "families", "gradients", "metrics", "optimize", "prune", "rewards", "sampling", "videos",
               "zoo")
_NAMES = {
    "Sampler": "sampling", "PrecisionError": "sampling", "call_denoiser": "sampling",
    "optimize_latents": "optimize", "OptimizeResult": "optimize", "OptimizationError": "optimize",
    "finetune": "optimize", "add_lora": "optimize", "FinetuneResult": "optimize", "FinetuneError": "optimize",
    "HeldOut": "optimize",
}

__all__ = ["Sampler", "PrecisionError", "call_denoiser", "conditions", "families", "gradients", "metrics", "prune",
           "rewards", "videos", "zoo", "optimize_latents", "OptimizeResult", "OptimizationError", "finetune",
           "add_lora", "FinetuneResult", "FinetuneError", "HeldOut"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
