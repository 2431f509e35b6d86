"""Which blocks of a denoiser can be reused, how they are reused, and what each costs.

DiP-GO (Zhu et al. 2024, arXiv 2410.16942) gates the coarse blocks of the denoiser: for a UNet its
``down_blocks.*``, ``mid_block`` and ``up_blocks.*`` (a reused down block also returns its cached skip
residuals), for a DiT or PixArt transformer each of ``transformer_blocks.*``.

Two ways to reuse a block's work from an earlier step:
- ``"output"`` (UNet blocks): return the cached output as it is, as DeepCache does.
- ``"residual"`` (transformer blocks, whose input and output live on one residual stream): return
  ``x + (f(x_cached) - x_cached)``, the cached *update*. Returning the cached output itself would throw
  away what the blocks before it computed at this step (Learning-to-Cache, FORA cache the update too).

A block's cost weight gamma_b is its share of the MACs of one denoiser call, counted once per model
configuration and input shape by :func:`profile`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from ..metrics import count_macs
from ..sampling import call_denoiser, unwrap

OUTPUT, RESIDUAL = "output", "residual"

_UNETS = ("UNet2DConditionModel", "UNet2DModel")
_TRANSFORMERS = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
SUPPORTED = _UNETS + _TRANSFORMERS


def check_supported(model: torch.nn.Module) -> str:
    kind = type(unwrap(model)).__name__
    if kind not in SUPPORTED:
        raise TypeError(f"pruning does not know the blocks of {kind}; supported: {', '.join(SUPPORTED)} "
                        "(or name the blocks yourself with blocks=[...])")
    return kind


def default_block_names(model: torch.nn.Module) -> list[str]:
    """The gateable blocks in forward order (UNet: down, mid, up; transformers: each block)."""
    model = unwrap(model)
    kind = check_supported(model)
    if kind in _UNETS:
        names = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
        names += ["mid_block"] if model.mid_block is not None else []
        return names + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]


def reuse_kind(model: torch.nn.Module, name: str) -> str:
    """``"residual"`` for blocks on a transformer's residual stream, else ``"output"``."""
    return RESIDUAL if type(unwrap(model)).__name__ in _TRANSFORMERS and name.startswith("transformer_blocks.") \
        else OUTPUT


def resolve_blocks(model: torch.nn.Module, names: list[str] | None = None) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` for the named blocks (default: :func:`default_block_names`); unknown names fail."""
    model = unwrap(model)
    names = default_block_names(model) if names is None else list(names)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or not n]
    if missing:
        raise ValueError(f"{type(model).__name__} has no block(s) {missing}; its blocks: {default_block_names(model)}"
                         if type(model).__name__ in SUPPORTED else f"{type(model).__name__} has no block(s) {missing}")
    if len(set(names)) != len(names):
        raise ValueError(f"block names repeat: {names}")
    return [(n, modules[n]) for n in names]


def model_id(model: torch.nn.Module) -> str:
    """An identity of the model's architecture: class name and a hash of its configuration."""
    model = unwrap(model)
    config = dict(getattr(model, "config", {}) or {})
    text = json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=str)
    return f"{type(model).__name__}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class BlockProfile:
    """MACs of one denoiser call for ONE sample (no guidance): per block and in all."""

    blocks: tuple[str, ...]
    kinds: tuple[str, ...]
    block_macs: tuple[int, ...]
    total_macs: int
    model_id: str
    sample_shape: tuple[int, ...]

    @property
    def other_macs(self) -> int:
        """MACs outside the gated blocks (input/output convolutions, embeddings): always computed."""
        return self.total_macs - sum(self.block_macs)

    @property
    def gamma(self) -> torch.Tensor:
        """Each block's share of one call's MACs (the cost weights of the sparsity loss)."""
        return torch.tensor(self.block_macs, dtype=torch.float64) / self.total_macs


_PROFILES: dict[tuple, BlockProfile] = {}


def _shape_key(cond) -> tuple:
    if isinstance(cond, torch.Tensor):
        return (tuple(cond.shape[1:]), str(cond.dtype))
    if isinstance(cond, dict):
        return tuple(sorted((k, _shape_key(v)) for k, v in cond.items()))
    return (repr(cond),)


def _first(cond):
    if isinstance(cond, torch.Tensor) and cond.ndim > 0:
        return cond[:1]
    if isinstance(cond, dict):
        return {k: _first(v) for k, v in cond.items()}
    return cond


def profile(model: torch.nn.Module, sample: torch.Tensor, cond=None, blocks: list[str] | None = None) -> BlockProfile:
    """Count the MACs of each block for one call on one sample shaped like ``sample[0]`` (cached).

    ``cond`` matters where it changes the cost (a prompt's token count in cross-attention); only its
    first row is used.
    """
    model = unwrap(model)
    names = [n for n, _ in resolve_blocks(model, blocks)]
    key = (model_id(model), tuple(sample.shape[1:]), _shape_key(cond), tuple(names))
    if key not in _PROFILES:
        x = torch.zeros(1, *sample.shape[1:], device=sample.device, dtype=sample.dtype)
        t = torch.tensor(1, device=sample.device)
        total, per_module = count_macs(call_denoiser, model, x, t, _first(cond))
        root = type(model).__name__
        block_macs = tuple(int(per_module.get(f"{root}.{n}", 0)) for n in names)
        _PROFILES[key] = BlockProfile(tuple(names), tuple(reuse_kind(model, n) for n in names), block_macs,
                                      int(total), key[0], tuple(sample.shape[1:]))
    return _PROFILES[key]
