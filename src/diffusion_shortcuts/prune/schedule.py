"""``CacheSchedule``: the static table of which block reuses its cache at which step, and what it costs.

A schedule is what DiP-GO's search leaves behind (the pruner is discarded): a T x N boolean table
``reuse[t, b]`` (True: block b returns its cached work at step t), the sampler's timesteps, the block
names, MACs per block for one call on one sample, and the identity of the model configuration it was
made for. Row 0 is always computed in full (nothing is cached yet). Saved as JSON with a version field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import write_json
from .blocks import OUTPUT, RESIDUAL, BlockProfile
from .forecast import REUSE_MODES

FORMAT_VERSION = 1
TOLERANCE = 0.0125  # DiP-GO's post-processing stops when the pruned MACs fraction is this close to the target


class ScheduleError(ValueError):
    """A schedule file that cannot be read, or a schedule that does not fit the model or sampler."""


def handovers(timesteps, boundary: float | None) -> list[int]:
    """The steps after step 0 at which a pipeline with two denoisers hands over to the other (the one at or above
    ``boundary``, then the one below it): such a step computes every block, as step 0 does."""
    if boundary is None:
        return []
    return [step for step in range(1, len(timesteps)) if (timesteps[step] >= boundary) !=
            (timesteps[step - 1] >= boundary)]


@dataclass
class CacheSchedule:
    """Which block reuses at which step (``reuse``: bool [T, N]) and its MACs accounting.

    ``block_macs`` and ``total_macs`` are per sample and per denoiser call without guidance; guidance
    doubles every call (both branches run every block a step computes), which :meth:`macs` counts.
    """

    reuse: torch.Tensor
    timesteps: list[float]
    blocks: list[str]
    kinds: list[str]
    block_macs: list[int]
    total_macs: int
    model_id: str
    info: dict = field(default_factory=dict)
    whole_steps: bool = False  # a step that reuses every block reuses the whole denoiser call (costs nothing)
    mode: str = "copy"  # what a reused block returns: its cached work ("copy") or a forecast of it (REUSE_MODES)
    # a pipeline with two denoisers (Wan 2.2 A14B): {"names": [first, second], "boundary": timestep}; the rows of the
    # steps at or above the boundary are the first's table, the others the second's. None: one denoiser.
    experts: dict | None = None

    def __post_init__(self):
        self.reuse = torch.as_tensor(self.reuse, dtype=torch.bool).cpu()
        self.timesteps = [float(t) for t in self.timesteps]
        if not all(math.isfinite(t) for t in self.timesteps):
            raise ScheduleError(f"schedule timesteps must be finite, got {self.timesteps[:3]}...")
        self.blocks, self.kinds = list(self.blocks), list(self.kinds)
        self.block_macs = [int(m) for m in self.block_macs]
        t, n = len(self.timesteps), len(self.blocks)
        if self.reuse.shape != (t, n):
            raise ScheduleError(f"schedule table is {tuple(self.reuse.shape)} but there are {t} timesteps and {n} "
                                "blocks")
        if len(self.kinds) != n or len(self.block_macs) != n:
            raise ScheduleError(f"schedule has {n} blocks but {len(self.kinds)} kinds and {len(self.block_macs)} MACs")
        if bad := [k for k in self.kinds if k not in (OUTPUT, RESIDUAL)]:
            raise ScheduleError(f"unknown reuse kinds {bad}")
        if self.mode not in REUSE_MODES:
            raise ScheduleError(f"unknown reuse mode {self.mode!r}; known: {', '.join(REUSE_MODES)}")
        if t and self.reuse[0].any():
            raise ScheduleError("step 0 cannot reuse anything: nothing is cached before it")
        if sum(self.block_macs) > self.total_macs or min(self.block_macs, default=0) < 0:
            raise ScheduleError(f"block MACs {self.block_macs} do not fit in the total {self.total_macs}")
        if self.experts is not None:
            names, boundary = self.experts.get("names"), self.experts.get("boundary")
            if not (isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) for n in names)
                    and isinstance(boundary, (int, float)) and math.isfinite(boundary)):
                raise ScheduleError(f"experts must be {{'names': [first, second], 'boundary': timestep}}, got "
                                    f"{self.experts!r}")
            for step in self.expert_starts():
                if self.reuse[step].any():
                    raise ScheduleError(f"step {step} cannot reuse anything: it is {self.expert_of(step)}'s first "
                                        "step, and that denoiser has cached nothing yet")

    def for_experts(self, names: list[str], boundary: float) -> "CacheSchedule":
        """This table for a pipeline whose ``names[0]`` runs at timesteps at or above ``boundary`` and ``names[1]``
        below it (each follows the rows of its own steps). The second denoiser's first step computes every block,
        as step 0 does: its blocks have nothing cached from the steps the first one ran."""
        experts = {"names": list(names), "boundary": float(boundary)}
        reuse = self.reuse.clone()
        reuse[handovers(self.timesteps, boundary)] = False
        return dataclasses.replace(self, reuse=reuse, experts=experts)

    def expert_starts(self) -> list[int]:
        """The steps after step 0 at which another denoiser takes over (none for a schedule of one)."""
        return handovers(self.timesteps, self.experts["boundary"] if self.experts is not None else None)

    def expert_of(self, step: int) -> str | None:
        """The denoiser whose table holds row ``step`` (None for a schedule of one denoiser)."""
        if self.experts is None:
            return None
        first, second = self.experts["names"]
        return first if self.timesteps[step] >= self.experts["boundary"] else second

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_table(cls, reuse, timesteps, profile: BlockProfile, **info) -> "CacheSchedule":
        return cls(torch.as_tensor(reuse, dtype=torch.bool), [float(t) for t in timesteps], list(profile.blocks),
                   list(profile.kinds), list(profile.block_macs), profile.total_macs, profile.model_id, dict(info),
                   profile.whole_steps)

    @classmethod
    def keep_all(cls, timesteps, profile: BlockProfile) -> "CacheSchedule":
        """Every block computed at every step: the unpruned model."""
        return cls.from_table(torch.zeros(len(timesteps), len(profile.blocks)), timesteps, profile, method="full")

    @classmethod
    def uniform(cls, timesteps, profile: BlockProfile, interval: int, keep_outer: int = 1,
                branch: int | None = None) -> "CacheSchedule":
        """DeepCache-style (Ma et al. 2024): every ``interval`` steps compute everything, at the other steps
        reuse all blocks but the ``keep_outer`` outermost at each end (a UNet's first down and last up
        block; a transformer's first and last block).

        ``branch``: DeepCache's own ``cache_branch_id`` on a UNet, at sub-block granularity; the profile must
        be made for it (``profile(model, sample, cond, branch=branch)``, whose blocks are exactly what the
        branch reuses), and every one of its blocks is reused at the cached steps (``keep_outer`` unused).
        """
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        n = len(profile.blocks)
        inner = torch.zeros(n, dtype=torch.bool)
        if branch is not None:
            if profile.branch != branch:
                raise ValueError(f"branch={branch} needs a profile of that branch's blocks: "
                                 f"profile(model, sample, cond, branch={branch}); this one is for "
                                 + (f"branch {profile.branch}" if profile.branch is not None else "whole blocks"))
            inner[:] = True
            method = f"deepcache(interval={interval}, branch={branch})"
        else:
            if not 0 <= 2 * keep_outer <= n:
                raise ValueError(f"keep_outer={keep_outer} does not fit {n} blocks")
            inner[keep_outer:n - keep_outer] = True
            method = f"uniform(interval={interval}, keep_outer={keep_outer})"
        reuse = torch.zeros(len(timesteps), n, dtype=torch.bool)
        for i in range(len(timesteps)):
            if i % interval:
                reuse[i] = inner
        return cls.from_table(reuse, timesteps, profile, method=method)

    @classmethod
    def every(cls, timesteps, profile: BlockProfile, interval: int, warmup: int = 3) -> "CacheSchedule":
        """The step-synchronous rule (TaylorSeer's table, Liu et al. 2025): every block computed at the first
        ``warmup`` steps and at every ``interval``-th step after them, every block reused in between."""
        if interval < 1 or warmup < 1:
            raise ValueError(f"interval and warmup must be >= 1, got {interval} and {warmup}")
        reuse = torch.ones(len(timesteps), len(profile.blocks), dtype=torch.bool)
        for i in range(len(timesteps)):
            reuse[i] = not (i < warmup or (i - warmup) % interval == 0)
        return cls.from_table(reuse, timesteps, profile, method=f"every(interval={interval}, warmup={warmup})")

    @classmethod
    def every_for_ratio(cls, timesteps, profile: BlockProfile, ratio: float, warmup: int = 3) -> "CacheSchedule":
        """The rule table (:meth:`every`) whose pruned fraction of the MACs is nearest ``ratio`` (the start a
        search at ``ratio`` is best given: the zoo's schedules were searched from intervals 2, 4, 7 and 10 for
        0.5, 0.7, 0.8 and 0.85 on 50 steps)."""
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        tables = [cls.every(timesteps, profile, n, warmup) for n in range(1, max(2, len(timesteps)))]
        return min(tables, key=lambda table: abs(table.pruned_fraction - ratio))

    @classmethod
    def from_scores(cls, keep_scores: torch.Tensor, timesteps, profile: BlockProfile, ratio: float,
                    tolerance: float = TOLERANCE, iterations: int = 100, keep_steps=()) -> "CacheSchedule":
        """DiP-GO's post-processing: one global threshold on the keep scores, found by bisection, so that
        the pruned fraction of the MACs is within ``tolerance`` of ``ratio``; step 0 is never pruned, nor the
        ``keep_steps`` (a second denoiser's first step).

        Where no threshold lands within the tolerance (ties, or a ratio beyond what pruning every block
        after step 0 reaches) the closest achievable schedule is returned and ``info["within_tolerance"]``
        says so.
        """
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        scores = torch.as_tensor(keep_scores, dtype=torch.float64).detach().cpu()
        if scores.shape != (len(timesteps), len(profile.blocks)):
            raise ValueError(f"keep scores are {tuple(scores.shape)}, expected "
                             f"({len(timesteps)}, {len(profile.blocks)})")
        if not torch.isfinite(scores).all():
            raise ValueError("keep scores contain non-finite values")

        def table(threshold: float) -> torch.Tensor:
            reuse = scores < threshold
            reuse[[0, *keep_steps]] = False
            return reuse

        def pruned(threshold: float) -> float:
            return cls.from_table(table(threshold), timesteps, profile).pruned_fraction

        lo, hi = float(scores.min()) - 1.0, float(scores.max()) + 1.0  # pruned(lo) = 0, pruned(hi) = max
        best = min((lo, hi), key=lambda th: abs(pruned(th) - ratio))
        for _ in range(iterations):
            mid = (lo + hi) / 2
            fraction = pruned(mid)
            if abs(fraction - ratio) < abs(pruned(best) - ratio):
                best = mid
            if abs(fraction - ratio) <= tolerance:
                break
            lo, hi = (mid, hi) if fraction < ratio else (lo, mid)
        result = cls.from_table(table(best), timesteps, profile, method="dipgo", target_ratio=ratio, threshold=best)
        result.info["within_tolerance"] = abs(result.pruned_fraction - ratio) <= tolerance
        return result

    # ---- accounting ---------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def step_macs(self) -> torch.Tensor:
        """MACs of each step's call for one sample without guidance, shape (T,); a step that reuses every block
        costs nothing where the whole call is reused (``whole_steps``)."""
        kept = (~self.reuse).to(torch.float64) @ torch.tensor(self.block_macs, dtype=torch.float64)
        macs = kept + (self.total_macs - sum(self.block_macs))
        if self.whole_steps and self.mode == "copy" and self.blocks:
            macs[self.reuse.all(dim=1)] = 0.0
        return macs

    def macs(self, batch: int = 1, guidance: bool = False) -> int:
        """MACs of one whole generation of ``batch`` samples; guidance runs both branches every call."""
        return int(round(float(self.step_macs().sum()))) * batch * (2 if guidance else 1)

    def full_macs(self, batch: int = 1, guidance: bool = False) -> int:
        return self.total_macs * self.num_steps * batch * (2 if guidance else 1)

    @property
    def macs_ratio(self) -> float:
        """MACs of this schedule over the unpruned model's (the same with or without guidance)."""
        return self.macs() / self.full_macs()

    @property
    def pruned_fraction(self) -> float:
        return 1.0 - self.macs_ratio

    def summary(self) -> str:
        reused = int(self.reuse.sum())
        return (f"{self.num_steps} steps x {len(self.blocks)} blocks, {reused} block-steps reused, "
                f"MACs {self.macs_ratio:.3f} of full")

    # ---- checks -------------------------------------------------------------------------------
    def check_model(self, model_id: str, blocks: list[str]) -> None:
        """Refuse another model (named by both identities) or other blocks."""
        if model_id != self.model_id:
            raise ScheduleError(f"schedule was made for model {self.model_id}, this model is {model_id} "
                                "(a different architecture or configuration)")
        if list(blocks) != self.blocks:
            raise ScheduleError(f"schedule is for blocks {self.blocks}, the model's are {list(blocks)}")

    def check_timesteps(self, timesteps) -> None:
        theirs = [float(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
        if len(theirs) != self.num_steps:
            raise ScheduleError(f"schedule has {self.num_steps} steps, the sampler {len(theirs)}")
        if any(abs(a - b) > 1e-4 * max(1.0, abs(a)) for a, b in zip(theirs, self.timesteps)):
            raise ScheduleError(f"the sampler's timesteps {theirs[:3]}...{theirs[-2:]} differ from the schedule's "
                                f"{self.timesteps[:3]}...{self.timesteps[-2:]} (another scheduler or spacing)")

    def resampled(self, timesteps) -> "CacheSchedule":
        """This schedule for a sampler with other ``timesteps`` (another step count): each new step takes the
        row of the nearest of the schedule's timesteps; the first step computes everything. The new schedule's
        ``macs_ratio`` says what it costs; ``info["resampled_from"]`` the step count it was made for."""
        new = [float(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
        if not new:
            raise ScheduleError("cannot resample a schedule to no timesteps")
        ours = torch.tensor(self.timesteps, dtype=torch.float64)
        rows = [int((ours - t).abs().argmin()) for t in new]
        reuse = self.reuse[rows].clone()
        reuse[0] = False
        info = {**self.info, "resampled_from": self.num_steps}
        resampled = CacheSchedule(reuse, new, self.blocks, self.kinds, self.block_macs, self.total_macs, self.model_id,
                                  info, self.whole_steps, self.mode)
        return resampled if self.experts is None else resampled.for_experts(**self.experts)

    def with_mode(self, mode: str) -> "CacheSchedule":
        """The same table with another reuse mode (one of :data:`REUSE_MODES`)."""
        return dataclasses.replace(self, mode=mode, info={**self.info, "mode": mode})

    def fitted(self, timesteps, strict: bool = False) -> "CacheSchedule":
        """Itself when ``timesteps`` are its own; else (unless ``strict``) :meth:`resampled` to them."""
        try:
            self.check_timesteps(timesteps)
            return self
        except ScheduleError:
            if strict:
                raise
            return self.resampled(timesteps)

    # ---- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": "diffusion-shortcuts/cache-schedule", "version": FORMAT_VERSION,
                "model_id": self.model_id, "blocks": self.blocks, "kinds": self.kinds,
                "block_macs": self.block_macs, "total_macs": self.total_macs, "timesteps": self.timesteps,
                "reuse": [[int(v) for v in row] for row in self.reuse.tolist()], "whole_steps": self.whole_steps,
                "mode": self.mode, **({"experts": self.experts} if self.experts is not None else {}),
                "macs_ratio": self.macs_ratio, "info": self.info}

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "CacheSchedule":
        """A schedule file, or the ``schedule.json`` in a folder (``prune``'s output, or the LoRA folder that
        ``finetune --schedule`` ships its refit schedule in)."""
        path = Path(path)
        if path.is_dir():
            if not (path / "schedule.json").is_file():
                raise ScheduleError(f"{path}: a folder, not a schedule file, and no schedule.json in it")
            path = path / "schedule.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ScheduleError(f"{path}: no such schedule file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ScheduleError(f"{path}: not a schedule (invalid JSON: {e})") from None
        if not isinstance(data, dict) or data.get("format") != "diffusion-shortcuts/cache-schedule":
            raise ScheduleError(f"{path}: not a diffusion-shortcuts cache schedule")
        if data.get("version") != FORMAT_VERSION:
            raise ScheduleError(f"{path}: schedule format version {data.get('version')!r}, this library reads "
                                f"{FORMAT_VERSION}")
        keys = ("reuse", "timesteps", "blocks", "kinds", "block_macs", "total_macs", "model_id")
        if missing := [k for k in keys if k not in data]:
            raise ScheduleError(f"{path}: schedule lacks {missing}")
        _check_table(path, data)
        try:
            return cls(torch.tensor(data["reuse"], dtype=torch.bool).reshape(len(data["timesteps"]), -1)
                       if data["timesteps"] else torch.zeros(0, len(data["blocks"]), dtype=torch.bool),
                       data["timesteps"], data["blocks"], data["kinds"], data["block_macs"],
                       int(data["total_macs"]), str(data["model_id"]), dict(data.get("info", {})),
                       bool(data.get("whole_steps", False)), str(data.get("mode", "copy")), data.get("experts"))
        except ScheduleError as e:
            raise ScheduleError(f"{path}: {e}") from None
        except (TypeError, ValueError, RuntimeError) as e:
            raise ScheduleError(f"{path}: malformed schedule ({e})") from None


def _check_table(path: Path, data: dict) -> None:
    """The parts of a schedule file torch would misread or report without the file's name: timesteps a list of
    finite numbers, blocks a list of names, reuse one row of 0/1 (false/true) per timestep and one entry per block."""
    timesteps, blocks, reuse = data["timesteps"], data["blocks"], data["reuse"]
    if not isinstance(timesteps, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                                  and math.isfinite(t) for t in timesteps):
        shown = timesteps[:3] if isinstance(timesteps, list) else timesteps
        raise ScheduleError(f"{path}: timesteps must be a list of finite numbers, found {shown!r}")
    if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
        raise ScheduleError(f"{path}: blocks must be a list of block names")
    if not isinstance(reuse, list) or not all(isinstance(row, list) for row in reuse):
        raise ScheduleError(f"{path}: reuse must be a table: one list of {len(blocks)} entries per timestep")
    if len(reuse) != len(timesteps) or any(len(row) != len(blocks) for row in reuse):
        lengths = sorted({len(row) for row in reuse})
        raise ScheduleError(f"{path}: the reuse table has {len(reuse)} rows of {lengths} entries; {len(timesteps)} "
                            f"timesteps and {len(blocks)} blocks need {len(timesteps)} rows of {len(blocks)}")
    if bad := [v for row in reuse for v in row if v not in (0, 1) or not isinstance(v, (int, bool))]:
        raise ScheduleError(f"{path}: reuse entries must be 0/1 (false/true), found {bad[:3]}")
