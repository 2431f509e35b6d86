"""``CacheSchedule``: checks, files, DiP-GO's post-processing, rule tables and resampling (``prune/schedule.py``)."""

import json

import pytest
import torch
from tiny_models import (STEPS, ddim, dit_case, schedule_for, tiny_cond_unet, unet_case)

import diffusion_shortcuts as ds
from diffusion_shortcuts.prune import CacheSchedule, Pruner, ScheduleError, apply, profile


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
