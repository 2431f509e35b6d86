"""The model-family registry: everything the library asks of a denoiser, one module per family.

- :mod:`.base`: the :class:`Family` base class (real method signatures, plain data as class attributes; the
  timestep scale declared once and applied by the base) and the helpers families' calls share;
- :mod:`.registry`: ``@register(TheModelClass)``, :func:`family_of` (through the model's class and bases, so
  subclasses work) and the pipeline helpers;
- :mod:`.codecs`: latents <-> images or videos through the VAEs (scale and shift, per-channel mean and std);
- one module per family: :mod:`.unet` (``ddpm-unet``, ``sd-unet``), :mod:`.sdxl`, :mod:`.dit`, :mod:`.pixart`,
  :mod:`.sana`, :mod:`.sd3`, :mod:`.flux`, :mod:`.qwenimage`, :mod:`.wan`, :mod:`.hunyuanvideo`, :mod:`.ltx`,
  :mod:`.cogvideox`.

No other module of the library names a model class. Adding a family: one new module here with its
``@register(...)`` subclass of :class:`Family` (every module of this package is imported, none is listed), and a
tiny random pipeline in ``tests/tiny/`` that the family tests find by themselves.
"""

import importlib
import pkgutil

from .base import (BATCHED, CFG, CLASS_NAMES, COND, EMBEDDED, LABELS, NONE, OUTPUT, RESIDUAL, SEPARATE, TEXT, UNCOND,
                   Family, TransformerFamily, UnknownModelError, VideoFamily, as_kwargs, output_of,
                   unwrap)
from .base import latent_frames
from .registry import (FAMILIES, adapter_id, denoiser_of, family_of, model_id, register, sample_shape, vae_scale,
                       vae_time_scale)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):  # each family module registers itself
    importlib.import_module(f"{__name__}.{_module}")

from .flux import flux_image_ids, pack_latents, unpack_latents  # noqa: E402

__all__ = ["BATCHED", "CFG", "CLASS_NAMES", "COND", "EMBEDDED", "LABELS", "NONE", "OUTPUT", "RESIDUAL", "SEPARATE",
           "TEXT", "UNCOND", "Family", "TransformerFamily", "VideoFamily", "UnknownModelError", "as_kwargs",
           "output_of", "unwrap", "FAMILIES", "adapter_id", "denoiser_of", "family_of", "model_id", "register",
           "sample_shape", "vae_scale", "vae_time_scale", "latent_frames", "flux_image_ids",
           "pack_latents", "unpack_latents"]
