"""The DiP-GO SuperNet: gated blocks that either run or return their work from an earlier step.

The wrappers are diffusers hooks (``diffusers.hooks.HookRegistry``) on the model and on each block, so the
model keeps its class, parameters and state dict, and removing the hooks restores it exactly. The SuperNet
puts together four small parts, the diffusers way:

- a step clock (:mod:`.clock`), the model's hook: the step of each call, generation boundaries, refusals;
- a decision (:mod:`.decision`): the static table (inference: a reused block is not called at all) or the
  search's gates (every block runs and is mixed ``g_reuse * forecast + g_keep * f(x)``), one interface;
- per-block state (:mod:`.state`): what each block computed at which step, reset at every generation;
- a forecaster (:mod:`.forecast`): what a reused block returns (``copy``, ``taylor1``, ``taylor2``);

plus the accounting that :func:`~diffusion_shortcuts.prune.summary` reads. Block state is kept per guidance
branch: a family that calls ``cond`` and ``uncond`` one at a time gets two of everything, each branch reading only
its own work. Work is stored once per step and generation: a gradient checkpoint recomputing a step's forward
during backward reads what the forward read and overwrites nothing; under ``torch.no_grad()`` only what the
forecast needs is kept.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from ..families import OUTPUT, family_of, unwrap
from .blocks import block_kind, resolve_blocks
from .clock import StepClock, in_backward
from .compiling import compile_options, compiled_whole
from .decision import Decision, GateDecision, TableDecision
from .forecast import FORECASTERS, REUSE_MODES
from .schedule import ScheduleError
from .state import BlockState, batch_of, map_streams

HOOK_NAME = "diffusion_shortcuts.prune"


@functools.lru_cache(maxsize=None)
def _class_signature(function) -> inspect.Signature:
    """``inspect.signature`` of a class's function, computed once per function (a schedule is applied per
    generation, and the signatures of a UNet's blocks cost as much as a few sampling steps)."""
    return inspect.signature(function)


def _forward_signature(module: torch.nn.Module) -> inspect.Signature:
    """The signature of ``module.forward`` as called (without ``self``)."""
    if getattr(module.forward, "__func__", None) is not type(module).forward:
        return inspect.signature(module.forward)  # a forward replaced on the instance
    signature = _class_signature(type(module).forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def _positions(signature: inspect.Signature, names: tuple[str, ...]) -> list[tuple[str, int | None]]:
    """Each name with its position among the signature's positional parameters (None if keyword-only or absent),
    so that a call's arguments are read without binding them at every call."""
    positional = [p.name for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [(name, positional.index(name) if name in positional else None) for name in names]


def _arguments(positions, args, kwargs) -> tuple:
    return tuple(kwargs[name] if name in kwargs else args[position] if position is not None and
                 position < len(args) else None for name, position in positions)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


@dataclass
class GatedBlock:
    """One gated block: where it is, how its work is reused, which of its arguments are residual streams, and
    its state. ``output`` blocks (UNets) store their output; ``residual`` blocks (transformers) store their
    update ``f(x) - x`` of every stream they carry, and a reuse adds it to this step's streams."""

    index: int
    name: str
    module: torch.nn.Module
    kind: str
    stream_positions: list[tuple[str, int | None]]
    states: dict[str, BlockState] = field(default_factory=dict)  # per guidance branch
    run: Callable | None = None  # the block's own forward as the hook calls it: as it was, or compiled

    def state(self, branch: str) -> BlockState:
        """What this block computed in the current generation of ``branch``."""
        if branch not in self.states:
            self.states[branch] = BlockState()
        return self.states[branch]

    def streams(self, args, kwargs) -> tuple | None:
        """The residual-stream inputs of a call, in the order the block returns them (None for output blocks)."""
        return None if self.kind == OUTPUT else _arguments(self.stream_positions, args, kwargs)

    def work_of(self, out, streams):
        return out if streams is None else map_streams(lambda o, s: o - s, out if isinstance(out, tuple) else (out,),
                                                       streams)

    def output_of(self, work, streams):
        if streams is None:
            return work
        out = map_streams(lambda x, w: x + w, streams, work)
        return out[0] if len(out) == 1 else out


@dataclass
class Accounting:
    """Denoiser calls seen (skipped ones included), calls skipped whole, and block forwards really run."""

    calls: int = 0
    skipped_calls: int = 0
    computed: list[int] = field(default_factory=list)


class _ContextState(StateManager):
    """Receives the ``CacheContext`` a stock pipeline sets around each call (``with model.cache_context("cond",
    step_index=i)``): diffusers hands it to every ``StateManager`` of a stateful hook, its public way in."""

    def __init__(self):
        super().__init__(BlockState)

    def branch_and_step(self) -> tuple[str, int | None]:
        try:
            context = self.context
        except ValueError:  # no cache_context around this call (a pipeline that names none: SD, PixArt, ...)
            return "", None
        return context.name or "", context.step_index


class _StepHook(ModelHook):
    """On the model: tell the SuperNet which step and branch each call is; skip a call whose every block is
    reused."""

    _is_stateful = True

    def __init__(self, net: "SuperNet", module: torch.nn.Module):
        super().__init__()
        self.net = net
        self.context = _ContextState()
        self.timestep_position = _positions(_class_signature(type(module).forward), ("timestep",))

    def pre_forward(self, module, *args, **kwargs):
        (timestep,) = _arguments(self.timestep_position, (module, *args), kwargs)
        self.net.enter(timestep, *self.context.branch_and_step())
        return args, kwargs

    def new_forward(self, module, *args, **kwargs):
        cached = self.net.whole_step_output()
        if cached is not None:
            return cached
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.net.remember_output(out)
        return out

    def reset_state(self, module):
        self.net.reset()
        return module


class _BlockHook(ModelHook):
    """On one block: compute it, or return its forecast work (the SuperNet's decision)."""

    def __init__(self, net: "SuperNet", block: GatedBlock):
        super().__init__()
        self.net, self.block = net, block

    def new_forward(self, module, *args, **kwargs):
        net, block, step = self.net, self.block, self.net.step
        if step is None:  # called outside a model call (a user calling the block directly)
            return block.run(*args, **kwargs)
        x = args[0] if args else kwargs["hidden_states"]
        streams = block.streams(args, kwargs)
        net.check_batch(block, step, x)
        if net.reuses(block, step):
            return block.output_of(net.forecaster.predict(block.state(net.branch), step), streams)
        out = block.run(*args, **kwargs)
        return net.ran(block, step, out, streams, x.dtype)


class SuperNet:
    """Gated blocks of ``model`` for a sampler with the given ``timesteps`` (see the module docstring).

    ``whole_steps``: a step at which every block is reused reuses the whole call's output (exact for UNets, see
    ``Family.whole_step_reuse``). ``full_graph_steps``: a call that keeps its autograd graph (SDO's one step)
    computes every block, so that only the no-grad rollout is pruned. ``mode``: the forecaster.

    ``compile``: compile each gated block's own forward (``torch.compile(..., fullgraph=True)``; a dict adds
    ``torch.compile`` options): the reuse decision stays outside the compiled regions, so nothing in a block
    breaks its graph and a block compiles once per input shape, whatever the step. A model already compiled
    whole (``torch.compile(model)``) gets the same: the hooks run outside its graphs and the blocks are compiled.

    ``expert`` and ``owner``: on a pipeline with two denoisers, this one's name and which denoiser each step of the
    table belongs to (:meth:`CacheSchedule.expert_of`): a call at another's step is refused, naming both.
    """

    def __init__(self, model: torch.nn.Module, timesteps, blocks: list[str] | None = None, kinds=None,
                 whole_steps: bool = False, full_graph_steps: bool = False, mode: str = "copy",
                 compile: bool | dict = False, expert: str | None = None, owner: Callable[[int], str | None] = None):
        if mode not in REUSE_MODES:
            raise ScheduleError(f"reuse mode must be one of {', '.join(REUSE_MODES)}, got {mode!r}")
        self.compiled_whole = compiled_whole(model)
        self.model = unwrap(model)
        self.compile_options = compile_options(compile, self.compiled_whole, _device_of(self.model))
        self.family = family_of(self.model)
        resolved = resolve_blocks(self.model, blocks)
        kinds = list(kinds) if kinds is not None else [block_kind(self.model, n) for n, _ in resolved]
        self.blocks = [GatedBlock(i, name, module, kind, _positions(_forward_signature(module), self.family.streams))
                       for i, ((name, module), kind) in enumerate(zip(resolved, kinds))]
        self.clock = StepClock(timesteps, self.family, self.model)
        self.forecaster = FORECASTERS[mode]()
        self.decision: Decision = TableDecision(torch.zeros(len(self.clock.timesteps), len(self.blocks)),
                                                len(self.clock.timesteps), len(self.blocks))
        self.whole_steps = whole_steps and mode == "copy"  # a forecast changes the output: the call must run
        self.full_graph_steps = full_graph_steps
        self.outputs: dict[str, BlockState] = {}  # per branch, the whole call's output by step (steps reusing all)
        self.accounting = Accounting(computed=[0] * len(self.blocks))
        self.step: int | None = None
        self.branch = ""
        self.attached = False
        self.expert, self.owner = expert, owner
        self.observer: Callable | None = None  # observer(block, step, branch, work) of every computed block

    # ---- what the parts say, under the names summary and the tests read ---------------------------------
    @property
    def names(self) -> list[str]:
        return [block.name for block in self.blocks]

    @property
    def mode(self) -> str:
        return self.forecaster.name

    @property
    def computed(self) -> list[int]:
        return self.accounting.computed

    @property
    def calls(self) -> int:
        return self.accounting.calls

    @property
    def skipped_calls(self) -> int:
        return self.accounting.skipped_calls

    # ---- decisions ------------------------------------------------------------------------------------
    def use_table(self, reuse) -> None:
        """Inference: ``reuse[t, b]`` True skips block b at step t (row 0 is ignored: step 0 runs in full)."""
        self.decision = TableDecision(reuse, len(self.clock.timesteps), len(self.blocks))

    def use_gates(self, gates: torch.Tensor) -> None:
        """Search: ``gates[t, b] = (g_reuse, g_keep)``, hard one-hot values carrying gradients."""
        self.decision = GateDecision(gates, len(self.clock.timesteps), len(self.blocks))

    def reset(self) -> None:
        """Forget every block's work and the generation in progress: the next call starts a new generation."""
        self.clock.reset()
        for block in self.blocks:
            block.states.clear()
        self.outputs.clear()
        self.step = None

    def _forget(self, branch: str) -> None:
        """A new generation on ``branch``: forget what its blocks computed (other branches keep theirs)."""
        for block in self.blocks:
            block.state(branch).reset()
        self.output_state(branch).reset()
        self.step = None

    def output_state(self, branch: str) -> BlockState:
        if branch not in self.outputs:
            self.outputs[branch] = BlockState()
        return self.outputs[branch]

    # ---- hooks ----------------------------------------------------------------------------------------
    def attach(self) -> "SuperNet":
        registry = HookRegistry.check_if_exists_or_initialize(self.model)
        if registry.get_hook(HOOK_NAME) is not None:
            raise RuntimeError("a cache schedule is already applied to this model; disable it first")
        registry.register_hook(self._outside_graphs(_StepHook(self, self.model)), HOOK_NAME)
        for block in self.blocks:
            hook = self._outside_graphs(_BlockHook(self, block))
            HookRegistry.check_if_exists_or_initialize(block.module).register_hook(hook, HOOK_NAME)
            block.run = hook.fn_ref.original_forward
            if self.compile_options is not None:
                block.run = torch.compile(block.run, **self.compile_options)
        registry.invalidate_child_registries_cache()
        self.attached = True
        return self

    def _outside_graphs(self, hook: ModelHook) -> ModelHook:
        """On a model compiled whole, the hook's Python (the step, the table, the caches) runs outside its graphs."""
        if self.compiled_whole:
            hook.pre_forward = torch.compiler.disable(hook.pre_forward)
            hook.new_forward = torch.compiler.disable(hook.new_forward)
        return hook

    def detach(self) -> None:
        if not self.attached:
            return
        for block in self.blocks:
            block.run = None
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

    # ---- per call -------------------------------------------------------------------------------------
    def enter(self, timestep, branch: str = "", step_index: int | None = None) -> None:
        """A denoiser call begins: its step and branch from the clock (``branch`` and ``step_index`` as a stock
        pipeline's ``cache_context`` names them); a new generation of a branch forgets that branch's work."""
        recomputing = in_backward()  # a checkpoint recomputing an earlier step reads the work its forward read
        step, branch, new_generation = self.clock.tick(timestep, branch, step_index)
        owner = self.owner(step) if self.owner is not None and self.expert is not None else None
        if owner is not None and owner != self.expert:
            raise ScheduleError(f"step {step} (timestep {self.clock.timesteps[step]:g}) is {owner}'s in the schedule, "
                                f"but {self.expert} was called at it: a schedule for {owner} applied to {self.expert} "
                                "(the pipeline switches denoisers at another timestep than the schedule was made for)")
        if new_generation:
            self._forget(branch)
        if not recomputing:
            self.accounting.calls += 1
        self.step, self.branch = step, branch

    def _graph_step_in_full(self) -> bool:
        return self.full_graph_steps and torch.is_grad_enabled()

    def whole_step_output(self):
        """The output of the latest call before this step, when this step reuses every block and ``whole_steps``
        says that is exact; else None (the call runs)."""
        step = self.step
        if not self.whole_steps or step is None or not self.decision.skips_all(step) or self._graph_step_in_full():
            return None
        earlier = self.output_state(self.branch).latest(step)
        if earlier is None or any(block.state(self.branch).latest(step) is None for block in self.blocks):
            return None
        self.accounting.skipped_calls += 1
        return earlier

    def remember_output(self, out) -> None:
        if self.step is not None and self.whole_steps:
            self.output_state(self.branch).store(self.step, out, keep=None if torch.is_grad_enabled() else 1)

    def check_batch(self, block: GatedBlock, step: int, x: torch.Tensor) -> None:
        latest = block.state(self.branch).latest(step)
        if latest is not None and batch_of(latest) != x.shape[0]:
            raise ScheduleError(f"block {block.name} cached a batch of {batch_of(latest)} but is called with "
                                f"{x.shape[0]}: call the model once per step and guidance branch with one batch "
                                "(both branches batched, or each named by diffusers' cache_context)")

    def reuses(self, block: GatedBlock, step: int) -> bool:
        """True when ``block`` is not computed at ``step``: the table says so, it has work to reuse, and the call
        is not a graph step computed in full."""
        return (self.decision.skips(step, block.index) and block.state(self.branch).latest(step) is not None
                and not self._graph_step_in_full())

    def ran(self, block: GatedBlock, step: int, out, streams, dtype: torch.dtype):
        """``block`` ran at ``step``: count it, mix it with its forecast under the gates, store its work; returns
        what the block passes on."""
        self.accounting.computed[block.index] += 1
        work = block.work_of(out, streams)
        state = block.state(self.branch)
        if self.decision.mixes and state.latest(step) is not None:
            forecast = self.forecaster.predict(state, step)
            work, reused = self.decision.mix(step, block.index, forecast, work, dtype)
            if reused and self.forecaster.order > 0:
                state.forecast_steps.add(step)
            out = block.output_of(work, streams)
        if self.observer is not None and not in_backward():
            self.observer(block, step, self.branch, work)
        self.forecaster.update(state, step, work)
        return out


class ExpertNets:
    """One :class:`SuperNet` per denoiser of a pipeline with experts (Wan 2.2 A14B), driven as one: the same table
    or gates, each denoiser following the rows of the steps it runs; the accounting is summed."""

    def __init__(self, nets: list[SuperNet]):
        self.nets = nets

    @property
    def model(self) -> torch.nn.Module:
        return self.nets[0].model

    @property
    def names(self) -> list[str]:
        return self.nets[0].names

    @property
    def mode(self) -> str:
        return self.nets[0].mode

    @property
    def computed(self) -> list[int]:
        return [sum(counts) for counts in zip(*(net.computed for net in self.nets))]

    @property
    def calls(self) -> int:
        return sum(net.calls for net in self.nets)

    @property
    def skipped_calls(self) -> int:
        return sum(net.skipped_calls for net in self.nets)

    def use_table(self, reuse) -> None:
        for net in self.nets:
            net.use_table(reuse)

    def use_gates(self, gates: torch.Tensor) -> None:
        for net in self.nets:
            net.use_gates(gates)

    def reset(self) -> None:
        for net in self.nets:
            net.reset()

    def attach(self) -> "ExpertNets":
        attached = []
        try:
            for net in self.nets:
                attached.append(net.attach())
        except BaseException:
            for net in attached:
                net.detach()
            raise
        return self

    def detach(self) -> None:
        for net in self.nets:
            net.detach()

    @property
    def observer(self):
        return self.nets[0].observer

    @observer.setter
    def observer(self, fn) -> None:
        for net in self.nets:
            net.observer = fn
