"""The DiP-GO SuperNet: gated blocks that either run or return their work cached at an earlier step.

The wrappers are diffusers hooks (``diffusers.hooks.HookRegistry``) on the model and on each block, so
the model keeps its class, parameters and state dict, and removing the hooks restores it exactly.

- A hook on the model reads the timestep of every denoiser call (in the scheduler's units: the family
  says how the model's ``timestep`` argument is scaled) and maps it to the step index of the schedule
  (a timestep the schedule does not have, or a skipped step, is an error: the sampler and the schedule
  disagree).
- A hook on each block either computes the block or reuses its cache. Caches hold, per block, the
  work of the steps at which the block ran, as whole batch tensors: under classifier-free guidance the
  batch is ``[uncond; cond]`` and row r of a cache is only ever read by row r, so the two branches
  never read each other's cache.
- A generation starts whenever the Sampler starts one (it resets the stateful diffusers hooks of its
  model), and also, for stock pipeline calls that never reset a UNet's hooks, whenever step 0 comes
  again or the step index goes back outside a backward pass. A generation that the Sampler did not
  announce must begin at step 0: a stock call with other timesteps is refused, never run on stale
  caches. Only the Sampler may start mid-way (``start_step``).

Two modes:
- table (inference): ``reuse[t, b]`` True means the block is not called at all at step t.
- gates (search): every block runs and its result is ``g_reuse * cache + g_keep * f(x)`` with hard 0/1
  gates that carry straight-through gradients to the pruner (DiP-GO eq. 3).

Caches are keyed by step and written once per generation. Gradient checkpointing recomputes a step's
forward during backward: the recomputation then reads the same cache the forward read, and overwrites
nothing. Under ``torch.no_grad()`` (plain sampling) only the newest cached value per block is kept.
"""

from __future__ import annotations

import functools
import inspect

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..families import family_of, unwrap
from .blocks import OUTPUT, resolve_blocks, reuse_kind
from .schedule import REUSE_MODES, ScheduleError

HOOK_NAME = "diffusion_shortcuts.prune"


def _map(fn, *trees):
    """Apply ``fn`` leafwise to tensors in matching (nested) tuples, e.g. a down block's (h, residuals);
    a missing leaf (SD3's last block returns no text stream) stays missing."""
    first = trees[0]
    if isinstance(first, (tuple, list)):
        return type(first)(_map(fn, *parts) for parts in zip(*trees))
    return None if any(t is None for t in trees) else fn(*trees)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (a gradient checkpoint recomputing an earlier step)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _leaves(tree):
    if isinstance(tree, (tuple, list)):
        for part in tree:
            yield from _leaves(part)
    elif isinstance(tree, torch.Tensor):
        yield tree


def _batch(tree) -> int:
    return next(_leaves(tree)).shape[0]


class _StepHook(ModelHook):
    """On the model: read each call's timestep and tell the SuperNet which step it is."""

    _is_stateful = True

    def __init__(self, net: "SuperNet"):
        super().__init__()
        self.net = net
        self.signature = None

    def pre_forward(self, module, *args, **kwargs):
        if self.signature is None:
            self.signature = _class_signature(type(module).forward)
        bound = self.signature.bind_partial(module, *args, **kwargs)
        timestep = bound.arguments.get("timestep")
        if timestep is None:
            raise ScheduleError(f"{type(module).__name__} was called without a timestep: a schedule needs it "
                                "to know the step")
        self.net.enter(timestep)
        return args, kwargs

    def new_forward(self, module, *args, **kwargs):
        """The whole call, or (at a step that reuses every block, where that is exact) its cached output."""
        cached = self.net.whole_step_output()
        if cached is not None:
            return cached
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.net.remember_output(out)
        return out

    def reset_state(self, module):
        self.net.reset(announced=True)
        return module


@functools.lru_cache(maxsize=None)
def _class_signature(function) -> inspect.Signature:
    """``inspect.signature`` of a class's function, computed once per function (a schedule is applied per
    generation, and the signatures of a UNet's blocks cost as much as a few sampling steps)."""
    return inspect.signature(function)


def _positions(signature: inspect.Signature, names: tuple[str, ...]) -> list[tuple[str, int | None]]:
    """Each name with its position among the signature's positional parameters (None if keyword-only or absent),
    so that a block call's streams are read without binding its arguments at every call."""
    positional = [p.name for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [(name, positional.index(name) if name in positional else None) for name in names]


def _forward_signature(module: torch.nn.Module) -> inspect.Signature:
    """The signature of ``module.forward`` as called (without ``self``)."""
    if getattr(module.forward, "__func__", None) is not type(module).forward:
        return inspect.signature(module.forward)  # a forward replaced on the instance
    signature = _class_signature(type(module).forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


class _BlockHook(ModelHook):
    """On one block: compute it, or return its cached work (the SuperNet decides)."""

    def __init__(self, net: "SuperNet", index: int):
        super().__init__()
        self.net = net
        self.index = index

    def new_forward(self, module, *args, **kwargs):
        return self.net.run_block(self.index, self.fn_ref.original_forward, args, kwargs)


class SuperNet:
    """Gated blocks of ``model`` for a sampler with the given ``timesteps`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, timesteps, blocks: list[str] | None = None, kinds=None,
                 whole_steps: bool = False, full_graph_steps: bool = False, mode: str = "copy"):
        self.model = unwrap(model)
        self.family = family_of(self.model)
        resolved = resolve_blocks(self.model, blocks)
        self.names = [n for n, _ in resolved]
        self.modules = [m for _, m in resolved]
        self.signatures = [_forward_signature(m) for m in self.modules]
        self.stream_positions = [_positions(sig, self.family.streams) for sig in self.signatures]
        self.kinds = list(kinds) if kinds is not None else [reuse_kind(self.model, n) for n in self.names]
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
        # the table, read at every block call: Python lists, not tensor indexing
        self.reuse: list[list[bool]] | None = [[False] * len(self.names) for _ in range(len(self.timesteps))]
        self.gates: torch.Tensor | None = None
        self.computed = [0] * len(self.names)  # block forwards really run, for accounting and tests
        if mode not in REUSE_MODES:
            raise ScheduleError(f"reuse mode must be one of {', '.join(REUSE_MODES)}, got {mode!r}")
        self.mode = mode  # "copy": the cached work as it was; "taylorK": extrapolated to order K
        self.order = REUSE_MODES[mode]
        self.whole_steps = whole_steps and mode == "copy"  # a forecast changes the output: the call must run
        # a call that keeps its autograd graph (SDO's one step) computes every block: only no-grad calls reuse
        self.full_graph_steps = full_graph_steps
        self.skipped_calls = 0
        self.calls = 0  # denoiser calls seen (skipped ones included)
        self.attached = False
        self.reset()

    # ---- modes --------------------------------------------------------------------------------
    def use_table(self, reuse: torch.Tensor) -> None:
        """Inference: ``reuse[t, b]`` True skips block b at step t (row 0 is ignored: step 0 runs in full)."""
        reuse = torch.as_tensor(reuse, dtype=torch.bool).cpu()
        if reuse.shape != (len(self.timesteps), len(self.names)):
            raise ScheduleError(f"reuse table {tuple(reuse.shape)} does not match {len(self.timesteps)} steps x "
                                f"{len(self.names)} blocks")
        self.reuse, self.gates = reuse.tolist(), None

    def use_gates(self, gates: torch.Tensor) -> None:
        """Search: ``gates[t, b] = (g_reuse, g_keep)``, hard one-hot values carrying gradients."""
        if gates.shape != (len(self.timesteps), len(self.names), 2):
            raise ScheduleError(f"gates {tuple(gates.shape)} do not match ({len(self.timesteps)}, {len(self.names)}, 2)")
        self.gates, self.reuse = gates, None

    def reset(self, announced: bool = False) -> None:
        """Forget every cache: the next call starts a new generation (at any step if ``announced`` by the
        Sampler, which may start mid-way; else at step 0)."""
        self.caches: list[dict[int, object]] = [{} for _ in self.names]
        # search with a forecast: steps whose hard gate chose reuse; their stored (mixed) work is a forecast, and
        # a forecast extrapolates from computed steps only, as at inference, where reused steps store nothing
        self.forecast_steps: list[set[int]] = [set() for _ in self.names]
        self.outputs: dict[int, object] = {}  # whole-call outputs by step, for steps that reuse everything
        self.step: int | None = None
        self.last_step: int | None = None
        self.announced = announced

    # ---- hooks --------------------------------------------------------------------------------
    def attach(self) -> "SuperNet":
        registry = HookRegistry.check_if_exists_or_initialize(self.model)
        if registry.get_hook(HOOK_NAME) is not None:
            raise RuntimeError("a cache schedule is already applied to this model; disable it first")
        registry.register_hook(_StepHook(self), HOOK_NAME)
        for index, module in enumerate(self.modules):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_BlockHook(self, index), HOOK_NAME)
        registry.invalidate_child_registries_cache()
        self.attached = True
        return self

    def detach(self) -> None:
        if not self.attached:
            return
        HookRegistry.check_if_exists_or_initialize(self.model).remove_hook(HOOK_NAME, recurse=True)
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()
        self.attached = False
        self.reset()

    @staticmethod
    def of(model: torch.nn.Module) -> "SuperNet | None":
        """The SuperNet attached to ``model``, if any."""
        registry = getattr(unwrap(model), "_diffusers_hook", None)
        hook = registry.get_hook(HOOK_NAME) if registry is not None else None
        return hook.net if hook is not None else None

    # ---- per call -----------------------------------------------------------------------------
    def step_index(self, timestep) -> int:
        """The schedule's step of a model call's ``timestep`` argument."""
        t = self.family.timestep_of(timestep, self.model)
        hits = ((self.timesteps - t).abs() <= 1e-4 * max(1.0, abs(t))).nonzero()
        if len(hits) == 0:
            ts = self.timesteps.tolist()
            raise ScheduleError(f"timestep {t:g} is not one of the schedule's {len(ts)} timesteps "
                                f"({ts[0]:g}, {ts[1] if len(ts) > 1 else ts[0]:g}, ..., {ts[-1]:g}): sample with the "
                                "scheduler and number of steps the schedule was made for")
        return int(hits[0])

    def enter(self, timestep) -> None:
        step = self.step_index(timestep)
        if _in_backward():  # a checkpoint recomputing an earlier step reads the caches its forward read
            self.step = step
            return
        self.calls += 1
        if self.last_step is not None and step == self.last_step:
            raise ScheduleError(f"the model was called twice at step {step}: a cache schedule needs one call per "
                                "step, with both guidance branches batched")
        if step == 0 or (self.last_step is not None and step < self.last_step):
            self.reset()
        if self.last_step is None and step != 0 and not self.announced:
            raise ScheduleError(f"a generation began at timestep {self.timesteps[step].item():g}, the schedule's step "
                                f"{step} of {len(self.timesteps)}, not its first: sample with the scheduler and "
                                "number of steps the schedule was made for")
        if self.last_step is not None and step > self.last_step + 1:
            raise ScheduleError(f"the sampler went from step {self.last_step} to step {step} of the schedule's "
                                f"{len(self.timesteps)}: it runs other timesteps than the schedule was made for")
        self.step = step
        self.last_step = step
        self.announced = False

    def whole_step_output(self):
        """The output of the latest call before this step, when this step reuses every block and ``whole_steps``
        says that is exact; else None (the call runs)."""
        step = self.step
        if not self.whole_steps or self.gates is not None or step is None or not all(self.reuse[step]) \
                or self._graph_step_in_full():
            return None
        earlier = [s for s in self.outputs if s < step]
        if not earlier or any(self._latest(i, step) is None for i in range(len(self.names))):
            return None
        self.skipped_calls += 1
        return self.outputs[max(earlier)]

    def _graph_step_in_full(self) -> bool:
        return self.full_graph_steps and torch.is_grad_enabled()

    def remember_output(self, out) -> None:
        if self.step is None or not self.whole_steps:
            return
        if self.step not in self.outputs:
            self.outputs[self.step] = out
            if not torch.is_grad_enabled():
                for old in [s for s in self.outputs if s < self.step]:
                    del self.outputs[old]

    def _latest(self, index: int, step: int):
        """Block ``index``'s latest work before ``step`` (None if it has none)."""
        earlier = [s for s in self.caches[index] if s < step]
        return self.caches[index][max(earlier)] if earlier else None

    def _cached(self, index: int, step: int):
        """What block ``index`` reuses at ``step``: its latest work before it ("copy"), or that work extrapolated in
        step units from its latest computed steps (TaylorSeer's rule), with a bounded horizon.

        "taylor1", from the two latest computed steps s1 < s2 (works w1, w2): ``w2 + (w2 - w1) * h / (s2 - s1)``.
        "taylor2", from the three latest s0 < s1 < s2: the parabola through them (Newton's divided differences),
        ``w2 + D1 * h + D2 * h * (h + s2 - s1)`` with ``D1 = (w2 - w1) / (s2 - s1)`` and
        ``D2 = (D1 - (w1 - w0) / (s1 - s0)) / (s2 - s0)``; with fewer computed steps, the highest order they allow.

        The horizon ``h = min(step - s2, s2 - s1)``: the forecast goes at most as far past s2 as the two latest
        computed steps are apart, and holds there. TaylorSeer never extrapolates farther than its interval (it
        recomputes every N steps); a learned table may reuse a block for 20 steps after two adjacent
        computations, where an unbounded line runs away (digits-unet's SSIM fell from 0.956 to 0.513 that way).
        """
        earlier = sorted(s for s in self.caches[index] if s < step and s not in self.forecast_steps[index])
        if not earlier:
            return None
        cache = self.caches[index]
        order = min(self.order, len(earlier) - 1)
        s2 = earlier[-1]
        if order == 0:
            return cache[s2]
        s1 = earlier[-2]
        h = min(step - s2, s2 - s1)
        if order == 1:
            return _map(lambda w2, w1: torch.add(w2, w2 - w1, alpha=h / (s2 - s1)), cache[s2], cache[s1])
        s0 = earlier[-3]
        curve = h * (h + s2 - s1) / (s2 - s0)  # the D2 term's factor
        a1 = (h + curve) / (s2 - s1)  # on w2 - w1 (from D1 * h and D2's first part)
        a0 = curve / (s1 - s0)  # on w1 - w0
        return _map(lambda w2, w1, w0: w2 + a1 * (w2 - w1) - a0 * (w1 - w0), cache[s2], cache[s1], cache[s0])

    def _remember(self, index: int, step: int, value) -> None:
        cache = self.caches[index]
        if step in cache:  # a checkpoint recomputation: keep what the forward pass stored
            return
        cache[step] = value
        if not torch.is_grad_enabled():  # no backward (hence no recomputation) can need older ones
            keep = self.order + 1
            for old in sorted(cache)[:-keep]:
                del cache[old]

    def _streams(self, index: int, args, kwargs) -> tuple:
        """The residual-stream inputs of a block call, in the order the block returns them."""
        return tuple(kwargs[name] if name in kwargs else args[position] if position is not None and
                     position < len(args) else None for name, position in self.stream_positions[index])

    def _updated(self, streams: tuple, work: tuple):
        """``x + update`` per stream, shaped as the block returns it (a tensor for one stream)."""
        out = _map(lambda x, w: x + w, streams, work)
        return out[0] if len(out) == 1 else out

    def run_block(self, index: int, forward, args, kwargs):
        step = self.step
        if step is None:  # called outside a model call (a user calling the block directly)
            return forward(*args, **kwargs)
        residual = self.kinds[index] != OUTPUT
        x = args[0] if args else kwargs["hidden_states"]
        streams = self._streams(index, args, kwargs) if residual else None
        latest = self._latest(index, step)
        if latest is not None and _batch(latest) != x.shape[0]:
            raise ScheduleError(f"block {self.names[index]} cached a batch of {_batch(latest)} but is called with "
                                f"{x.shape[0]}: call the model once per step with both guidance branches batched")
        if self.gates is None and latest is not None and self.reuse[step][index] \
                and not self._graph_step_in_full():
            cached = self._cached(index, step)
            return self._updated(streams, cached) if residual else cached

        out = forward(*args, **kwargs)
        self.computed[index] += 1
        work = _map(lambda o, s: o - s, out if isinstance(out, tuple) else (out,), streams) if residual else out
        if self.gates is not None and latest is not None:  # the forecast (or copy) only where it is mixed in
            g_reuse, g_keep = self.gates[step, index].to(x.dtype)
            work = _map(lambda c, w: g_reuse * c + g_keep * w, self._cached(index, step), work)
            if self.mode != "copy" and bool(g_reuse.detach() > g_keep.detach()):
                self.forecast_steps[index].add(step)
            out = self._updated(streams, work) if residual else work
        self._remember(index, step, work)
        return out
