"""The differentiable denoising loop: ``Sampler``.

diffusers' pipelines run under ``torch.no_grad()``; every optimizer here needs the loop itself, with
control over which network calls keep their autograd graph. ``Sampler`` runs a diffusers scheduler
(DDIM, DDPM, Euler, DPM-Solver++, flow-matching Euler, ...) over a denoiser (UNet2DConditionModel,
UNet2DModel, DiTTransformer2DModel, PixArtTransformer2DModel, or any callable ``f(x, t, cond)``),
with classifier-free guidance, DiT's learned-variance split and an optional decoder (a VAE), and a
gradient policy from :mod:`diffusion_shortcuts.gradients` deciding what the backward pass sees.

With ``gradient=None`` the whole loop runs under ``torch.no_grad()`` and matches diffusers' own
pipelines for the same scheduler, noise and steps.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from . import gradients as G

Cond = torch.Tensor | dict[str, Any] | None

_STATE_LISTS = ("model_outputs",)  # multistep schedulers' stored model outputs (DPM-Solver, UniPC)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under accelerate/DDP wrappers (``.module``) and torch.compile (``._orig_mod``)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def sample_shape(model) -> tuple[int, int, int]:
    """One sample's (C, H, W) for a diffusers denoiser, from its config's ``in_channels`` and ``sample_size``."""
    config = getattr(unwrap(model), "config", None)
    if config is None or not hasattr(config, "sample_size") or not hasattr(config, "in_channels"):
        raise ValueError(f"cannot tell the sample shape of {type(model).__name__} (no config.sample_size and "
                         "config.in_channels): pass the shape")
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (config.in_channels, h, w)


def count_rows(conditions) -> int:
    """How many conditions a batch holds (1 for None): a tensor's length, a dict's common tensor length,
    a list's length (prompts, labels); an empty batch or a dict of unequal lengths is refused."""
    if conditions is None:
        return 1
    if isinstance(conditions, dict):
        sizes = {v.shape[0] for v in conditions.values() if isinstance(v, torch.Tensor)}
        if len(sizes) != 1:
            raise ValueError(f"conditions: tensors of different batch sizes {sorted(sizes)}")
        return sizes.pop()
    if isinstance(conditions, (torch.Tensor, list, tuple)) and getattr(conditions, "ndim", 1) > 0 and len(conditions):
        return len(conditions)
    raise ValueError("conditions must be a non-empty batch (a tensor, a dict of tensors, a list) or None")


def take_rows(conditions, index: torch.Tensor):
    """Rows ``index`` of a condition batch: a tensor, a dict of them (added conditions), a list (prompts)."""
    if conditions is None:
        return None
    if isinstance(conditions, dict):
        return {k: take_rows(v, index) for k, v in conditions.items()}
    if isinstance(conditions, torch.Tensor):
        return conditions[index.to(conditions.device)]
    return [conditions[int(i)] for i in index]


def _batch_of(cond: Cond) -> int | None:
    if isinstance(cond, torch.Tensor):
        return cond.shape[0] if cond.ndim > 0 else None
    if isinstance(cond, dict):
        sizes = {v.shape[0] for v in cond.values() if isinstance(v, torch.Tensor) and v.ndim > 0}
        return sizes.pop() if len(sizes) == 1 else (None if not sizes else -1)
    return None


def _expand(cond: Cond, batch: int) -> Cond:
    if isinstance(cond, torch.Tensor) and cond.ndim > 0 and cond.shape[0] == 1 and batch != 1:
        return cond.expand(batch, *cond.shape[1:])
    if isinstance(cond, dict):
        return {k: _expand(v, batch) for k, v in cond.items()}
    return cond


def _concat(a: Cond, b: Cond) -> Cond:
    if isinstance(a, dict):
        return {k: _concat(a[k], b[k]) for k in a}
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b.to(a.device)])
    return a


def call_denoiser(model: Callable, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """One call of a diffusers denoiser (or any ``f(x, t, cond)``) returning its output tensor.

    ``cond`` is what the model takes as conditioning: ``encoder_hidden_states`` for UNet2DConditionModel
    and PixArt, ``class_labels`` for DiT and class-conditional UNet2DModel; a dict is passed as
    keyword arguments as it is.
    """
    t_batch = t.reshape(-1).expand(x.shape[0]) if t.ndim <= 1 else t
    kind = type(model).__name__
    kwargs = dict(cond) if isinstance(cond, dict) else {}
    if kind == "DiTTransformer2DModel":
        if not kwargs:
            kwargs["class_labels"] = cond
        out = model(x, timestep=t_batch, **kwargs)
    elif kind == "PixArtTransformer2DModel":
        if not kwargs:
            kwargs["encoder_hidden_states"] = cond
        kwargs.setdefault("added_cond_kwargs", {"resolution": None, "aspect_ratio": None})
        out = model(x, timestep=t_batch, **kwargs)
    elif kind == "UNet2DConditionModel":
        if not kwargs:
            kwargs["encoder_hidden_states"] = cond
        out = model(x, t_batch, **kwargs)
    elif kind == "UNet2DModel":
        if not kwargs and cond is not None:
            kwargs["class_labels"] = cond
        out = model(x, t_batch, **kwargs)
    else:
        out = model(x, t_batch, **kwargs) if kwargs else model(x, t_batch, cond)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, tuple):
        out = out[0]
    return out


def _scale_input(sched, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The scheduler's input preconditioning (Euler's 1/sqrt(sigma^2+1)); flow matching has none."""
    scale = getattr(sched, "scale_model_input", None)
    return scale(x, t) if scale is not None else x


def _spatial_multiple(model) -> int:
    kind = type(model).__name__
    config = getattr(model, "config", None)
    if kind in ("DiTTransformer2DModel", "PixArtTransformer2DModel"):
        return int(config.patch_size)
    if kind in ("UNet2DConditionModel", "UNet2DModel"):
        return 2 ** (len(config.down_block_types) - 1)
    return 1


class Sampler:
    """A first-order (or multistep) diffusion sampler whose backward pass is set by a gradient policy.

    Args:
        model: the denoiser (see :func:`call_denoiser`).
        scheduler: a diffusers scheduler; it is copied per call, never mutated.
        num_inference_steps: N, the number of denoising steps.
        guidance_scale: classifier-free guidance weight w: ``eps = eps_u + w (eps_c - eps_u)``; 1 = none.
        decode: latents -> images (e.g. a VAE decoder, or ``x / 2 + 0.5`` for pixel models);
            None returns the final latents. Keep it differentiable: rewards are taken on its output.
        encode: images -> latents, the inverse of ``decode``, used by :meth:`invert`.
        uncond: the unconditional conditioning for guidance (batch 1 is broadcast), e.g. the null
            label's tokens, empty-prompt embeddings or DiT's null class.
        eta: DDIM's eta (0 = deterministic); noise for eta > 0 is drawn once per call from the call's
            generator, so the same generator state gives the same sample and the same gradient.
        progress: show a progress bar per call.
    """

    def __init__(self, model: Callable, scheduler, num_inference_steps: int = 50, guidance_scale: float = 1.0,
                 decode: Callable | None = None, encode: Callable | None = None, uncond: Cond = None,
                 eta: float = 0.0, progress: bool = False):
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if guidance_scale != 1.0 and uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs uncond (the unconditional conditioning)")
        self.model = model
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = float(guidance_scale)
        self.decode = decode
        self.encode = encode
        self.uncond = uncond
        self.eta = float(eta)
        self.progress = progress
        self._warned_clip = False
        self._step_params = set(inspect.signature(scheduler.step).parameters)

    # ---- schedule -------------------------------------------------------------------------------
    def fresh_scheduler(self, device: torch.device | str | None = None):
        """A copy of the scheduler with its timesteps set for this sampler (state of its own)."""
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(self.num_inference_steps, device=device)
        return sched

    @property
    def timesteps(self) -> torch.Tensor:
        return self.fresh_scheduler().timesteps

    # ---- one network evaluation -----------------------------------------------------------------
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond = None) -> torch.Tensor:
        """The guided model output eps_theta(x, t, c) that the scheduler step consumes.

        Learned-variance channels (DiT, PixArt: twice the latent channels) are split off.
        """
        uncond = self.uncond if uncond is None else uncond
        guided = self.guidance_scale != 1.0
        if guided:
            batch = x.shape[0]
            x_in = torch.cat([x, x])
            cond_in = _concat(_expand(uncond, batch), _expand(cond, batch))
        else:
            x_in, cond_in = x, _expand(cond, x.shape[0])
        out = call_denoiser(self.model, x_in, t, cond_in)
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        if guided:
            out_u, out_c = out.chunk(2)
            out = out_u + self.guidance_scale * (out_c - out_u)
        return out

    # ---- checks ---------------------------------------------------------------------------------
    def _check_inputs(self, latents: torch.Tensor, cond: Cond, start_step: int, policy) -> None:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a (B, C, H, W) tensor, got {shape}")
        config = getattr(self.model, "config", None)
        channels = getattr(config, "in_channels", None)
        if channels is not None and latents.shape[1] != channels:
            raise ValueError(f"latents have {latents.shape[1]} channels but the model takes {channels}: "
                             f"shape {tuple(latents.shape)}")
        multiple = _spatial_multiple(self.model)
        if latents.shape[2] % multiple or latents.shape[3] % multiple:
            raise ValueError(f"latents spatial size {tuple(latents.shape[2:])} must be a multiple of {multiple} "
                             f"for {type(self.model).__name__}")
        batch = _batch_of(cond)
        if batch == -1:
            raise ValueError("cond: its tensors have different batch sizes")
        if batch is not None and batch not in (1, latents.shape[0]):
            raise ValueError(f"cond has batch {batch} but latents have batch {latents.shape[0]}")
        if not isinstance(start_step, int) or not 0 <= start_step < self.num_inference_steps:
            raise ValueError(f"start_step must be an int in [0, {self.num_inference_steps - 1}], got {start_step!r}")
        if policy is not None and not self._warned_clip and self.scheduler.config.get("clip_sample", False):
            warnings.warn("the scheduler has clip_sample=True: clipped pixels of the x0 estimate get zero "
                          "gradient; set clip_sample=False for gradient-based optimization", stacklevel=3)
            self._warned_clip = True

    # ---- the loop -------------------------------------------------------------------------------
    def __call__(self, latents: torch.Tensor, cond: Cond = None, gradient: G.GradientPolicy | str | None = None,
                 start_step: int = 0, generator: torch.Generator | None = None, uncond: Cond = None,
                 callback: Callable[[dict], None] | None = None, return_latents: bool = False):
        """Denoise ``latents`` from step ``start_step`` to the end; return the (decoded) final sample.

        ``latents`` is unit-variance noise when ``start_step == 0`` (scaled by the scheduler's
        ``init_noise_sigma`` here, as diffusers' pipelines do), else the latent entering step
        ``start_step`` as the sampler itself produced it. ``callback({'x', 'i', 't', 'denoised'})`` is
        called after every step. With ``return_latents`` the result is ``(images, final_latents)``.
        """
        policy = G.resolve(gradient)
        self._check_inputs(latents, cond, start_step, policy)
        if policy is None:
            with torch.no_grad():
                return self._run(latents, cond, None, start_step, generator, uncond, callback, return_latents)
        return self._run(latents, cond, policy, start_step, generator, uncond, callback, return_latents)

    def _reset_model_state(self) -> None:
        """Start a generation: reset the model's stateful diffusers hooks (block caches such as a cache
        schedule's or FirstBlockCache's), as diffusers' pipelines do after each call."""
        registry = getattr(self.model, "_diffusers_hook", None)
        if registry is not None:
            registry.reset_stateful_hooks()

    def _run(self, latents, cond, policy, start_step, generator, uncond, callback, return_latents):
        self._reset_model_state()
        sched = self.fresh_scheduler(latents.device)
        timesteps = sched.timesteps[start_step:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start_step)
        n = len(timesteps)
        plan = policy.plan(n, generator) if policy is not None else G.StepPlan((G.NOGRAD,) * n)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        step_generator = torch.Generator(device=latents.device).manual_seed(seed)
        step_kwargs = {}
        if "generator" in self._step_params:
            step_kwargs["generator"] = step_generator
        if "eta" in self._step_params:
            step_kwargs["eta"] = self.eta

        x = latents * getattr(sched, "init_noise_sigma", 1.0) if start_step == 0 else latents
        for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not self.progress, leave=False)):
            mode = plan.modes[i]
            if plan.detach_before == i:
                x = x.detach()
                self._detach_state(sched, last_only=False)

            def eps_fn(x_in, t=t):
                return self.predict(_scale_input(sched, x_in, t), t, cond, uncond)

            if mode == G.GRAPH:
                eps = eps_fn(x)
            elif mode == G.CHECKPOINT:
                eps = checkpoint(eps_fn, x, use_reentrant=False)
            else:
                with torch.no_grad():
                    eps = eps_fn(x).detach()
            out = sched.step(eps, t, x, **step_kwargs)
            x = out.prev_sample
            if mode == G.NOGRAD and policy is not None:
                self._detach_state(sched, last_only=True)
            if callback is not None:
                callback({"x": x, "i": start_step + i, "t": t, "denoised": getattr(out, "pred_original_sample", None)})
        images = self.decode(x) if self.decode is not None else x
        return (images, x) if return_latents else images

    @staticmethod
    def _detach_state(sched, last_only: bool) -> None:
        for name in _STATE_LISTS:
            stored = getattr(sched, name, None)
            if not stored:
                continue
            targets = [len(stored) - 1] if last_only else range(len(stored))
            for j in targets:
                if isinstance(stored[j], torch.Tensor):
                    stored[j] = stored[j].detach()

    # ---- inversion ------------------------------------------------------------------------------
    @torch.no_grad()
    def invert(self, images_or_latents: torch.Tensor, cond: Cond = None, to_step: int = 0,
               latents: bool | None = None, uncond: Cond = None) -> torch.Tensor:
        """DDIM inversion (Song et al. 2021, eq. 13 run backwards): the latent entering step ``to_step``.

        Given clean images (encoded with ``encode`` when the sampler has one, unless
        ``latents=True``), run the deterministic DDIM update from the clean sample up to timestep
        ``timesteps[to_step]``, with the model evaluated at the current latent and the next (higher)
        timestep, as diffusers' DDIMInverseScheduler does. ``sampler(result, cond,
        start_step=to_step)`` then reconstructs the input approximately; optimizing that latent edits
        the given image. Requires a scheduler with ``alphas_cumprod`` and epsilon prediction.
        """
        self._reset_model_state()
        sched = self.fresh_scheduler(images_or_latents.device)
        alphas = getattr(sched, "alphas_cumprod", None)
        if alphas is None or sched.config.get("prediction_type", "epsilon") != "epsilon":
            raise NotImplementedError("invert needs a DDIM-family scheduler (alphas_cumprod) with epsilon prediction; "
                                      f"got {type(sched).__name__}")
        if not isinstance(to_step, int) or not 0 <= to_step < self.num_inference_steps:
            raise ValueError(f"to_step must be an int in [0, {self.num_inference_steps - 1}], got {to_step!r}")
        use_encode = self.encode is not None and not latents
        x = self.encode(images_or_latents) if use_encode else images_or_latents
        self._check_inputs(x, cond, to_step, None)
        timesteps = sched.timesteps
        alphas = alphas.to(x.device, x.dtype)
        for j in range(len(timesteps) - 1, to_step - 1, -1):
            t = timesteps[j]
            a_t = alphas[t]
            a_prev = alphas[timesteps[j + 1]] if j + 1 < len(timesteps) else torch.ones_like(a_t)
            eps = self.predict(_scale_input(sched, x, t), t, cond, uncond)
            x0 = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            x = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        return x

    # ---- adapters -------------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe, num_inference_steps: int = 50, guidance_scale: float | None = None,
                      uncond: Cond = None, **kwargs) -> "Sampler":
        """A Sampler for a local diffusers pipeline: DDPM/DDIM, StableDiffusion, DiT, PixArt-alpha.

        Conditioning is what the pipeline's denoiser takes: ``prompt_embeds`` for Stable Diffusion
        (pass the negative/empty-prompt embeddings as ``uncond``), class labels for DiT (``uncond``
        defaults to the null class), ``{"encoder_hidden_states", "encoder_attention_mask"}`` for
        PixArt. Images are decoded by the pipeline's VAE (if any) and mapped to [0, 1] without
        clamping, so that they stay differentiable.
        """
        model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if model is None:
            raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
        kind = type(model).__name__
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            scale = vae.config.scaling_factor

            def decode(z):
                return vae.decode(z / scale).sample / 2 + 0.5

            def encode(images):
                return vae.encode(images * 2 - 1).latent_dist.mean * scale
        else:
            def decode(x):
                return x / 2 + 0.5

            def encode(images):
                return images * 2 - 1
        defaults = {"UNet2DConditionModel": 7.5, "DiTTransformer2DModel": 4.0, "PixArtTransformer2DModel": 4.5}
        if guidance_scale is None:
            guidance_scale = defaults.get(kind, 1.0)
        if uncond is None and kind == "DiTTransformer2DModel":
            uncond = torch.tensor([model.config.num_embeds_ada_norm], device=model.device)
        if uncond is None and guidance_scale != 1.0:
            raise ValueError(f"{type(pipe).__name__}: guidance_scale={guidance_scale} needs uncond "
                             "(e.g. the empty-prompt embeddings); pass guidance_scale=1.0 for none")
        return cls(model, pipe.scheduler, num_inference_steps, guidance_scale, decode=decode, encode=encode,
                   uncond=uncond, **kwargs)
