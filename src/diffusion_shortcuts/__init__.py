"""diffusion-shortcuts: one-step gradients through diffusion sampling (SDO) and learned block caching (DiP-GO)."""

from . import gradients, zoo
from .sampling import Sampler, call_denoiser

__all__ = ["Sampler", "call_denoiser", "gradients", "zoo"]
__version__ = "0.1.0"
