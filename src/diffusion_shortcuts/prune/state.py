"""Per-block state of a cache schedule: what one gated block computed in the current generation, by step.

One :class:`BlockState` per block (and one for the denoiser's whole output, for steps that reuse every block),
reset at every generation. Under classifier-free guidance the Sampler batches ``[uncond; cond]`` into one call,
so a stored work holds both branches as rows of one batch: row r is only ever read by row r, and the two
branches never read each other's work.
"""

from __future__ import annotations


def map_streams(fn, *trees):
    """Apply ``fn`` leafwise to tensors in matching (nested) tuples, e.g. a down block's (h, residuals);
    a missing leaf (SD3's last block returns no text stream) stays missing."""
    first = trees[0]
    if isinstance(first, (tuple, list)):
        return type(first)(map_streams(fn, *parts) for parts in zip(*trees))
    return None if any(t is None for t in trees) else fn(*trees)


def batch_of(tree) -> int:
    """The batch size of the first tensor in a (nested tuple of) tensors."""
    while isinstance(tree, (tuple, list)):
        tree = next(part for part in tree if part is not None)
    return tree.shape[0]


class BlockState:
    """What a block computed at which step of this generation (``works``), and at which of those steps the stored
    work is a forecast mixed in by the search's gates (``forecast_steps``: a forecast extrapolates from really
    computed steps only, as at inference, where reused steps store nothing)."""

    def __init__(self):
        self.works: dict[int, object] = {}
        self.forecast_steps: set[int] = set()

    def reset(self) -> None:
        self.works.clear()
        self.forecast_steps.clear()

    def latest(self, step: int):
        """The latest stored work before ``step`` (None if there is none)."""
        earlier = [s for s in self.works if s < step]
        return self.works[max(earlier)] if earlier else None

    def computed_before(self, step: int) -> list[int]:
        """The steps before ``step`` at which the block really computed, in order."""
        return sorted(s for s in self.works if s < step and s not in self.forecast_steps)

    def store(self, step: int, work, keep: int | None = None) -> None:
        """Store ``work`` at ``step`` once: a gradient checkpoint recomputing the step keeps what its forward pass
        stored. With ``keep``, only the ``keep`` latest steps stay (no backward pass can need older ones)."""
        if step in self.works:
            return
        self.works[step] = work
        if keep is not None:
            for old in sorted(self.works)[:-keep]:
                del self.works[old]
                self.forecast_steps.discard(old)
