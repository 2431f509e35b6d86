"""Gradient policies: which denoiser calls of a sampling run keep their autograd graph.

Every first-order sampler step (DDIM, DDPM with fixed noise draws, Euler, flow-matching Euler, DPM-Solver-1) has
the form of a linear map plus the network

    x_{i+1} = a_i * x_i + b_i * eps_theta(x_i, t_i, c) + s_i * noise_i

Full backpropagation multiplies the Jacobians ``a_i I + b_i d eps/dx`` of all N steps. SDO (arXiv 2505.07477)
keeps the network's graph at one step k and the linear skip path of the others: the latent gradient is
``(prod_{i>k} a_i) * g^T (a_k I + b_k d eps/dx |_{x_k})``, and a parameter's ``(prod_{i>s} a_i) * g^T b_s
d eps(x_s, t_s, c)/d theta`` at the graph step s (with x_s detached).

A policy never changes what is sampled, only the backward pass. Like torchdiffeq's ``odeint`` and
``odeint_adjoint``, every optimizer in this library takes ``gradient=`` and nothing else changes.

Steps are numbered 0..n-1 over the steps that one sampler call runs (with ``start_step=k`` the first
step run is step 0). In every policy the scheduler arithmetic (the a_i, b_i and noise terms) stays in
the graph unless the policy says the latent is detached; what differs is which network calls
``eps_theta`` keep their graph ("graph"), keep it by recomputation ("checkpoint"), or run under
``torch.no_grad()`` and enter the step as constants ("nograd").

A policy is a small immutable object; ``plan(n, generator)`` returns a :class:`StepPlan`. Each policy
configuration has one spec string (``"full"``, ``"truncated:4"``, ``"shortcut:random"``, ...), registered
by its class: ``resolve("truncated:4")`` makes the policy and ``policy.spec`` gives the string back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRAPH, CHECKPOINT, NOGRAD = "graph", "checkpoint", "nograd"


@dataclass(frozen=True)
class StepPlan:
    """What one sampler call does at each step.

    modes[i] is GRAPH, CHECKPOINT or NOGRAD for the network call of step i. ``detach_before`` is the
    step whose input latent (and any scheduler state carried from earlier steps) is detached from
    the graph, cutting everything before it; None detaches nothing.
    """

    modes: tuple[str, ...]
    detach_before: int | None = None

    @property
    def graph_steps(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.modes) if m != NOGRAD)


SPECS: dict[str, type] = {}


def register(cls):
    """Class decorator: make ``cls`` known to :func:`resolve` by its ``name``."""
    SPECS[cls.name] = cls
    return cls


class GradientPolicy:
    """Base class: subclasses implement ``plan``; those with a parameter override ``from_arg``/``arg``."""

    name = "policy"
    arg_help = ""  # what may follow the name after a colon, for help texts ("K", "random|K")

    def plan(self, num_steps: int, generator: torch.Generator | None = None) -> StepPlan:
        raise NotImplementedError

    @classmethod
    def from_arg(cls, arg: str | None) -> "GradientPolicy":
        if arg is not None:
            raise ValueError(f"{cls.name} takes no argument, got {cls.name}:{arg}")
        return cls()

    @property
    def arg(self) -> str | None:
        return None

    @property
    def spec(self) -> str:
        """The one string that :func:`resolve` turns back into this policy."""
        return self.name if self.arg is None else f"{self.name}:{self.arg}"

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _check_steps(num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")


def _positive_int(cls, arg: str | None) -> int:
    try:
        return int(arg)
    except (TypeError, ValueError):
        given = cls.name if arg is None else f"{cls.name}:{arg}"
        raise ValueError(f"{cls.name} needs a positive integer, e.g. {cls.name}:4, got {given}") from None


class _CountedPolicy(GradientPolicy):
    """A policy with one positive integer parameter, written ``name:N`` (its attribute ``count``)."""

    count = "k"
    arg_help = "K"

    @classmethod
    def from_arg(cls, arg):
        return cls(_positive_int(cls, arg))

    @property
    def arg(self):
        return str(getattr(self, self.count))


class _EveryStep(GradientPolicy):
    """A policy that treats every step alike: ``mode`` for each network call."""

    mode = GRAPH

    def plan(self, num_steps, generator=None):
        _check_steps(num_steps)
        return StepPlan((self.mode,) * num_steps)


@register
class Full(_EveryStep):
    """Plain backpropagation through time (BPTT).

    Graph: every network call of every step. Gradient: exact, the product of all step Jacobians
    ``prod_i (a_i I + b_i d eps/dx_i)`` for latents, and the sum over all steps for weights and
    conditioning. Memory grows linearly with the number of steps.
    """

    name, mode = "full", GRAPH


@register
class Checkpointed(_EveryStep):
    """Full backpropagation with gradient checkpointing of each network call.

    Graph: every step, but a network call's activations are not stored; they are recomputed during
    backward (``torch.utils.checkpoint``, non-reentrant). Gradient: identical to :class:`Full`.
    Memory: only the step inputs are kept; time: one extra forward per step.
    """

    name, mode = "checkpointed", CHECKPOINT


@register
class Truncated(_CountedPolicy):
    """Truncated backpropagation through the last ``k`` steps (DRaFT-K; k=1 is DRaFT-1).

    Graph: the network calls of steps n-k .. n-1. The latent entering step n-k is detached, so
    nothing before it gets a gradient: the initial latent gets none unless k >= n, and weights and
    conditioning get the gradient of the last k steps only. ``Truncated(n)`` equals :class:`Full`.
    """

    name = "truncated"

    def __init__(self, k: int = 1):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"Truncated: k must be a positive int, got {k!r}")
        self.k = k

    def plan(self, num_steps, generator=None):
        _check_steps(num_steps)
        k = min(self.k, num_steps)
        first = num_steps - k
        return StepPlan((NOGRAD,) * first + (GRAPH,) * k, detach_before=first if first > 0 else None)


@register
class RandomTruncated(_CountedPolicy):
    """Truncation after a random number of final steps (AlignProp).

    k is drawn uniformly from 1..max_k once per sampler call (from the call's generator), then the
    call behaves exactly as ``Truncated(k)``.
    """

    name = "random_truncated"
    count, arg_help = "max_k", "MAX_K"

    def __init__(self, max_k: int = 10):
        if not isinstance(max_k, int) or max_k < 1:
            raise ValueError(f"RandomTruncated: max_k must be a positive int, got {max_k!r}")
        self.max_k = max_k

    def draw_k(self, num_steps: int, generator: torch.Generator | None) -> int:
        high = min(self.max_k, num_steps)
        return int(torch.randint(1, high + 1, (1,), generator=generator).item())

    def plan(self, num_steps, generator=None):
        _check_steps(num_steps)
        return Truncated(self.draw_k(num_steps, generator)).plan(num_steps)


@register
class Shortcut(GradientPolicy):
    """The SDO one-step shortcut (arXiv 2505.07477).

    Graph: the network call of ONE step s; every other network call runs under ``torch.no_grad()``
    and enters its step as a constant, while the scheduler arithmetic stays in the graph. The rest of
    the chain therefore contributes only through its linear skip path:

    - latents (x entering step 0, i.e. the initial noise or an intermediate latent with
      ``start_step``), with s = 0: ``grad = (prod_{i>0} a_i) * g^T (a_0 I + b_0 d eps/dx |_{x_0})``,
      g the gradient of the reward at the final sample. With s > 0 the latent gradient is
      ``(prod_{i != s} a_i) * g^T (a_s I + b_s d eps/dx |_{x_s})``.
    - weights and conditioning: ``grad = (prod_{i>s} a_i) * g^T b_s d eps(x_s, t_s, c)/d theta``.
      The input x_s reaches the network through the skip path only, so it carries no gradient to
      theta (it holds no network graph), exactly as if it were detached.

    ``step``: "first" (s = 0, the latent-optimization default), "random" (uniform over the steps run,
    drawn once per call from the call's generator, the fine-tuning default), or an int index.
    """

    name = "shortcut"
    arg_help = "random|S"

    def __init__(self, step: str | int = "first"):
        if not (step in ("first", "random") or (isinstance(step, int) and not isinstance(step, bool) and step >= 0)):
            raise ValueError(f"Shortcut: step must be 'first', 'random' or a non-negative int, got {step!r}")
        self.step = step

    @classmethod
    def from_arg(cls, arg):
        """``shortcut`` (the first step), ``shortcut:random``, ``shortcut:S`` (step S)."""
        if arg is None or arg == "random":
            return cls("first" if arg is None else "random")
        if arg.isdigit():
            return cls(int(arg))
        raise ValueError(f"shortcut takes random or a step number, e.g. shortcut:random, got shortcut:{arg}")

    @property
    def arg(self):
        return None if self.step == "first" else str(self.step)

    def choose_step(self, num_steps: int, generator: torch.Generator | None) -> int:
        if self.step == "first":
            return 0
        if self.step == "random":
            return int(torch.randint(0, num_steps, (1,), generator=generator).item())
        if self.step >= num_steps:
            raise ValueError(f"Shortcut: step={self.step} is out of range for a run of {num_steps} steps")
        return self.step

    def plan(self, num_steps, generator=None):
        _check_steps(num_steps)
        s = self.choose_step(num_steps, generator)
        return StepPlan(tuple(GRAPH if i == s else NOGRAD for i in range(num_steps)))


@register
class StraightThrough(_EveryStep):
    """Ablation: no network call keeps a graph; only the linear skip path carries the gradient.

    Latent gradient: ``(prod_i a_i) * g``. Weights and conditioning get no gradient.
    """

    name, mode = "straight_through", NOGRAD


def known_specs() -> str:
    """The spec strings :func:`resolve` takes, for help texts: ``full, checkpointed, truncated:K, ...``."""
    return ", ".join(f"{name}:{cls.arg_help}" if cls.arg_help and name != "shortcut" else
                     (f"{name}[:{cls.arg_help}]" if cls.arg_help else name) for name, cls in SPECS.items())


def resolve(policy: GradientPolicy | str | None) -> GradientPolicy | None:
    """A policy object as it is, a spec string (``"full"``, ``"truncated:4"``, ``"shortcut:random"``; see
    :func:`known_specs`) as the policy it names, None as None (no gradient)."""
    if policy is None or isinstance(policy, GradientPolicy):
        return policy
    if not isinstance(policy, str):
        raise ValueError(f"gradient: expected a GradientPolicy, a spec string or None, got {type(policy).__name__}")
    name, colon, arg = policy.strip().lower().replace("-", "_").partition(":")
    if name not in SPECS:
        raise ValueError(f"gradient: unknown policy {policy!r}; known: {known_specs()}")
    try:
        return SPECS[name].from_arg(arg if colon else None)
    except ValueError as exc:
        raise ValueError(f"gradient: {exc}") from None
