"""A cache schedule with no search: measured on a few full generations, built at the asked MACs.

What the DiP-GO gates learn to predict is how far a block's work moves from what a reuse would hand on. Here it is
measured once: one (or a few) full generations run with every block computed, and for every block, step t and an
earlier step c (at most ``window`` steps back) the error of reusing at t what the block computed at c, in the
schedule's reuse mode (``copy``: the work of c; ``taylor1`` / ``taylor2``: the forecast from c and the steps just
before it), relative to the work at t: ``e_b(c, t) = |w_t - f(c, t)| / |w_t|``, averaged over the samples and the
guidance branches.

The table follows by one rule, with one global threshold: walking the steps, a step reuses every block while the
MACs-weighted mean of the blocks' errors from the latest computed step stays within the threshold, and computes
every block (becoming the new latest) otherwise (``granularity="block"``: each block on its own); the warm-up steps
and a second denoiser's first step compute in full, as the search's rules have it. The threshold is bisected until
the table keeps the asked fraction of the MACs, within DiP-GO's tolerance (as the search's post-processing). The
errors are measured on the full model's trajectory: what one reuse changes downstream is not (as MagCache and
TeaCache calibrate); the search is what accounts for it.

    schedule = ds.prune.calibrate(sampler, m.encode(torch.arange(10)), macs=0.3)
    ds.prune.enable_cache(pipe, ds.prune.calibrate(pipe, ["a red car", "a blue house"], macs=0.3))
"""

from __future__ import annotations

import math
import time

import torch

from .. import conditions as C
from ..usage import whole_number
from .blocks import profile
from .forecast import FORECASTERS, REUSE_MODES
from .schedule import TOLERANCE, CacheSchedule, handovers
from .state import BlockState

__all__ = ["calibrate", "CalibrationError"]


class CalibrationError(ValueError):
    """Bad arguments to :func:`calibrate`, named."""


def _flat(work) -> torch.Tensor:
    """A block's work (a tensor, or a tuple of streams) as one (B, -1) float tensor."""
    parts = work if isinstance(work, (tuple, list)) else (work,)
    tensors = [p for p in parts if isinstance(p, torch.Tensor)]
    return torch.cat([t.detach().float().flatten(1) for t in tensors], dim=1)


class _Errors:
    """The errors ``e_b(c, t)`` of reusing at t what block b computed at c, accumulated over generations and
    guidance branches from the works a full generation computes (the latest ``window`` of each kept)."""

    def __init__(self, steps: int, blocks: int, window: int, mode: str):
        self.window, self.forecaster = window, FORECASTERS[mode]()
        self.sum = torch.zeros(blocks, steps, steps, dtype=torch.float64)
        self.count = torch.zeros(blocks, steps, steps, dtype=torch.float64)
        self.recent: dict[tuple[int, str], BlockState] = {}

    def observe(self, block, step: int, branch: str, work) -> None:
        state = self.recent.setdefault((block.index, branch), BlockState())
        if state.works and step <= max(state.works):  # a new generation of this branch
            state.reset()
        current = _flat(work)
        scale = current.norm(dim=1).clamp_min(1e-12)
        order = self.forecaster.order
        for c in sorted(state.works):
            if step - c > self.window or c - order < min(state.works):
                continue  # too far back, or not enough steps before c for the forecast
            history = BlockState()
            for s in range(c - order, c + 1):
                history.works[s] = state.works[s]
            forecast = _flat(self.forecaster.predict(history, step))
            error = float(((current - forecast).norm(dim=1) / scale).mean())
            self.sum[block.index, c, step] += error
            self.count[block.index, c, step] += 1
        state.works[step] = work.detach() if isinstance(work, torch.Tensor) else \
            type(work)(w.detach() if isinstance(w, torch.Tensor) else w for w in work)
        for old in sorted(state.works)[:-(self.window + order + 1)]:
            del state.works[old]

    def table(self) -> torch.Tensor:
        """``e[b, c, t]``, infinite where nothing was measured (farther back than the window)."""
        errors = self.sum / self.count.clamp_min(1)
        errors[self.count == 0] = math.inf
        return errors


def _reuse_rows(errors: torch.Tensor, threshold: float, full_steps: set[int]) -> torch.Tensor:
    """Reuse at t while the error ``errors[latest, t]`` from the latest computed step is within ``threshold`` (the
    ``full_steps`` always compute): a bool per step."""
    steps = errors.shape[-1]
    reuse = torch.zeros(steps, dtype=torch.bool)
    latest = 0
    for t in range(1, steps):
        if t not in full_steps and errors[latest, t] <= threshold:
            reuse[t] = True
        else:
            latest = t
    return reuse


def _reuse_table(errors: torch.Tensor, weights: torch.Tensor, threshold: float, full_steps: set[int],
                 granularity: str) -> torch.Tensor:
    """The table by the rule, per step (every block reused or computed together, judged by the MACs-weighted mean
    error of the blocks) or per block."""
    blocks, steps, _ = errors.shape
    if granularity == "step":
        combined = (errors * weights.view(-1, 1, 1)).sum(0)
        return _reuse_rows(combined, threshold, full_steps).view(-1, 1).expand(steps, blocks).clone()
    return torch.stack([_reuse_rows(errors[b], threshold, full_steps) for b in range(blocks)], dim=1)


def _sampler_and_conditions(subject, conditions, num_inference_steps, height, width):
    """A Sampler and its conditioning from a sampler and conditions, or from a pipeline and prompts."""
    from ..sampling import Sampler

    if isinstance(subject, Sampler):
        return subject, conditions
    from ..families import denoiser_of, family_of, vae_scale

    _, model = denoiser_of(subject)
    shape = list(family_of(model).latent_shape(model))
    factor = vae_scale(subject)
    shape[-2:] = [height // factor if height else shape[-2], width // factor if width else shape[-1]]
    sampler = Sampler.from_pipeline(subject, num_inference_steps, sample_shape=tuple(shape))
    prompts = [conditions] if isinstance(conditions, str) else conditions
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise CalibrationError("with a pipeline, conditions are prompts: a list of strings")
    return sampler, sampler.encode_prompt(list(prompts))


GRANULARITIES = ("step", "block")


def calibrate(sampler, conditions, macs: float = 0.3, *, generations: int = 1, batch_size: int | None = None,
              mode: str = "copy", granularity: str = "step", warmup: int = 3, window: int = 10, seed: int = 0,
              tolerance: float = TOLERANCE,
              num_inference_steps: int = 50, height: int | None = None, width: int | None = None,
              progress: bool = False) -> CacheSchedule:
    """A cache schedule keeping ``macs`` of the full model's MACs (its ``macs_ratio``; the search's ``ratio`` is
    ``1 - macs``), measured on ``generations`` full generations and built with no search (module docstring).

    Args:
        sampler: a :class:`~diffusion_shortcuts.Sampler`, or a diffusers pipeline (then ``conditions`` are prompts,
            and the sampler is the pipeline's at ``num_inference_steps``, ``height`` x ``width`` pixels).
        conditions: the conditioning rows to calibrate on (``m.encode(labels)``, ``sampler.encode_prompt(...)``),
            cycled over the batch; None for an unconditional model.
        generations: full generations measured (each of ``batch_size`` samples, noise from ``seed``): the cost.
        batch_size: samples per generation (default: one per condition, at most 8); more than the conditions is
            refused (the calibration set would be smaller than the batch).
        mode: the reuse mode the schedule runs with and is measured in (``copy``, ``taylor1``, ``taylor2``).
        granularity: ``"step"``: every block reused or computed together, judged by the blocks' MACs-weighted mean
            error (a computed step sees every block's input fresh: on the zoo it measures far better than
            ``"block"``, each block judged on its own, whose computed blocks read stale upstream work).
        warmup: the first steps, which compute every block (as the rule tables and TaylorSeer's warm-up).
        window: the farthest back (in steps) a reuse may reach.
    """
    sampler, conditions = _sampler_and_conditions(sampler, conditions, num_inference_steps, height, width)
    batch = _checked_batch(conditions, macs, mode, granularity, generations, warmup, window, batch_size)
    from .apply import gated

    timesteps = [float(t) for t in sampler.timesteps]
    device = next(sampler.model.parameters()).device
    example = torch.zeros(1, *sampler.sample_shape, device=device)
    prof = profile(sampler.model, example, C.first(conditions))
    keep_all = CacheSchedule.keep_all(timesteps, prof).with_mode(mode)
    boundary = sampler.experts[0][1] if sampler.experts else None
    if boundary is not None:
        keep_all = keep_all.for_experts(sampler.expert_names, boundary)
    errors = _Errors(len(timesteps), len(prof.blocks), window, mode)
    net = gated(list(zip(sampler.expert_names, sampler.models)), keep_all)
    net.observer = errors.observe
    started = time.perf_counter()
    with torch.no_grad():
        net.attach()
        try:
            _generate(sampler, conditions, batch, generations, seed, device)
        finally:
            net.detach()
    table = errors.table()
    weights = prof.gamma / prof.gamma.sum()
    full_steps = set(range(min(warmup, len(timesteps)))) | set(handovers(timesteps, boundary))

    def schedule(threshold: float) -> CacheSchedule:
        reuse = _reuse_table(table, weights, threshold, full_steps, granularity)
        return CacheSchedule.from_table(reuse, timesteps, prof, method=f"calibrated({granularity})").with_mode(mode)

    finite = table[torch.isfinite(table)]
    high = float(finite.max()) + 1.0 if finite.numel() else 1.0  # reuses all it can; -1 keeps everything
    best = _bisected_threshold(lambda th: schedule(th).macs_ratio, -1.0, high, macs, tolerance)
    result = schedule(best)
    if boundary is not None:
        result = result.for_experts(sampler.expert_names, boundary)
    result.info.update(target_macs=macs, threshold=best, within_tolerance=abs(result.macs_ratio - macs) <= tolerance,
                       generations=generations, batch=batch, warmup=warmup, window=window, granularity=granularity,
                       seconds=time.perf_counter() - started)
    return result


def _checked_batch(conditions, macs, mode: str, granularity: str, generations, warmup, window, batch_size) -> int:
    """The calibration's batch (default: one per condition, at most 8), every argument checked first."""
    if not isinstance(macs, (int, float)) or not 0.0 < macs <= 1.0:
        raise CalibrationError(f"macs must be in (0, 1] (the fraction of the MACs kept), got {macs!r}")
    if mode not in REUSE_MODES:
        raise CalibrationError(f"mode must be one of {', '.join(REUSE_MODES)}, got {mode!r}")
    if granularity not in GRANULARITIES:
        raise CalibrationError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    for name, value in (("generations", generations), ("warmup", warmup), ("window", window)):
        whole_number(name, value, 1, error=CalibrationError)
    rows = C.count(conditions) if conditions is not None else 1
    batch = whole_number("batch_size", min(rows, 8) if batch_size is None else batch_size, 1, error=CalibrationError)
    if conditions is not None and rows < batch:
        raise CalibrationError(f"the calibration set has {rows} conditions, fewer than the batch of {batch}: give "
                               "more conditions (prompts, labels) or a smaller batch")
    return batch


def _generate(sampler, conditions, batch: int, generations: int, seed: int, device) -> None:
    """``generations`` full generations of ``batch`` samples (noise from ``seed + g``, conditions cycled), for the
    observer to measure."""
    rows = C.count(conditions) if conditions is not None else 1
    for g in range(generations):
        noise = torch.randn((batch, *sampler.sample_shape), generator=torch.Generator().manual_seed(seed + g))
        cond = C.take(conditions, torch.arange(g * batch, (g + 1) * batch) % rows) if conditions is not None else None
        sampler(noise.to(device), cond)


def _bisected_threshold(kept_at, low: float, high: float, macs: float, tolerance: float) -> float:
    """The threshold whose table keeps the MACs fraction nearest ``macs`` (``kept_at(threshold)``, falling as the
    threshold rises), bisected between ``low`` (keeps everything) and ``high`` until within ``tolerance``."""
    best, best_gap = min(((th, abs(kept_at(th) - macs)) for th in (low, high)), key=lambda pair: pair[1])
    for _ in range(60):
        mid = (low + high) / 2
        kept = kept_at(mid)
        if abs(kept - macs) < best_gap:
            best, best_gap = mid, abs(kept - macs)
        if abs(kept - macs) <= tolerance:
            break
        low, high = (mid, high) if kept > macs else (low, mid)
    return best
