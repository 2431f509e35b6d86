"""The registry: families registered against diffusers classes, found through the model's class and bases.

Like diffusers' ``TransformerBlockRegistry``: ``@register(TheModelClass)`` on a :class:`~.base.Family`
subclass registers one instance of it; :func:`family_of` walks the model's method resolution order, so
subclasses of a registered class work. A class may carry several families told apart by
:meth:`~.base.Family.matches` (Stable Diffusion and SDXL share ``UNet2DConditionModel``); the one
registered last is asked first.
"""

from __future__ import annotations

import hashlib
import json

import torch

from .base import Family, UnknownModelError, unwrap


class Registry:
    """Families registered against classes; :meth:`lookup` walks the model's class and its bases."""

    def __init__(self):
        self._by_class: dict[type, list[Family]] = {}

    def register(self, cls: type, family: Family) -> Family:
        self._by_class.setdefault(cls, []).insert(0, family)  # later (more specific) entries win
        return family

    def remove(self, family_class: type[Family]) -> None:
        """Unregister every family of ``family_class`` (a family tried out in a session, then taken back)."""
        for cls in list(self._by_class):
            self._by_class[cls] = [f for f in self._by_class[cls] if type(f) is not family_class]
            if not self._by_class[cls]:
                del self._by_class[cls]

    def names(self) -> list[str]:
        return [f"{fam.name} ({cls.__name__})" for cls, fams in self._by_class.items() for fam in reversed(fams)]

    def lookup(self, model) -> Family:
        model = unwrap(model)
        for cls in type(model).__mro__:
            for family in self._by_class.get(cls, ()):
                if family.matches(model):
                    return family
        raise UnknownModelError(f"no model family knows {type(model).__name__}; supported: {', '.join(self.names())}")


FAMILIES = Registry()


def register(model_class: type):
    """Class decorator: register one instance of the decorated :class:`Family` for ``model_class``."""
    def decorate(family_class: type[Family]) -> type[Family]:
        FAMILIES.register(model_class, family_class())
        return family_class
    return decorate


def family_of(model) -> Family:
    """The registered :class:`Family` of ``model`` (a clear error naming the class when there is none)."""
    return FAMILIES.lookup(model)


def sample_shape(model) -> tuple[int, int, int]:
    """One latent's (C, H, W) for a registered denoiser, from its configuration."""
    return tuple(family_of(model).latent_shape(model))


def model_id(model) -> str:
    """An identity of the model's architecture: class name and a hash of its configuration."""
    model = unwrap(model)
    config = dict(getattr(model, "config", {}) or {})
    text = json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=str)
    return f"{type(model).__name__}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def adapter_id(model) -> str | None:
    """A hash of the LoRA adapter weights on the model (peft's ``lora_*`` parameters, whatever loaded them), or None
    where it carries none: a training loop records it, so that a resume onto another adapter is refused."""
    weights = sorted((name, p) for name, p in unwrap(model).named_parameters() if "lora_" in name)
    if not weights:
        return None
    digest = hashlib.sha256()
    for name, p in weights:
        digest.update(name.encode())
        digest.update(p.detach().to("cpu", torch.float32).contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def denoiser_of(pipe) -> tuple[str, torch.nn.Module]:
    """A diffusers pipeline's denoiser and its component name (``unet`` or ``transformer``)."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name, getattr(pipe, name)
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")


def vae_scale(pipe) -> int:
    """Image pixels per latent pixel of a pipeline: its VAE's (spatial) scale factor, 1 for a pixel-space pipeline.
    A pipeline that does not state it (DiT's) gets the AutoencoderKL's own: one halving per block after the first."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return 1
    factor = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None)
    return int(factor) if factor is not None else 2 ** (len(vae.config.block_out_channels) - 1)


def vae_time_scale(pipe) -> int:
    """Frames per latent frame of a video pipeline's VAE, as the pipeline states it (``vae_scale_factor_temporal``,
    LTX's ``vae_temporal_compression_ratio``), else its family's."""
    for name in ("vae_scale_factor_temporal", "vae_temporal_compression_ratio"):
        if getattr(pipe, name, None) is not None:
            return int(getattr(pipe, name))
    return int(family_of(denoiser_of(pipe)[1]).compression[0])
