"""Pictures a person would rather look at: reward curves, cache-schedule heatmaps (matplotlib, Agg)."""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path


def save_figure(fig, path: str | Path, dpi: int = 90) -> Path:
    """Lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


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
    return save_figure(fig, path)


def heldout_curves(evaluations: list[dict], path: str | Path, title: str = "") -> Path:
    """Held-out figures of a fine-tuning run against iteration: the reward, every judge figure (e.g. eval
    accuracy) and diversity, one panel each, so that a rising reward with falling diversity (collapse) shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["reward"] + [k for k in evaluations[0] if k not in ("iteration", "seconds", "reward", "reward_std",
                                                                 "diversity")] + ["diversity"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    iterations = [e["iteration"] for e in evaluations]
    for ax, key in zip(axes[0], keys):
        ax.plot(iterations, [e[key] for e in evaluations], marker=".")
        ax.set(xlabel="iteration", ylabel=key, title=title if key == "reward" else "")
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def schedule_heatmap(schedule, path: str | Path, label: str = "", title: str = "") -> Path:
    """Steps (rows, first step on top) x blocks (columns): dark = computed, light = reused from the cache.

    The title says ``label`` (e.g. the model and ratio), the MACs kept and the legend, on two lines;
    ``title`` replaces it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = (~schedule.reuse).float().numpy()
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * keep.shape[1], 1.5 + 0.09 * keep.shape[0]))
    ax.imshow(keep, aspect="auto", cmap="Blues", vmin=-0.3, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(keep.shape[1]), [b.replace("_blocks.", "") .replace("transformer", "block ")
                                         for b in schedule.blocks], rotation=60, ha="right", fontsize=7)
    ticks = list(range(0, keep.shape[0], max(1, keep.shape[0] // 10)))
    ax.set_yticks(ticks, [f"{i} (t={schedule.timesteps[i]:g})" for i in ticks], fontsize=7)
    ax.set_ylabel("step")
    ax.set_title(title or f"{label + ': ' if label else ''}MACs {schedule.macs_ratio:.3f} of full\n"
                          "computed (dark) / reused (light)", fontsize=8)
    return save_figure(fig, path, dpi=100)
