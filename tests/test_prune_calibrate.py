"""A schedule with no search (``ds.prune.calibrate``): the errors it measures are the reuse errors of the full
model's trajectory (against an independent recording), the table keeps the asked MACs by the search's rules, and it
works from a pipeline and prompts (with the stock call), on two experts, and from the command line."""

import json

import pytest
import torch
from tiny import TINIES
from tiny.sd import sd_pipeline
from tiny_models import dit_case, unet_case

import diffusion_shortcuts as ds
from diffusion_shortcuts.prune import CalibrationError
from diffusion_shortcuts.prune.calibrate import _Errors
from diffusion_shortcuts.prune.supernet import GatedBlock


def recorded_works(sampler, noise, cond) -> torch.Tensor:
    """Every DiT block's update ``out - in`` at every step of a plain generation, by plain forward hooks:
    (steps, blocks, B, D)."""
    works, handles = [], []
    blocks = sampler.model.transformer_blocks
    for index, block in enumerate(blocks):
        def hook(module, args, kwargs, out, index=index):
            x = args[0] if args else kwargs["hidden_states"]
            works.append((index, (out - x).detach().flatten(1)))
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            sampler(noise, cond)
    finally:
        for handle in handles:
            handle.remove()
    steps = len(works) // len(blocks)
    return torch.stack([torch.stack([w for i, w in works[s * len(blocks):(s + 1) * len(blocks)]])
                        for s in range(steps)])


def test_the_measured_errors_are_the_full_trajectorys_reuse_errors():
    sampler, noise, cond = dit_case(steps=6)
    works = recorded_works(sampler, noise, cond)  # (T, N, B, D)
    errors = _Errors(steps=6, blocks=2, window=3, mode="copy")
    net = ds.prune.supernet.SuperNet(sampler.model, sampler.timesteps)
    net.observer = errors.observe
    with torch.no_grad():
        net.attach()
        try:
            sampler(noise, cond)
        finally:
            net.detach()
    table = errors.table()
    for b in range(2):
        for t in range(6):
            for c in range(6):
                if 0 < t - c <= 3:
                    w_t, w_c = works[t, b], works[c, b]
                    expected = float(((w_t - w_c).norm(dim=1) / w_t.norm(dim=1)).mean())
                    assert table[b, c, t].item() == pytest.approx(expected, rel=1e-4)
                else:
                    assert table[b, c, t].item() == float("inf")  # not measured: farther than the window, or later
    assert isinstance(net.blocks[0], GatedBlock)


@pytest.mark.parametrize("granularity", ["step", "block"])
def test_the_table_keeps_the_asked_macs_by_the_searchs_rules(granularity):
    sampler, noise, cond = unet_case(steps=12)
    schedule = ds.prune.calibrate(sampler, cond, macs=0.5, granularity=granularity, warmup=2, mode="taylor1")
    assert abs(schedule.macs_ratio - 0.5) <= 0.0125 and schedule.info["within_tolerance"]
    assert schedule.mode == "taylor1" and schedule.info["method"] == f"calibrated({granularity})"
    assert not schedule.reuse[:2].any() and schedule.reuse.any()  # the warm-up computes every block
    if granularity == "step":
        assert all(len(set(row.tolist())) == 1 for row in schedule.reuse)  # every block together
    assert schedule.info["generations"] == 1 and schedule.info["batch"] == 2
    keep = ds.prune.calibrate(sampler, cond, macs=1.0)
    assert keep.macs_ratio == 1.0 and not keep.reuse.any()
    with ds.prune.apply(sampler.model, schedule, sampler) as net:
        sampler(noise, cond)
        assert ds.prune.summary(net)["block_calls_reused"] > 0


@pytest.mark.parametrize("kwargs,needle", [
    (dict(macs=0.0), "macs must be in (0, 1] (the fraction of the MACs kept), got 0.0"),
    (dict(macs=1.5), "macs must be in (0, 1]"),
    (dict(macs=0.5, generations=0), "generations must be a whole number >= 1, got 0"),
    (dict(macs=0.5, batch_size=3), "the calibration set has 2 conditions, fewer than the batch of 3"),
    (dict(macs=0.5, mode="taylor9"), "mode must be one of copy, taylor1, taylor2"),
    (dict(macs=0.5, granularity="token"), "granularity must be one of step, block"),
])
def test_bad_arguments_are_named(kwargs, needle):
    sampler, _, cond = unet_case(steps=4)
    with pytest.raises(CalibrationError) as info:
        ds.prune.calibrate(sampler, cond, **kwargs)
    assert needle in str(info.value)


def test_from_a_pipeline_and_prompts_for_the_stock_call():
    pipe, _ = sd_pipeline()
    prompts = ["a red car", "a photo of a cat"]
    schedule = ds.prune.calibrate(pipe, prompts, macs=0.5, num_inference_steps=6, height=16, width=16, warmup=2)
    assert schedule.num_steps == 6 and abs(schedule.macs_ratio - 0.5) <= 0.0125  # 3 of 6 whole steps computed
    # 0.6 is no whole number of six steps: the closest table, and it says it missed
    closest = ds.prune.calibrate(pipe, prompts, macs=0.6, num_inference_steps=6, height=16, width=16, warmup=2)
    assert not closest.info["within_tolerance"] and closest.macs_ratio in (0.5, 4 / 6)
    net = ds.prune.enable_cache(pipe, schedule)
    try:
        images = pipe("a red car", num_inference_steps=6, height=16, width=16, output_type="pt").images
    finally:
        net.detach()
    assert torch.isfinite(images).all() and ds.prune.summary(net)["block_calls_reused"] > 0


def test_two_experts_compute_the_second_ones_first_step():
    tiny = next(t for t in TINIES if t.name == "wan22")
    pipe = tiny.pipeline()
    sampler = tiny.sampler(pipe, 6)
    sampler.decode = None
    schedule = ds.prune.calibrate(sampler, tiny.encode(sampler), macs=0.6, warmup=1)
    handover = schedule.expert_starts()
    assert schedule.experts["names"] == ["transformer", "transformer_2"] and len(handover) == 1
    assert not schedule.reuse[handover[0]].any()


def test_prune_calibrate_only_writes_a_schedule_and_its_comparison(tmp_path, capsys):
    from diffusion_shortcuts import cli

    code = cli.main(["prune", "--model", "digits-dit", "--calibrate-only", "--ratio", "0.5", "--steps", "10",
                     "--samples", "4", "--calibration-generations", "2", "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["method"] == "calibrated(step)" and metrics["calibration_generations"] == 2
    assert metrics["calibration_batch"] == 8 and "pruner" not in metrics and 0 < metrics["ssim"] <= 1
    schedule = ds.prune.CacheSchedule.load(tmp_path / "o" / "schedule.json")
    assert abs(schedule.macs_ratio - 0.5) <= 0.0125 and metrics["within_tolerance"]
    assert (tmp_path / "o" / "heatmap.png").exists()
    assert not (tmp_path / "o" / "pruner").exists()


def test_a_search_starts_from_the_calibrated_table_and_keeps_the_better(tmp_path, capsys):
    from diffusion_shortcuts import cli

    code = cli.main(["prune", "--model", "digits-dit", "--start-from", "calibrated", "--ratio", "0.5", "--steps", "10",
                     "--iterations", "2", "--batch-size", "1", "--samples", "4", "--validation", "2",
                     "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["search_settings"]["start"].startswith("calibrated(step):")
    validation = metrics["search_validation"]
    assert validation["kept"] in ("start", "searched") and validation["samples"] == 2


def test_a_fixed_training_set_makes_the_full_models_targets_once_and_draws_every_batch_from_it(monkeypatch):
    """``training_set=N``: the full model's images for N fixed (noise, condition) pairs, made once; each iteration's
    target is the full model's image of the members it draws (checked against a plain generation of them)."""
    from diffusion_shortcuts.prune.train import SearchConfig, _Search

    sampler, _, cond = dit_case(steps=4)
    config = SearchConfig(ratio=0.5, iterations=5, batch_size=2, training_set=3, target_batch=2,
                          sample_shape=(2, 8, 8), pruner_kwargs={"dim": 8, "heads": 2})
    search = _Search(sampler, cond, ds.gradients.resolve("full"), config, None, ds.prune.Objective(), cond)
    calls, original = [], type(sampler).__call__

    def counted(self, latents, *args, **kwargs):
        calls.append(len(latents))
        return original(self, latents, *args, **kwargs)

    monkeypatch.setattr(type(sampler), "__call__", counted)
    with search.attached():
        drawn = [search.members(it) for it in range(5)]
        targets = [search.target(it) for it in range(5)]
    monkeypatch.undo()
    assert calls == [3]  # one rollout for the whole set (3 samples fit one chunk of 2 x 2), none per iteration
    assert sorted(torch.cat(drawn)[:3].tolist()) == [0, 1, 2]  # a pass visits every member once
    for members, target in zip(drawn, targets):
        expected = sampler(search.set_noise[members], ds.conditions.take(cond, search.perm[members % 2]))
        assert torch.allclose(target, expected, atol=1e-5)
    with pytest.raises(ValueError, match="training_set 1 is smaller than an iteration's batch of 2"):
        ds.prune.train_pruner(sampler, cond, 0.5, iterations=1, batch_size=2, training_set=1, progress=False)


def test_the_latent_objective_searches_without_decoding():
    """``objective=latent``: the search's rollouts stop before the decoder (it is never called) and the loss is the
    relative squared distance of the final latents; its history records that distance."""
    sampler, _, cond = unet_case(steps=4)
    decoded = []

    def decode(x):
        decoded.append(len(x))
        return x / 2 + 0.5

    sampler.decode = decode
    result = ds.prune.train_pruner(sampler, cond, 0.5, iterations=2, batch_size=1, target_batch=2, gradient="full",
                                   objective=ds.prune.Objective("latent"), pruner_kwargs={"dim": 8, "heads": 2},
                                   progress=False)
    assert decoded == [] and len(result.history["latent_distance"]) == 2 and "ssim" not in result.history
    assert result.history["settings"]["objective"] == "latent"
    loss, figures = ds.prune.Objective("latent").loss(torch.ones(2, 3) * 2, torch.ones(2, 3), None)
    assert loss.item() == pytest.approx(1.0) and figures["latent_distance"].item() == pytest.approx(1.0)
    assert ds.prune.parse_objective("latent") == ("latent", None, 1.0)


def test_step_gates_decide_whole_steps_and_the_schedule_reuses_whole_steps():
    """``granularity="step"``: every step's hard gates are one decision for all its blocks (the mean of their
    logits), during the search and in the frozen schedule."""
    sampler, _, cond = dit_case(steps=6)
    seen = []

    def callback(event):
        gates = event["objects"]["pruner"].gates(per_step=True).detach()
        seen.append(gates)

    result = ds.prune.train_pruner(sampler, cond, 0.5, iterations=4, batch_size=1, target_batch=2, gradient="full",
                                   granularity="step", pruner_kwargs={"dim": 8, "heads": 2}, lr=0.5,
                                   progress=False, callback=callback)
    for gates in seen:
        assert (gates == gates[:, :1]).all()
    reuse = result.schedule(0.5).reuse
    assert reuse.any(), "the search at ratio 0.5 reuses something"
    assert all(bool(row.all()) or not bool(row.any()) for row in reuse)
    logits = result.pruner()
    assert torch.allclose(result.pruner(per_step=True)[:, 0], logits.mean(1))


def test_step_then_block_restarts_the_block_gates_exactly_at_the_step_table(monkeypatch):
    """``granularity="step+block"``: at half the iterations the block-level gates start from the step-level phase's
    hard table exactly (heads reset to it, the optimizer's moments cleared), and the search goes on block by block."""
    from diffusion_shortcuts.prune.train import _Search

    sampler, _, cond = dit_case(steps=6)
    tables, original = {}, _Search.refine_blocks

    def watched(self):
        tables["step"] = self.pruner.gates(per_step=True)[..., 0].detach() > 0.5
        original(self)
        tables["block"] = self.pruner.gates()[..., 0].detach() > 0.5
        tables["optimizer"] = len(self.optimizer.state)

    monkeypatch.setattr(_Search, "refine_blocks", watched)
    result = ds.prune.train_pruner(sampler, cond, 0.5, iterations=4, batch_size=1, target_batch=2, gradient="full",
                                   granularity="step+block", pruner_kwargs={"dim": 8, "heads": 2}, lr=0.5,
                                   progress=False)
    assert result.history["blocks_from"] == 2
    assert torch.equal(tables["step"], tables["block"]) and tables["optimizer"] == 0
    pruner = ds.prune.Pruner(3, 2, dim=8, heads=2)
    with torch.no_grad():
        pruner.head_weight.normal_()
    table = torch.tensor([[False, False], [True, False], [True, True]])
    assert torch.equal(pruner.restart_from(table).gates()[1:, :, 0] > 0.5, table[1:])


def test_a_search_at_fewer_steps_gives_a_schedule_at_the_samplers_steps():
    """``search_steps=N``: the search rolls out N steps (its pruner has N rows, a start is resampled to them), and the
    schedule is read at the sampler's own timesteps, keeping the asked MACs."""
    sampler, _, cond = dit_case(steps=8)
    calls = []
    result = ds.prune.train_pruner(sampler, cond, 0.5, iterations=2, batch_size=1, target_batch=2, gradient="full",
                                   search_steps=4, pruner_kwargs={"dim": 8, "heads": 2}, progress=False,
                                   callback=lambda event: calls.append(event["iteration"]))
    assert len(result.timesteps) == 4 and result.pruner.config.num_steps == 4 and calls == [0, 1]
    schedule = result.schedule(0.5)
    assert schedule.num_steps == 8
    schedule.check_timesteps(sampler.timesteps)
    assert schedule.info["scores_resampled_from"] == 4 and result.history["settings"]["search_steps"] == 4
    start = ds.prune.calibrate(sampler, cond, macs=0.5)
    started = ds.prune.train_pruner(sampler, cond, 0.5, iterations=1, batch_size=1, gradient="full", start=start,
                                    search_steps=4, validation=1, pruner_kwargs={"dim": 8, "heads": 2},
                                    progress=False)
    assert started.history["validation"]["kept"] in ("start", "searched")
    assert started.schedule(0.5).num_steps == 8


@pytest.mark.parametrize("kwargs, needle", [
    ({"granularity": "frame"}, "granularity must be one of block, step, step\\+block, got 'frame'"),
    ({"search_steps": -1}, "search_steps must be a whole number >= 0"),
])
def test_bad_search_settings_are_named(kwargs, needle):
    sampler, _, cond = dit_case(steps=4)
    with pytest.raises(ValueError, match=needle):
        ds.prune.train_pruner(sampler, cond, 0.5, iterations=1, progress=False, **kwargs)


def test_the_library_search_starts_from_the_calibrated_table_by_name():
    """``train_pruner(..., start="calibrated")`` starts from the table ``calibrate`` makes at ``1 - ratio`` (the same
    table, by its digest), and ends with the start validation; another string is refused naming it."""
    sampler, _, cond = dit_case(steps=6)
    result = ds.prune.train_pruner(sampler, cond, 0.5, iterations=1, batch_size=1, gradient="full",
                                   start="calibrated", validation=1, pruner_kwargs={"dim": 8, "heads": 2},
                                   progress=False)
    table = ds.prune.calibrate(sampler, cond, macs=0.5)
    assert result.history["settings"]["start"] == f"{table.info['method']}:{ds.conditions.fingerprint(table.reuse)}"
    assert "validation" in result.history
    with pytest.raises(ValueError, match="start must be a CacheSchedule, 'calibrated' or None, got 'rule'"):
        ds.prune.train_pruner(sampler, cond, 0.5, iterations=1, start="rule", progress=False)
