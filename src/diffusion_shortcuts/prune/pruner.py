"""The DiP-GO gate network: learnable queries per (step, block) -> keep / reuse logits.

Zhu et al. 2024 (arXiv 2410.16942), section 3.3: T x N learnable queries of width D, an encoder that
lets the blocks of one step see each other (self-attention across blocks, then an MLP), and a separate
linear head per (step, block) giving two logits (reuse, keep). The heads start at zero weight with a
bias favouring "keep", so the gated model starts as the full model. Gates are hard one-hot forward
and straight-through backward (the softmax's gradient).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

REUSE, KEEP = 0, 1


class Pruner(ModelMixin, ConfigMixin):
    """Gate logits for ``num_steps`` x ``num_blocks``; save with ``save_pretrained``."""

    config_name = "pruner_config.json"

    @register_to_config
    def __init__(self, num_steps: int, num_blocks: int, dim: int = 64, heads: int = 4, layers: int = 1,
                 keep_bias: float = 2.0, blocks: list[str] | None = None, timesteps: list[float] | None = None):
        super().__init__()
        if num_steps < 1 or num_blocks < 1:
            raise ValueError(f"need at least one step and one block, got {num_steps} x {num_blocks}")
        self.queries = nn.Parameter(torch.randn(num_steps, num_blocks, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.head_weight = nn.Parameter(torch.zeros(num_steps, num_blocks, dim, 2))
        self.head_bias = nn.Parameter(torch.tensor([0.0, keep_bias]).repeat(num_steps, num_blocks, 1))

    @torch.no_grad()
    def start_from(self, reuse: torch.Tensor) -> "Pruner":
        """Start from a table instead of keeping everything: the head biases favour "reuse" where ``reuse[t, b]`` is
        True and "keep" elsewhere (by ``keep_bias``), so the first hard gates are the table (a warm start)."""
        reuse = torch.as_tensor(reuse, dtype=torch.bool, device=self.head_bias.device)
        if reuse.shape != self.head_bias.shape[:2]:
            raise ValueError(f"the table is {tuple(reuse.shape)}, the pruner's gates {tuple(self.head_bias.shape[:2])}")
        bias = self.config.keep_bias
        self.head_bias[..., REUSE] = torch.where(reuse, bias, 0.0)
        self.head_bias[..., KEEP] = torch.where(reuse, 0.0, bias)
        return self

    @torch.no_grad()
    def restart_from(self, reuse: torch.Tensor) -> "Pruner":
        """:meth:`start_from` with the heads' weights zeroed too, so that the hard gates are exactly the table
        whatever was learnt before (the block-level phase after a step-level one)."""
        self.head_weight.zero_()
        return self.start_from(reuse)

    def forward(self, per_step: bool = False) -> torch.Tensor:
        """Logits ``(T, N, 2)``: [..., 0] reuse, [..., 1] keep. ``per_step``: one decision per step, the mean of its
        blocks' logits given to every block (a step-level search; the gradient reaches every block's head)."""
        h = self.encoder(self.queries)  # attention across the blocks of each step
        h = h + self.mlp(h)
        logits = torch.einsum("tnd,tndk->tnk", h, self.head_weight) + self.head_bias
        return logits.mean(1, keepdim=True).expand_as(logits) if per_step else logits

    def keep_scores(self, per_step: bool = False) -> torch.Tensor:
        """Softmax probability of "keep" per (step, block), the quantity post-processing thresholds."""
        return self(per_step).softmax(-1)[..., KEEP]

    def gates(self, per_step: bool = False) -> torch.Tensor:
        """Hard one-hot gates ``(T, N, 2)`` with straight-through gradients; step 0 always keeps."""
        soft = self(per_step).softmax(-1)
        hard = nn.functional.one_hot(soft.argmax(-1), 2).to(soft.dtype)
        gates = hard + soft - soft.detach()
        first = torch.zeros_like(gates[:1])
        first[..., KEEP] = 1.0
        return torch.cat([first, gates[1:]])
