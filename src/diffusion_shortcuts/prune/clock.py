"""The step clock of a cache schedule: which of the schedule's steps each denoiser call is, on which guidance
branch, and where a generation begins; the refusals when the caller's timesteps are not the schedule's.

Every call is keyed by (step, branch). The branch is the guidance branch a call computes where a family calls
them one at a time (``"cond"``, ``"uncond"``: Qwen-Image, Wan, Flux's true CFG), ``""`` (or the pipeline's own
name, ``"cond_uncond"``) for one call on both; each branch keeps its own position, so two calls at one step are
two branches, never a repeat.

- Under our :class:`~diffusion_shortcuts.Sampler` the step and branch are announced
  (:func:`~diffusion_shortcuts.sampling.current_step`): the clock reads no tensor back to the host. The sampler's
  timesteps are checked against the schedule's once, as Python floats.
- Under a stock pipeline call the branch is the name of diffusers' ``cache_context`` around the call, and the step
  its ``step_index`` where the pipeline fills it (Wan). Otherwise call k of a branch's generation is step k,
  checked against the schedule's timesteps at the precision the model was handed its timestep in (a bfloat16 Flux
  pipeline rounds ``t / 1000`` to bfloat16), never by float equality: one read of the timestep per call. A call
  that matches the schedule's first step starts a new generation; any other mismatch is refused, never run on
  stale caches.
"""

from __future__ import annotations

import torch

from ..sampling import SamplingStep, current_step
from .schedule import ScheduleError


_GRAPH_TASK = getattr(torch._C, "_current_graph_task_id", None)


def in_backward() -> bool:
    """True while autograd runs a backward pass (a gradient checkpoint recomputing an earlier step)."""
    return _GRAPH_TASK is not None and _GRAPH_TASK() != -1


def tolerance(timestep: float, dtype: torch.dtype | None) -> float:
    """How far a timestep handed to the model may lie from the schedule's: a relative 1e-4, or the two roundings
    (the timestep, then its scaled value) of a model in lower precision."""
    eps = torch.finfo(dtype).eps if dtype is not None and dtype.is_floating_point else 0.0
    return 1e-4 * max(1.0, abs(timestep)) + eps * abs(timestep)


class StepClock:
    """The step of each call for a schedule over ``timesteps`` (scheduler units) on a model of ``family``."""

    def __init__(self, timesteps, family, model):
        self.timesteps = [float(t) for t in timesteps]
        self.family, self.model = family, model
        self.checked: tuple[float, ...] | None = None  # the latest sampler timesteps found to be the schedule's
        self.reset()

    def reset(self) -> None:
        """Forget the generation in progress on every branch: the next call starts a new one."""
        self.last_steps: dict[str, int] = {}

    @property
    def last_step(self) -> int | None:
        """The latest step of any branch (None before the first call of a generation)."""
        return max(self.last_steps.values()) if self.last_steps else None

    def tick(self, timestep, branch: str = "", step_index: int | None = None) -> tuple[int, str, bool]:
        """``(step, branch, new_generation)`` for the call in progress; ``timestep`` is the argument the model was
        handed (read only under a stock call that names no step), ``branch`` and ``step_index`` what the stock
        pipeline's ``cache_context`` says (an announcement by our Sampler wins over both). A backward-pass
        recomputation returns its step and changes nothing."""
        announced = current_step()
        if announced is not None:
            branch = announced.branch
        if in_backward():
            return (announced.index if announced is not None else self._nearest(timestep)), branch, False
        last = self.last_steps.get(branch)
        if announced is not None:
            step = self._announced(announced)
        elif step_index is not None:
            step = self._indexed(step_index, timestep)
        else:
            step = self._counted(timestep, last)
        if last is not None and step == last:
            where = f" on guidance branch {branch!r}" if branch else ""
            raise ScheduleError(f"the model was called twice at step {step}{where}: a cache schedule needs one call "
                                "per step and branch (a family that calls the guidance branches one at a time must "
                                "name them: diffusers' cache_context(\"cond\" / \"uncond\"))")
        new = last is None or step < last
        if not new and step > last + 1:
            raise ScheduleError(f"the sampler went from step {last} to step {step} of the schedule's "
                                f"{len(self.timesteps)}: it runs other timesteps than the schedule was made for")
        self.last_steps[branch] = step
        return step, branch, new

    # ---- under the Sampler ---------------------------------------------------------------------------
    def _announced(self, announced: SamplingStep) -> int:
        if announced.timesteps is not self.checked:
            self._check(announced.timesteps)
            self.checked = announced.timesteps
        return announced.index

    def _check(self, theirs: tuple[float, ...]) -> None:
        ours = self.timesteps
        if len(theirs) == len(ours) and all(abs(a - b) <= tolerance(b, None) for a, b in zip(theirs, ours)):
            return
        steps = [self._match(t, None) for t in theirs]
        if None in steps:
            self._refuse(theirs[steps.index(None)])
        for a, b in zip(steps, steps[1:]):
            if b != a + 1:
                raise ScheduleError(f"the sampler went from step {a} to step {b} of the schedule's {len(ours)}: it "
                                    "runs other timesteps than the schedule was made for")
        raise ScheduleError(f"the sampler's {len(theirs)} timesteps are the schedule's steps {steps[0]}-{steps[-1]} "
                            f"of {len(ours)}: sample with the scheduler and number of steps the schedule was made for")

    # ---- under a stock call --------------------------------------------------------------------------
    def _indexed(self, step_index: int, timestep) -> int:
        """The step a pipeline's ``cache_context(step_index=i)`` names, checked against the schedule's timesteps."""
        if not 0 <= step_index < len(self.timesteps):
            raise ScheduleError(f"the pipeline is at step {step_index}, but the schedule has {len(self.timesteps)}: "
                                "sample with the scheduler and number of steps the schedule was made for")
        if timestep is not None:
            t = self.family.timestep_of(timestep, self.model)
            dtype = timestep.dtype if isinstance(timestep, torch.Tensor) else None
            if abs(t - self.timesteps[step_index]) > tolerance(self.timesteps[step_index], dtype):
                self._refuse(t)
        return step_index

    def _counted(self, timestep, last: int | None) -> int:
        if timestep is None:
            raise ScheduleError(f"{type(self.model).__name__} was called without a timestep: a schedule needs it "
                                "to know the step")
        t = self.family.timestep_of(timestep, self.model)
        dtype = timestep.dtype if isinstance(timestep, torch.Tensor) else None
        expected = 0 if last is None or last == len(self.timesteps) - 1 else last + 1
        for step in (expected, 0):
            if abs(t - self.timesteps[step]) <= tolerance(self.timesteps[step], dtype):
                return step
        step = self._match(t, dtype)
        if step is None:
            self._refuse(t)
        if step != last and (last is None or expected == 0 or step < last):  # not a continuation: a new start
            raise ScheduleError(f"a generation began at timestep {self.timesteps[step]:g}, the schedule's step "
                                f"{step} of {len(self.timesteps)}, not its first: sample with the scheduler and "
                                "number of steps the schedule was made for")
        return step

    def _nearest(self, timestep) -> int:
        t = self.family.timestep_of(timestep, self.model)
        return min(range(len(self.timesteps)), key=lambda s: abs(self.timesteps[s] - t))

    def _match(self, t: float, dtype) -> int | None:
        for step, ours in enumerate(self.timesteps):
            if abs(t - ours) <= tolerance(ours, dtype):
                return step
        return None

    def _refuse(self, t: float):
        ts = self.timesteps
        raise ScheduleError(f"timestep {t:g} is not one of the schedule's {len(ts)} timesteps "
                            f"({ts[0]:g}, {ts[1] if len(ts) > 1 else ts[0]:g}, ..., {ts[-1]:g}): sample with the "
                            "scheduler and number of steps the schedule was made for")
