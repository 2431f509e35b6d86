"""Sampling with a schedule: the hooks, the step clock, per-block state, whole steps and the forecasters
(``prune/supernet.py``, ``clock.py``, ``state.py``, ``forecast.py``, ``apply.py``)."""

import tempfile
from pathlib import Path

import pytest
import torch
from tiny_models import (CASES, STEPS, ddim, dit_case, record_outputs, schedule_for, tiny_unet, unet_case)

import diffusion_shortcuts as ds
from diffusion_shortcuts.metrics import count_macs
from diffusion_shortcuts.prune import CacheSchedule, ScheduleError, SuperNet, apply, profile
from diffusion_shortcuts.prune.forecast import FORECASTERS
from diffusion_shortcuts.prune.state import BlockState


@pytest.mark.parametrize("case", CASES)
def test_keep_everything_equals_unwrapped(case):
    sampler, noise, cond = CASES[case]()
    reference = sampler(noise, cond)
    with apply(sampler.model, schedule_for(sampler, noise, cond), sampler) as net:
        out = sampler(noise, cond)
    assert torch.equal(out, reference)
    assert net.computed == [STEPS] * len(net.names)
    assert SuperNet.of(sampler.model) is None  # hooks removed on exit
    assert torch.equal(sampler(noise, cond), reference)


@pytest.mark.parametrize("case,block", [("unet", 1), ("unet", 3), ("dit", 1)])
def test_reusing_one_block_at_one_step_equals_doing_it_by_hand(case, block):
    sampler, noise, cond = CASES[case]()
    step = 3
    prof = profile(sampler.model, noise, cond)
    reuse = torch.zeros(STEPS, len(prof.blocks), dtype=torch.bool)
    reuse[step, block] = True
    with apply(sampler.model, CacheSchedule.from_table(reuse, sampler.timesteps, prof), sampler):
        scheduled = sampler(noise, cond)

    # by hand: run the plain model to step `step`, remembering the block's input and output at step-1 ...
    module = dict(sampler.model.named_modules())[prof.blocks[block]]
    seen, latents = [], {}
    hook = module.register_forward_hook(lambda mod, args, kwargs, out: seen.append((args, kwargs, out)),
                                        with_kwargs=True)
    sampler(noise, cond, callback=lambda d: latents.__setitem__(d["i"], d["x"]))
    hook.remove()
    args, kwargs, before = seen[step - 1]
    # ... then at `step` the block returns that output (a UNet block) or adds that update (a transformer block)
    original = module.forward

    def reused(*a, **k):
        module.forward = original
        if case == "dit":
            x_now = a[0] if a else k["hidden_states"]
            x_then = args[0] if args else kwargs["hidden_states"]
            return x_now + (before - x_then)
        return before

    module.forward = reused
    try:
        by_hand = sampler(latents[step - 1], cond, start_step=step)
    finally:
        module.forward = original
    torch.testing.assert_close(scheduled, by_hand, rtol=0, atol=1e-6)
    assert not torch.allclose(scheduled, sampler(noise, cond), atol=1e-6)  # the reuse changed something


def test_generations_and_guidance_branches_keep_their_own_caches():
    sampler, noise, cond = unet_case()
    prof = profile(sampler.model, noise, cond)
    sched = CacheSchedule.uniform(sampler.timesteps, prof, interval=2, keep_outer=1)
    other_noise = torch.randn_like(noise)
    with apply(sampler.model, sched, sampler):
        sampler(noise, cond)
        second = sampler(other_noise, cond)
    with apply(sampler.model, sched, sampler):
        fresh = sampler(other_noise, cond)
    assert torch.equal(second, fresh)

    # step 1 reuses the mid block: each half of the batch [uncond; cond] gets its own half of step 0's output
    outputs = []
    mid = sampler.model.mid_block
    handle = record_outputs(mid, outputs)
    with apply(sampler.model, sched, sampler):
        sampler(noise, cond)
    handle.remove()
    assert sched.reuse[1, prof.blocks.index("mid_block")]
    step0, step1 = outputs[0], outputs[1]
    assert torch.equal(step1[:2], step0[:2]) and torch.equal(step1[2:], step0[2:])
    assert not torch.allclose(step0[:2], step0[2:])  # the branches differ, so a swap would show


@pytest.mark.parametrize("case", CASES)
def test_reused_blocks_are_not_computed_and_macs_match_the_table(case):
    sampler, noise, cond = CASES[case]()
    prof = profile(sampler.model, noise, cond)
    reuse = torch.rand(STEPS, len(prof.blocks), generator=torch.Generator().manual_seed(0)) < 0.5
    reuse[0] = False
    sched = CacheSchedule.from_table(reuse, sampler.timesteps, prof)
    calls = [0] * len(prof.blocks)
    modules = dict(sampler.model.named_modules())
    inner = [next(m for n, m in modules[name].named_modules() if n.endswith(("conv1", "attn1.to_q")))
             for name in prof.blocks]  # a layer each block runs first when it is computed
    handles = [m.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, m in enumerate(inner)]
    with apply(sampler.model, sched, sampler):
        measured, _ = count_macs(sampler, noise, cond)
    for h in handles:
        h.remove()
    assert calls == (~reuse).sum(0).tolist()
    assert measured == sched.macs(batch=2, guidance=True)
    assert 0 < sched.macs_ratio < 1


def test_sdo_through_a_pruned_model_checkpointing_recomputes_the_same_caches():
    sampler, noise, cond = unet_case(dtype=torch.float64, steps=5)
    prof = profile(sampler.model, noise, cond)
    sched = CacheSchedule.uniform(sampler.timesteps, prof, interval=2)
    grads = {}
    with apply(sampler.model, sched, sampler):
        for policy in ("full", "checkpointed"):
            x = noise.clone().requires_grad_(True)
            sampler(x, cond, gradient=policy).square().sum().backward()
            grads[policy] = x.grad
    torch.testing.assert_close(grads["checkpointed"], grads["full"], rtol=1e-10, atol=1e-12)
    x = noise.clone().requires_grad_(True)
    sampler(x, cond, gradient="full").square().sum().backward()  # unpruned: a different gradient
    assert not torch.allclose(x.grad, grads["full"])


@pytest.mark.parametrize("case", ["unet", "pixel-unet"])
def test_a_step_that_reuses_every_block_skips_the_call_exactly(case):
    if case == "unet":
        sampler, noise, cond = unet_case()
    else:
        sampler = ds.Sampler(tiny_unet(), ddim(), STEPS)
        noise, cond = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), None
    prof = profile(sampler.model, noise, cond[:1] if cond is not None else None)
    reuse = torch.zeros(STEPS, len(prof.blocks), dtype=torch.bool)
    reuse[2] = reuse[3] = reuse[5] = True  # every block reused at steps 2, 3 and 5
    reuse[4, 1] = True
    schedule = CacheSchedule.from_table(reuse, sampler.timesteps, prof)
    assert schedule.whole_steps and prof.whole_steps
    computing = CacheSchedule.from_table(reuse, sampler.timesteps, prof)
    computing.whole_steps = False  # the same table, with the layers outside the blocks run at every step
    calls = []
    handle = sampler.model.conv_in.register_forward_hook(lambda *a: calls.append(1))
    try:
        with apply(sampler.model, computing, sampler):
            reference = sampler(noise, cond)
        assert len(calls) == STEPS
        calls.clear()
        with apply(sampler.model, schedule, sampler) as net:
            skipped = sampler(noise, cond)
            assert net.skipped_calls == 3 and len(calls) == STEPS - 3  # no denoiser call at the three whole steps
            measured, _ = count_macs(lambda: sampler(noise, cond))
    finally:
        handle.remove()
    assert torch.equal(skipped, reference)
    batch = noise.shape[0]
    assert measured == schedule.macs(batch=batch, guidance=sampler.guidance_scale != 1.0)
    assert schedule.macs() < computing.macs()


def test_whole_steps_keep_gradients_exact_under_checkpointing():
    sampler, noise, cond = unet_case(dtype=torch.float64, steps=4)
    prof = profile(sampler.model, noise, cond)
    reuse = torch.zeros(4, len(prof.blocks), dtype=torch.bool)
    reuse[2] = True
    schedule = CacheSchedule.from_table(reuse, sampler.timesteps, prof)
    grads = []
    for policy in (ds.gradients.Full(), ds.gradients.Checkpointed()):
        x = noise.clone().requires_grad_(True)
        with apply(sampler.model, schedule, sampler):
            sampler(x, cond, gradient=policy).square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_a_transformer_or_a_block_subset_never_skips_the_call():
    sampler, noise, cond = dit_case()
    assert not profile(sampler.model, noise, cond).whole_steps  # the output layer reads the timestep
    unet, noise, cond = unet_case()
    assert not profile(unet.model, noise, cond, blocks=["down_blocks.0", "mid_block"]).whole_steps


def test_full_graph_steps_compute_every_block_at_sdos_graph_step_only():
    sampler, noise, cond = unet_case(steps=4)
    prof = profile(sampler.model, noise, cond)
    reuse = torch.zeros(4, len(prof.blocks), dtype=torch.bool)
    reuse[1:, 1:3] = True  # blocks 1 and 2 reused at steps 1-3
    schedule = CacheSchedule.from_table(reuse, sampler.timesteps, prof)
    computed = {}
    for full in (False, True):
        x = noise.clone().requires_grad_(True)
        with apply(sampler.model, schedule, sampler, full_graph_steps=full) as net:
            out = sampler(x, cond, gradient=ds.gradients.Shortcut(step=2))
            computed[full] = list(net.computed)
        out.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    # with full graph steps, blocks 1 and 2 run at step 2 (the graph step) as well; nothing else changes
    assert [b - a for a, b in zip(computed[False], computed[True])] == [0, 1, 1, 0, 0]


def stored(works: dict) -> BlockState:
    state = BlockState()
    state.works.update(works)
    return state


def test_taylor1_forecasts_a_blocks_work_from_its_two_latest_computed_steps():
    sampler, noise, cond = dit_case()
    taylor1 = FORECASTERS["taylor1"]()
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    state = stored({1: a, 3: b})
    torch.testing.assert_close(taylor1.predict(state, 4), b + (b - a) * 0.5)  # one step after s2, two steps between
    torch.testing.assert_close(taylor1.predict(state, 5), b + (b - a) * 1.0)
    # the horizon: no farther past s2 than s1 is before it; the forecast holds there
    torch.testing.assert_close(taylor1.predict(state, 6), b + (b - a) * 1.0)
    torch.testing.assert_close(taylor1.predict(state, 9), b + (b - a) * 1.0)
    one = stored({2: (a, (b,))})  # one computed step: nothing to extrapolate from, the copy
    assert taylor1.predict(one, 5)[0] is a
    with pytest.raises(ScheduleError, match="reuse mode must be one of copy, taylor1"):
        SuperNet(sampler.model, sampler.timesteps, mode="taylor9")


def test_taylor2_is_the_parabola_through_the_three_latest_computed_steps():
    taylor2 = FORECASTERS["taylor2"]()
    a, b, c = torch.randn(3, 2, 3, dtype=torch.float64)

    def work(s):  # a quadratic in the step: the second-order forecast must be exact within its horizon
        return a + b * s + c * s ** 2

    state = stored({1: work(1), 4: work(4), 6: work(6)})
    torch.testing.assert_close(taylor2.predict(state, 7), work(7))
    torch.testing.assert_close(taylor2.predict(state, 8), work(8))
    torch.testing.assert_close(taylor2.predict(state, 11), work(8))  # held at s2 + (s2 - s1)
    two = stored({2: work(2), 3: work(3)})  # two computed steps: the first-order forecast
    torch.testing.assert_close(taylor2.predict(two, 4), work(3) + (work(3) - work(2)))


@pytest.mark.parametrize("case", ["unet", "dit"])
def test_taylor1_keep_all_is_bit_identical_and_reuse_differs_from_copy(case):
    sampler, noise, cond = CASES[case]()
    plain = sampler(noise, cond)
    prof = profile(sampler.model, noise, cond)
    keep = CacheSchedule.keep_all(sampler.timesteps, prof).with_mode("taylor1")
    with apply(sampler.model, keep, sampler):
        assert torch.equal(sampler(noise, cond), plain)
    reuse = torch.zeros(STEPS, len(prof.blocks), dtype=torch.bool)
    reuse[3:, 1] = True  # block 1 computed at steps 0-2, then forecast
    copy = CacheSchedule.from_table(reuse, sampler.timesteps, prof)
    outs = {}
    for schedule in (copy, copy.with_mode("taylor1")):
        with apply(sampler.model, schedule, sampler) as net:
            outs[schedule.mode] = sampler(noise, cond)
        assert net.computed[1] == 3
    assert (outs["copy"] - outs["taylor1"]).abs().max() > 1e-6
    again = CacheSchedule.load(copy.with_mode("taylor1").save(Path(tempfile.mkdtemp()) / "s.json"))
    assert again.mode == "taylor1" and torch.equal(again.reuse, copy.reuse)
