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

import _thread
import contextlib
import os
import re
import signal
import threading
import time

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


MULTI_PROCESS_CPU = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes P"  # P CPU processes


def launch_shortfall() -> str | None:
    """What to say where ``accelerate launch`` was asked for several processes and started one: its ``--cpu`` launch
    without ``--multi_gpu`` runs a single process (accelerate 1.16), telling only by the rendezvous address it sets
    for them (``MASTER_PORT``) with no ``WORLD_SIZE``. None where nothing is amiss."""
    if os.environ.get("ACCELERATE_USE_CPU") is None or "MASTER_PORT" not in os.environ or launched():
        return None
    return ("accelerate launch was asked for several processes but started one (its --cpu launch without --multi_gpu "
            f"runs a single process); for P processes on the CPU: {MULTI_PROCESS_CPU} ...")


def peer_failed(exc: BaseException) -> bool:
    """True for the error a process of a multi-process launch meets when another one died under a collective
    (gloo's ``Connection reset by peer``, a ``DistBackendError``)."""
    if not launched() or not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return type(exc).__name__ == "DistBackendError" or any(
        sign in text for sign in ("Connection reset by peer", "Connection closed by peer", "gloo", "NCCL"))


_launcher_gone = threading.Event()
_watching = False  # one watcher a process, however many commands it runs


def watch_the_launcher(every: float = 1.0) -> None:
    """In a process of a multi-process launch: stop (a KeyboardInterrupt in the main thread, so that the command
    says what was kept) when the launcher that started it dies. torchrun starts every process in a session of its
    own, so a launcher killed with SIGKILL would otherwise leave them running to the end."""
    global _watching
    if _watching or not launched() or threading.current_thread() is not threading.main_thread():
        return
    _watching, parent = True, os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        _launcher_gone.set()
        _thread.interrupt_main()

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


class LaunchStopped(RuntimeError):
    """The launcher sent this process SIGTERM: torchrun's agent does so to every process left when one exits (or
    when it is stopped itself), often before the survivors' next collective would have told them."""


@contextlib.contextmanager
def sigterm_stops_the_command():
    """In a process of a multi-process launch, for the duration: SIGTERM raises :class:`LaunchStopped` in the main
    thread, so that the command says in one line what was kept instead of dying silently."""
    if not launched() or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise LaunchStopped("the launcher stopped this process with SIGTERM")

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def launcher_gone() -> bool:
    """True once :func:`watch_the_launcher` saw the launcher die."""
    return _launcher_gone.is_set()


def peer_failure_reason(exc: BaseException) -> str:
    """The gist of a collective's error: ``Read error [127.0.0.1]:26820: Connection reset by peer`` without gloo's
    source path and advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's "[.../pair.cc:537] "
    return text.split(". ")[0].rstrip(".")


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
