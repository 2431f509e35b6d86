"""Batches of conditioning: how many rows, some rows, broadcast, concatenate; one tree-map for all.

A condition batch is what a denoiser takes besides the latents: ``None`` (unconditional), a tensor
(class labels, prompt embeddings), a list (prompts or labels as a reward sees them), or a dict of such
batches, possibly nested (SDXL's ``{"encoder_hidden_states", "text_embeds", "time_ids"}``, PixArt's
attention mask). Every batch-wise operation walks the structure with :func:`tree_map`; tensors whose
first dimension is the batch are its leaves, anything else (0-d tensors, strings, numbers) passes
through untouched.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch

Cond = torch.Tensor | dict[str, Any] | list | None


class ConditionError(ValueError):
    """A condition batch that is empty, ragged, or does not fit the latents it goes with."""


def _is_batch(leaf) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.ndim > 0


def tree_map(fn: Callable, *trees):
    """``fn(leaf, *matching leaves)`` on every batch tensor of the (nested dict) ``trees``; others pass through."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: tree_map(fn, *(t[k] for t in trees)) for k in first}
    if _is_batch(first):
        return fn(*trees)
    return first


def leaves(tree) -> list[torch.Tensor]:
    """The batch tensors of ``tree`` in key order."""
    found = []
    tree_map(lambda leaf: found.append(leaf), tree)
    return found


def batch_size(cond: Cond) -> int | None:
    """Rows of a batch: a tensor's or a list's length, a dict's common tensor length; None for ``None`` or a
    structure with no batch tensor. Ragged dicts and empty batches raise :class:`ConditionError`."""
    if cond is None:
        return None
    if isinstance(cond, (list, tuple)):
        if not cond:
            raise ConditionError("conditions must be a non-empty batch: got an empty list")
        return len(cond)
    sizes = {leaf.shape[0] for leaf in leaves(cond)}
    if len(sizes) > 1:
        raise ConditionError(f"conditions: tensors of different batch sizes {sorted(sizes)}")
    if sizes == {0}:
        raise ConditionError("conditions: an empty batch")
    return sizes.pop() if sizes else None


def count(conditions: Cond) -> int:
    """How many conditions a batch holds (1 for None); a batch with no rows is refused."""
    if conditions is None:
        return 1
    size = batch_size(conditions)
    if size is None:
        raise ConditionError("conditions must be a non-empty batch (a tensor, a dict of tensors, a list) or None")
    return size


def take(conditions: Cond, index: torch.Tensor) -> Cond:
    """Rows ``index`` of a batch (a list gives a list)."""
    if conditions is None:
        return None
    if isinstance(conditions, (list, tuple)):
        return [conditions[int(i)] for i in index]
    return tree_map(lambda leaf: leaf[index.to(leaf.device)], conditions)


def first(conditions: Cond) -> Cond:
    """The first row, kept as a batch of one."""
    return take(conditions, torch.tensor([0])) if batch_size(conditions) else conditions


def expand(cond: Cond, batch: int) -> Cond:
    """Broadcast a batch of one to ``batch`` rows (other sizes are left as they are)."""
    return tree_map(lambda leaf: leaf.expand(batch, *leaf.shape[1:]) if leaf.shape[0] == 1 and batch != 1 else leaf,
                    cond)


def concat(*conds: Cond) -> Cond:
    """Row-wise concatenation of batches of one structure (e.g. ``[uncond; cond]`` for guidance)."""
    if isinstance(conds[0], (list, tuple)):
        return [row for c in conds for row in c]
    return tree_map(lambda *parts: torch.cat([p.to(parts[0].device) for p in parts]), *conds)


def signature(cond: Cond) -> tuple:
    """What about a batch changes a denoiser call's cost: per-row shapes and dtypes (not the batch size)."""
    if isinstance(cond, dict):
        return tuple(sorted((k, signature(v)) for k, v in cond.items()))
    if _is_batch(cond):
        return (tuple(cond.shape[1:]), str(cond.dtype))
    return (repr(cond),)


def check_fits(cond: Cond, latents_batch: int) -> None:
    """A batch goes with ``latents_batch`` latents when it has one row (broadcast) or as many."""
    size = batch_size(cond)
    if size is not None and size not in (1, latents_batch):
        raise ConditionError(f"cond has batch {size} but latents have batch {latents_batch}")


def fingerprint(conditions: Cond) -> str:
    """A short hash of a batch's content (tensor values, list items): training loops record it, so that a
    resume on other conditions is refused."""
    digest = hashlib.sha256()
    if isinstance(conditions, (list, tuple)):
        digest.update(repr(list(conditions)).encode())
    else:
        digest.update(repr(signature(conditions)).encode())
        for leaf in leaves(conditions):
            digest.update(leaf.detach().to("cpu").contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
