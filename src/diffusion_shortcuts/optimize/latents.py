"""Optimize what enters sampling (the initial noise, an intermediate latent, the conditioning) against a reward.

Each iteration samples with the chosen gradient policy (SDO's ``Shortcut()`` by default: one network
graph, the rest of the chain through its linear skip path), evaluates the reward on the TRUE final
sample, and takes one optimizer step on ``-reward`` (plus an optional noise prior). The latent update is
the SDO latent-optimization loop of arXiv 2505.07477 (Adam, lr about 0.01, 100-200 iterations).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .. import gradients as G
from ..metrics import peak_rss_mb
from ..rewards.base import check_reward_output, reward_name

NOISE_PRIORS = (None, "chi2", "sphere")


@dataclass
class OptimizeResult:
    """Final latents (the last good ones if the run stopped on an error), images, and the history."""

    latents: torch.Tensor
    images: torch.Tensor | None
    cond: Any
    history: dict = field(default_factory=dict)
    stopped: str = "iterations"
    settings: dict = field(default_factory=dict)

    @property
    def reward(self) -> list[float]:
        return self.history.get("reward", [])


class OptimizationError(RuntimeError):
    """A run stopped on a non-finite reward or gradient; ``.result`` holds the last good latents."""

    def __init__(self, message: str, result: OptimizeResult):
        super().__init__(message)
        self.result = result


def chi2_prior(latents: torch.Tensor) -> torch.Tensor:
    """Negative log-density of the norm of a d-dimensional standard Gaussian, per sample.

    ``||x||`` follows a chi distribution with d degrees of freedom: ``-log p(r) = r^2/2 - (d-1) log r``
    (+ const), minimal at r = sqrt(d-1): it keeps the latent on the Gaussian shell.
    """
    d = latents[0].numel()
    r = latents.flatten(1).norm(dim=1)
    return (r.square() / 2 - (d - 1) * torch.log(r)) / d


def project_to_sphere(latents: torch.Tensor) -> torch.Tensor:
    """Rescale each latent to norm sqrt(d), the typical norm of a d-dimensional standard Gaussian."""
    d = latents[0].numel()
    norm = latents.flatten(1).norm(dim=1).clamp(min=1e-12)
    return latents * (math.sqrt(d) / norm).view(-1, *[1] * (latents.ndim - 1))


def shell_drift(latents: torch.Tensor) -> float:
    """Mean |‖x‖/sqrt(d) - 1|: how far latents drifted from the Gaussian shell (0 for fresh noise, ~1/sqrt(2d))."""
    d = latents[0].numel()
    return (latents.flatten(1).norm(dim=1) / math.sqrt(d) - 1).abs().mean().item()


def optimize_latents(sampler, reward: Callable, latents: torch.Tensor, cond: Any = None, iterations: int = 100,
                     lr: float = 0.01, gradient: G.GradientPolicy | str = G.Shortcut(), start_step: int = 0,
                     optimize_cond: bool = False, noise_prior: str | None = None, prior_weight: float = 1.0,
                     grad_clip: float | None = None, target_reward: float | None = None,
                     optimizer: str = "adam", seed: int = 0, progress: bool = True,
                     callback: Callable[[int, dict], None] | None = None) -> OptimizeResult:
    """Maximize ``reward(sampler(latents, cond))`` over the latents (and the conditioning if asked).

    Args:
        latents: initial noise (``start_step=0``) or the latent entering ``start_step`` (e.g. from
            ``sampler.invert`` of an image to edit). Not modified.
        cond: conditioning; with ``optimize_cond`` a float tensor that is optimized too.
        gradient: the policy (``Shortcut()`` = SDO; ``Full()``, ``Checkpointed()``, ``StraightThrough()``).
        noise_prior: None, "chi2" (penalty ``prior_weight * chi2_prior``) or "sphere" (projection
            after every step); only meaningful for initial noise.
        grad_clip: clip the gradient norm of each optimized tensor to this value.
        target_reward: stop once the mean reward reaches it.
        seed: seeds the sampler's per-iteration generator (stochastic samplers, random policies).
        callback: ``callback(iteration, record)`` after each iteration.

    Returns an :class:`OptimizeResult`; history has per iteration the mean reward of the latents
    BEFORE the update (so ``reward[0]`` is the starting point), seconds, peak RSS and autograd-graph MB.
    Raises :class:`OptimizationError` (with the last good latents) on a non-finite reward or gradient.
    """
    policy = G.resolve(gradient)
    if policy is None:
        raise ValueError("gradient: optimize_latents needs a gradient policy, got None")
    if noise_prior not in NOISE_PRIORS:
        raise ValueError(f"noise_prior must be one of {NOISE_PRIORS}, got {noise_prior!r}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if optimize_cond and not (isinstance(cond, torch.Tensor) and cond.is_floating_point()):
        raise ValueError("optimize_cond needs cond to be a float tensor (embeddings), "
                         f"got {type(cond).__name__ if not isinstance(cond, torch.Tensor) else cond.dtype}")
    x = latents.detach().clone().requires_grad_(True)
    params = [x]
    c = cond
    if optimize_cond:
        c = cond.detach().clone().requires_grad_(True)
        params.append(c)
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")

    settings = {"iterations": iterations, "lr": lr, "gradient": repr(policy), "start_step": start_step,
                "optimize_cond": optimize_cond, "noise_prior": noise_prior, "prior_weight": prior_weight,
                "grad_clip": grad_clip, "target_reward": target_reward, "optimizer": optimizer, "seed": seed,
                "reward": reward_name(reward)}
    history = {"reward": [], "reward_per_sample": [], "seconds": [], "peak_rss_mb": [], "graph_mb": [],
               "shell_drift": []}
    result = OptimizeResult(latents=x.detach().clone(), images=None, cond=cond, history=history, settings=settings)
    graph_bytes = [0]

    def pack(t):
        graph_bytes[0] += t.numel() * t.element_size()
        return t

    def record_cost(start: float) -> None:
        history["seconds"].append(time.perf_counter() - start)
        history["peak_rss_mb"].append(peak_rss_mb())
        history["graph_mb"].append(graph_bytes[0] / 2**20)

    bar = tqdm(range(iterations), desc=f"optimize ({policy.name})", disable=not progress)
    for it in bar:
        start = time.perf_counter()
        graph_bytes[0] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            images = sampler(x, c, gradient=policy, start_step=start_step,
                             generator=torch.Generator().manual_seed(seed + it))
            values = check_reward_output(reward(images, c), x.shape[0], reward_name(reward))
        if not torch.isfinite(values).all():
            raise OptimizationError(f"non-finite reward at iteration {it}: {values.detach().tolist()}", result)
        loss = -values.sum()
        if noise_prior == "chi2":
            loss = loss + prior_weight * chi2_prior(x).sum()
        opt.zero_grad()
        loss.backward()
        for p in params:
            if p.grad is None or not torch.isfinite(p.grad).all():
                raise OptimizationError(f"non-finite or missing gradient at iteration {it} (policy {policy!r})", result)
        if grad_clip is not None:
            for p in params:
                torch.nn.utils.clip_grad_norm_([p], grad_clip)
        result.latents, result.images = x.detach().clone(), images.detach()
        result.cond = c.detach().clone() if optimize_cond else cond
        mean = values.mean().item()
        history["reward"].append(mean)
        history["reward_per_sample"].append(values.detach().tolist())
        history["shell_drift"].append(shell_drift(x.detach()))
        if target_reward is not None and mean >= target_reward:
            record_cost(start)
            result.stopped = f"target reached at iteration {it}"
            history["final_reward"], history["final_reward_per_sample"] = mean, values.detach().tolist()
            history["final_shell_drift"] = history["shell_drift"][-1]
            break
        opt.step()
        if noise_prior == "sphere":
            with torch.no_grad():
                x.copy_(project_to_sphere(x))
        record_cost(start)
        bar.set_postfix(reward=f"{mean:.4g}")
        if callback is not None:
            callback(it, {k: v[-1] for k, v in history.items()})
    else:
        result.latents = x.detach().clone()
        result.cond = c.detach().clone() if optimize_cond else cond
        with torch.no_grad():
            result.images = sampler(result.latents, result.cond, start_step=start_step,
                                    generator=torch.Generator().manual_seed(seed + iterations))
            final = check_reward_output(reward(result.images, result.cond), x.shape[0], reward_name(reward))
        history["final_reward"] = final.mean().item()
        history["final_reward_per_sample"] = final.tolist()
        history["final_shell_drift"] = shell_drift(result.latents)
    return result
