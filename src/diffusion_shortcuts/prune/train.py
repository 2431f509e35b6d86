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

Under ``accelerate launch --num_processes P`` the search is data parallel (:mod:`diffusion_shortcuts.distributed`):
every process draws the iteration's global batch of ``batch_size * P`` samples, rolls out its slice (the full
model's targets sharded the same way), and the gate network's gradients are averaged, so every process holds the
same gates: those one process reaches with ``batch_size * P``. Only the main process writes checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import conditions as C
from .. import distributed
from .. import gradients as G
from ..checkpoints import Checkpoint, configured, make_optimizer, settings_of
from ..loop import LoopState, iteration_generator, run_loop
from ..families import adapter_id, unwrap
from ..metrics import Timer
from ..usage import whole_number
from .blocks import BlockProfile, profile
from .objective import Objective
from .pruner import KEEP, REUSE, Pruner
from .schedule import TOLERANCE, CacheSchedule, handovers
from .apply import gated

CHECKPOINT = "search_checkpoint.pt"
GRANULARITIES = ("block", "step", "step+block")


class SearchError(RuntimeError):
    """The search cannot go on (a non-finite loss); the last checkpoint is left as it was."""


@dataclass
class SearchResult:
    pruner: Pruner
    profile: BlockProfile
    timesteps: list[float]
    history: dict = field(default_factory=dict)
    reuse_mode: str = "copy"
    experts: dict | None = None  # the sampler's denoisers (Wan 2.2): the schedule's CacheSchedule.experts
    # the sampler's own timesteps where the search ran at fewer steps (``search_steps``): the schedule's default
    schedule_timesteps: list[float] | None = None

    @classmethod
    def load(cls, folder: str | Path, model, sample: torch.Tensor, cond=None) -> "SearchResult":
        """A saved search (``prune``'s output folder, or a zoo model's ``dipgo/``: ``pruner/`` and ``search.json``)
        for ``model``, profiled on one sample shaped like ``sample[0]`` with ``cond``'s first row; the reuse mode
        is the one the search trained with."""
        folder = Path(folder)
        pruner = Pruner.from_pretrained(folder / "pruner").eval()
        history = json.loads((folder / "search.json").read_text()) if (folder / "search.json").exists() else {}
        prof = profile(model, sample, cond, pruner.config.blocks)
        mode = history.get("settings", {}).get("reuse_mode", "copy")
        return cls(pruner, prof, list(pruner.config.timesteps), history, mode)

    def schedule(self, ratio: float, timesteps=None, profile: BlockProfile | None = None) -> CacheSchedule:
        """The static schedule at ``ratio`` (pruned MACs fraction) from the trained keep scores, in the reuse
        mode the search trained with. ``profile``: the block MACs to threshold on where the schedule is sampled at
        another shape than the search ran at (a search at fewer frames); default the search's own.

        ``timesteps``: a sampler's other timesteps (another step count). The keep scores are interpolated
        linearly in the timestep, block by block, and thresholded at ``ratio`` over the new steps, so the
        schedule keeps the MACs fraction asked for (``CacheSchedule.resampled`` copies the nearest table rows
        instead, and its MACs follow).
        """
        per_step = self.history.get("settings", {}).get("granularity") == "step"
        with torch.no_grad():
            scores = self.pruner.keep_scores(per_step).double().cpu()
        steps = self.timesteps
        timesteps = timesteps if timesteps is not None else self.schedule_timesteps
        if timesteps is not None:
            steps = [float(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
            scores = interpolate_scores(scores, self.timesteps, steps)
        boundary = self.experts["boundary"] if self.experts is not None else None
        sched = CacheSchedule.from_scores(scores, steps, profile or self.profile, ratio,
                                          keep_steps=handovers(steps, boundary))
        sched = sched.with_mode(self.reuse_mode)
        if self.experts is not None:
            sched = sched.for_experts(self.experts["names"], boundary)
        sched.info["search"] = {k: v for k, v in self.history.get("settings", {}).items()}
        if timesteps is not None:
            sched.info["scores_resampled_from"] = len(self.timesteps)
        return sched


def interpolate_scores(scores: torch.Tensor, timesteps: list[float], new: list[float]) -> torch.Tensor:
    """Keep scores [T, N] at ``timesteps`` read at ``new`` timesteps: linear in the timestep between the two
    nearest, held at the ends (``numpy.interp``, block by block)."""
    order = np.argsort(timesteps)
    old, values = np.asarray(timesteps, dtype=np.float64)[order], scores.double().cpu().numpy()[order]
    return torch.from_numpy(np.stack([np.interp(new, old, values[:, b]) for b in range(values.shape[1])], axis=1))


@dataclass(frozen=True)
class SearchConfig:
    """Every setting of a pruner search (:func:`train_pruner` takes it, or its fields as keywords); a checkpoint is
    matched on all of them. The last fields are derived from the sampler, the conditions and the start table.

    Attributes:
        ratio: the MACs fraction to prune; ``tau`` (default ``1 - ratio``) is the kept fraction below which the
            sparsity term is dropped; ``alpha`` its weight (DiP-GO eq. 8).
        iterations, batch_size, lr, optimizer, momentum: the gate network's training (momentum for ``"sgd"``);
            ``batch_size`` is per process: under ``accelerate launch`` an iteration's batch is ``batch_size`` times
            the processes.
        gradient: the policy for the gated rollout, or its spec; ``"checkpointed"`` is exact with the memory of one
            step.
        blocks: the gated blocks (default: the family's); ``sample_shape``: one latent's (C, H, W) (default: the
            sampler's).
        seed: the gate network's initialisation and every iteration's noise and conditions.
        target_batch: the full model's target images are made this many iterations at a time, in one rollout.
        pruner_kwargs: the :class:`Pruner`'s own settings (``dim``, ``heads``, ...).
        reuse_mode: what a reused block returns during the search and in the schedule: ``"copy"`` (DiP-GO) or
            ``"taylor1"`` / ``"taylor2"`` (its work extrapolated from its two / three latest computed steps); the
            search trains with it.
        validation: with a ``start`` table, the searched schedule and the start (if it prunes as much, within the
            tolerance) are compared at the end on this many fresh samples (SSIM to the full model's images, as the
            loss); where the start is better, or the searched table prunes less than asked (its keep scores allowed
            no closer threshold), the result is the pruner as it began (it gives the start table back),
            and ``history["validation"]`` says which was kept and why. A search from a good rule thus never returns
            a worse table than the rule on its own measure.
        training_set: 0 draws fresh noise every iteration and makes the full model's targets for it (DiP-GO's);
            N > 0 fixes N (noise, condition) pairs drawn from ``seed``, makes the full model's targets for them
            once (``target_batch`` iterations' worth at a time), and draws every iteration's batch from them: an
            iteration then costs only the gated rollout and its backward. A resume makes the same set again.
        granularity: what one gate decides: ``"block"`` (DiP-GO's: every (step, block) on its own), ``"step"``
            (one decision per step for all its blocks: the mean of the blocks' logits, so the schedule reuses whole
            steps) or ``"step+block"`` (step-level for the first half of the iterations, then block-level started
            from the step-level table: whole steps first, refined block by block).
        search_steps: 0 searches at the sampler's steps; N > 0 runs the search (its rollouts, targets and
            validation) at N steps, a start table resampled to them, and the schedule's keep scores are read at the
            sampler's timesteps (interpolated, :meth:`SearchResult.schedule`): an iteration costs about N / steps.
    """

    ratio: float = 0.8
    iterations: int = 300
    batch_size: int = 4
    lr: float = 0.01
    optimizer: str = "adam"
    momentum: float = 0.9
    alpha: float = 1.0
    tau: float | None = None
    gradient: str | G.GradientPolicy = "checkpointed"
    blocks: tuple[str, ...] | None = None
    sample_shape: tuple[int, ...] | None = None
    seed: int = 0
    target_batch: int = 8
    pruner_kwargs: dict | None = None
    reuse_mode: str = "copy"
    validation: int = 8
    training_set: int = 0
    granularity: str = "block"
    search_steps: int = 0
    sampler: dict = field(default_factory=dict, metadata={"derived": True})
    conditions: str = field(default="", metadata={"derived": True})
    # the table the gates start from ("": keep everything), as its method and a digest of its table
    start: str = field(default="", metadata={"derived": True})
    # processes sharing each iteration's batch (accelerate launch): a resume with another count is refused
    num_processes: int = field(default=1, metadata={"derived": True})
    # what the search keeps (:class:`~.objective.Objective`'s name): "ssim", "reward:NAME", "ssim+reward:NAME:W"
    objective: str = field(default="ssim", metadata={"derived": True})
    # the rows the reward sees (labels, prompts) when they are not ``conditions`` themselves: a digest, "" if none
    reward_conditions: str = field(default="", metadata={"derived": True})
    # the LoRA adapter on the (frozen) denoiser, a digest of its weights ("" if none): a resume onto another is refused
    adapter: str = field(default="", metadata={"derived": True})


def _check_search_args(config: SearchConfig, conditions, shape) -> None:
    if not 0.0 < config.ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {config.ratio}")
    for name in ("iterations", "batch_size", "target_batch", "validation"):
        whole_number(name, getattr(config, name))
    if config.granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {config.granularity!r}")
    whole_number("search_steps", config.search_steps, 0, "0: the sampler's steps")
    size = whole_number("training_set", config.training_set, 0, "0: fresh noise every iteration")
    if 0 < size < config.batch_size * distributed.num_processes():
        raise ValueError(f"training_set {size} is smaller than an iteration's batch of "
                         f"{config.batch_size * distributed.num_processes()}")
    if isinstance(conditions, (list, tuple)):  # the sampler takes them as they are: embeddings, not labels
        raise ValueError("conditions must be a non-empty batch of conditioning (a tensor, a dict of tensors) or None")
    if shape is None:
        raise ValueError("sample_shape: the model's configuration has no sample size; pass sample_shape=(C, H, W)")


def train_pruner(sampler, conditions, ratio: float | None = None, config: SearchConfig | None = None, *,
                 start: CacheSchedule | None = None, checkpoint_dir: str | Path | None = None,
                 checkpoint_every: int = 25, resume: bool = False, progress: bool = True, callback=None,
                 objective: Objective | None = None, reward_conditions=None, **settings) -> SearchResult:
    """Train a :class:`Pruner` for ``sampler`` (its model, scheduler, steps and guidance).

    Args:
        conditions: the conditioning rows to cycle through (e.g. ``m.encode(labels)`` or
            ``sampler.encode_prompt(prompts)``), or None.
        ratio / config / settings: a :class:`SearchConfig`, and any of its fields as keywords over it
            (``train_pruner(sampler, conds, 0.8, iterations=200, reuse_mode="taylor1")``; ``ratio`` may come
            third, as a position).
        start: a schedule the gates start from (e.g. ``CacheSchedule.every(...)``, a rule) instead of keeping
            every block, for this sampler's timesteps and blocks; the search then moves away from it where that
            lowers the loss. ``"calibrated"``: the table :func:`~.calibrate.calibrate` makes at ``1 - ratio`` of the
            MACs from one full generation of the conditions (the ``prune`` command's default start).
        validation: with a ``start``, the searched schedule and the start table (if it prunes as much, within
            the tolerance) are compared at the end on this many fresh samples (SSIM to the full model's images,
            as the loss); where the start is better the result is the pruner as it began (it gives the start
            table back), and ``history["validation"]`` says which was kept and why. A search from a good rule
            thus never returns a worse table than the rule on its own measure.
        checkpoint_dir / checkpoint_every / resume: a checkpoint (pruner, optimizer, LR schedule,
            history, iteration) is written atomically every ``checkpoint_every`` iterations; with
            ``resume`` the search continues from it, refusing one made with other settings
            (:class:`SearchConfig`) and naming the first difference.
        callback: ``callback(event)`` after each iteration (the loop kit's contract, :mod:`diffusion_shortcuts.loop`:
            ``iteration``, ``elapsed``, ``loss``, ``ssim``, ``macs_ratio``, ``seconds``, and with a reward objective
            ``reward``, ``reward_full``, ``reward_drop``); returning True stops there.
        objective: what the gates keep (:class:`~.objective.Objective`): the full model's images (``"ssim"``,
            DiP-GO's, the default), a reward (a hinge on its drop from the full model's sample from the same noise)
            or both; the start validation compares by it too. ``reward_conditions``: the rows of ``conditions`` as
            the reward sees them (labels, prompts), default ``conditions`` themselves.
    """
    config = configured(SearchConfig, config, {**settings, **({"ratio": ratio} if ratio is not None else {})})
    if isinstance(start, str):
        if start != "calibrated":
            raise ValueError(f"start must be a CacheSchedule, 'calibrated' or None, got {start!r}")
        from .calibrate import calibrate
        start = calibrate(sampler, conditions, macs=1.0 - config.ratio, mode=config.reuse_mode, seed=config.seed)
    objective = objective if objective is not None else Objective()
    if reward_conditions is not None and C.count(reward_conditions) != C.count(conditions):
        raise ValueError(f"reward_conditions has {C.count(reward_conditions)} rows, conditions "
                         f"{C.count(conditions)}: one row of each per condition")
    policy = G.resolve(config.gradient)
    if policy is None:
        raise ValueError("gradient: the search needs a gradient policy, e.g. Checkpointed(), got None")
    if isinstance(policy, G.Shortcut) and policy.step in ("first", 0):
        raise ValueError(f"gradient {policy.spec}: its one graph is step 0's call, where no gate acts (step 0 always "
                         "computes every block), so the gates would get no gradient; use shortcut:random")
    shape = config.sample_shape if config.sample_shape is not None else sampler.sample_shape
    _check_search_args(config, conditions, shape)
    config = dataclasses.replace(
        config, tau=1.0 - config.ratio if config.tau is None else config.tau, gradient=policy.spec,
        blocks=tuple(config.blocks) if config.blocks is not None else None, sample_shape=tuple(shape),
        start=_describe_start(start), sampler=sampler.describe(),
        conditions=C.fingerprint(conditions), num_processes=distributed.num_processes(), objective=objective.name,
        reward_conditions="" if reward_conditions is None else C.fingerprint(reward_conditions),
        adapter=adapter_id(sampler.model) or "")
    searched_at = sampler
    if config.search_steps and config.search_steps != sampler.num_inference_steps:
        searched_at = copy.copy(sampler)
        searched_at.num_inference_steps = config.search_steps
        start = start.resampled(searched_at.timesteps) if start is not None else None
    search = _Search(searched_at, conditions, policy, config, start, objective,
                     conditions if reward_conditions is None else reward_conditions)
    checkpoint = Checkpoint(checkpoint_dir, CHECKPOINT, settings_of(config), checkpoint_every, resume)
    with search.attached():
        run_loop(search, config.iterations, checkpoint, desc="pruner search", progress=progress, callback=callback,
                 map_location=search.device, main_process=distributed.is_main_process())
        experts = {"names": sampler.expert_names, "boundary": sampler.experts[0][1]} if sampler.experts else None
        result = SearchResult(search.pruner.eval(), search.profile, search.timesteps, search.history,
                              config.reuse_mode, experts,
                              None if searched_at is sampler else [float(t) for t in sampler.timesteps])
        if search.start is not None:
            search.keep_the_better(result)
    return result


class _Search(LoopState):
    """The state of one pruner search and its iteration (see :func:`train_pruner`)."""

    def __init__(self, sampler, conditions, policy, config: SearchConfig, start: CacheSchedule | None,
                 objective: Objective, reward_conditions):
        self.sampler, self.conditions, self.policy, self.config = sampler, conditions, policy, config
        self.objective, self.reward_conditions = objective, reward_conditions
        model = sampler.model
        self.device = next(unwrap(model).parameters()).device
        self.timesteps = [float(t) for t in sampler.timesteps]
        example = torch.zeros(1, *config.sample_shape, device=self.device)
        self.profile = prof = profile(model, example, C.first(conditions),
                                      list(config.blocks) if config.blocks else None)
        self.gamma = prof.gamma.to(self.device)
        self.block_macs = torch.tensor(prof.block_macs, dtype=torch.float64, device=self.device)
        with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the caller's RNG alone
            torch.manual_seed(config.seed)
            self.pruner = Pruner(len(self.timesteps), len(prof.blocks), blocks=list(prof.blocks),
                                 timesteps=self.timesteps, **(config.pruner_kwargs or {})).to(self.device)
        self.start = start
        if start is not None:
            start.check_model(prof.model_id, list(prof.blocks))
            start.check_timesteps(self.timesteps)
            self.pruner.start_from(start.reuse)
            self.initial_state = copy.deepcopy(self.pruner.state_dict())
        self.optimizer = make_optimizer(config.optimizer, self.pruner.parameters(), config.lr,
                                        momentum=config.momentum if config.optimizer == "sgd" else 0.0)
        self.lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, config.iterations)
        first = "latent_distance" if objective.kind == "latent" else "ssim"
        self.history = {"settings": settings_of(config), "loss": [], first: [], "macs_ratio": [], "seconds": []}
        # the rollouts the objective compares: images, or final latents with no decoding for ``latent``
        self.rollout = copy.copy(sampler)
        if objective.kind == "latent":
            self.rollout.decode = None
        if self.objective.reward is not None:
            self.history.update(reward=[], reward_full=[], reward_drop=[])
        self.n_cond = C.count(conditions)
        self.perm = torch.randperm(self.n_cond, generator=torch.Generator().manual_seed(config.seed))
        # the search's own table: every block computed (the gates decide), no whole step skipped
        table = dataclasses.replace(CacheSchedule.keep_all(self.timesteps, prof), mode=config.reuse_mode,
                                    whole_steps=False)
        if sampler.experts:
            table = table.for_experts(sampler.expert_names, sampler.experts[0][1])
        self.net = gated(list(zip(sampler.expert_names, sampler.models)), table)
        self.targets: dict[int, torch.Tensor] = {}
        self.set_targets: torch.Tensor | None = None  # the training set's full-model images, made once
        self.set_noise = torch.randn((config.training_set, *config.sample_shape),
                                     generator=torch.Generator().manual_seed(config.seed + 104729))

    def objects(self) -> dict:
        return {"pruner": self.pruner, "optimizer": self.optimizer, "lr_schedule": self.lr_schedule}

    def postfix(self, record: dict) -> dict:
        figure = "latent_distance" if "latent_distance" in record else "ssim"
        return {figure.split("_")[-1]: f"{record[figure]:.3f}", "macs": f"{record['macs_ratio']:.3f}"}

    @contextmanager
    def attached(self):
        """The SuperNet on the model and the model's weights frozen, for the duration of the search."""
        frozen = [p for model in self.sampler.models for p in unwrap(model).parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        self.net.attach()
        try:
            yield
        finally:
            self.net.detach()
            for p in frozen:
                p.requires_grad_(True)

    def batch(self, iteration: int):
        """Noise, conditions and the reward's conditions of iteration ``iteration``: this process's slice of the
        global batch (drawn from the fixed training set where there is one)."""
        cfg = self.config
        size, mine = cfg.batch_size * cfg.num_processes, distributed.my_slice(cfg.batch_size)
        if cfg.training_set:
            members = self.members(iteration)[mine]
            noise, rows = self.set_noise[members], self.perm[members % self.n_cond]
        else:
            gen = iteration_generator(cfg.seed, iteration)
            noise = torch.randn((size, *cfg.sample_shape), generator=gen)[mine]
            rows = self.perm[(iteration * size + torch.arange(size)) % self.n_cond][mine]
        return noise.to(self.device), C.take(self.conditions, rows), C.take(self.reward_conditions, rows)

    def members(self, iteration: int) -> torch.Tensor:
        """The training-set members of iteration ``iteration``'s global batch: the set walked in one shuffled order
        of the seed, a new shuffle every pass."""
        cfg = self.config
        size, count = cfg.batch_size * cfg.num_processes, cfg.training_set
        positions = iteration * size + torch.arange(size)
        passes = positions // count
        orders = {int(p): torch.randperm(count, generator=torch.Generator().manual_seed(cfg.seed * 7919 + int(p)))
                  for p in passes.unique()}
        return torch.stack([orders[int(p)][int(q)] for p, q in zip(passes, positions % count)])

    def set_target(self, members: torch.Tensor) -> torch.Tensor:
        """The full model's images of training-set ``members``, made for the whole set once, ``target_batch``
        iterations' worth of samples in a rollout."""
        if self.set_targets is None:
            chunk = self.config.batch_size * self.config.target_batch
            self.net.use_table(torch.zeros(len(self.timesteps), len(self.profile.blocks), dtype=torch.bool))
            parts = []
            for first in range(0, self.config.training_set, chunk):
                index = torch.arange(first, min(first + chunk, self.config.training_set))
                cond = None if self.conditions is None else C.take(self.conditions, self.perm[index % self.n_cond])
                parts.append(self.rollout(self.set_noise[index].to(self.device), cond).detach())
            self.set_targets = torch.cat(parts)
        return self.set_targets[members.to(self.set_targets.device)]

    def target(self, it: int) -> torch.Tensor:
        """The full model's images, made ``target_batch`` iterations at a time in one rollout; pools start
        at fixed iterations, so a resumed run sees the same targets."""
        if self.config.training_set:
            cfg = self.config
            return self.set_target(self.members(it)[distributed.my_slice(cfg.batch_size)])
        if it not in self.targets:
            first = it - it % self.config.target_batch
            its = list(range(first, min(first + self.config.target_batch, self.config.iterations)))
            batches = [self.batch(j) for j in its]
            noise = torch.cat([b[0] for b in batches])
            cond = None if self.conditions is None else C.concat(*[b[1] for b in batches])
            self.net.use_table(torch.zeros(len(self.timesteps), len(self.profile.blocks), dtype=torch.bool))
            full = self.rollout(noise, cond).detach()
            self.targets = dict(zip(its, full.split(self.config.batch_size)))
        return self.targets.pop(it)

    def step(self, it: int) -> dict:
        cfg = self.config
        with Timer() as timer:  # the full model's images made for this iteration count in its seconds
            target = self.target(it)
            noise, cond, seen = self.batch(it)
            if cfg.granularity == "step+block" and it == self.blocks_from:
                self.refine_blocks()
            gates = self.pruner.gates(per_step=self.per_step(it))
            self.net.use_gates(gates)
            images = self.rollout(noise, cond, gradient=self.policy,
                                  generator=torch.Generator().manual_seed(cfg.seed + it))
            quality, figures = self.objective.loss(images, target, seen)
            keep_macs = (gates[..., KEEP].double() @ self.gamma).mean()  # mean_t sum_b gamma_b g_keep[t, b]
            # the kept MACs fraction of the current hard gates, summed in whole MACs (exactly 1 when all keep)
            kept = (self.profile.other_macs + float((gates[..., KEEP].detach().double() @ self.block_macs).mean())
                    ) / self.profile.total_macs
            sparsity = keep_macs if kept > cfg.tau else torch.zeros((), dtype=keep_macs.dtype, device=self.device)
            loss = quality + cfg.alpha * sparsity
            # the global batch's figures, the same on every process: all of them stop here together or none
            names = ["loss", *figures]
            values = distributed.mean(torch.stack([loss.detach().double(), *(v.double() for v in figures.values())]))
            if not torch.isfinite(values).all():
                raise SearchError(f"iteration {it}: non-finite loss (SSIM {float(values[1])}); "
                                  "the last checkpoint is left as it was")
            self.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:  # a one-step graph at step 0 (where no gate acts) gives nothing
                loss.backward()
                distributed.average_gradients(self.pruner.parameters())
                self.optimizer.step()
            self.lr_schedule.step()
        record = {**{name: float(v) for name, v in zip(names, values)}, "macs_ratio": kept, "seconds": timer.seconds}
        for key, value in record.items():
            self.history[key].append(value)
        return record

    @property
    def blocks_from(self) -> int:
        """The first iteration of the block-level phase of a ``step+block`` search."""
        return self.config.iterations // 2

    def per_step(self, iteration: int) -> bool:
        granularity = self.config.granularity
        return granularity == "step" or (granularity == "step+block" and iteration < self.blocks_from)

    @torch.no_grad()
    def refine_blocks(self) -> None:
        """The step-level phase's hard table becomes the start of the block-level one: the gates are reset to it
        exactly and the optimizer's moments cleared (they were those of the tied logits)."""
        table = self.pruner.gates(per_step=True)[..., REUSE] > 0.5
        self.pruner.restart_from(table)
        self.optimizer.state.clear()
        self.history["blocks_from"] = self.blocks_from

    @torch.no_grad()
    def keep_the_better(self, result: SearchResult) -> None:
        """Compare ``result``'s schedule with the start table on fresh samples by the search's objective (for SSIM:
        the SSIM to the full model's images); return the pruner to its start where the start prunes as much and is
        better, or the searched table prunes less than asked (see ``validation`` in :func:`train_pruner`).

        The images are clamped to [0, 1] as every comparison and report judges samples (the training loss keeps
        them unclamped, for the gradient): unclamped, a model that overshoots the range is judged on pixels no one
        sees, and the validation picked a table worse than its start by the judged SSIM."""
        cfg = self.config
        gen = torch.Generator().manual_seed(2**31 + cfg.seed)  # apart from every training batch's seed
        noise = torch.randn((cfg.validation, *cfg.sample_shape), generator=gen).to(self.device)
        rows = torch.arange(cfg.validation) % self.n_cond
        cond, seen = C.take(self.conditions, rows), C.take(self.reward_conditions, rows)

        def images(reuse: torch.Tensor) -> torch.Tensor:
            self.net.use_table(reuse)
            out = self.rollout(noise, cond)
            return out if self.objective.kind == "latent" else out.clamp(0, 1)

        full = images(torch.zeros(len(self.timesteps), len(self.profile.blocks), dtype=torch.bool))
        searched = result.schedule(cfg.ratio, timesteps=self.timesteps)
        loss_searched, searched_figures = self.objective.loss(images(searched.reuse), full, seen)
        loss_start, start_figures = self.objective.loss(images(self.start.reuse), full, seen)
        start_prunes_enough = self.start.pruned_fraction >= cfg.ratio - TOLERANCE
        searched_prunes_enough = searched.pruned_fraction >= cfg.ratio - TOLERANCE  # else no like-for-like contest
        kept = "start" if start_prunes_enough and (loss_start < loss_searched or not searched_prunes_enough) else \
            "searched"
        if kept == "start":
            self.pruner.load_state_dict(self.initial_state)
        self.history["validation"] = {
            "samples": cfg.validation, "kept": kept, "objective": self.objective.name,
            "loss_searched": float(loss_searched), "loss_start": float(loss_start),
            **{f"{name}_searched": float(v) for name, v in searched_figures.items()},
            **{f"{name}_start": float(v) for name, v in start_figures.items()},
            "macs_searched": searched.macs_ratio, "macs_start": self.start.macs_ratio}


def _describe_start(start: CacheSchedule | None) -> str:
    return "" if start is None else f"{start.info.get('method', 'table')}:{C.fingerprint(start.reuse)}"


def search(sampler, conditions, ratio: float = 0.8, **kwargs) -> CacheSchedule:
    """Train a pruner (:func:`train_pruner`) and return the static schedule at ``ratio``."""
    return train_pruner(sampler, conditions, ratio, **kwargs).schedule(ratio)


def refit(sampler, schedule: CacheSchedule, conditions, iterations: int = 50, **kwargs) -> CacheSchedule:
    """``schedule`` refit to the model ``sampler`` drives now (a LoRA loaded, weights fine-tuned): a short search
    started from it at its own pruned fraction and reuse mode (:func:`train_pruner` with ``start=schedule``), ended by
    the start validation, so the result is never worse than ``schedule`` on the model by the search's objective.

    A schedule searched on the base model was trained to copy the base model's images; after fine-tuning the blocks'
    outputs move and the reuse that was harmless may not be. ``info["refit"]`` of the result holds the validation's
    figures: the given schedule on this model (``ssim_start``, ``loss_start``), the refit one (``*_searched``), which
    was kept, and the search's seconds. ``kwargs``: any :func:`train_pruner` keyword (``batch_size``, ``lr``,
    ``objective``, ``validation``, ``checkpoint_dir``, ...).
    """
    schedule.check_timesteps(sampler.timesteps)
    ratio = schedule.pruned_fraction
    kwargs.setdefault("reuse_mode", schedule.mode)
    result = train_pruner(sampler, conditions, ratio, start=schedule, iterations=iterations, **kwargs)
    refitted = result.schedule(ratio)
    refitted.info["refit"] = {**result.history["validation"], "iterations": len(result.history["loss"]),
                              "seconds": sum(result.history["seconds"]), "from": schedule.info.get("method", "table")}
    return refitted
