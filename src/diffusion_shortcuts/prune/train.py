"""DiP-GO's search: train the gate network by gradient descent, then freeze it into a schedule.

Loss per iteration (Zhu et al. 2024, eq. 6-8), on a batch of fresh noise and cycled conditions:

    L = 1 - SSIM(full model's final image, gated model's final image)
        + alpha * mean_t sum_b gamma_b * g_keep[t, b]      (only while the kept MACs fraction > tau)

gamma_b is block b's share of one call's MACs. The gated rollout is differentiated with a gradient
policy: ``Checkpointed()`` (exact, memory of one step) by default, ``Shortcut()`` (one step's graph) as
the cheap choice. The full model's images are made ``target_batch`` iterations at a time in one
batched rollout (the same noise the iterations then use): cheaper on small models, where a call's cost
is mostly overhead.

Every iteration's noise and conditions derive from ``(seed, iteration)``, so a search killed after a
checkpoint resumes to the same pruner as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import gradients as G
from ..checkpoints import load_matching, save_atomically
from ..metrics import Timer, ssim
from .. import conditions as C
from ..families import unwrap
from .blocks import BlockProfile, profile
from .pruner import KEEP, Pruner
from .schedule import CacheSchedule
from .supernet import SuperNet

CHECKPOINT = "search_checkpoint.pt"


class SearchError(RuntimeError):
    """The search cannot go on (a non-finite loss); the last checkpoint is left as it was."""


@dataclass
class SearchResult:
    pruner: Pruner
    profile: BlockProfile
    timesteps: list[float]
    history: dict = field(default_factory=dict)

    def schedule(self, ratio: float) -> CacheSchedule:
        """The static schedule at ``ratio`` (pruned MACs fraction) from the trained keep scores."""
        with torch.no_grad():
            scores = self.pruner.keep_scores()
        sched = CacheSchedule.from_scores(scores, self.timesteps, self.profile, ratio)
        sched.info["search"] = {k: v for k, v in self.history.get("settings", {}).items()}
        return sched


def train_pruner(sampler, conditions, ratio: float = 0.8, iterations: int = 300, batch_size: int = 4,
                 lr: float = 0.01, optimizer: str = "adam", momentum: float = 0.9, alpha: float = 1.0, tau: float | None = None,
                 gradient: G.GradientPolicy | str | None = None, blocks: list[str] | None = None,
                 sample_shape: tuple[int, ...] | None = None, seed: int = 0, target_batch: int = 8,
                 pruner_kwargs: dict | None = None, checkpoint_dir: str | Path | None = None,
                 checkpoint_every: int = 25, resume: bool = False, progress: bool = True,
                 callback=None) -> SearchResult:
    """Train a :class:`Pruner` for ``sampler`` (its model, scheduler, steps and guidance).

    Args:
        conditions: the conditioning rows to cycle through (e.g. ``m.encode(labels)``), or None.
        ratio: the MACs fraction to prune; ``tau`` (default ``1 - ratio``) is the kept fraction below
            which the sparsity term is dropped.
        gradient: policy for the gated rollout (default ``Checkpointed()``).
        checkpoint_dir / checkpoint_every / resume: a checkpoint (pruner, optimizer, LR schedule,
            history, iteration) is written atomically every ``checkpoint_every`` iterations; with
            ``resume`` the search continues from it.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if iterations < 1 or batch_size < 1 or target_batch < 1:
        raise ValueError("iterations, batch_size and target_batch must be >= 1")
    policy = G.resolve(gradient) if gradient is not None else G.Checkpointed()
    tau = 1.0 - ratio if tau is None else tau
    if isinstance(conditions, (list, tuple)):  # the sampler takes them as they are: embeddings, not labels
        raise ValueError("conditions must be a non-empty batch of conditioning (a tensor, a dict of tensors) or None")
    n_cond = C.count(conditions)
    model = sampler.model
    shape = sample_shape if sample_shape is not None else sampler.sample_shape
    if shape is None:
        raise ValueError("sample_shape: the model's configuration has no sample size; pass sample_shape=(C, H, W)")
    shape = tuple(shape)
    device = next(unwrap(model).parameters()).device
    timesteps = [float(t) for t in sampler.timesteps]
    example = torch.zeros(1, *shape, device=device)
    prof = profile(model, example, C.first(conditions), blocks)
    gamma = prof.gamma.to(device)
    block_macs = torch.tensor(prof.block_macs, dtype=torch.float64, device=device)

    with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's RNG alone
        torch.manual_seed(seed)
        pruner = Pruner(len(timesteps), len(prof.blocks), blocks=list(prof.blocks), timesteps=timesteps,
                        **(pruner_kwargs or {})).to(device)
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    optimizer_name = optimizer
    optimizer = (torch.optim.Adam(pruner.parameters(), lr=lr) if optimizer == "adam"
                 else torch.optim.SGD(pruner.parameters(), lr=lr, momentum=momentum))
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    settings = {"ratio": ratio, "iterations": iterations, "batch_size": batch_size, "optimizer": optimizer_name,
                "lr": lr, "momentum": momentum,
                "alpha": alpha, "tau": tau, "gradient": repr(policy), "seed": seed,
                "num_inference_steps": len(timesteps), "guidance_scale": sampler.guidance_scale}
    history = {"settings": settings, "loss": [], "ssim": [], "macs_ratio": [], "seconds": []}
    start = 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        if resume and ckpt_path.exists():
            state = load_matching(ckpt_path, settings, map_location=device)
            pruner.load_state_dict(state["pruner"])
            optimizer.load_state_dict(state["optimizer"])
            lr_schedule.load_state_dict(state["lr_schedule"])
            history, start = state["history"], state["iteration"]

    perm = torch.randperm(n_cond, generator=torch.Generator().manual_seed(seed))

    def batch_for(iteration: int):
        noise = torch.randn((batch_size, *shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + iteration))
        rows = perm[(iteration * batch_size + torch.arange(batch_size)) % n_cond]
        return noise.to(device), C.take(conditions, rows)

    net = SuperNet(model, timesteps, list(prof.blocks))
    frozen = [p for p in unwrap(model).parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    net.attach()
    targets: dict[int, torch.Tensor] = {}
    bar = tqdm(range(start, iterations), desc="pruner search", disable=not progress, initial=start, total=iterations)
    try:
        for it in bar:
            if it not in targets:  # the full model's images for target_batch iterations, in one rollout
                first = it - it % target_batch  # pools start at fixed iterations: a resumed run sees the same
                its = list(range(first, min(first + target_batch, iterations)))
                pairs = [batch_for(j) for j in its]
                noise = torch.cat([p[0] for p in pairs])
                cond = None if conditions is None else C.concat(*[p[1] for p in pairs])
                net.use_table(torch.zeros(len(timesteps), len(prof.blocks), dtype=torch.bool))
                full = sampler(noise, cond).detach()
                targets = dict(zip(its, full.split(batch_size)))
            with Timer() as timer:
                noise, cond = batch_for(it)
                gates = pruner.gates()
                net.use_gates(gates)
                images = sampler(noise, cond, gradient=policy, generator=torch.Generator().manual_seed(seed + it))
                similarity = ssim(images, targets.pop(it)).mean()
                keep_macs = (gates[..., KEEP].double() @ gamma).mean()  # mean_t sum_b gamma_b g_keep[t, b]
                # the kept MACs fraction of the current hard gates, summed in whole MACs (exactly 1 when all keep)
                kept = (prof.other_macs + float((gates[..., KEEP].detach().double() @ block_macs).mean())) / prof.total_macs
                sparsity = keep_macs if kept > tau else torch.zeros((), dtype=keep_macs.dtype, device=device)
                loss = (1 - similarity) + alpha * sparsity
                if not torch.isfinite(loss):
                    raise SearchError(f"iteration {it}: non-finite loss (SSIM {float(similarity.detach())}); "
                                      "the last checkpoint is left as it was")
                optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad:  # a one-step graph at step 0 (where no gate acts) gives nothing
                    loss.backward()
                    optimizer.step()
                lr_schedule.step()
            record = {"loss": float(loss.detach()), "ssim": float(similarity.detach()), "macs_ratio": kept,
                      "seconds": timer.seconds}
            for key, value in record.items():
                history[key].append(value)
            bar.set_postfix(ssim=f"{record['ssim']:.3f}", macs=f"{kept:.3f}")
            if callback is not None:
                callback({"iteration": it, **record, "pruner": pruner})
            done = it + 1
            if ckpt_path is not None and (done % checkpoint_every == 0 or done == iterations):
                save_atomically({"pruner": pruner.state_dict(), "optimizer": optimizer.state_dict(),
                                 "lr_schedule": lr_schedule.state_dict(), "history": history, "iteration": done,
                                 "settings": settings}, ckpt_path)
    finally:
        net.detach()
        for p in frozen:
            p.requires_grad_(True)
    return SearchResult(pruner.eval(), prof, timesteps, history)


def search(sampler, conditions, ratio: float = 0.8, **kwargs) -> CacheSchedule:
    """Train a pruner (:func:`train_pruner`) and return the static schedule at ``ratio``."""
    return train_pruner(sampler, conditions, ratio, **kwargs).schedule(ratio)
