"""Optimize what enters sampling (the initial noise, an intermediate latent, the conditioning) against a reward.

Each iteration samples with the chosen gradient policy (SDO's ``Shortcut()`` by default: one network
graph, the rest of the chain through its linear skip path), evaluates the reward on the TRUE final
sample, and takes one optimizer step on ``-reward`` (plus an optional noise prior). The latent update is
the SDO latent-optimization loop of arXiv 2505.07477 (Adam, lr about 0.01, 100-200 iterations).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import conditions as C
from .. import gradients as G
from ..checkpoints import Checkpoint, configured, make_optimizer, settings_of
from ..loop import LoopState, run_loop
from ..metrics import peak_rss_mb
from ..rewards.base import check_reward_output, reward_name

NOISE_PRIORS = ("auto", None, "chi2", "sphere")
CHECKPOINT = "optimize_checkpoint.pt"


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


@dataclass(frozen=True)
class LatentConfig:
    """Every setting of a latent optimization (:func:`optimize_latents` takes it, or its fields as keywords); a
    checkpoint is matched on all of them. The last fields are derived from the sampler, the reward and the starting
    latents.

    Attributes:
        iterations, lr, optimizer: the optimizer's run (``"adam"``, ``"adamw"`` or ``"sgd"``).
        gradient: the policy or its spec (``"shortcut"`` = SDO; ``"full"``, ``"checkpointed"``, ...).
        start_step: the step the latents enter (0: initial noise; else e.g. from ``sampler.invert`` of an image).
        optimize_cond: optimize the conditioning too (a float tensor of embeddings).
        noise_prior: "sphere" (projection onto the Gaussian shell after every step), "chi2" (penalty
            ``prior_weight * chi2_prior``), None, or "auto": "sphere" for initial noise (``start_step == 0``),
            None for an intermediate latent. Without a prior the optimized noise drifts off the shell into
            adversarial noise that the reward model likes and no other judge does.
        grad_clip: clip the gradient norm of each optimized tensor to this value.
        target_reward: stop once the mean reward reaches it.
        seed: seeds the sampler's per-iteration generator (stochastic samplers, random policies).
    """

    iterations: int = 100
    lr: float = 0.01
    gradient: str | G.GradientPolicy = "shortcut"
    start_step: int = 0
    optimize_cond: bool = False
    noise_prior: str | None = "auto"
    prior_weight: float = 1.0
    grad_clip: float | None = None
    target_reward: float | None = None
    optimizer: str = "adam"
    seed: int = 0
    sampler: dict = field(default_factory=dict, metadata={"derived": True})
    reward: str = field(default="", metadata={"derived": True})
    latents: str = field(default="", metadata={"derived": True})
    cond: str = field(default="", metadata={"derived": True})


class _Tensors:
    """The optimized tensors as a checkpointable object (state_dict / load_state_dict)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors

    def state_dict(self) -> dict:
        return {"tensors": [t.detach().clone() for t in self.tensors]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["tensors"]
        if len(saved) != len(self.tensors) or any(a.shape != b.shape for a, b in zip(saved, self.tensors)):
            raise ValueError(f"other tensors: {[tuple(t.shape) for t in saved]}")
        with torch.no_grad():
            for t, v in zip(self.tensors, saved):
                t.copy_(v)


def _check_latent_args(policy, config: LatentConfig, cond) -> None:
    if policy is None:
        raise ValueError("gradient: optimize_latents needs a gradient policy, got None")
    if config.noise_prior not in NOISE_PRIORS:
        raise ValueError(f"noise_prior must be one of {NOISE_PRIORS}, got {config.noise_prior!r}")
    if not isinstance(config.iterations, int) or config.iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {config.iterations!r}")
    if config.optimize_cond and not (isinstance(cond, torch.Tensor) and cond.is_floating_point()):
        raise ValueError("optimize_cond needs cond to be a float tensor (embeddings), "
                         f"got {type(cond).__name__ if not isinstance(cond, torch.Tensor) else cond.dtype}")


def optimize_latents(sampler, reward: Callable, latents: torch.Tensor, cond: Any = None,
                     config: LatentConfig | None = None, *, checkpoint_dir: str | Path | None = None,
                     checkpoint_every: int = 10, resume: bool = False, progress: bool = True,
                     callback: Callable[[dict], bool | None] | None = None, **settings) -> OptimizeResult:
    """Maximize ``reward(sampler(latents, cond))`` over the latents (and the conditioning if asked).

    Args:
        latents: initial noise (``start_step=0``) or the latent entering ``start_step``. Not modified.
        cond: conditioning; with ``optimize_cond`` a float tensor that is optimized too.
        config / settings: a :class:`LatentConfig`, and any of its fields as keywords over it
            (``optimize_latents(sampler, reward, noise, cond, iterations=50, gradient="full")``).
        checkpoint_dir / checkpoint_every / resume: an atomic checkpoint (latents, optimizer, history)
            every ``checkpoint_every`` iterations; ``resume`` continues from it and refuses one made with
            other settings (:class:`LatentConfig`), naming the first difference.
        callback: ``callback(event)`` after each iteration (the loop kit's contract, :mod:`diffusion_shortcuts.loop`:
            ``iteration``, ``elapsed`` and the iteration's figures: ``reward``, ``seconds``, ...); returning True
            stops the run there.

    Returns an :class:`OptimizeResult`; history has per iteration the mean reward of the latents
    BEFORE the update (so ``reward[0]`` is the starting point), seconds, peak RSS and autograd-graph MB.
    Raises :class:`OptimizationError` (with the last good latents) on a non-finite reward or gradient.
    """
    config = configured(LatentConfig, config, settings)
    policy = G.resolve(config.gradient)
    _check_latent_args(policy, config, cond)
    config = dataclasses.replace(config, gradient=policy.spec, sampler=sampler.describe(), reward=reward_name(reward),
                                 latents=C.fingerprint(latents), cond=C.fingerprint(cond) if cond is not None else "")
    run = _LatentRun(sampler, reward, latents, cond, policy, config)
    checkpoint = Checkpoint(checkpoint_dir, CHECKPOINT, settings_of(config), checkpoint_every, resume)
    if run_loop(run, config.iterations, checkpoint, desc=f"optimize ({policy.name})", progress=progress,
                callback=callback):
        run.finish()
    return run.result


class _LatentRun(LoopState):
    """The state of one latent optimization and its iteration (see :func:`optimize_latents`)."""

    def __init__(self, sampler, reward, latents, cond, policy, config: LatentConfig):
        self.sampler, self.reward, self.policy, self.config, self.cond = sampler, reward, policy, config, cond
        self.prior = config.noise_prior if config.noise_prior != "auto" else (
            "sphere" if config.start_step == 0 else None)
        self.x = latents.detach().clone().requires_grad_(True)
        self.params = [self.x]
        self.c = cond
        if config.optimize_cond:
            self.c = cond.detach().clone().requires_grad_(True)
            self.params.append(self.c)
        self.opt = make_optimizer(config.optimizer, self.params, config.lr)
        self.history = {"reward": [], "reward_per_sample": [], "seconds": [], "peak_rss_mb": [], "graph_mb": [],
                        "shell_drift": []}
        self.result = OptimizeResult(latents=self.x.detach().clone(), images=None, cond=cond, history=self.history,
                                     settings=settings_of(config))
        self.graph_bytes = 0

    def objects(self) -> dict:
        return {"tensors": _Tensors(self.params), "optimizer": self.opt}

    def restore(self, state: dict) -> None:
        self.history.update(state["history"])

    def ended(self) -> bool:
        return self.result.stopped != "iterations"

    def postfix(self, record: dict) -> dict:
        return {"reward": f"{record['reward']:.4g}"}

    def _pack(self, t):
        self.graph_bytes += t.numel() * t.element_size()
        return t

    def _record_cost(self, start: float) -> None:
        self.history["seconds"].append(time.perf_counter() - start)
        self.history["peak_rss_mb"].append(peak_rss_mb())
        self.history["graph_mb"].append(self.graph_bytes / 2**20)

    def _final(self, values, mean: float) -> None:
        self.history["final_reward"], self.history["final_reward_per_sample"] = mean, values.detach().tolist()
        self.history["final_shell_drift"] = shell_drift(self.result.latents)

    def _no_path(self) -> str:
        return (f"gradient {self.policy.spec} gives the latents no gradient (it cuts them off before the steps it "
                "keeps): it cannot steer them; use shortcut, checkpointed or full")

    def step(self, it: int) -> dict:
        cfg, x, result = self.config, self.x, self.result
        start = time.perf_counter()
        self.graph_bytes = 0
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            images = self.sampler(x, self.c, gradient=self.policy, start_step=cfg.start_step,
                                  generator=torch.Generator().manual_seed(cfg.seed + it))
            values = check_reward_output(self.reward(images, self.c), x.shape[0], reward_name(self.reward))
        if not torch.isfinite(values).all():
            raise OptimizationError(f"non-finite reward at iteration {it}: {values.detach().tolist()}", result)
        if not values.requires_grad and not images.requires_grad:
            raise ValueError(self._no_path())
        if not values.requires_grad:
            raise ValueError(f"reward {reward_name(self.reward)} does not depend on the images (its value carries no "
                             "gradient): it cannot steer them")
        loss = -values.sum()
        if self.prior == "chi2":
            loss = loss + cfg.prior_weight * chi2_prior(x).sum()
        self.opt.zero_grad()
        loss.backward()
        for p in self.params:
            if p.grad is None and p is x and self.policy.plan(len(self.sampler.timesteps) - cfg.start_step,
                                                              torch.Generator().manual_seed(0)).detach_before:
                raise ValueError(self._no_path())
            if p.grad is None or not torch.isfinite(p.grad).all():
                raise OptimizationError(f"non-finite or missing gradient at iteration {it} (policy {self.policy!r})",
                                        result)
        if cfg.grad_clip is not None:
            for p in self.params:
                torch.nn.utils.clip_grad_norm_([p], cfg.grad_clip)
        result.latents, result.images = x.detach().clone(), images.detach()
        result.cond = self.c.detach().clone() if cfg.optimize_cond else self.cond
        mean = values.mean().item()
        self.history["reward"].append(mean)
        self.history["reward_per_sample"].append(values.detach().tolist())
        self.history["shell_drift"].append(shell_drift(x.detach()))
        if cfg.target_reward is not None and mean >= cfg.target_reward:
            self._record_cost(start)
            result.stopped = f"target reached at iteration {it}"
            self._final(values, mean)
            return self._record()
        self.opt.step()
        if self.prior == "sphere":
            with torch.no_grad():
                x.copy_(project_to_sphere(x))
        self._record_cost(start)
        return self._record()

    def _record(self) -> dict:
        """The iteration's figures: the latest entry of each per-iteration history."""
        return {k: v[-1] for k, v in self.history.items() if isinstance(v, list) and v}

    def finish(self) -> None:
        """The final latents' sample and reward, after the last update."""
        cfg, result = self.config, self.result
        result.latents = self.x.detach().clone()
        result.cond = self.c.detach().clone() if cfg.optimize_cond else self.cond
        with torch.no_grad():
            result.images = self.sampler(result.latents, result.cond, start_step=cfg.start_step,
                                         generator=torch.Generator().manual_seed(cfg.seed + cfg.iterations))
            final = check_reward_output(self.reward(result.images, result.cond), self.x.shape[0],
                                        reward_name(self.reward))
        self._final(final, final.mean().item())


def merged_history(histories: list[dict], latents: torch.Tensor) -> dict:
    """One history for the samples of several runs over disjoint samples (the shards of ``optimize`` under
    ``accelerate launch``, in sample order), as one run over all of them would have recorded it: the per-sample
    rewards side by side and their mean per iteration, the slowest run's seconds and graph, the final figures of
    the ``latents`` (all samples', in the same order). Iterations that not every run reached (one stopped on an
    error) are left out."""
    done = min(len(h["reward_per_sample"]) for h in histories)
    per_sample = [[r for h in histories for r in h["reward_per_sample"][it]] for it in range(done)]
    merged = {"reward": [sum(rows) / len(rows) for rows in per_sample], "reward_per_sample": per_sample}
    for key in ("seconds", "peak_rss_mb", "graph_mb"):
        merged[key] = [max(h[key][it] for h in histories) for it in range(done)]
    merged["shell_drift"] = [sum(h["shell_drift"][it] * len(h["reward_per_sample"][it]) for h in histories) /
                             len(per_sample[it]) for it in range(done)]
    if all("final_reward_per_sample" in h for h in histories):
        final = [r for h in histories for r in h["final_reward_per_sample"]]
        merged.update(final_reward=sum(final) / len(final), final_reward_per_sample=final,
                      final_shell_drift=shell_drift(latents))
    return merged
