"""The networks of the embedded zoo: configs of the two generators and the small modules around them.

- ``unet_config()``: a ``UNet2DConditionModel`` with Stable Diffusion 1.5's block structure in
  miniature (3 cross-attention down blocks + 1 plain, a cross-attention mid block, 1 plain + 3
  cross-attention up blocks), so the 9 coarse blocks that DiP-GO gates on SD-1.5 exist here too.
- ``dit_config()``: a class-conditional ``DiTTransformer2DModel`` with patch 2, the DiT-XL/2 analogue.
- ``LabelEncoder``: class label -> token sequence (B, L, D) fed to the UNet as ``encoder_hidden_states``,
  the digits stand-in for a text encoder; label ``NULL_LABEL`` is the unconditional token for guidance.
- ``DigitClassifier``: a small CNN over images in [0, 1]; two architectures, one used as a reward and
  the other only to evaluate.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES


def unet_config() -> dict:
    return dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=2,  # diffusers names the number of heads so here
        norm_num_groups=8,
    )


def dit_config() -> dict:
    return dict(num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=6,
                norm_num_groups=8, sample_size=16, patch_size=2, num_embeds_ada_norm=NUM_CLASSES)


class LabelEncoder(ModelMixin, ConfigMixin):
    """Digit label (0-9, or ``NULL_LABEL`` for no condition) -> token sequence (B, num_tokens, dim)."""

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, num_tokens: int = 4, dim: int = 64):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, num_tokens * dim)
        self.position = nn.Parameter(torch.zeros(num_tokens, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        n, d = self.config.num_tokens, self.config.dim
        tokens = self.table(labels).view(-1, n, d) + self.position
        return self.norm(tokens)


class DigitClassifier(ModelMixin, ConfigMixin):
    """A small CNN on 16x16 digits in [0, 1].

    ``arch="cnn"`` (the reward classifier): two 3x3 conv stages with max-pooling and a 128-wide head.
    ``arch="cnn5"`` (the evaluation classifier): 5x5 convs, GroupNorm, average pooling and a different
    width, so that a sample that fools one classifier does not fool the other for the same reason.
    """

    @register_to_config
    def __init__(self, arch: str = "cnn", num_classes: int = NUM_CLASSES):
        super().__init__()
        if arch == "cnn":
            self.body = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 16, 128), nn.ReLU(),
            )
            width = 128
        elif arch == "cnn5":
            self.body = nn.Sequential(
                nn.Conv2d(1, 24, 5, padding=2), nn.GroupNorm(4, 24), nn.SiLU(), nn.AvgPool2d(2),
                nn.Conv2d(24, 48, 5, padding=2), nn.GroupNorm(4, 48), nn.SiLU(), nn.AvgPool2d(2),
                nn.Conv2d(48, 96, 3, padding=1), nn.GroupNorm(4, 96), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(96, 96), nn.SiLU(),
            )
            width = 96
        else:
            raise ValueError(f"unknown classifier arch {arch!r}; known: 'cnn', 'cnn5'")
        self.head = nn.Linear(width, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features of images in [0, 1], shape (B, width): the FID feature space."""
        if images.ndim != 4 or images.shape[1:] != (1, 16, 16):
            raise ValueError(f"images must have shape (B, 1, 16, 16), got {tuple(images.shape)}")
        return self.body(images * 2.0 - 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def log_prob(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(label | image), differentiable in the images: shape (B,)."""
        logp = F.log_softmax(self(images), dim=-1)
        return logp.gather(1, labels.view(-1, 1).to(logp.device)).squeeze(1)
