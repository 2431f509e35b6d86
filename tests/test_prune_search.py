"""DiP-GO's search: the gates, the pruner, the loss's gradients, resuming, starting from a rule
(``prune/train.py``, ``pruner.py``, ``decision.py``)."""


import pytest
import torch
from conftest import Killed, kill_at
from tiny_models import (CASES, ddim, dit_case, unet_case)

import diffusion_shortcuts as ds
from diffusion_shortcuts.prune import CacheSchedule, Pruner, ScheduleError, SuperNet, apply, profile


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


def test_keep_scores_are_interpolated_linearly_in_the_timestep():
    from diffusion_shortcuts.prune.train import interpolate_scores

    scores = torch.arange(12.0, dtype=torch.float64).reshape(4, 3)  # rows at timesteps 900, 600, 300, 0
    out = interpolate_scores(scores, [900.0, 600.0, 300.0, 0.0], [900.0, 750.0, 100.0, 0.0, 1000.0])
    expected = torch.stack([scores[0], (scores[0] + scores[1]) / 2, scores[3] + (scores[2] - scores[3]) / 3,
                            scores[3], scores[0]])  # 1000: held at the first row
    torch.testing.assert_close(out, expected)


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
    # the recorded figure, recomputed through the public API on the validation samples, judged as the comparison
    # and the reports judge samples: clamped to [0, 1] (this model's samples leave that range)
    val_noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(2**31 + 0))
    full = sampler(val_noise, conditions)
    assert full.min() < 0 or full.max() > 1
    full = full.clamp(0, 1)
    with apply(sampler.model, rule, sampler):
        ruled = sampler(val_noise, conditions).clamp(0, 1)
    assert checked["ssim_start"] == pytest.approx(float(ds.metrics.ssim(ruled, full).mean()), abs=1e-6)
    # no update (lr 0): the searched table is the rule, equally good, and stays the search's
    unchanged = ds.prune.train_pruner(sampler, conditions, ratio, lr=0.0, **kwargs)
    assert unchanged.history["validation"]["kept"] == "searched"
    assert torch.equal(unchanged.schedule(ratio).reuse, rule.reuse)


def test_a_search_whose_one_graph_is_step_0_is_refused_naming_the_policy_that_works():
    sampler, noise, cond = unet_case(steps=3)
    for gradient in (ds.gradients.Shortcut(), ds.gradients.Shortcut(step=0), "shortcut"):
        with pytest.raises(ValueError, match="no gate acts.*use shortcut:random"):
            ds.prune.train_pruner(sampler, torch.randn(2, 3, 8), ratio=0.5, iterations=1, gradient=gradient,
                                  sample_shape=(1, 8, 8), progress=False)
