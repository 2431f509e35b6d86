"""The model-family registry: everything the library asks of a denoiser, one module per family.

- :mod:`.base`: the :class:`Family` base class (real method signatures, plain data as class attributes; the
  timestep scale declared once and applied by the base) and the helpers families' calls share;
- :mod:`.registry`: ``@register(TheModelClass)``, :func:`family_of` (through the model's class and bases, so
  subclasses work) and the pipeline helpers;
- one module per family: :mod:`.unet` (``ddpm-unet``, ``sd-unet``), :mod:`.sdxl`, :mod:`.dit`, :mod:`.pixart`,
  :mod:`.sana`, :mod:`.sd3`, :mod:`.flux`.

No other module of the library names a model class. Adding a family: one new module here with its
``@register(...)`` subclass of :class:`Family`, imported below, and a tiny random pipeline in the tests
(``tests/tiny_pipelines.py`` and ``FAMILIES`` in ``tests/test_families.py``), proven equal to the stock pipeline.
"""

from .base import (CFG, CLASS_NAMES, EMBEDDED, LABELS, NONE, OUTPUT, RESIDUAL, TEXT, Family, TransformerFamily,
                   UnknownModelError, unwrap)
from .registry import FAMILIES, adapter_id, denoiser_of, family_of, model_id, register, sample_shape, vae_scale
from . import unet, sdxl, dit, pixart, sana, sd3, flux  # noqa: E402,F401  (each registers its families, listed in this order)
from .flux import flux_image_ids, pack_latents, unpack_latents

__all__ = ["CFG", "CLASS_NAMES", "EMBEDDED", "LABELS", "NONE", "OUTPUT", "RESIDUAL", "TEXT", "Family",
           "TransformerFamily", "UnknownModelError", "unwrap", "FAMILIES", "adapter_id", "denoiser_of", "family_of",
           "model_id", "register", "sample_shape", "vae_scale", "flux_image_ids", "pack_latents", "unpack_latents"]
