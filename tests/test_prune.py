"""DiP-GO: gated blocks, cache schedules, MACs accounting, the pruner and the search."""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import Killed, kill_at
from tiny_models import ddim, dit_case, tiny_cond_unet, tiny_dit, tiny_unet, unet_case

import diffusion_shortcuts as ds
from diffusion_shortcuts.metrics import count_macs
from diffusion_shortcuts.prune import CacheSchedule, Pruner, ScheduleError, SuperNet, apply, profile
from diffusion_shortcuts.prune.forecast import FORECASTERS
from diffusion_shortcuts.prune.state import BlockState

STEPS = 6


CASES = {"unet": unet_case, "dit": dit_case}


def schedule_for(sampler, noise, cond, reuse=None):
    prof = profile(sampler.model, noise, cond)
    if reuse is None:
        return CacheSchedule.keep_all(sampler.timesteps, prof)
    return CacheSchedule.from_table(reuse, sampler.timesteps, prof)


def record_outputs(module, store):
    """A plain forward hook: sees what the block returns, computed or reused."""
    return module.register_forward_hook(lambda mod, args, out: store.append(out))


# ---- blocks and profile -----------------------------------------------------------------------------
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


# ---- applying a schedule ----------------------------------------------------------------------------
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


# ---- mismatches and files ---------------------------------------------------------------------------
def test_mismatched_schedules_fail_clearly(tmp_path):
    sampler, noise, cond = unet_case()
    sched = schedule_for(sampler, noise, cond)
    shorter = ds.Sampler(sampler.model, ddim(), STEPS - 2, guidance_scale=2.0, uncond=sampler.uncond)
    with pytest.raises(ScheduleError, match="schedule has 6 steps, the sampler 4"):
        with apply(sampler.model, sched, shorter):
            pass
    with apply(sampler.model, sched):  # no sampler given: the first unknown timestep fails
        with pytest.raises(ScheduleError, match="is not one of the schedule's 6 timesteps"):
            ds.Sampler(sampler.model, ddim(), 5, 2.0, uncond=sampler.uncond)(noise, cond)
    # a subset of the timesteps (every other step) is caught as a skipped step
    skipping = CacheSchedule.keep_all(list(range(1000, 0, -100)), profile(sampler.model, noise, cond))
    with apply(sampler.model, skipping):
        with pytest.raises(ScheduleError, match="went from step 0 to step 2"):
            _run_timesteps(sampler.model, noise, cond, [1000, 800])
    other = tiny_cond_unet(cross_dim=16)
    with pytest.raises(ScheduleError, match="made for model"):
        apply(other, sched).__enter__()
    dit_sampler, dit_noise, dit_cond = dit_case()
    with pytest.raises(ScheduleError, match="blocks"):
        apply(dit_sampler.model, sched).__enter__()


def _run_timesteps(model, noise, cond, timesteps):
    for t in timesteps:
        ds.call_denoiser(model, torch.cat([noise, noise]), torch.tensor(t), torch.cat([cond, cond]))


def test_schedule_and_pruner_files_round_trip_and_reject_corruption(tmp_path):
    sampler, noise, cond = unet_case()
    prof = profile(sampler.model, noise, cond)
    sched = CacheSchedule.uniform(sampler.timesteps, prof, interval=3)
    path = sched.save(tmp_path / "s.json")
    loaded = CacheSchedule.load(path)
    assert torch.equal(loaded.reuse, sched.reuse) and loaded.to_dict() == sched.to_dict()

    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(ScheduleError, match="invalid JSON"):
        CacheSchedule.load(tmp_path / "garbage.json")
    data = json.loads(path.read_text())
    for key, value, message in [("version", 99, "version 99"), ("reuse", [[1, 0]], "malformed|table"),
                                ("format", "x", "not a diffusion-shortcuts"), ("block_macs", [1], "blocks but")]:
        broken = dict(data, **{key: value})
        (tmp_path / "b.json").write_text(json.dumps(broken))
        with pytest.raises(ScheduleError, match=message):
            CacheSchedule.load(tmp_path / "b.json")
    data["reuse"][0][0] = 1
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="step 0 cannot reuse"):
        CacheSchedule.load(tmp_path / "b.json")
    with pytest.raises(ScheduleError, match="no such schedule"):
        CacheSchedule.load(tmp_path / "missing.json")

    pruner = Pruner(STEPS, len(prof.blocks), dim=8, heads=2)
    torch.nn.init.normal_(pruner.head_weight)
    pruner.save_pretrained(tmp_path / "pruner")
    again = Pruner.from_pretrained(tmp_path / "pruner")
    assert torch.equal(again(), pruner())
    (tmp_path / "pruner" / "diffusion_pytorch_model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(OSError, match="Unable to load weights from checkpoint file .*pruner/diffusion_pytorch_model"):
        Pruner.from_pretrained(tmp_path / "pruner")


# ---- post-processing --------------------------------------------------------------------------------
def test_bisection_lands_within_tolerance_and_never_prunes_step_0():
    sampler, noise, cond = unet_case(steps=50)
    prof = profile(sampler.model, noise, cond)
    scores = torch.rand(50, len(prof.blocks), generator=torch.Generator().manual_seed(1))
    previous = None
    for ratio in (0.3, 0.5, 0.8):
        sched = CacheSchedule.from_scores(scores, sampler.timesteps, prof, ratio)
        assert abs(sched.pruned_fraction - ratio) <= 0.0125 and sched.info["within_tolerance"]
        assert not sched.reuse[0].any()
        if previous is not None:  # one global threshold: a higher ratio reuses a superset
            assert (sched.reuse | previous.reuse).equal(sched.reuse)
        previous = sched
    # the lowest-scoring block-steps go first
    sched = CacheSchedule.from_scores(scores, sampler.timesteps, prof, 0.3)
    assert scores[1:][sched.reuse[1:]].max() < scores[1:][~sched.reuse[1:]].min()
    # out of reach: report, don't pretend
    impossible = CacheSchedule.from_scores(scores, sampler.timesteps, prof, 0.999)
    assert not impossible.info["within_tolerance"]


def test_uniform_schedule_is_deepcache_style():
    sampler, noise, cond = unet_case(steps=10)
    prof = profile(sampler.model, noise, cond)
    sched = CacheSchedule.uniform(sampler.timesteps, prof, interval=3)
    assert sched.reuse[:, 0].sum() == 0 and sched.reuse[:, -1].sum() == 0  # outermost blocks always run
    assert [bool(r.any()) for r in sched.reuse] == [i % 3 != 0 for i in range(10)]
    assert sched.reuse[1, 1:-1].all()


# ---- gates and search -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("policy", ["full", "checkpointed"])
def test_gate_gradients_match_finite_differences(case, policy):
    """The mix g_reuse * cache + g_keep * f(x), differentiated through every step and cache."""
    sampler, noise, cond = CASES[case](dtype=torch.float64, steps=4)
    n_blocks = len(ds.prune.default_block_names(sampler.model))
    weights = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gates = torch.rand(4, n_blocks, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gates[0] = torch.tensor([0.0, 1.0])
    net = SuperNet(sampler.model, sampler.timesteps).attach()
    try:
        def loss(g, gradient=None):
            net.use_gates(g)
            return (sampler(noise, cond, gradient=gradient) * weights).sum()

        g = gates.clone().requires_grad_(True)
        loss(g, policy).backward()
        eps = 1e-4  # central differences: error O(eps^2); smaller eps meets float32 timestep embeddings
        for index in [(1, 0, 0), (2, n_blocks - 1, 1), (3, 1, 0), (2, 0, 1)]:
            up, down = gates.clone(), gates.clone()
            up[index] += eps
            down[index] -= eps
            numeric = (loss(up) - loss(down)) / (2 * eps)
            torch.testing.assert_close(g.grad[index], numeric, rtol=1e-5, atol=1e-8)
    finally:
        net.detach()


def test_pruner_starts_at_keep_everything_with_straight_through_gates():
    pruner = Pruner(5, 3, dim=8, heads=2)
    gates = pruner.gates()
    assert torch.equal(gates.detach()[..., 1], torch.ones(5, 3))
    gates[..., 0].sum().backward()  # straight-through: a gradient reaches the logits though gates are hard
    assert pruner.head_bias.grad[1:].abs().sum() > 0
    assert (pruner.keep_scores() > 0.5).all()


def test_search_learns_to_reuse_and_resumes_exactly(tmp_path):
    sampler, noise, cond = unet_case(steps=5)
    conditions = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(9))
    kwargs = dict(ratio=0.6, iterations=6, batch_size=2, lr=1.0, target_batch=4, sample_shape=(1, 8, 8),
                  pruner_kwargs={"dim": 8, "heads": 2}, progress=False)
    whole = ds.prune.train_pruner(sampler, conditions, **kwargs)
    assert len(whole.history["loss"]) == 6
    assert whole.history["macs_ratio"][-1] < whole.history["macs_ratio"][0] == 1.0  # sparsity pushed gates off

    with pytest.raises(Killed):
        ds.prune.train_pruner(sampler, conditions, checkpoint_dir=tmp_path, checkpoint_every=2, callback=kill_at(3),
                              **kwargs)
    assert torch.load(tmp_path / "search_checkpoint.pt", weights_only=False)["iteration"] == 2
    resumed = ds.prune.train_pruner(sampler, conditions, checkpoint_dir=tmp_path, checkpoint_every=2,
                                    resume=True, **kwargs)
    for a, b in zip(resumed.pruner.parameters(), whole.pruner.parameters()):
        assert torch.equal(a, b)
    assert resumed.history["loss"] == whole.history["loss"]
    sched = resumed.schedule(0.5)
    assert sched.reuse.shape == (5, 5) and not sched.reuse[0].any()
    # at another step count: the keep scores interpolated over timesteps, thresholded at the same ratio
    longer = ds.Sampler(sampler.model, ddim(), 9)
    again = resumed.schedule(0.5, timesteps=sampler.timesteps)
    assert torch.equal(again.reuse, sched.reuse)
    resampled = resumed.schedule(0.5, timesteps=longer.timesteps)
    assert resampled.reuse.shape == (9, 5) and resampled.timesteps == [float(t) for t in longer.timesteps]
    assert resampled.info["scores_resampled_from"] == 5
    assert abs(resampled.pruned_fraction - 0.5) <= 0.0125 or not resampled.info["within_tolerance"]
    with pytest.raises(ValueError, match="other settings.*lr"):
        ds.prune.train_pruner(sampler, conditions, checkpoint_dir=tmp_path, resume=True, **dict(kwargs, lr=0.5))


def test_search_stops_on_a_non_finite_loss_and_keeps_its_checkpoint(tmp_path):
    sampler, noise, cond = unet_case(steps=3)
    conditions = torch.randn(2, 3, 8)
    kwargs = dict(ratio=0.5, iterations=4, batch_size=1, target_batch=1, sample_shape=(1, 8, 8),
                  pruner_kwargs={"dim": 8, "heads": 2}, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)

    def poison(info):
        if info["iteration"] == 1:  # the next iteration's rollout meets a broken weight
            sampler.model.conv_out.bias.data.fill_(float("nan"))

    with pytest.raises(ds.prune.SearchError, match="iteration 2: non-finite loss"):
        ds.prune.train_pruner(sampler, conditions, callback=poison, **kwargs)
    state = torch.load(tmp_path / "search_checkpoint.pt", weights_only=False)
    assert state["iteration"] == 2 and all(torch.isfinite(v).all() for v in state["pruner"].values())


def test_search_with_the_one_step_shortcut_gradient():
    sampler, noise, cond = unet_case(steps=4)
    result = ds.prune.train_pruner(sampler, torch.randn(2, 3, 8), ratio=0.5, iterations=3, batch_size=1,
                                   gradient=ds.gradients.Shortcut(step=2), sample_shape=(1, 8, 8),
                                   pruner_kwargs={"dim": 8, "heads": 2}, progress=False)
    assert len(result.history["ssim"]) == 3
    initial = Pruner(4, 5, dim=8, heads=2)
    assert not torch.equal(result.pruner.head_bias, initial.head_bias)  # the gates moved


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


# ---- whole steps --------------------------------------------------------------------------------------
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


def test_a_schedule_is_resampled_to_another_step_count_by_nearest_timestep():
    sampler, noise, cond = unet_case(steps=6)
    prof = profile(sampler.model, noise, cond)
    reuse = torch.zeros(6, len(prof.blocks), dtype=torch.bool)
    reuse[1:, 0] = True
    reuse[4, 3] = True
    schedule = CacheSchedule.from_table(reuse, sampler.timesteps, prof)
    shorter = ds.Sampler(sampler.model, ddim(), 3, guidance_scale=2.0, uncond=sampler.uncond)
    with pytest.raises(ScheduleError, match="schedule has 6 steps, the sampler 3"):
        apply(sampler.model, schedule, shorter).__enter__()
    resampled = schedule.fitted(shorter.timesteps)
    assert resampled.info["resampled_from"] == 6 and resampled.num_steps == 3
    theirs, ours = shorter.timesteps.tolist(), sampler.timesteps.tolist()
    for j, t in enumerate(theirs):  # each new step takes the nearest old step's row; the first computes everything
        nearest = min(range(6), key=lambda i: abs(ours[i] - t))
        assert torch.equal(resampled.reuse[j], reuse[nearest] if j else torch.zeros(len(prof.blocks), dtype=torch.bool))
    with apply(sampler.model, schedule, shorter, strict=False) as net:
        shorter(noise, cond)
    assert net.calls == 3 and schedule.fitted(sampler.timesteps) is schedule


def test_keep_scores_are_interpolated_linearly_in_the_timestep():
    from diffusion_shortcuts.prune.train import interpolate_scores

    scores = torch.arange(12.0, dtype=torch.float64).reshape(4, 3)  # rows at timesteps 900, 600, 300, 0
    out = interpolate_scores(scores, [900.0, 600.0, 300.0, 0.0], [900.0, 750.0, 100.0, 0.0, 1000.0])
    expected = torch.stack([scores[0], (scores[0] + scores[1]) / 2, scores[3] + (scores[2] - scores[3]) / 3,
                            scores[3], scores[0]])  # 1000: held at the first row
    torch.testing.assert_close(out, expected)


# ---- forecasting reuse -----------------------------------------------------------------------------------
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


@pytest.mark.parametrize("case,mode", [("unet", "taylor1"), ("dit", "taylor1"), ("dit", "taylor2")])
def test_search_with_hard_gates_forecasts_as_inference_does(case, mode):
    """The search mixes g_reuse * forecast + g_keep * f(x) at every step; with hard gates that equal a table it
    must give the table's images: forecasts extrapolate from the computed steps only, with the same horizon."""
    sampler, noise, cond = CASES[case](steps=8)
    prof = profile(sampler.model, noise, cond)
    reuse = torch.zeros(8, len(prof.blocks), dtype=torch.bool)
    reuse[3:, 1] = True  # computed at 0-2, then forecast for five steps (beyond the horizon from step 5 on)
    reuse[[1, 4, 5, 6], 0] = True  # computed at 0, 2, 3, 7
    schedule = CacheSchedule.from_table(reuse, sampler.timesteps, prof).with_mode(mode)
    with apply(sampler.model, schedule, sampler):
        expected = sampler(noise, cond)
    gates = torch.stack([reuse, ~reuse], dim=-1).float().requires_grad_(True)
    net = SuperNet(sampler.model, sampler.timesteps, mode=mode).attach()
    try:
        net.use_gates(gates)
        searched = sampler(noise, cond, gradient=ds.gradients.Full())
        searched.sum().backward()
    finally:
        net.detach()
    torch.testing.assert_close(searched, expected, rtol=1e-5, atol=1e-6)
    assert gates.grad[3:, 1].abs().sum() > 0  # the reused steps still carry gradients to their gates


@pytest.mark.parametrize("mode", ["taylor1", "taylor2"])
def test_gradients_through_a_forecast_equal_finite_differences(mode):
    sampler, noise, cond = dit_case(dtype=torch.float64, steps=5)
    prof = profile(sampler.model, noise, cond)
    reuse = torch.zeros(5, len(prof.blocks), dtype=torch.bool)
    reuse[3:, 0] = reuse[4, 1] = True  # block 0 forecast from steps 0-2 (second order possible), block 1 from 0-3
    schedule = CacheSchedule.from_table(reuse, sampler.timesteps, prof).with_mode(mode)
    weights = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    direction = torch.randn(noise.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with apply(sampler.model, schedule, sampler):
        x = noise.clone().requires_grad_(True)
        (sampler(x, cond, gradient=ds.gradients.Full()) * weights).sum().backward()
        h = 1e-5
        with torch.no_grad():
            numeric = ((sampler(noise + h * direction, cond) - sampler(noise - h * direction, cond)) * weights
                       ).sum() / (2 * h)
    torch.testing.assert_close((x.grad * direction).sum(), numeric, rtol=1e-6, atol=1e-9)


def test_profile_sees_an_adapter_added_after_an_earlier_profile():
    sampler, noise, cond = unet_case()
    plain = profile(sampler.model, noise, cond)
    ds.add_lora(sampler.model, rank=2)
    adapted = profile(sampler.model, noise, cond)
    assert adapted.total_macs > plain.total_macs  # the adapter's products are counted, not the cached plain profile


def test_a_search_can_start_from_a_rule_table():
    sampler, noise, cond = unet_case(steps=6)
    prof = profile(sampler.model, noise, cond)
    rule = CacheSchedule.every(sampler.timesteps, prof, 2, warmup=1)
    assert [bool(r.any()) for r in rule.reuse] == [False, False, True, False, True, False]  # 0, then 1, 3, 5
    assert bool(rule.reuse[2].all())
    conditions = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(9))
    kwargs = dict(ratio=0.5, batch_size=1, target_batch=1, sample_shape=(1, 8, 8), progress=False,
                  pruner_kwargs={"dim": 8, "heads": 2})
    # no iteration's update yet: the first gates are the table
    started = ds.prune.train_pruner(sampler, conditions, iterations=1, lr=0.0, start=rule, **kwargs)
    torch.testing.assert_close(started.pruner.gates()[..., 0], rule.reuse.float())
    assert started.history["settings"]["start"].startswith("every(interval=2, warmup=1):")
    with pytest.raises(ScheduleError, match="steps"):
        ds.prune.train_pruner(ds.Sampler(sampler.model, ddim(), 4), conditions, iterations=1, start=rule, **kwargs)


def test_a_search_from_a_rule_keeps_the_rule_where_it_validates_better():
    sampler, noise, cond = unet_case(steps=6)
    prof = profile(sampler.model, noise, cond)
    rule = CacheSchedule.every(sampler.timesteps, prof, 2, warmup=1)
    ratio = round(rule.pruned_fraction, 3)
    conditions = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(9))
    kwargs = dict(iterations=6, batch_size=1, target_batch=1, sample_shape=(1, 8, 8), progress=False,
                  pruner_kwargs={"dim": 8, "heads": 2}, start=rule, validation=4)
    # Adam at lr 0.5 scrambles the gates: the searched table validates worse, and the result is the rule again
    scrambled = ds.prune.train_pruner(sampler, conditions, ratio, lr=0.5, **kwargs)
    checked = scrambled.history["validation"]
    assert checked["kept"] == "start" and checked["ssim_start"] > checked["ssim_searched"]
    assert torch.equal(scrambled.schedule(ratio).reuse, rule.reuse)
    # the recorded figure, recomputed through the public API on the validation samples
    val_noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(2**31 + 0))
    full = sampler(val_noise, conditions)
    with apply(sampler.model, rule, sampler):
        ruled = sampler(val_noise, conditions)
    assert checked["ssim_start"] == pytest.approx(float(ds.metrics.ssim(ruled, full).mean()), abs=1e-6)
    # no update (lr 0): the searched table is the rule, equally good, and stays the search's
    unchanged = ds.prune.train_pruner(sampler, conditions, ratio, lr=0.0, **kwargs)
    assert unchanged.history["validation"]["kept"] == "searched"
    assert torch.equal(unchanged.schedule(ratio).reuse, rule.reuse)


def test_the_rule_table_for_a_ratio_is_the_interval_that_prunes_nearest_it():
    sampler, noise, cond = unet_case(steps=50)
    prof = profile(sampler.model, noise, cond)
    for ratio in (0.5, 0.7, 0.8, 0.85):
        chosen = CacheSchedule.every_for_ratio(sampler.timesteps, prof, ratio)
        others = [CacheSchedule.every(sampler.timesteps, prof, n) for n in range(1, 50)]
        assert all(abs(chosen.pruned_fraction - ratio) <= abs(o.pruned_fraction - ratio) for o in others)
        assert chosen.info["method"].startswith("every(interval=")
    assert CacheSchedule.every_for_ratio(sampler.timesteps, prof, 0.8).info["method"] != \
        CacheSchedule.every_for_ratio(sampler.timesteps, prof, 0.5).info["method"]
    with pytest.raises(ValueError, match="ratio"):
        CacheSchedule.every_for_ratio(sampler.timesteps, prof, 1.0)
