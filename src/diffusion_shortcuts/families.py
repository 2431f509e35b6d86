"""The model-family registry: everything the library asks of a denoiser, in one place per family.

A :class:`Family` says how to call a denoiser (conditioning keyword arguments, timestep scaling, packed
latents), the shape of its latents, how guidance works, how prompts become conditioning (through the
pipeline's own ``encode_prompt``), how its scheduler's timesteps are set, and which blocks a cache
schedule may gate and how their work is reused. Families are registered against diffusers classes and
found through the model's class and its bases (:func:`family_of`), so subclasses work; a registered
class may hold several families told apart by a predicate on the model (Stable Diffusion and SDXL share
``UNet2DConditionModel``). No other module names a model class.

Conditioning is what :meth:`Family.call` takes: ``None`` or class labels for pixel UNets, a tensor of
prompt embeddings or a flat dict for text models (``{"encoder_hidden_states", "text_embeds",
"time_ids"}`` for SDXL; ``{"encoder_hidden_states", "pooled_projections"}`` for SD3 and Flux;
``{"encoder_hidden_states", "encoder_attention_mask"}`` for PixArt). Latents are always ``(B, C, H, W)``;
Flux's token packing happens inside its call.

Adding a family: write its call (and, for a text model, its prompt encoder), then
``FAMILIES.register(TheModelClass, Family(...))``, and prove it in ``tests/test_families.py`` on a tiny
random pipeline against the stock diffusers pipeline.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                       SanaTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel)


OUTPUT, RESIDUAL = "output", "residual"
CFG, EMBEDDED = "cfg", "embedded"


class UnknownModelError(TypeError):
    """A denoiser whose class no registered model family knows."""


def unwrap(model):
    """The model under accelerate/DDP wrappers (``.module``) and torch.compile (``._orig_mod``)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def _output(out) -> torch.Tensor:
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, tuple) else out


def _as_kwargs(cond, key: str | None) -> dict:
    """A dict condition as keyword arguments; a bare tensor under ``key``; None as nothing."""
    if isinstance(cond, dict):
        return dict(cond)
    if cond is None:
        return {}
    if key is None:
        raise ValueError("this model takes its conditioning as a dict of keyword arguments, got a "
                         f"{type(cond).__name__}")
    return {key: cond}


def _nest(kwargs: dict, names: tuple[str, ...], into: str, defaults: dict | None = None) -> dict:
    """Move the flat ``names`` of a condition into the nested dict argument ``into`` (SDXL's and PixArt's
    ``added_cond_kwargs``), keeping one given nested already."""
    nested = dict(defaults or {})
    nested.update(kwargs.pop(into, None) or {})
    for name in names:
        if name in kwargs:
            nested[name] = kwargs.pop(name)
    if nested:
        kwargs[into] = nested
    return kwargs


@dataclass(frozen=True)
class Family:
    """What the library needs to know about one kind of denoiser (see the module docstring).

    ``call(model, x, t, cond, guidance)`` returns the model output shaped like ``x`` (plus learned-variance
    channels where ``learned_sigma``); ``t`` is the scheduler's timestep, already broadcast to the batch,
    and ``guidance`` the scale for families whose guidance is ``"embedded"`` in the model (else None).
    """

    name: str
    call: Callable[..., torch.Tensor]
    blocks: Callable[[Any], list[str]]
    latent_shape: Callable[[Any], tuple[int, int, int]]
    spatial_multiple: Callable[[Any], int]
    reuse: str = OUTPUT                              # how a gated block's work is reused (see prune.blocks)
    streams: tuple[str, ...] = ("hidden_states",)    # residual blocks: the input each output element updates
    timestep_scale: float | Callable = 1.0           # model timestep / scheduler timestep (or model -> that)
    learned_sigma: bool = False                      # output has 2C channels: variance split off
    guidance: str = CFG                              # "cfg": two batched branches; "embedded": a model input
    default_guidance: float = 1.0
    encode_prompt: Callable | None = None            # (pipe, prompts, negative, device, size, **options)
                                                     #   -> (cond, uncond): through pipe.encode_prompt
    null_cond: Callable[[Any], Any] | None = None    # the unconditional input of class-conditional models
    set_timesteps: Callable | None = None            # (scheduler, n, device, latent_shape, model) -> None
    check_cond: Callable | None = None               # (model, cond) -> None, a ValueError naming what is wrong
    whole_step_reuse: Callable[[Any], bool] | None = None  # model -> True when a step that reuses every default
                                                     # block may reuse the whole output (nothing after the blocks
                                                     # depends on the new input or timestep)
    matches: Callable[[Any], bool] = field(default=lambda model: True)

    def timestep_of(self, model_timestep, model) -> float:
        """The scheduler timestep behind the ``timestep`` argument ``model`` was called with."""
        scale = self.timestep_scale(model) if callable(self.timestep_scale) else self.timestep_scale
        return float(torch.as_tensor(model_timestep).reshape(-1)[0]) / scale

    def prepare_timesteps(self, scheduler, num_inference_steps: int, device, latent_shape: tuple[int, ...],
                          model) -> None:
        """``scheduler.set_timesteps`` as the family's stock pipeline calls it for latents of this shape."""
        if self.set_timesteps is None:
            scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            self.set_timesteps(scheduler, num_inference_steps, device, tuple(latent_shape), model)


class Registry:
    """Families registered against classes; :meth:`lookup` walks the model's class and its bases."""

    def __init__(self):
        self._by_class: dict[type, list[Family]] = {}

    def register(self, cls: type, family: Family) -> Family:
        self._by_class.setdefault(cls, []).insert(0, family)  # later (more specific) entries win
        return family

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


def family_of(model) -> Family:
    """The registered :class:`Family` of ``model`` (a clear error naming the class when there is none)."""
    return FAMILIES.lookup(model)


# ---- shapes -------------------------------------------------------------------------------------------

def _config_shape(model, channels_divisor: int = 1, default_size: int | None = None) -> tuple[int, int, int]:
    config = unwrap(model).config
    size = getattr(config, "sample_size", None) or default_size
    if size is None:
        raise ValueError(f"cannot tell the latent size of {type(model).__name__}: pass sample_shape")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (config.in_channels // channels_divisor, h, w)


def _unet_multiple(model) -> int:
    return 2 ** (len(unwrap(model).config.down_block_types) - 1)


def _patch_multiple(model) -> int:
    return int(unwrap(model).config.patch_size)


def _unet_blocks(model) -> list[str]:
    model = unwrap(model)
    names = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
    names += ["mid_block"] if model.mid_block is not None else []
    return names + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]


def _listed_blocks(*lists: str) -> Callable[[Any], list[str]]:
    def blocks(model) -> list[str]:
        model = unwrap(model)
        return [f"{name}.{i}" for name in lists for i in range(len(getattr(model, name)))]
    return blocks


# ---- timesteps of flow-matching pipelines -------------------------------------------------------------

def _shift_mu(scheduler, image_seq_len: int, max_shift: float) -> float:
    """The resolution-dependent shift of flow-matching schedulers (Esser et al. 2024; diffusers'
    ``calculate_shift``): linear in the token count between (base_seq_len, base_shift) and
    (max_seq_len, max_shift)."""
    config = scheduler.config
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _sd3_timesteps(scheduler, n, device, shape, model):
    """StableDiffusion3Pipeline: the scheduler's own sigmas, shifted by the token count where it shifts
    dynamically (SD3.5 configurations)."""
    patch = _patch_multiple(model)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False) and _accepts(scheduler.set_timesteps, "mu"):
        kwargs["mu"] = _shift_mu(scheduler, (shape[-2] // patch) * (shape[-1] // patch), 1.16)
    scheduler.set_timesteps(n, device=device, **kwargs)


def _flux_timesteps(scheduler, n, device, shape, model):
    """FluxPipeline: sigmas linear from 1 to 1/n, shifted by the packed token count."""
    kwargs = {}
    if _accepts(scheduler.set_timesteps, "sigmas") and not scheduler.config.get("use_flow_sigmas", False):
        kwargs["sigmas"] = np.linspace(1.0, 1 / n, n)
    if scheduler.config.get("use_dynamic_shifting", False) and _accepts(scheduler.set_timesteps, "mu"):
        kwargs["mu"] = _shift_mu(scheduler, (shape[-2] // 2) * (shape[-1] // 2), 1.15)
    if "sigmas" in kwargs:
        scheduler.set_timesteps(device=device, **kwargs)
    else:
        scheduler.set_timesteps(n, device=device, **kwargs)


# ---- calls --------------------------------------------------------------------------------------------

def _call_pixel_unet(model, x, t, cond, guidance=None):
    return _output(model(x, t, **_as_kwargs(cond, "class_labels")))


def _call_cond_unet(model, x, t, cond, guidance=None):
    kwargs = _nest(_as_kwargs(cond, "encoder_hidden_states"), ("text_embeds", "time_ids"), "added_cond_kwargs")
    return _output(model(x, t, **kwargs))


def _call_dit(model, x, t, cond, guidance=None):
    return _output(model(x, timestep=t, **_as_kwargs(cond, "class_labels")))


def _call_pixart(model, x, t, cond, guidance=None):
    kwargs = _nest(_as_kwargs(cond, "encoder_hidden_states"), ("resolution", "aspect_ratio"), "added_cond_kwargs",
                   {"resolution": None, "aspect_ratio": None})
    return _output(model(x, timestep=t, **kwargs))


def _call_sd3(model, x, t, cond, guidance=None):
    return _output(model(hidden_states=x, timestep=t, **_as_kwargs(cond, None)))


def _sana_scale(model) -> float:
    return float(unwrap(model).config.get("timestep_scale", 1.0))


def _call_sana(model, x, t, cond, guidance=None):
    return _output(model(x, timestep=t * _sana_scale(model), **_as_kwargs(cond, "encoder_hidden_states")))


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """Flux's tokens: (B, C, H, W) -> (B, H/2 * W/2, 4C), one token per 2x2 patch."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of spatial size (h, w)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def flux_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Flux's rotary position ids of the packed latent tokens: (row, column) per 2x2 patch."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def _call_flux(model, x, t, cond, guidance=None):
    kwargs = _as_kwargs(cond, None)
    h, w = x.shape[-2:]
    text = kwargs["encoder_hidden_states"]
    embedded = guidance is not None and unwrap(model).config.guidance_embeds
    out = model(hidden_states=pack_latents(x), timestep=t.to(x.dtype) / 1000,
                guidance=torch.full((x.shape[0],), float(guidance), device=x.device) if embedded else None,
                img_ids=flux_image_ids(h, w, x.device, x.dtype),
                txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=text.dtype), **kwargs)
    return unpack_latents(_output(out), h, w)


# ---- prompts (through the pipeline's own encode_prompt) -----------------------------------------------

def _encode_sd(pipe, prompts, negative, device, size, **options):
    cond, uncond = pipe.encode_prompt(prompts, device, 1, True, negative, **options)
    return cond, uncond


def _encode_sdxl(pipe, prompts, negative, device, size, **options):
    cond, uncond, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True, negative_prompt=negative,
                                                          **options)
    projection = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                  else int(pooled.shape[-1]))
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=cond.dtype, text_encoder_projection_dim=projection)
    time_ids = time_ids.to(device).repeat(len(prompts), 1)
    return ({"encoder_hidden_states": cond, "text_embeds": pooled, "time_ids": time_ids},
            {"encoder_hidden_states": uncond, "text_embeds": neg_pooled, "time_ids": time_ids})


def _encode_pixart(pipe, prompts, negative, device, size, **options):
    options.setdefault("clean_caption", False)  # cleaning needs bs4 and ftfy
    cond, mask, uncond, neg_mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=True,
                                                      negative_prompt=negative or "", device=device,
                                                      **options)
    extra = {}
    if getattr(pipe.transformer, "use_additional_conditions", False):
        h, w = size
        extra = {"resolution": torch.tensor([[h, w]], dtype=cond.dtype, device=device).repeat(len(prompts), 1),
                 "aspect_ratio": torch.tensor([[h / w]], dtype=cond.dtype, device=device).repeat(len(prompts), 1)}
    return ({"encoder_hidden_states": cond, "encoder_attention_mask": mask, **extra},
            {"encoder_hidden_states": uncond, "encoder_attention_mask": neg_mask, **extra})


def _encode_sana(pipe, prompts, negative, device, size, **options):
    """SanaPipeline's own call prefixes prompts with its "complex human instruction" by default: so do we."""
    default = inspect.signature(pipe.__call__).parameters["complex_human_instruction"].default
    options.setdefault("complex_human_instruction", default)
    cond, mask, uncond, neg_mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=True,
                                                      negative_prompt=negative or "", device=device, **options)
    return ({"encoder_hidden_states": cond, "encoder_attention_mask": mask},
            {"encoder_hidden_states": uncond, "encoder_attention_mask": neg_mask})


def _encode_sd3(pipe, prompts, negative, device, size, **options):
    cond, uncond, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                          do_classifier_free_guidance=True, negative_prompt=negative,
                                                          **options)
    return ({"encoder_hidden_states": cond, "pooled_projections": pooled},
            {"encoder_hidden_states": uncond, "pooled_projections": neg_pooled})


def _encode_flux(pipe, prompts, negative, device, size, **options):
    cond, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, **options)
    return {"encoder_hidden_states": cond, "pooled_projections": pooled}, None


def _encode_dit(pipe, prompts, negative, device, size, **options):
    """DiT's "prompts" are class names (``pipe.get_label_ids``); the null class is the unconditional input."""
    labels = torch.tensor(pipe.get_label_ids(list(prompts)), device=device)
    return labels, _dit_null(pipe.transformer).expand(len(prompts))


def _dit_null(model) -> torch.Tensor:
    return torch.tensor([unwrap(model).config.num_embeds_ada_norm], device=unwrap(model).device)


# ---- conditioning checks (a clear error before the model's own IndexError or shape mismatch) -----------

def _check_unet_cond(model, cond) -> None:
    if cond is None:
        raise ValueError(f"cond: {type(model).__name__} needs conditioning (prompt embeddings), got None")
    states = cond.get("encoder_hidden_states") if isinstance(cond, dict) else cond
    width = model.config.cross_attention_dim
    if isinstance(states, torch.Tensor) and model.config.get("encoder_hid_dim") is None and isinstance(width, int) \
            and states.shape[-1] != width:
        raise ValueError(f"cond: embeddings of width {states.shape[-1]}, but the model's cross-attention takes {width}")


def _check_dit_cond(model, cond) -> None:
    if not isinstance(cond, torch.Tensor) or cond.is_floating_point():
        raise ValueError(f"cond: DiT takes integer class labels, got {type(cond).__name__ if cond is not None else None}")
    highest = model.config.num_embeds_ada_norm  # the null class
    bad = cond[(cond < 0) | (cond > highest)]
    if len(bad):
        raise ValueError(f"cond: class labels {bad.tolist()[:5]} out of range 0-{highest} ({highest}: no class)")


# ---- the registered families --------------------------------------------------------------------------

def _unet_output_is_the_blocks(model) -> bool:
    """A UNet's output is norm, activation and convolution of its last up block's: nothing else enters, except
    UNet2DModel's Fourier time embedding, which divides the output by the timestep."""
    return unwrap(model).config.get("time_embedding_type", "positional") != "fourier"


FAMILIES.register(UNet2DModel, Family(
    name="ddpm-unet", call=_call_pixel_unet, blocks=_unet_blocks, latent_shape=_config_shape,
    spatial_multiple=_unet_multiple, whole_step_reuse=_unet_output_is_the_blocks))

FAMILIES.register(UNet2DConditionModel, Family(
    name="sd-unet", call=_call_cond_unet, blocks=_unet_blocks, latent_shape=_config_shape,
    spatial_multiple=_unet_multiple, default_guidance=7.5, encode_prompt=_encode_sd, check_cond=_check_unet_cond,
    whole_step_reuse=_unet_output_is_the_blocks))

FAMILIES.register(UNet2DConditionModel, Family(
    name="sdxl-unet", call=_call_cond_unet, blocks=_unet_blocks, latent_shape=_config_shape,
    spatial_multiple=_unet_multiple, default_guidance=5.0, encode_prompt=_encode_sdxl, check_cond=_check_unet_cond,
    whole_step_reuse=_unet_output_is_the_blocks,
    matches=lambda model: unwrap(model).config.get("addition_embed_type") == "text_time"))

FAMILIES.register(DiTTransformer2DModel, Family(
    name="dit", call=_call_dit, blocks=_listed_blocks("transformer_blocks"), latent_shape=_config_shape,
    spatial_multiple=_patch_multiple, reuse=RESIDUAL, learned_sigma=True, default_guidance=4.0,
    encode_prompt=_encode_dit, null_cond=_dit_null, check_cond=_check_dit_cond))

FAMILIES.register(PixArtTransformer2DModel, Family(
    name="pixart", call=_call_pixart, blocks=_listed_blocks("transformer_blocks"), latent_shape=_config_shape,
    spatial_multiple=_patch_multiple, reuse=RESIDUAL, learned_sigma=True, default_guidance=4.5,
    encode_prompt=_encode_pixart))

FAMILIES.register(SanaTransformer2DModel, Family(
    name="sana", call=_call_sana, blocks=_listed_blocks("transformer_blocks"), latent_shape=_config_shape,
    spatial_multiple=_patch_multiple, reuse=RESIDUAL, timestep_scale=_sana_scale, learned_sigma=True,
    default_guidance=4.5, encode_prompt=_encode_sana))

FAMILIES.register(SD3Transformer2DModel, Family(
    name="sd3", call=_call_sd3, blocks=_listed_blocks("transformer_blocks"), latent_shape=_config_shape,
    spatial_multiple=_patch_multiple, reuse=RESIDUAL, streams=("encoder_hidden_states", "hidden_states"),
    default_guidance=7.0, encode_prompt=_encode_sd3, set_timesteps=_sd3_timesteps))

FAMILIES.register(FluxTransformer2DModel, Family(
    name="flux", call=_call_flux, blocks=_listed_blocks("transformer_blocks", "single_transformer_blocks"),
    latent_shape=lambda model: _config_shape(model, channels_divisor=4, default_size=128),
    spatial_multiple=lambda model: 2, reuse=RESIDUAL, streams=("encoder_hidden_states", "hidden_states"),
    timestep_scale=1 / 1000, guidance=EMBEDDED, default_guidance=3.5, encode_prompt=_encode_flux,
    set_timesteps=_flux_timesteps))


def denoiser_of(pipe) -> tuple[str, torch.nn.Module]:
    """A diffusers pipeline's denoiser and its component name (``unet`` or ``transformer``)."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name, getattr(pipe, name)
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")


def vae_scale(pipe) -> int:
    """Image pixels per latent pixel of a pipeline: its VAE's scale factor, 1 for a pixel-space pipeline. A
    pipeline that does not state it (DiT's) gets the AutoencoderKL's own: one halving per block after the first."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return 1
    factor = getattr(pipe, "vae_scale_factor", None)
    return int(factor) if factor is not None else 2 ** (len(vae.config.block_out_channels) - 1)


def model_id(model) -> str:
    """An identity of the model's architecture: class name and a hash of its configuration."""
    model = unwrap(model)
    config = dict(getattr(model, "config", {}) or {})
    text = json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=str)
    return f"{type(model).__name__}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def sample_shape(model) -> tuple[int, int, int]:
    """One latent's (C, H, W) for a registered denoiser, from its configuration."""
    return tuple(family_of(model).latent_shape(model))

