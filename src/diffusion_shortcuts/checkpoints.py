"""The resumable-loop kit shared by every training loop (fine-tuning, pruner search, latent optimization,
the zoo's trainers): atomic files, one optimizer factory, settings derived from a config dataclass, and a
checkpoint that restores everything a resumed run needs to reach the uninterrupted run's result.

A run's *settings* are ``dataclasses.asdict(config)``: every field of the loop's config dataclass, so none
can be left out of the comparison; a checkpoint made with other settings is refused, naming the first
field that differs.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .outdir import remove_stale_temporaries


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or one made by another run (other settings)."""


# ---- atomic files -------------------------------------------------------------------------------------

class NoSpaceError(OSError):
    """The device filled up while a file was written; the file that was there before is kept."""


def _no_space(exc: BaseException) -> bool:
    """torch's writer reports a full disk as ``enforce fail at inline_container.cc ... unexpected pos``."""
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or \
        (isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "No space left" in str(exc)))


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``: a reader (or
    a resume after SIGKILL) sees the old file or the new one, never half of one. The temporary name is
    unique per process, so two writers never share it; those of killed writers are removed. A full disk is a
    :class:`NoSpaceError` naming the folder (the old file is kept)."""
    path = Path(path)
    remove_stale_temporaries(path.parent, glob.escape(path.name))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if _no_space(exc):
            kept = "the one there before is kept" if path.exists() else "there was none before"
            raise NoSpaceError(errno.ENOSPC, f"no space left on the device at {path.parent} while writing "
                                             f"{path.name} ({kept})") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_atomically(state, path: str | Path) -> Path:
    """``torch.save(state)`` to ``path`` atomically (see :func:`write_atomically`)."""
    return write_atomically(path, lambda tmp: torch.save(state, tmp))


def _finite(value):
    """JSON has no NaN or infinity: such numbers become null (and strict parsers stay happy)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | Path, payload) -> Path:
    """``payload`` as indented JSON, atomically; non-finite numbers are written as null."""
    text = json.dumps(_finite(payload), indent=1, default=str, allow_nan=False) + "\n"
    return write_atomically(path, lambda tmp: tmp.write_text(text))


# ---- optimizers ---------------------------------------------------------------------------------------

OPTIMIZERS = ("adam", "adamw", "sgd")


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The one optimizer factory: ``"adam"``, ``"adamw"`` or ``"sgd"`` (with ``momentum``)."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


# ---- settings -----------------------------------------------------------------------------------------

def configured(cls: type, config=None, overrides: dict | None = None):
    """A loop's config: ``config`` (default ``cls()``) with keyword ``overrides`` (the sugar
    ``finetune(..., iterations=50)`` for ``config=FinetuneConfig(iterations=50)``). A name that is not one of its
    settings (derived fields are the loop's to fill) is a TypeError listing them."""
    config = cls() if config is None else config
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived")]
    if unknown := sorted(set(overrides or {}) - set(names)):
        raise TypeError(f"{cls.__name__} has no setting {', '.join(unknown)}; its settings: {', '.join(names)}")
    return dataclasses.replace(config, **(overrides or {}))


def settings_of(config) -> dict:
    """A config dataclass as plain data (tuples as lists, so that it round-trips through a checkpoint)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=repr))


def first_difference(saved: dict, now: dict) -> str | None:
    """``"lr: checkpoint 0.001, this run 0.01"`` for the first setting that differs, None if none does."""
    for key in sorted(set(saved) | set(now)):
        if saved.get(key, "<missing>") != now.get(key, "<missing>"):
            return f"{key}: checkpoint {saved.get(key, '<missing>')!r}, this run {now.get(key, '<missing>')!r}"
    return None


def load_checkpoint(path: str | Path, map_location=None) -> dict:
    """A checkpoint written by :func:`save_atomically`; a truncated, empty, foreign or corrupt file is a
    :class:`CheckpointError` naming it. Loaded with ``weights_only=True``: torch's allow-list of tensors and plain
    data (what every checkpoint here holds: weights, optimizer and schedule states, RNG states as tensors,
    histories and settings), so a crafted file in a shared run folder is refused, never executed."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)  # never unpickles code
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if ln.startswith(("Unsupported", "Trying to load"))),
                      lines[0] if lines else "")
        if "GLOBAL" in reason:  # a pickled object that would be called: refused before anything runs
            refused = reason.split("GLOBAL ")[1].split()[0]
            raise CheckpointError(f"{path}: holds Python objects besides tensors and plain data ({refused}), and is "
                                  "not loaded (unpickling them could run code; this library never writes such a "
                                  "file): start afresh in another folder, without --resume") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (UnpicklingError: {reason[:200]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, AttributeError,
            ModuleNotFoundError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else 'empty'})") from None
    if not isinstance(state, dict) or "settings" not in state or "iteration" not in state:
        raise CheckpointError(f"{path}: not a diffusion-shortcuts checkpoint (no settings or iteration in it)")
    return state


def load_matching(path: str | Path, settings: dict, map_location=None) -> dict:
    """:func:`load_checkpoint`, refused when it was made with other ``settings`` (a resume with another
    learning rate, batch or seed would not reach the uninterrupted run's result)."""
    state = load_checkpoint(path, map_location)
    difference = first_difference(state["settings"], settings)
    if difference is not None:
        raise CheckpointError(f"{path}: the checkpoint was made with other settings ({difference}); "
                              "resume with the same settings, or start afresh in another folder")
    return state


class Checkpoint:
    """A loop's checkpoint file: what to restore and save besides the loop's own tensors.

    ``objects`` are things with ``state_dict`` / ``load_state_dict`` (optimizer, learning-rate schedule,
    EMA, a module); the torch RNG state travels too. ``directory=None`` disables checkpointing.
    """

    def __init__(self, directory: str | Path | None, name: str, settings: dict, every: int = 10,
                 resume: bool = False):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every must be an int >= 1, got {every!r}")
        self.path = Path(directory) / name if directory is not None else None
        self.settings, self.every, self.resume = settings, every, resume

    def restore(self, map_location=None, **objects) -> dict | None:
        """The saved state (its ``objects`` loaded back, the RNG restored) when resuming, else None."""
        if self.path is None or not self.resume or not self.path.exists():
            return None
        state = load_matching(self.path, self.settings, map_location)
        for key, obj in objects.items():
            if obj is not None:
                try:
                    obj.load_state_dict(state[key])
                except (KeyError, RuntimeError, ValueError) as exc:
                    raise CheckpointError(f"{self.path}: its {key} does not fit this run ({str(exc)[:200]})") from None
        torch.set_rng_state(state["rng"])
        return state

    def due(self, done: int, total: int) -> bool:
        return self.path is not None and (done % self.every == 0 or done == total)

    def save(self, done: int, extra: dict, **objects) -> None:
        """Write ``extra`` (the loop's tensors, history) with the objects' states, the RNG and the settings."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {**extra, **{k: (o.state_dict() if o is not None else None) for k, o in objects.items()},
                 "rng": torch.get_rng_state(), "iteration": done, "settings": self.settings}
        save_atomically(state, self.path)
