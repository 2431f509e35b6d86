"""The differentiable denoising loop: ``Sampler``.

diffusers' pipelines run under ``torch.no_grad()``; every optimizer here needs the loop itself, with
control over which network calls keep their autograd graph. ``Sampler`` runs a diffusers scheduler
(DDIM, DDPM, Euler, DPM-Solver++, flow-matching Euler, ...) over a denoiser of any registered model
family (:mod:`diffusion_shortcuts.families`: pixel UNets, Stable Diffusion 1.x/2.x and SDXL, DiT,
PixArt, Sana, SD3, Flux), with classifier-free or embedded guidance, learned-variance splits and an optional
decoder (a VAE), and a gradient policy from :mod:`diffusion_shortcuts.gradients` deciding what the
backward pass sees. Latents are ``(B, C, H, W)`` for images and ``(B, C, F, H, W)`` for video (each family
says its layout); the family packs them where its model wants tokens.

With ``gradient=None`` the whole loop runs under ``torch.no_grad()`` and matches diffusers' own
pipelines for the same scheduler, noise and steps.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import json
import math
import warnings
from typing import Callable, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from . import conditions as C
from . import gradients as G
from .conditions import Cond
from .precision import PrecisionError, check_finite
from .families import (BATCHED, CFG, CLASS_NAMES, COND, EMBEDDED, TEXT, UNCOND, denoiser_of, family_of, model_id,
                       sample_shape, unwrap, vae_scale)

__all__ = ["PrecisionError", "Sampler", "SamplingStep", "call_denoiser", "current_step", "sample_shape", "unwrap"]
_STATE_LISTS = ("model_outputs",)  # multistep schedulers' stored model outputs (DPM-Solver, UniPC)
_STATE_SAMPLES = ("last_sample",)  # stored samples (UniPC's corrector mixes the previous step's sample in)


class SamplingStep(NamedTuple):
    """What the Sampler tells whoever wraps its denoiser about the call in progress: the step ``index`` of the
    generation (counted in the sampler's ``timesteps``, whatever ``start_step``), those timesteps as Python
    floats, and the guidance ``branch`` the call computes (``"cond"`` or ``"uncond"`` where the family calls them
    separately, ``""`` for one call on both or on no guidance). A cache schedule finds its step and keeps its
    block state per branch from it, with no read of the timestep tensor back to the host."""

    index: int
    timesteps: tuple[float, ...]
    branch: str = ""


class Branches(NamedTuple):
    """The conditioning of the two guidance branches of a family that calls them separately (never concatenated:
    a prompt and a negative prompt may have different lengths)."""

    uncond: Cond
    cond: Cond


_CURRENT_STEP: contextvars.ContextVar[SamplingStep | None] = contextvars.ContextVar("sampling_step", default=None)


def current_step() -> SamplingStep | None:
    """The :class:`SamplingStep` of the denoiser call in progress under a :class:`Sampler` (None outside one, as
    under a stock pipeline call). A gradient checkpoint recomputing a step in the backward pass announces it again."""
    return _CURRENT_STEP.get()


@contextlib.contextmanager
def announced(step: SamplingStep | None):
    """Announce ``step`` (:func:`current_step`) for the calls inside the block; None announces nothing new."""
    if step is None:
        yield
        return
    token = _CURRENT_STEP.set(step)
    try:
        yield
    finally:
        _CURRENT_STEP.reset(token)


def call_denoiser(model: Callable, x: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float | None = None,
                  dtype: torch.dtype | None = None, *, family=None) -> torch.Tensor:
    """One call of a registered denoiser at scheduler timestep ``t``, as its model family calls it
    (:mod:`diffusion_shortcuts.families`); returns the output tensor shaped like ``x`` (plus any
    learned-variance channels). ``guidance`` is the scale of families with embedded guidance (Flux).

    A model in lower precision (bfloat16, float16) gets ``x`` and the floating conditioning in its dtype
    and gives its output back in ``x``'s: latents and the scheduler arithmetic stay in ``x``'s precision.
    ``dtype`` is the model's, when the caller has looked it up already (:func:`model_dtype` walks every
    submodule, a millisecond and more per call on a small model), and ``family`` the model's family likewise.
    """
    t_batch = t.reshape(-1).expand(x.shape[0]) if t.ndim <= 1 else t
    dtype = model_dtype(model, x.dtype) if dtype is None else dtype
    family = family_of(model) if family is None else family
    if dtype == x.dtype or not dtype.is_floating_point:
        return family.call(model, x, t_batch, cond, guidance)
    cond = C.tree_map(lambda leaf: leaf.to(dtype) if leaf.is_floating_point() else leaf, cond)
    return family.call(model, x.to(dtype), t_batch, cond, guidance).to(x.dtype)


def model_dtype(model: Callable, default: torch.dtype) -> torch.dtype:
    """The precision a denoiser computes in (diffusers' ``dtype``: layerwise casting's compute dtype, else its
    first floating parameter's); ``default`` for a plain callable."""
    return getattr(unwrap(model), "dtype", default)


def _scale_input(sched, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The scheduler's input preconditioning (Euler's 1/sqrt(sigma^2+1)); flow matching has none."""
    scale = getattr(sched, "scale_model_input", None)
    return scale(x, t) if scale is not None else x


class Sampler:
    """A first-order (or multistep) diffusion sampler whose backward pass is set by a gradient policy.

    Args:
        model: the denoiser (see :func:`call_denoiser`).
        scheduler: a diffusers scheduler; it is copied per call, never mutated.
        num_inference_steps: N, the number of denoising steps.
        guidance_scale: classifier-free guidance weight w: ``eps = eps_u + w (eps_c - eps_u)``; 1 = none.
            For families with embedded guidance (Flux-dev, HunyuanVideo) it is the model's guidance input instead.
        true_cfg_scale: the classifier-free guidance weight of families with embedded guidance and a CFG of their
            own (Flux, Qwen-Image: the stock call's ``true_cfg_scale`` with a negative prompt); 1 = none.
        experts: the denoisers after ``model`` with the scheduler timestep below which each takes over, as
            ``[(model_2, boundary_timestep)]`` (Wan 2.2 A14B: ``transformer_2`` below ``boundary_ratio * 1000``);
            ``guidance_scale_2`` is the CFG weight while the second one runs (default ``guidance_scale``).
        decode: latents -> images (e.g. a VAE decoder, or ``x / 2 + 0.5`` for pixel models);
            None returns the final latents. Keep it differentiable: rewards are taken on its output.
        encode: images -> latents, the inverse of ``decode``, used by :meth:`invert`.
        uncond: the unconditional conditioning for guidance (batch 1 is broadcast), e.g. the null
            label's tokens, empty-prompt embeddings or DiT's null class.
        eta: DDIM's eta (0 = deterministic); noise for eta > 0 is drawn once per call from the call's
            generator, so the same generator state gives the same sample and the same gradient.
        progress: show a progress bar per call.
        sample_shape: one latent's (C, H, W) that :attr:`timesteps` is set for (flow-matching schedulers
            shift their timesteps with the resolution); default: the model configuration's size.
        pipeline: the diffusers pipeline behind the sampler, for :meth:`encode_prompt`.
        prompt_options: extra arguments of the pipeline's ``encode_prompt`` (``max_sequence_length`` of
            T5-encoded families, ``clip_skip``), the same for prompts and the negative prompt.
    """

    def __init__(self, model: Callable, scheduler, num_inference_steps: int = 50, guidance_scale: float = 1.0,
                 decode: Callable | None = None, encode: Callable | None = None, uncond: Cond = None,
                 eta: float = 0.0, progress: bool = False, sample_shape: tuple[int, ...] | None = None,
                 pipeline=None, prompt_options: dict | None = None, true_cfg_scale: float = 1.0,
                 experts: list | None = None, guidance_scale_2: float | None = None):
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        trained = scheduler.config.get("num_train_timesteps", None)
        if trained is not None and num_inference_steps > trained:
            raise ValueError(f"num_inference_steps={num_inference_steps} is more than the scheduler's {trained} "
                             "training timesteps")
        for name, value in (("guidance_scale", guidance_scale), ("true_cfg_scale", true_cfg_scale),
                            ("guidance_scale_2", 1.0 if guidance_scale_2 is None else guidance_scale_2)):
            if not math.isfinite(float(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        self.family = family_of(model)
        if true_cfg_scale != 1.0 and not self.family.true_cfg:
            raise ValueError(f"true_cfg_scale is for families with embedded guidance and a CFG of their own (Flux, "
                             f"Qwen-Image); {self.family.name} takes guidance_scale")
        self.model = model
        self.experts = [(m, float(boundary)) for m, boundary in (experts or [])]
        for other, _ in self.experts:
            if family_of(other) is not self.family:
                raise ValueError(f"experts must be of one family: {self.family.name} and {family_of(other).name}")
        self.expert_names = ["denoiser", *(f"expert_{i + 2}" for i in range(len(self.experts)))]  # from_pipeline:
        self.true_cfg_scale = float(true_cfg_scale)  # the pipeline's component names
        self.guidance_scale_2 = None if guidance_scale_2 is None else float(guidance_scale_2)
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else self._default_shape(model)
        self.pipeline = pipeline
        self.prompt_options = dict(prompt_options or {})
        self.scheduler = scheduler
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = float(guidance_scale)
        if self._guided and uncond is None:
            scale = "guidance_scale" if self.family.guidance == CFG else "true_cfg_scale"
            raise ValueError(f"{scale}={getattr(self, scale):g} needs uncond (the unconditional conditioning)")
        self.decode = decode
        self.encode = encode
        self.uncond = uncond
        self.eta = float(eta)
        self.progress = progress
        self._warned_clip = False
        self._step_params = set(inspect.signature(scheduler.step).parameters)
        self._timestep_values: dict[tuple, tuple[float, ...]] = {}

    @property
    def models(self) -> list:
        """The denoisers a generation meets, in order: ``model`` and any experts after it."""
        return [self.model, *(m for m, _ in self.experts)]

    def expert_at(self, t: float) -> int:
        """Which of :attr:`models` runs at scheduler timestep ``t`` (the first at or above its successor's boundary,
        as WanPipeline switches)."""
        index = 0
        for i, (_, boundary) in enumerate(self.experts):
            if t < boundary:
                index = i + 1
        return index

    def cfg_scale(self, expert: int = 0) -> float:
        """The classifier-free guidance weight while expert ``expert`` runs (1: none)."""
        if self.family.guidance == CFG:
            return self.guidance_scale_2 if expert > 0 and self.guidance_scale_2 is not None else self.guidance_scale
        return self.true_cfg_scale if self.family.true_cfg else 1.0

    def _default_shape(self, model) -> tuple[int, int, int] | None:
        try:
            return tuple(self.family.latent_shape(model))
        except (AttributeError, ValueError):
            return None

    # ---- schedule -------------------------------------------------------------------------------
    def fresh_scheduler(self, device: torch.device | str | None = None, latent_shape: tuple[int, ...] | None = None):
        """A copy of the scheduler with its timesteps set for this sampler and latents of ``latent_shape``
        (default: :attr:`sample_shape`), as the family's stock pipeline sets them (state of its own)."""
        sched = copy.deepcopy(self.scheduler)
        shape = latent_shape if latent_shape is not None else (1, *(self.sample_shape or (1, 1, 1)))
        self.family.set_timesteps(sched, self.num_inference_steps, device, tuple(shape), self.model)
        return sched

    def describe(self) -> dict:
        """What about this sampler changes the samples it makes: model, scheduler, steps, guidance, shape.
        Training loops record it with their settings, so that a resume with another sampler is refused."""
        described = {"model": model_id(self.model), "scheduler": type(self.scheduler).__name__,
                     "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                     "eta": self.eta, "sample_shape": list(self.sample_shape) if self.sample_shape else None}
        if self.true_cfg_scale != 1.0:
            described["true_cfg_scale"] = self.true_cfg_scale
        if self.experts:
            described["experts"] = [[model_id(m), boundary] for m, boundary in self.experts]
            described["guidance_scale_2"] = self.guidance_scale_2
        return described

    @property
    def timesteps(self) -> torch.Tensor:
        """The timesteps of a generation at :attr:`sample_shape`."""
        return self.fresh_scheduler().timesteps

    def timestep_values(self, latent_shape: tuple[int, ...]) -> tuple[float, ...]:
        """The timesteps of a generation of latents shaped ``latent_shape``, as Python floats, computed on the CPU
        once per scheduler configuration, step count and shape (no read back from the device per generation)."""
        config = json.dumps(dict(self.scheduler.config), sort_keys=True, default=str)
        key = (type(self.scheduler).__name__, config, self.num_inference_steps, tuple(latent_shape[1:]))
        if key not in self._timestep_values:
            self._timestep_values[key] = tuple(self.fresh_scheduler("cpu", latent_shape).timesteps.tolist())
        return self._timestep_values[key]

    # ---- one network evaluation -----------------------------------------------------------------
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """The guided model output eps_theta(x, t, c) that the scheduler step consumes.

        Classifier-free guidance batches ``[uncond; cond]`` in one call, or calls the two branches one after the
        other (``cond`` first) where the family's stock pipeline does, and combines them as the family does;
        embedded guidance (Flux) passes the scale to the model. Learned-variance channels (DiT, PixArt: twice the
        latent channels) are split off. ``dtype`` is the model's, looked up once per generation by the loop.
        """
        dtype = model_dtype(self.model, x.dtype) if dtype is None else dtype
        return self._predict(x, t, self.model_conditioning(cond, uncond, x.shape[0], dtype), dtype)

    @property
    def _guided(self) -> bool:
        """Two guidance branches per step (whichever expert runs: the stock loop calls both throughout)."""
        return any(self.cfg_scale(e) != 1.0 for e in range(len(self.models)))

    def model_conditioning(self, cond: Cond, uncond: Cond, batch: int, dtype: torch.dtype) -> Cond:
        """The conditioning of one step's denoiser calls on ``batch`` latents, floating leaves in the model's
        ``dtype``: under classifier-free guidance ``[uncond; cond]`` for one batched call, or :class:`Branches` for
        a family that calls them separately. The sampling loop makes it once per generation."""
        uncond = self.uncond if uncond is None else uncond

        def cast(c):
            return C.tree_map(lambda leaf: leaf.to(dtype) if leaf.is_floating_point() and dtype.is_floating_point
                              else leaf, c)

        if not self._guided:
            return cast(C.expand(cond, batch))
        if self.family.cfg_calls != BATCHED:
            return Branches(cast(C.expand(uncond, batch)), cast(C.expand(cond, batch)))
        try:
            return cast(C.concat(C.expand(uncond, batch), C.expand(cond, batch)))
        except RuntimeError as exc:
            raise C.ConditionError(f"uncond does not batch with cond ({str(exc).splitlines()[0]}): {self.family.name} "
                                   "calls both guidance branches in one batch, so their conditioning must have "
                                   "one shape (pad prompts to one length, as its pipeline does)") from None

    def _call(self, expert: int, x: torch.Tensor, t: torch.Tensor, cond: Cond, dtype: torch.dtype,
              branch: str = "") -> torch.Tensor:
        """One denoiser call of ``expert`` on ``branch``, announced (:func:`current_step`) and named for diffusers'
        own cache hooks (``cache_context``) as the stock pipelines name it."""
        model = self.models[expert]
        embedded = (self.guidance_scale_2 if expert > 0 and self.guidance_scale_2 is not None else
                    self.guidance_scale) if self.family.guidance == EMBEDDED else None
        step = current_step()
        context = contextlib.nullcontext()
        if hasattr(model, "cache_context"):  # diffusers' CacheMixin models: its own caches need the call named
            context = model.cache_context(branch or "cond_uncond",
                                          step_index=step.index if step is not None else None)
        with announced(step._replace(branch=branch) if step is not None and branch else None), context:
            out = call_denoiser(model, x, t, cond, embedded, dtype, family=self.family)
        axis = self.family.channel_axis()
        if self.family.learned_sigma and out.shape[axis] == 2 * x.shape[axis]:
            out = out.narrow(axis, 0, x.shape[axis])
        return out

    def _predict(self, x: torch.Tensor, t: torch.Tensor, cond_in: Cond, dtype: torch.dtype) -> torch.Tensor:
        step = current_step()
        expert = self.expert_at(step.timesteps[step.index] if step is not None else float(t)) if self.experts else 0
        if not self._guided:
            return self._call(expert, x, t, cond_in, dtype)
        if isinstance(cond_in, Branches):
            out_c = self._call(expert, x, t, cond_in.cond, dtype, COND)
            out_u = self._call(expert, x, t, cond_in.uncond, dtype, UNCOND)
        else:
            out_u, out_c = self._call(expert, torch.cat([x, x]), t, cond_in, dtype).chunk(2)
        return self.family.combine(out_u, out_c, self.cfg_scale(expert))

    # ---- checks ---------------------------------------------------------------------------------
    def _check_inputs(self, latents: torch.Tensor, cond: Cond, start_step: int, policy, uncond: Cond,
                      dtype: torch.dtype) -> None:
        layout = self.family.latent_layout
        if not isinstance(latents, torch.Tensor) or latents.ndim != 1 + len(layout) or latents.shape[0] < 1:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a (B, {', '.join(layout)}) tensor with B >= 1 for "
                             f"{type(unwrap(self.model)).__name__}, got {shape}")
        if not latents.is_floating_point() or not torch.isfinite(latents.detach()).all():
            raise ValueError(f"latents must be finite floating-point values, got {latents.dtype} with "
                             f"{int((~torch.isfinite(latents.detach().float())).sum())} non-finite entries")
        if latents.dtype not in (torch.float32, dtype):
            raise ValueError(f"latents are {str(latents.dtype).removeprefix('torch.')}: pass float32 latents (the "
                             f"denoiser computes in {str(dtype).removeprefix('torch.')}; the latents and the "
                             "scheduler's arithmetic stay float32)")
        if self._guided:
            try:
                C.check_fits(self.uncond if uncond is None else uncond, latents.shape[0])
            except C.ConditionError as exc:
                raise C.ConditionError(f"uncond: {str(exc).removeprefix('cond ')} (one row is broadcast)") from None
        axis = self.family.channel_axis()
        channels = self.sample_shape[axis - 1] if self.sample_shape is not None else None
        if channels is not None and latents.shape[axis] != channels:
            raise ValueError(f"latents have {latents.shape[axis]} channels but the model takes {channels}: "
                             f"shape {tuple(latents.shape)}")
        multiple = self.family.spatial_multiple(self.model)
        if latents.shape[-2] % multiple or latents.shape[-1] % multiple:
            raise ValueError(f"latents spatial size {tuple(latents.shape[-2:])} must be a multiple of {multiple} "
                             f"for {type(unwrap(self.model)).__name__}")
        C.check_fits(cond, latents.shape[0])
        self.family.check_cond(unwrap(self.model), cond)
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
        dtype = model_dtype(self.model, torch.float32)  # walks the model's modules: once per generation
        self._check_inputs(latents, cond, start_step, policy, uncond, dtype)
        if policy is None:
            with torch.no_grad():
                return self._run(latents, cond, None, start_step, generator, uncond, callback, return_latents, dtype)
        return self._run(latents, cond, policy, start_step, generator, uncond, callback, return_latents, dtype)

    def _reset_model_state(self) -> None:
        """Start a generation: reset the models' stateful diffusers hooks (block caches such as a cache
        schedule's or FirstBlockCache's), as diffusers' pipelines do after each call. On a CacheMixin model the
        walk of its hooks is refreshed first, so that hooks added since the last generation (diffusers' own caches
        sit on its blocks only) receive the cache_context every call is named with (:meth:`_call`)."""
        for model in self.models:
            model = unwrap(model)
            if hasattr(model, "cache_context"):
                from diffusers.hooks import HookRegistry

                HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
            registry = getattr(model, "_diffusers_hook", None)
            if registry is None:
                continue
            children = getattr(registry, "_get_child_registries", None)  # diffusers' cached walk of the module tree
            if children is None:
                registry.reset_stateful_hooks()
                continue
            for child in (registry, *children()):
                child.reset_stateful_hooks(recurse=False)

    def _run(self, latents, cond, policy, start_step, generator, uncond, callback, return_latents, dtype):
        self._reset_model_state()
        sched = self.fresh_scheduler(latents.device, tuple(latents.shape))
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
        if "return_dict" in self._step_params:  # a tuple: the output dataclass costs more than a tiny model's step
            step_kwargs["return_dict"] = False

        x = latents * getattr(sched, "init_noise_sigma", 1.0) if start_step == 0 else latents
        values = self.timestep_values(tuple(latents.shape))
        cond_in = self.model_conditioning(cond, uncond, latents.shape[0], dtype)
        for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not self.progress, leave=False)):
            mode = plan.modes[i]
            if plan.detach_before == i:
                x = x.detach()
                self._detach_state(sched, last_only=False)

            def eps_fn(x_in, t=t, step=SamplingStep(start_step + i, values)):
                token = _CURRENT_STEP.set(step)  # a checkpoint's recomputation announces its step again
                try:
                    return self._predict(_scale_input(sched, x_in, t), t, cond_in, dtype)
                finally:
                    _CURRENT_STEP.reset(token)

            if mode == G.GRAPH or policy is None:  # without a policy the whole loop runs under no_grad
                eps = eps_fn(x)
            elif mode == G.CHECKPOINT:
                eps = checkpoint(eps_fn, x, use_reentrant=False)
            else:
                with torch.no_grad():
                    eps = eps_fn(x).detach()
            out = sched.step(eps, t, x, **step_kwargs)
            x = out[0] if isinstance(out, tuple) else out.prev_sample
            if mode == G.NOGRAD and policy is not None:
                self._detach_state(sched, last_only=True)
            if callback is not None:
                denoised = (out[1] if len(out) > 1 else None) if isinstance(out, tuple) else \
                    getattr(out, "pred_original_sample", None)
                callback({"x": x, "i": start_step + i, "t": t, "denoised": denoised})
        check_finite(x, dtype, f"denoiser ({type(unwrap(self.model)).__name__})", "latents")
        images = self.decode(x) if self.decode is not None else x
        return (images, x) if return_latents else images

    @staticmethod
    def _detach_state(sched, last_only: bool) -> None:
        """Cut the scheduler's stored tensors from the graph: the latest model output (``last_only``, after a step
        without gradient), or everything it stored, samples too (where a policy detaches the latent: UniPC's
        corrector would otherwise carry the gradient past the cut through its previous sample)."""
        if not last_only:
            for name in _STATE_SAMPLES:
                if isinstance(getattr(sched, name, None), torch.Tensor):
                    setattr(sched, name, getattr(sched, name).detach())
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
        sched = self.fresh_scheduler(images_or_latents.device, tuple(images_or_latents.shape))
        alphas = getattr(sched, "alphas_cumprod", None)
        if alphas is None or sched.config.get("prediction_type", "epsilon") != "epsilon":
            raise NotImplementedError("invert needs a DDIM-family scheduler (alphas_cumprod) with epsilon prediction; "
                                      f"got {type(sched).__name__}")
        if not isinstance(to_step, int) or not 0 <= to_step < self.num_inference_steps:
            raise ValueError(f"to_step must be an int in [0, {self.num_inference_steps - 1}], got {to_step!r}")
        use_encode = self.encode is not None and not latents
        x = self.encode(images_or_latents) if use_encode else images_or_latents
        dtype = model_dtype(self.model, torch.float32)
        self._check_inputs(x, cond, to_step, None, uncond, dtype)
        timesteps = sched.timesteps
        alphas = alphas.to(x.device, x.dtype)
        for j in range(len(timesteps) - 1, to_step - 1, -1):
            t = timesteps[j]
            a_t = alphas[t]
            a_prev = alphas[timesteps[j + 1]] if j + 1 < len(timesteps) else torch.ones_like(a_t)
            eps = self.predict(_scale_input(sched, x, t), t, cond, uncond, dtype)
            x0 = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            x = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        return x

    # ---- pipelines ------------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe, num_inference_steps: int = 50, guidance_scale: float | None = None,
                      uncond: Cond = None, negative_prompt: str | None = None, true_cfg_scale: float | None = None,
                      guidance_scale_2: float | None = None, **kwargs) -> "Sampler":
        """A Sampler for a local diffusers pipeline of any registered family (DDPM/DDIM, Stable Diffusion
        1.x/2.x and XL, DiT, PixArt, Sana, SD3, Flux, Qwen-Image, Wan, ...).

        Conditioning is what the family's denoiser takes (see :mod:`diffusion_shortcuts.families`); get it
        from prompts with :meth:`encode_prompt`. The guidance arguments are the stock call's, under its names:
        ``guidance_scale`` (default the family's), ``true_cfg_scale`` with a ``negative_prompt`` (Flux, Qwen-Image:
        a CFG of their own, in two calls; default the stock call's where a negative prompt is given, else none),
        ``guidance_scale_2`` (Wan 2.2's second expert). Under classifier-free
        guidance ``uncond`` defaults to the encoded ``negative_prompt`` (empty by default) where the pipeline has
        its text encoders, or to the null class for DiT. Images are decoded by the pipeline's VAE as its stock
        call decodes them (:meth:`~diffusion_shortcuts.families.Family.codec`) and mapped to [0, 1] without
        clamping, so that they stay differentiable.
        """
        _, model = denoiser_of(pipe)
        family = family_of(model)
        family.check_pipeline(pipe)
        denoisers, boundary = family.experts(pipe)
        experts = [(m, boundary) for _, m in denoisers[1:]]
        decode, encode = family.codec(pipe)
        if guidance_scale is None:
            guidance_scale = family.default_guidance
        if true_cfg_scale is None:
            true_cfg_scale = family.default_true_cfg if family.true_cfg and negative_prompt is not None else 1.0
        if true_cfg_scale != 1.0 and not family.true_cfg:
            raise ValueError(f"true_cfg_scale is for families with embedded guidance and a CFG of their own (Flux, "
                             f"Qwen-Image); {family.name} takes guidance_scale")
        if true_cfg_scale != 1.0 and negative_prompt is None and uncond is None:
            raise ValueError(f"true_cfg_scale={true_cfg_scale:g} needs a negative_prompt (or uncond): without one the "
                             f"stock {type(pipe).__name__} call runs no classifier-free guidance")
        # built unguided first: the default uncond is encoded at the sampler's own latent size (SDXL's time ids)
        sampler = cls(denoisers[0][1], pipe.scheduler, num_inference_steps, 1.0, decode=decode, encode=encode,
                      uncond=uncond, pipeline=pipe, experts=experts, **kwargs)
        sampler.expert_names = [name for name, _ in denoisers]
        sampler.guidance_scale, sampler.true_cfg_scale = float(guidance_scale), float(true_cfg_scale)
        sampler.guidance_scale_2 = None if guidance_scale_2 is None else float(guidance_scale_2)
        if uncond is None and sampler._guided:
            sampler.uncond = sampler._default_uncond(negative_prompt)
        return sampler

    def _default_uncond(self, negative_prompt: str | None) -> Cond:
        null = self.family.null_cond(self.model)
        if null is not None:
            return null
        if self.family.conditioning == TEXT and _has_text_encoder(self.pipeline):
            return C.first(self._encode([""], negative_prompt)[1])
        raise ValueError(f"{type(self.pipeline).__name__}: classifier-free guidance needs uncond "
                         "(e.g. the empty-prompt embeddings) and the pipeline has no text encoder to make it; "
                         "pass uncond, or guidance_scale=1.0 for none")

    def _encode(self, prompts, negative_prompt):
        if self.pipeline is None or self.family.conditioning not in (TEXT, CLASS_NAMES):
            raise ValueError(f"encode_prompt needs a sampler made by Sampler.from_pipeline of a text-conditional "
                             f"pipeline; this one drives {type(unwrap(self.model)).__name__} "
                             f"({self.family.name}) {'without a pipeline' if self.pipeline is None else ''}".rstrip())
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        scale = vae_scale(self.pipeline)
        size = (self.sample_shape[-2] * scale, self.sample_shape[-1] * scale)
        device = getattr(unwrap(self.model), "device", None)
        negative = [negative_prompt] * len(prompts) if negative_prompt is not None else None
        with torch.no_grad():
            return self.family.encode_prompt(self.pipeline, list(prompts), negative, device, size,
                                             **self.prompt_options)

    def encode_prompt(self, prompts: str | list[str]) -> Cond:
        """Conditioning for ``prompts`` through the pipeline's own ``encode_prompt`` (its tokenizers and text
        encoders), shaped as this family's denoiser takes it; pass it as ``cond`` like any other batch."""
        return self._encode(prompts, None)[0]


def _has_text_encoder(pipe) -> bool:
    return any(getattr(pipe, name, None) is not None for name in ("text_encoder", "text_encoder_2", "text_encoder_3"))
