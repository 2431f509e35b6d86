"""Training checkpoints that survive a kill: written to a temporary file, then renamed over the old one."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomically(state, path: str | Path) -> Path:
    """``torch.save(state)`` to ``path`` so that a reader (or a resume after SIGKILL) sees either the old
    checkpoint or the new one, never half a file: write ``path.tmp``, then ``os.replace`` it."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_matching(path: str | Path, settings: dict, map_location=None) -> dict:
    """A checkpoint written by :func:`save_atomically` whose ``state["settings"]`` must equal ``settings``
    (a resume with another learning rate, batch or seed would not reach the uninterrupted run's result);
    the error names the settings that differ."""
    state = torch.load(path, map_location=map_location, weights_only=False)
    if state["settings"] != settings:
        changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
        raise ValueError(f"{path}: checkpoint was made with other settings ({', '.join(changed)})")
    return state
