"""Work across processes under ``accelerate launch``: which process this is, its share, and the main process's
gathering of the shares.

accelerate is the engine (``accelerate launch --num_processes P``, multi-GPU, multi-node, its configs); this module
launches nothing. A plain one-process run is the case P = 1 of the same code: its share is everything, a gather
returns its own part, a reduction its own value.

Two ways to share work, both deterministic whatever P is:

- **data parallel** (the pruner search, fine-tuning): every process draws the same global batch of ``batch * P``
  rows from the iteration's seed and takes its slice (:func:`my_slice`); gradients are averaged
  (:func:`average_gradients`), so every process holds the same weights, those one process reaches with batch
  ``batch * P``;
- **sharded** (``optimize``, ``sample``): the ``n`` samples are split into P contiguous runs of indices
  (:func:`shard`); every sample's noise is drawn for all ``n`` from the
  seed and indexed, so a sample's result does not depend on which process made it; :func:`gather` brings the parts
  to the main process, which alone writes.
"""

from __future__ import annotations

import os

import torch


def cpu_only() -> bool:
    """True where the processes compute on the CPU: no CUDA here, or ``accelerate launch --cpu``
    (``ACCELERATE_USE_CPU``)."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def state():
    """accelerate's ``PartialState``: the process group (set up on first use when launched; gloo on the CPU), rank,
    world, device."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())


def launched() -> bool:
    """True in a process of a multi-process ``accelerate launch`` (torchrun's ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def num_processes() -> int:
    return state().num_processes if launched() else 1


def process_index() -> int:
    return state().process_index if launched() else 0


def is_main_process() -> bool:
    """False on the other processes of an ``accelerate launch`` run (they work, the main one writes)."""
    return process_index() == 0


def local_device(kind: str) -> torch.device:
    """The device of ``kind`` (``"cpu"`` or ``"cuda"``) this process works on: under a multi-GPU launch its own GPU
    (``LOCAL_RANK``), not the first one every process would otherwise load onto."""
    if kind == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(kind)


def my_slice(batch: int) -> slice:
    """This process's rows of a global batch of ``batch * num_processes()`` rows (data parallel)."""
    rank = process_index()
    return slice(rank * batch, (rank + 1) * batch)


def check_shardable(n: int, what: str, processes: int | None = None) -> None:
    """Every process needs at least one of the ``n`` items: a ValueError naming both numbers otherwise."""
    processes = num_processes() if processes is None else processes
    if n < processes:
        raise ValueError(f"{what}: {n} for {processes} processes; every process needs at least one "
                         f"(give at least {processes}, or launch fewer processes)")


def shard(n: int, processes: int | None = None, rank: int | None = None) -> list[int]:
    """The indices of ``n`` items process ``rank`` takes (default: this one): contiguous runs, the first ``n % P``
    processes one more; the split of accelerate's ``split_between_processes``, computed for any process so that
    the main one can say which samples each took."""
    processes = num_processes() if processes is None else processes
    rank = process_index() if rank is None else rank
    per, extra = divmod(n, processes)
    start = rank * per + min(rank, extra)
    return list(range(start, start + per + (rank < extra)))


def gather(part) -> list:
    """Every process's ``part`` (any picklable object; tensors moved to the CPU first), in process order, on every
    process: accelerate's ``gather_object``. One process: ``[part]``, its tensors on the CPU too."""
    if not launched():
        return [_to_cpu(part)]
    from accelerate.utils import gather_object

    return gather_object([_to_cpu(part)])


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the processes (itself for one)."""
    if not launched():
        return value
    from accelerate.utils import reduce

    return reduce(value.detach(), reduction="mean")


def average_gradients(params) -> None:
    """Replace each parameter's gradient by its mean over the processes: the gradient of the global batch's mean
    loss when each process's loss is its slice's mean."""
    if not launched():
        return
    from accelerate.utils import reduce

    for p in params:
        if p.grad is not None:
            p.grad = reduce(p.grad, reduction="mean")
