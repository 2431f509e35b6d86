"""Curves a person would rather look at: reward against iteration and against seconds (matplotlib, Agg)."""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path


def reward_curves(histories: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """One line per run: mean reward against iteration (left) and against cumulative seconds (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_it, ax_s) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, history in histories.items():
        rewards = history["reward"]
        seconds = list(accumulate(history["seconds"]))[: len(rewards)]
        ax_it.plot(range(len(rewards)), rewards, label=label)
        ax_s.plot(seconds, rewards[: len(seconds)], label=label)
    ax_it.set(xlabel="iteration", ylabel="mean reward", title=title)
    ax_s.set(xlabel="seconds", ylabel="mean reward")
    for ax in (ax_it, ax_s):
        ax.grid(alpha=0.3)
    ax_it.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
