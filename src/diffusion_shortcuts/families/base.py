"""The :class:`Family` base class: what the library asks of one kind of denoiser, with real signatures.

A family is a small object with plain data as class attributes (its name, how a gated block's work is
reused, guidance, learned sigma, ...) and methods for everything that needs the model (calling it, its
latent shape, its blocks, its prompts). One module per family (``unet.py``, ``flux.py``, ...) holds all
of it and registers it with :func:`~diffusion_shortcuts.families.registry.register`.

The timestep scale is declared once (:meth:`Family.timestep_scale`) and applied here, in :meth:`Family.call`;
a family's :meth:`Family.forward` receives the timestep as its model takes it and never scales it again.
"""

from __future__ import annotations

from typing import Any

import torch

OUTPUT, RESIDUAL = "output", "residual"   # block kinds: what a gated block's cached work is (see prune.blocks)
CFG, EMBEDDED = "cfg", "embedded"         # what guidance_scale is: a CFG weight, or a model input (Flux-dev)
BATCHED, SEPARATE = "batched", "separate"  # how the two CFG branches are called: one call, or one call each
NONE, LABELS, CLASS_NAMES, TEXT = "none", "labels", "class-names", "text"  # what conditioning a family takes
COND, UNCOND = "cond", "uncond"           # the guidance branches, named as diffusers' cache_context names them


class UnknownModelError(TypeError):
    """A denoiser whose class no registered model family knows."""


def unwrap(model):
    """The model under accelerate/DDP wrappers (``.module``) and torch.compile (``._orig_mod``)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


class Family:
    """One kind of denoiser. Subclasses set the plain data below and implement :meth:`forward`,
    :meth:`blocks`, :meth:`latent_shape` and :meth:`spatial_multiple`; the rest has defaults that fit a
    model with no prompts, no learned variance, image latents, one batched call for both guidance branches, an
    AutoencoderKL and the scheduler's own timesteps.

    Conditioning is what :meth:`call` takes: ``None`` or class labels for pixel UNets, a tensor of prompt
    embeddings or a flat dict for text models. A sample's latents are laid out as :attr:`latent_layout` says
    (``CHW`` for images, ``CFHW`` for video, ``FCHW`` for CogVideoX), with the batch first; a family that wants
    tokens (Flux, Qwen-Image) packs them inside its :meth:`forward`.

    Guidance: :attr:`guidance` says what the sampler's ``guidance_scale`` is (a CFG weight, or a model input);
    families with a CFG weight of their own besides embedded guidance (Flux's and Qwen-Image's ``true_cfg_scale``)
    set :attr:`true_cfg`; :attr:`cfg_calls` says how the stock pipeline calls the two branches (``[uncond; cond]``
    in one call, or one call each, ``cond`` first) and :meth:`combine` how their outputs are combined.
    """

    name: str = ""
    block_kind: str = OUTPUT                     # how a gated block's work is reused: OUTPUT or RESIDUAL
    streams: tuple[str, ...] = ("hidden_states",)  # RESIDUAL blocks: the inputs each returned stream updates
    learned_sigma: bool = False                  # the output has 2C channels: the variance is split off
    guidance: str = CFG                          # what guidance_scale is: CFG (a weight) or EMBEDDED (a model input)
    true_cfg: bool = False                       # a CFG weight of its own besides embedded guidance: true_cfg_scale
    cfg_calls: str = BATCHED                     # BATCHED: one call on [uncond; cond]; SEPARATE: one call each
    default_guidance: float = 1.0
    default_true_cfg: float = 1.0               # the stock call's true_cfg_scale, applied with a negative prompt
    conditioning: str = NONE                     # NONE (or labels), LABELS, CLASS_NAMES or TEXT
    timestep_in_latent_dtype: bool = False       # the stock pipeline rounds the timestep to the latents' dtype
    latent_layout: str = "CHW"                   # one sample's latent axes: CHW (image), CFHW (video), FCHW

    # ---- identity --------------------------------------------------------------------------------------
    def matches(self, model) -> bool:
        """True when this family fits ``model`` (several families may share one class: SD and SDXL)."""
        return True

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # ---- calling ---------------------------------------------------------------------------------------
    def timestep_scale(self, model) -> float:
        """The model's ``timestep`` argument over the scheduler's timestep (Flux: 1/1000)."""
        return 1.0

    def model_timestep(self, model, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The scheduler timestep ``t`` as the model takes it: rounded to the latents' ``dtype`` first where the
        stock pipeline does so, then scaled."""
        if self.timestep_in_latent_dtype:
            t = t.to(dtype)
        scale = self.timestep_scale(model)
        return t if scale == 1.0 else t * scale

    def call(self, model, x: torch.Tensor, t: torch.Tensor, cond: Any, guidance: float | None = None) -> torch.Tensor:
        """The model output shaped like ``x`` (plus learned-variance channels) at scheduler timestep ``t``
        (already broadcast to the batch); ``guidance`` is the scale of EMBEDDED-guidance families, else None."""
        return self.forward(model, x, self.model_timestep(model, t, x.dtype), cond, guidance)

    def forward(self, model, x: torch.Tensor, timestep: torch.Tensor, cond: Any,
                guidance: float | None) -> torch.Tensor:
        """Call ``model`` with its own keyword arguments; ``timestep`` is already in the model's units."""
        raise NotImplementedError

    def timestep_of(self, model_timestep, model) -> float:
        """The scheduler timestep behind a ``timestep`` argument the model was called with (one host read)."""
        return float(torch.as_tensor(model_timestep).reshape(-1)[0]) / self.timestep_scale(unwrap(model))

    def combine(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """The guided output from the two branches' (classifier-free guidance, Ho & Salimans 2022):
        ``uncond + scale * (cond - uncond)``."""
        return uncond + scale * (cond - uncond)

    # ---- shapes ----------------------------------------------------------------------------------------
    def latent_shape(self, model) -> tuple[int, ...]:
        """One latent's shape in :attr:`latent_layout` (``(C, H, W)`` for images) from the model's configuration."""
        return config_shape(model)

    def spatial_multiple(self, model) -> int:
        """What the latents' height and width (their last two axes) must be a multiple of."""
        raise NotImplementedError

    def channel_axis(self) -> int:
        """The channel axis of a batch of latents (1 for ``CHW`` and ``CFHW``, 2 for CogVideoX's ``FCHW``)."""
        return 1 + self.latent_layout.index("C")

    # ---- the VAE ---------------------------------------------------------------------------------------
    def codec(self, pipe):
        """``(decode, encode)``: latents -> images (or videos) in [0, 1] and back, through the pipeline's VAE as
        its stock call decodes (:mod:`.codecs`); the default is an AutoencoderKL's scale and shift."""
        from .codecs import scaled_codec

        return scaled_codec(getattr(pipe, "vae", None))

    # ---- denoisers -------------------------------------------------------------------------------------
    def experts(self, pipe) -> tuple[list[tuple[str, torch.nn.Module]], float | None]:
        """The pipeline's denoisers in the order a generation meets them, by component name, and the scheduler
        timestep at or above which the first one runs (None: one denoiser). Wan 2.2 A14B: ``transformer`` above
        ``boundary_ratio * num_train_timesteps``, then ``transformer_2``."""
        from .registry import denoiser_of

        return [denoiser_of(pipe)], None

    def check_pipeline(self, pipe) -> None:
        """A ValueError naming what is supported, for a pipeline of this family's denoiser that the family does
        not drive (Wan's image-to-video, VACE)."""

    # ---- scheduler -------------------------------------------------------------------------------------
    def set_timesteps(self, scheduler, num_inference_steps: int, device, latent_shape: tuple[int, ...],
                      model) -> None:
        """``scheduler.set_timesteps`` as the family's stock pipeline calls it for latents of this shape."""
        scheduler.set_timesteps(num_inference_steps, device=device)

    # ---- blocks ----------------------------------------------------------------------------------------
    def blocks(self, model) -> list[str]:
        """The gateable blocks, in forward order."""
        raise NotImplementedError

    def whole_step_reuse(self, model) -> bool:
        """True when a step that reuses every default block may reuse the whole output (nothing after the
        blocks depends on the new input or timestep)."""
        return False

    # ---- conditioning ----------------------------------------------------------------------------------
    def encode_prompt(self, pipe, prompts: list[str], negative: list[str] | None, device, size: tuple[int, int],
                      **options) -> tuple[Any, Any]:
        """``(cond, uncond)`` for ``prompts`` through the pipeline's own ``encode_prompt`` (uncond None where
        guidance is embedded). Families with ``conditioning`` TEXT or CLASS_NAMES implement it."""
        raise NotImplementedError(f"{self.name} takes no prompts")

    def null_cond(self, model) -> Any:
        """The unconditional input of a class-conditional model (None where there is none)."""
        return None

    def check_cond(self, model, cond) -> None:
        """A ValueError naming what is wrong with ``cond``, before the model's own IndexError or shape mismatch."""


class TransformerFamily(Family):
    """A patchified transformer whose gated blocks sit on the residual stream (DiT, PixArt, Sana, SD3, Flux)."""

    block_kind = RESIDUAL
    block_lists: tuple[str, ...] = ("transformer_blocks",)

    def blocks(self, model) -> list[str]:
        model = unwrap(model)
        return [f"{name}.{i}" for name in self.block_lists for i in range(len(getattr(model, name)))]

    def spatial_multiple(self, model) -> int:
        patch = unwrap(model).config.patch_size  # Wan's is (t, h, w)
        return int(patch[-1] if isinstance(patch, (tuple, list)) else patch)


class VideoFamily(TransformerFamily):
    """A video transformer: latents ``(C, F, H, W)`` (or frames first), whose default shape is its stock call's
    video (``default_video``: frames, height, width) through its VAE's compression (``compression``: in time, in
    space)."""

    latent_layout = "CFHW"
    default_video: tuple[int, int, int] = (81, 480, 832)
    compression: tuple[int, int] = (4, 8)
    default_fps: int = 16                 # the frame rate its videos are written at (the model card's)
    prefix_decode: bool = False           # a prefix of latent frames decodes to the whole video's first frames

    def latent_shape(self, model) -> tuple[int, int, int, int]:
        (frames, height, width), (in_time, in_space) = self.default_video, self.compression
        sizes = {"C": unwrap(model).config.in_channels, "F": latent_frames(frames, in_time), "H": height // in_space,
                 "W": width // in_space}
        return tuple(sizes[axis] for axis in self.latent_layout)

    def frame_axis(self) -> int:
        """The frame axis of a batch of latents (2 for ``CFHW``, 1 for CogVideoX's ``FCHW``)."""
        return 1 + self.latent_layout.index("F")


def latent_frames(frames: int, time_scale: int) -> int:
    """Latent frames of a video of ``frames`` frames through a causal video VAE that compresses time ``time_scale``x:
    the first frame alone, then one latent frame per ``time_scale`` frames (Wan, HunyuanVideo, LTX, CogVideoX)."""
    return (frames - 1) // time_scale + 1


# ---- helpers the families' calls share ---------------------------------------------------------------

def output_of(out) -> torch.Tensor:
    """The sample tensor of a diffusers model output (``.sample``, a tuple's first item, or the tensor)."""
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, tuple) else out


def as_kwargs(cond, key: str | None) -> dict:
    """A dict condition as keyword arguments; a bare tensor under ``key``; None as nothing."""
    if isinstance(cond, dict):
        return dict(cond)
    if cond is None:
        return {}
    if key is None:
        raise ValueError("this model takes its conditioning as a dict of keyword arguments, got a "
                         f"{type(cond).__name__}")
    return {key: cond}


def nest(kwargs: dict, names: tuple[str, ...], into: str, defaults: dict | None = None) -> dict:
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


def config_shape(model, channels_divisor: int = 1, default_size: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) from a model configuration's ``in_channels`` and ``sample_size``."""
    config = unwrap(model).config
    size = getattr(config, "sample_size", None) or default_size
    if size is None:
        raise ValueError(f"cannot tell the latent size of {type(model).__name__}: pass sample_shape")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (config.in_channels // channels_divisor, h, w)

