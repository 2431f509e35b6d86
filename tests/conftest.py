"""Tiny models built from configs (no download) shared by the tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel


def tiny_cond_unet(in_channels: int = 1, sample_size: int = 8, cross_dim: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=2, norm_num_groups=4,
    ).eval()


def tiny_unet(in_channels: int = 1, sample_size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()


def tiny_dit(in_channels: int = 2, learned_sigma: bool = True, num_classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=in_channels,
        out_channels=2 * in_channels if learned_sigma else in_channels, num_layers=2, norm_num_groups=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes,
    ).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
    ).eval()


@pytest.fixture
def cond_unet():
    return tiny_cond_unet()


class Killed(Exception):
    """Raised from a progress callback to stop a run mid-way, as a kill would."""


def kill_at(iteration: int):
    """A callback that raises :class:`Killed` when the run reaches ``iteration``."""
    def callback(info):
        if info["iteration"] == iteration:
            raise Killed
    return callback
