"""Which blocks of a denoiser can be reused, how they are reused, and what each costs.

DiP-GO (Zhu et al. 2024, arXiv 2410.16942) gates the coarse blocks of the denoiser: for a UNet its
``down_blocks.*``, ``mid_block`` and ``up_blocks.*`` (a reused down block also returns its cached skip
residuals), for a DiT, PixArt or SD3 transformer each of ``transformer_blocks.*``, for Flux its double-
and single-stream blocks. Which blocks a model has is its family's business
(:mod:`diffusion_shortcuts.families`).

Two ways to reuse a block's work from an earlier step:
- ``"output"`` (UNet blocks): return the cached output as it is, as DeepCache does.
- ``"residual"`` (transformer blocks, whose inputs and outputs live on residual streams): return
  ``x + (f(x_cached) - x_cached)``, the cached *update*, for every stream the block carries (SD3's and
  Flux's blocks update the image and the text stream). Returning the cached output itself would throw
  away what the blocks before it computed at this step (Learning-to-Cache, FORA cache the update too).

A block's cost weight gamma_b is its share of the MACs of one denoiser call, counted once per model
configuration and input shape by :func:`profile`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import conditions as C
from ..families import EMBEDDED, FAMILIES, OUTPUT, RESIDUAL, family_of, model_id, unwrap
from ..metrics import count_macs
from ..sampling import call_denoiser

__all__ = ["OUTPUT", "RESIDUAL", "default_block_names", "deepcache_blocks", "block_kind", "resolve_blocks", "model_id",
           "BlockProfile", "profile", "supported"]


def supported() -> list[str]:
    """The registered model families and their classes, e.g. ``["sd-unet (UNet2DConditionModel)", ...]``."""
    return FAMILIES.names()


def default_block_names(model: torch.nn.Module) -> list[str]:
    """The gateable blocks of the model's family in forward order (UNet: down, mid, up; transformers: each
    block; Flux: the double-stream blocks, then the single-stream ones)."""
    return family_of(model).blocks(unwrap(model))


def block_kind(model: torch.nn.Module, name: str) -> str:
    """How block ``name`` reuses its work: the family's kind for its default blocks, ``"output"`` for any
    other module a user names (it is not known to sit on a residual stream)."""
    family = family_of(model)
    return family.block_kind if name in family.blocks(unwrap(model)) else OUTPUT


DEEPCACHE_LAYERS = 3  # DeepCache numbers a branch as block * 3 + layer (3: SD's layers per up block)


def deepcache_blocks(model: torch.nn.Module, branch: int) -> list[str]:
    """The modules a UNet reuses at DeepCache's cached steps for ``cache_branch_id=branch`` (Ma et al. 2024,
    arXiv 2312.00858; numbering of the DeepCache package: layer ``branch % 3`` of block ``branch // 3``,
    up blocks and their layers counted from the output end), in forward order.

    At a cached step DeepCache reuses every down block after block B and, in block B, its layers from
    layer L on (the downsampler counts as the layer after the last resnet; with L = 0 the whole block);
    the mid block; every up block (counted from the end) after B and, in up block B, its layers more than L
    from the end. What it computes is the shallow branch: the time embedding, ``conv_in``, the first
    layers of the first down blocks, the last layers of the last up blocks and ``conv_out``, with the
    deep feature entering the first computed up layer taken from the last full step. Branch 0 computes
    only the last resnet and attention of the last up block besides the input and output layers; a whole
    block list (:func:`default_block_names`) with the outermost blocks kept is branch 2 on SD-style UNets.
    """
    model = unwrap(model)
    if not all(hasattr(model, name) for name in ("down_blocks", "mid_block", "up_blocks")):
        raise ValueError(f"DeepCache's branches are defined for UNets; {type(model).__name__} has no "
                         "down_blocks / mid_block / up_blocks")
    if not isinstance(branch, int) or branch < 0 or branch // DEEPCACHE_LAYERS >= len(model.up_blocks):
        raise ValueError(f"branch must be an int in [0, {DEEPCACHE_LAYERS * len(model.up_blocks) - 1}] for "
                         f"{len(model.up_blocks)} up blocks, got {branch!r}")
    layer, block = branch % DEEPCACHE_LAYERS, branch // DEEPCACHE_LAYERS

    def layers(prefix, module, reused):  # resnets[j] then attentions[j], in forward order
        attentions = getattr(module, "attentions", None) or []
        names = []
        for j in range(len(module.resnets)):
            if reused(j):
                names += [f"{prefix}.resnets.{j}"] + ([f"{prefix}.attentions.{j}"] if j < len(attentions) else [])
        return names

    names = []
    for i, down in enumerate(model.down_blocks):
        if i > block or (i == block and layer == 0):
            names.append(f"down_blocks.{i}")
        elif i == block:
            names += layers(f"down_blocks.{i}", down, lambda j: j >= layer)
            if getattr(down, "downsamplers", None) and len(down.resnets) >= layer:
                names.append(f"down_blocks.{i}.downsamplers.0")
    names += ["mid_block"] if model.mid_block is not None else []
    count = len(model.up_blocks)
    for i, up in enumerate(model.up_blocks):
        from_end = count - 1 - i
        if from_end > block:
            names.append(f"up_blocks.{i}")
        elif from_end == block:
            names += layers(f"up_blocks.{i}", up, lambda j, n=len(up.resnets): n - 1 - j > layer)
    return names


def resolve_blocks(model: torch.nn.Module, names: list[str] | None = None) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` for the named blocks (default: :func:`default_block_names`); unknown names fail."""
    model = unwrap(model)
    names = default_block_names(model) if names is None else list(names)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or not n]
    if missing:
        raise ValueError(f"{type(model).__name__} has no block(s) {missing}; its blocks: {default_block_names(model)}")
    if len(set(names)) != len(names):
        raise ValueError(f"block names repeat: {names}")
    return [(n, modules[n]) for n in names]


@dataclass(frozen=True)
class BlockProfile:
    """MACs of one denoiser call for ONE sample (no guidance): per block and in all."""

    blocks: tuple[str, ...]
    kinds: tuple[str, ...]
    block_macs: tuple[int, ...]
    total_macs: int
    model_id: str
    sample_shape: tuple[int, ...]
    whole_steps: bool = False  # a step reusing every block reuses the whole call (see Family.whole_step_reuse)
    branch: int | None = None  # the blocks are DeepCache's for this branch (:func:`deepcache_blocks`)

    @property
    def other_macs(self) -> int:
        """MACs outside the gated blocks (input/output convolutions, embeddings): always computed."""
        return self.total_macs - sum(self.block_macs)

    @property
    def gamma(self) -> torch.Tensor:
        """Each block's share of one call's MACs (the cost weights of the sparsity loss)."""
        return torch.tensor(self.block_macs, dtype=torch.float64) / self.total_macs


_PROFILES: dict[tuple, BlockProfile] = {}


def profile(model: torch.nn.Module, sample: torch.Tensor, cond=None, blocks: list[str] | None = None,
            branch: int | None = None) -> BlockProfile:
    """Count the MACs of each block for one call on one sample shaped like ``sample[0]`` (cached).

    ``cond`` matters where it changes the cost (a prompt's token count in cross-attention); only its
    first row is used. ``branch`` profiles the modules DeepCache reuses for that branch
    (:func:`deepcache_blocks`) instead of ``blocks``.
    """
    model = unwrap(model)
    if branch is not None:
        if blocks is not None:
            raise ValueError("pass blocks or branch, not both: a branch names its own blocks")
        blocks = deepcache_blocks(model, branch)
    names = [n for n, _ in resolve_blocks(model, blocks)]
    # the configuration does not see an adapter injected later (LoRA adds modules and MACs): the structure is in the key
    structure = (sum(1 for _ in model.modules()), sum(p.numel() for p in model.parameters()))
    key = (model_id(model), structure, tuple(sample.shape[1:]), C.signature(cond), tuple(names), branch)
    if key not in _PROFILES:
        family = family_of(model)
        x = torch.zeros(1, *sample.shape[1:], device=sample.device, dtype=sample.dtype)
        t = torch.tensor(1, device=sample.device)
        guidance = family.default_guidance if family.guidance == EMBEDDED else None
        total, per_module = count_macs(call_denoiser, model, x, t, C.first(cond), guidance)
        root = type(model).__name__
        block_macs = tuple(int(per_module.get(f"{root}.{n}", 0)) for n in names)
        whole = family.whole_step_reuse(model) and \
            names == default_block_names(model)
        _PROFILES[key] = BlockProfile(tuple(names), tuple(block_kind(model, n) for n in names), block_macs,
                                      int(total), key[0], tuple(sample.shape[1:]), bool(whole), branch)
    return _PROFILES[key]
