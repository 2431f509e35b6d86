"""The loop runner of the resumable-loop kit: the skeleton every training loop shares, written once.

A loop (latent optimization, fine-tuning, the pruner search, the zoo's trainers) is a :class:`LoopState`: what
its checkpoint carries (``objects()``: things with ``state_dict``; ``saved()``: plain data such as the history),
how one iteration runs (``step(it)``, returning that iteration's figures) and a few optional moments (``begin``,
``after``, ``ended``). :func:`run_loop` owns the rest: restore from the checkpoint, the progress bar, the callback,
checkpoints on schedule, stopping.

The callback contract, the same for every loop: ``callback(event)`` after each iteration, with ``event`` a dict of
``iteration`` (0-based), ``elapsed`` (seconds of the iterations run so far, restored ones included) and the
iteration's figures (``seconds``, ``reward``, ``loss``, ...); returning True stops the run there (a time budget,
early stopping); raising stops it too, the last checkpoint left as it was.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .checkpoints import Checkpoint


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """The generator of one iteration's random draws (noise, conditions): a function of ``(seed, iteration)`` alone,
    so a resumed run draws what the uninterrupted one drew."""
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


class LoopState:
    """One run of a loop; subclasses implement :meth:`step` and say what their checkpoint carries."""

    history: dict

    def objects(self) -> dict:
        """What a checkpoint saves and restores by ``state_dict`` / ``load_state_dict`` (optimizer, modules, ...)."""
        return {}

    def saved(self) -> dict:
        """Plain data a checkpoint carries besides (the history, ...)."""
        return {"history": self.history}

    def restore(self, state: dict) -> None:
        """Take back :meth:`saved`'s data from a restored checkpoint."""
        self.history = state["history"]

    def begin(self, first: int) -> None:
        """Before the first iteration this run does (``first`` > 0 after a resume)."""

    def step(self, it: int) -> dict:
        """Iteration ``it``; returns its figures (``seconds`` at least), which the bar and the callback see."""
        raise NotImplementedError

    def ended(self) -> bool:
        """True when the loop finished by itself at this iteration (a target reached): no callback, no checkpoint."""
        return False

    def after(self, done: int, stopping: bool) -> None:
        """After iteration ``done - 1``, before its checkpoint (held-out evaluation, ...)."""

    def postfix(self, record: dict) -> dict:
        """What the progress bar shows of an iteration's figures."""
        return {}


def run_loop(state: LoopState, iterations: int, checkpoint: Checkpoint, *, desc: str, progress: bool = True,
             callback: Callable[[dict], bool | None] | None = None, main_process: bool = True,
             map_location=None) -> bool:
    """Run ``state`` from its checkpoint (or the start) to ``iterations``; True when every iteration ran (False when
    the loop ended itself or the callback stopped it). Only the main process writes checkpoints."""
    restored = checkpoint.restore(map_location=map_location, **state.objects())
    first = 0
    if restored is not None:
        state.restore(restored)
        first = restored["iteration"]
    state.begin(first)
    bar = tqdm(range(first, iterations), desc=desc, disable=not progress or not main_process, initial=first,
               total=iterations)
    completed = True
    for it in bar:
        record = state.step(it)
        if state.ended():
            completed = False
            break
        bar.set_postfix(state.postfix(record), refresh=False)
        event = {"iteration": it, "elapsed": float(sum(state.history.get("seconds", []))), **record,
                 "objects": state.objects()}
        stop = callback is not None and callback(event) is True
        state.after(it + 1, stop)
        if main_process and checkpoint.due(it + 1, iterations):
            checkpoint.save(it + 1, state.saved(), **state.objects())
        if stop:
            completed = False
            break
    bar.close()
    return completed
