"""Which blocks a schedule gates and what each costs (``prune/blocks.py``)."""


import pytest
import torch
from tiny_models import (tiny_cond_unet, tiny_dit,
                         tiny_unet, unet_case)

import diffusion_shortcuts as ds
from diffusion_shortcuts.metrics import count_macs
from diffusion_shortcuts.prune import profile


def test_blocks_per_architecture():
    assert ds.prune.default_block_names(tiny_cond_unet()) == ["down_blocks.0", "down_blocks.1", "mid_block",
                                                              "up_blocks.0", "up_blocks.1"]
    assert ds.prune.default_block_names(tiny_unet())[-1] == "up_blocks.1"
    assert ds.prune.default_block_names(tiny_dit()) == ["transformer_blocks.0", "transformer_blocks.1"]
    with pytest.raises(TypeError, match=r"no model family knows Linear; supported: .*sd-unet \(UNet2DConditionModel\)"):
        ds.prune.default_block_names(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no block.*nope"):
        profile(tiny_cond_unet(), torch.zeros(1, 1, 8, 8), torch.zeros(1, 3, 8), blocks=["nope"])


def test_profile_counts_each_block_and_the_rest():
    sampler, noise, cond = unet_case()
    prof = profile(sampler.model, noise, cond)
    total, per_module = count_macs(ds.call_denoiser, sampler.model, noise[:1], torch.tensor(1), cond[:1])
    assert prof.total_macs == total
    assert prof.block_macs[0] == per_module["UNet2DConditionModel.down_blocks.0"] > 0
    assert 0 < prof.other_macs < total and abs(float(prof.gamma.sum()) - sum(prof.block_macs) / total) < 1e-12
    # a longer prompt costs more cross-attention: the profile depends on the conditioning's shape
    longer = profile(sampler.model, noise, torch.randn(2, 7, 8))
    assert longer.total_macs > prof.total_macs


def test_profile_sees_an_adapter_added_after_an_earlier_profile():
    sampler, noise, cond = unet_case()
    plain = profile(sampler.model, noise, cond)
    ds.add_lora(sampler.model, rank=2)
    adapted = profile(sampler.model, noise, cond)
    assert adapted.total_macs > plain.total_macs  # the adapter's products are counted, not the cached plain profile
