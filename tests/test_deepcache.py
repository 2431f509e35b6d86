"""DeepCache's branches as cache schedules: ``CacheSchedule.uniform(..., branch=k)`` against DeepCache's
semantics written out by hand in this file (Ma et al. 2024, arXiv 2312.00858, and the numbering of the
DeepCache package: branch k is layer k % 3 of block k // 3)."""

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

import diffusion_shortcuts as ds
from diffusion_shortcuts.prune import CacheSchedule, SuperNet, apply, deepcache_blocks, profile

STEPS, INTERVAL = 7, 3


def sd_style_unet() -> UNet2DConditionModel:
    """SD's layout in miniature: two resnets per down block (three per up block), cross-attention in all
    but the deepest level, a downsampler after every down block but the last."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=4).eval()


class HandDeepCache:
    """DeepCache at its cached steps (step % interval != 0), module by module, at both levels a UNet has:
    each block and each of its resnets, attentions and samplers returns the output it had at its last
    computed call when the rule below says it is skipped. Up blocks and their layers are counted from the
    output end, as DeepCache counts them; a down block's sampler is the layer after its last resnet."""

    def __init__(self, unet, interval: int, branch: int):
        self.unet, self.interval = unet, interval
        self.layer, self.block = branch % 3, branch // 3
        self.step, self.cache, self.wrapped = -1, {}, []
        self.counter = unet.register_forward_pre_hook(lambda *_: setattr(self, "step", self.step + 1))
        for i, down in enumerate(unet.down_blocks):
            self._wrap_block(down, ("down", i), reverse=False)
        self._wrap(unet.mid_block, ("mid", 0, 0))
        for i, up in enumerate(unet.up_blocks):
            self._wrap_block(up, ("up", len(unet.up_blocks) - 1 - i), reverse=True)

    def _wrap_block(self, block, where, reverse):
        kind, index = where
        n = len(block.resnets)
        for j, resnet in enumerate(block.resnets):
            self._wrap(resnet, (kind, index, n - 1 - j if reverse else j))
        for j, attention in enumerate(getattr(block, "attentions", None) or []):
            self._wrap(attention, (kind, index, n - 1 - j if reverse else j))
        for sampler in (getattr(block, "downsamplers", None) or []):
            self._wrap(sampler, (kind, index, n))
        for sampler in (getattr(block, "upsamplers", None) or []):
            self._wrap(sampler, (kind, index, 0))
        self._wrap(block, (kind, index, 0))

    def skipped(self, kind, block, layer) -> bool:
        if self.step % self.interval == 0:
            return False
        if kind == "mid" or block > self.block:
            return True
        if block < self.block:
            return False
        return layer >= self.layer if kind == "down" else layer > self.layer

    def _wrap(self, module, key):
        computed = module.forward
        name = f"{key}-{id(module)}"

        def forward(*args, **kwargs):
            if self.skipped(*key):
                return self.cache[name]
            self.cache[name] = out = computed(*args, **kwargs)
            return out

        module.forward = forward
        self.wrapped.append(module)

    def remove(self):
        self.counter.remove()
        for module in self.wrapped:
            del module.forward


def case():
    unet = sd_style_unet()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    gen = torch.Generator().manual_seed(1)
    sampler = ds.Sampler(unet, scheduler, STEPS, guidance_scale=2.0, uncond=torch.randn(1, 3, 8, generator=gen))
    return sampler, torch.randn(2, 1, 8, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)


@pytest.mark.parametrize("branch", [0, 1, 2, 3, 5])
def test_branch_schedules_reproduce_deepcache_bit_for_bit(branch):
    sampler, noise, cond = case()
    with torch.no_grad():
        full = sampler(noise, cond)
        hand = HandDeepCache(sampler.model, INTERVAL, branch)
        try:
            expected = sampler(noise, cond)
        finally:
            hand.remove()
        schedule = CacheSchedule.uniform(sampler.timesteps, profile(sampler.model, noise, cond, branch=branch),
                                         INTERVAL, branch=branch)
        with apply(sampler.model, schedule, sampler):
            net = SuperNet.of(sampler.model)
            ours = sampler(noise, cond)
            computed = list(net.computed)
    assert not torch.equal(expected, full)  # the cache changed something: the comparison has teeth
    assert torch.equal(ours, expected)
    cached_steps = sum(1 for i in range(STEPS) if i % INTERVAL)
    assert computed == [STEPS - cached_steps] * len(schedule.blocks)  # reused modules really did not run


def test_branch_blocks_follow_deepcache_numbering():
    unet = sd_style_unet()
    assert deepcache_blocks(unet, 0) == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0",
                                         "up_blocks.1", "up_blocks.2.resnets.0", "up_blocks.2.attentions.0",
                                         "up_blocks.2.resnets.1", "up_blocks.2.attentions.1"]
    # branch 2: the first down block without its sampler, the last up block whole: the whole-block
    # uniform schedule (keep_outer=1) computes the same outputs
    assert deepcache_blocks(unet, 2) == ["down_blocks.0.downsamplers.0", "down_blocks.1", "down_blocks.2",
                                         "mid_block", "up_blocks.0", "up_blocks.1"]
    assert deepcache_blocks(unet, 4) == ["down_blocks.1.resnets.1", "down_blocks.1.attentions.1",
                                         "down_blocks.1.downsamplers.0", "down_blocks.2", "mid_block", "up_blocks.0",
                                         "up_blocks.1.resnets.0", "up_blocks.1.attentions.0"]


def test_branch_zero_computes_only_the_shallowest_layers():
    sampler, noise, cond = case()
    prof = profile(sampler.model, noise, cond, branch=0)
    schedule = CacheSchedule.uniform(sampler.timesteps, prof, INTERVAL, branch=0)
    macs = dict(zip(prof.blocks, prof.block_macs))
    last = sampler.model.up_blocks[-1]
    kept = prof.total_macs - sum(prof.block_macs)
    from diffusion_shortcuts.metrics import count_macs
    _, per_module = count_macs(ds.call_denoiser, sampler.model, noise[:1], sampler.timesteps[0], cond[:1])
    root = type(sampler.model).__name__
    shallow = sum(per_module.get(f"{root}.{n}", 0) for n in
                  ("time_embedding", "conv_in", "conv_norm_out", "conv_out", "up_blocks.2.resnets.2",
                   "up_blocks.2.attentions.2"))
    assert kept == pytest.approx(shallow, rel=1e-6)
    assert len(last.resnets) == 3 and "up_blocks.2.resnets.2" not in macs
    assert schedule.macs_ratio < CacheSchedule.uniform(sampler.timesteps, profile(sampler.model, noise, cond),
                                                       INTERVAL).macs_ratio


def test_branch_needs_a_profile_of_its_blocks():
    sampler, noise, cond = case()
    with pytest.raises(ValueError, match="branch=0 needs a profile of that branch"):
        CacheSchedule.uniform(sampler.timesteps, profile(sampler.model, noise, cond), INTERVAL, branch=0)
    with pytest.raises(ValueError, match="branch must be an int"):
        deepcache_blocks(sampler.model, 9)
    with pytest.raises(ValueError, match="defined for UNets"):
        deepcache_blocks(torch.nn.Linear(2, 2), 0)
