"""The resumable-loop kit: every loop's settings come from its config dataclass, a resume with any one of
them changed is refused naming it, and an interrupted run resumes to the uninterrupted result."""

import dataclasses
import inspect
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
from conftest import Killed
import tiny_models

import diffusion_shortcuts as ds
from diffusion_shortcuts import distributed
from diffusion_shortcuts.checkpoints import (CheckpointError, load_checkpoint, make_optimizer, save_atomically,
                                             write_json)
from diffusion_shortcuts.optimize.finetune import FinetuneConfig
from diffusion_shortcuts.optimize.latents import LatentConfig
from diffusion_shortcuts.prune.train import SearchConfig

# keyword arguments of each loop that do not change what it computes
RUNTIME = {"encode", "heldout", "checkpoint_dir", "checkpoint_every", "resume", "progress", "callback", "accelerator"}
DESCRIBED = {"start", "objective"}  # objects a config records through a derived field (their description)
LOOPS = [(ds.finetune, FinetuneConfig), (ds.prune.train_pruner, SearchConfig), (ds.optimize_latents, LatentConfig)]


def settings_fields(config):
    return [f for f in dataclasses.fields(config) if not f.metadata.get("derived")]


@pytest.mark.parametrize("loop, config", LOOPS, ids=lambda x: getattr(x, "__name__", ""))
def test_a_loop_takes_its_config_with_each_setting_declared_once(loop, config):
    """A setting is a field of the loop's config (default and documentation there); the loop takes the config and
    any setting as a keyword over it, never as a parameter of its own, and refuses a name that is no setting."""
    params = inspect.signature(loop).parameters
    assert "config" in params and list(params.values())[-1].kind is inspect.Parameter.VAR_KEYWORD
    settings = {f.name for f in settings_fields(config)}
    assert not (settings - {"ratio"}) & set(params), "a setting is declared again in the loop's signature"
    assert set(params) - {"config", "settings", "ratio"} - RUNTIME - DESCRIBED <= {
        "sampler", "reward", "latents", "cond", "conditions", "reward_conditions"}
    positional = [n for n, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                  and p.default is inspect.Parameter.empty]
    with pytest.raises(TypeError, match=f"{config.__name__} has no setting not_a_setting; its settings: "):
        loop(*[None] * len(positional), not_a_setting=1)
    for derived in [f.name for f in dataclasses.fields(config) if f.metadata.get("derived") and f.name not in params]:
        with pytest.raises(TypeError, match=f"has no setting {derived}"):  # the loop fills those itself
            loop(*[None] * len(positional), **{derived: 1})


def test_a_config_and_its_keywords_run_the_same():
    sampler, noise = unet_sampler(), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    by_config = ds.optimize_latents(sampler, brightness, noise, conditions(),
                                    LatentConfig(iterations=2, lr=0.05, gradient="full"), progress=False)
    by_keywords = ds.optimize_latents(sampler, brightness, noise, conditions(), iterations=2, lr=0.05,
                                      gradient=ds.gradients.Full(), progress=False)
    over_config = ds.optimize_latents(sampler, brightness, noise, conditions(), LatentConfig(iterations=5, lr=0.05),
                                      iterations=2, gradient="full", progress=False)  # keywords win over the config
    assert by_config.settings == by_keywords.settings == over_config.settings
    assert by_config.history["reward"] == by_keywords.history["reward"] == over_config.history["reward"]


def unet_sampler(steps=3):
    return tiny_models.unet_sampler(steps=steps, guidance_scale=2.0, decode=lambda x: x / 2 + 0.5)


def brightness(images, cond):
    return images.mean(dim=(1, 2, 3))


class Darkness:
    name = "darkness"

    def __call__(self, images, cond):
        return -images.mean(dim=(1, 2, 3))


def conditions(seed=0):
    return torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(seed))


def assert_each_change_is_refused(run, changes: dict, config, tmp_path):
    """Run once with checkpoints, then resume with each setting changed in turn: refused, naming it."""
    assert set(changes) == {f.name for f in dataclasses.fields(config)}, "every config field needs a change here"
    run(tmp_path)
    for name, change in changes.items():
        with pytest.raises(CheckpointError, match=f"other settings \\({name}: checkpoint"):
            change(tmp_path)
    run(tmp_path, resume=True)  # the unchanged settings resume


def test_finetune_refuses_a_resume_with_any_setting_changed(tmp_path):
    sampler = unet_sampler()
    ds.add_lora(sampler.model, rank=2)

    def run(folder, resume=False, sampler=sampler, reward=brightness, **overrides):
        kwargs = dict(noise_shape=(1, 8, 8), iterations=2, batch_size=2, lr=0.01, checkpoint_dir=folder,
                      checkpoint_every=1, resume=resume, progress=False)
        kwargs.update(overrides)
        return ds.finetune(sampler, reward, conditions(), **kwargs)

    other_rank, other_steps = unet_sampler(), unet_sampler(steps=4)
    ds.add_lora(other_rank.model, rank=3)
    ds.add_lora(other_steps.model, rank=2)
    alternatives = dict(noise_shape=(1, 16, 16), params="all", gradient="full", iterations=3, batch_size=1, lr=0.02,
                        optimizer="sgd", grad_clip=0.5, warmup=1, seed=1, base_weight=0.1, ema=0.9)
    changes = {name: (lambda folder, name=name, value=value: run(folder, True, **{name: value}))
               for name, value in alternatives.items()}
    changes["sampler"] = lambda folder: run(folder, True, sampler=other_steps)
    changes["reward"] = lambda folder: run(folder, True, reward=Darkness())
    changes["trainable_parameters"] = lambda folder: run(folder, True, sampler=other_rank)
    two_processes = SimpleNamespace(num_processes=2, is_main_process=True)  # as a 2-process launch's Accelerator says
    changes["num_processes"] = lambda folder: run(folder, True, accelerator=two_processes)
    assert_each_change_is_refused(run, changes, FinetuneConfig, tmp_path)


def test_search_refuses_a_resume_with_any_setting_changed(tmp_path):
    sampler = unet_sampler()

    def run(folder, resume=False, sampler=sampler, conds=None, **overrides):
        kwargs = dict(iterations=2, batch_size=1, target_batch=2, pruner_kwargs={"dim": 8, "heads": 2},
                      checkpoint_dir=folder, checkpoint_every=1, resume=resume, progress=False)
        kwargs.update(overrides)
        return ds.prune.train_pruner(sampler, conditions() if conds is None else conds, **kwargs)

    alternatives = dict(ratio=0.5, iterations=3, batch_size=2, lr=0.5, optimizer="sgd", momentum=0.5, alpha=0.5,
                        tau=0.3, gradient="full", blocks=["down_blocks.0", "up_blocks.1"], sample_shape=(1, 16, 16),
                        seed=1, target_batch=1, pruner_kwargs={"dim": 16, "heads": 2}, reuse_mode="taylor1",
                        validation=4, training_set=4, granularity="step+block", search_steps=2)
    changes = {name: (lambda folder, name=name, value=value: run(folder, True, **{name: value}))
               for name, value in alternatives.items()}
    changes["sampler"] = lambda folder: run(folder, True, sampler=unet_sampler(steps=4))
    changes["conditions"] = lambda folder: run(folder, True, conds=conditions(seed=1))
    prof = ds.prune.profile(sampler.model, torch.zeros(1, 1, 8, 8), conditions()[:1])
    start = ds.prune.CacheSchedule.every(sampler.timesteps, prof, 2, warmup=1)
    changes["start"] = lambda folder: run(folder, True, start=start)
    changes["objective"] = lambda folder: run(folder, True, objective=ds.prune.Objective("reward", brightness))

    def two_processes(folder):
        with patch.object(distributed, "num_processes", lambda: 2):
            run(folder, True)

    changes["num_processes"] = two_processes
    changes["reward_conditions"] = lambda folder: run(folder, True, reward_conditions=torch.arange(2))

    def with_an_adapter(folder):
        tuned = unet_sampler()
        ds.add_lora(tuned.model, rank=2)
        run(folder, True, sampler=tuned)

    changes["adapter"] = with_an_adapter
    assert_each_change_is_refused(run, changes, SearchConfig, tmp_path)


def test_latent_optimization_refuses_a_resume_with_any_setting_changed(tmp_path):
    sampler = unet_sampler()
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))

    def run(folder, resume=False, sampler=sampler, reward=brightness, latents=noise, cond=None, **overrides):
        kwargs = dict(iterations=2, lr=0.05, checkpoint_dir=folder, checkpoint_every=1, resume=resume, progress=False)
        kwargs.update(overrides)
        return ds.optimize_latents(sampler, reward, latents, conditions() if cond is None else cond, **kwargs)

    alternatives = dict(iterations=3, lr=0.1, gradient="full", start_step=1, optimize_cond=True, noise_prior="chi2",
                        prior_weight=2.0, grad_clip=1.0, target_reward=10.0, optimizer="sgd", seed=1)
    changes = {name: (lambda folder, name=name, value=value: run(folder, True, **{name: value}))
               for name, value in alternatives.items()}
    changes["sampler"] = lambda folder: run(folder, True, sampler=unet_sampler(steps=4))
    changes["reward"] = lambda folder: run(folder, True, reward=Darkness())
    changes["latents"] = lambda folder: run(folder, True, latents=noise + 1)
    changes["cond"] = lambda folder: run(folder, True, cond=conditions(seed=1))
    assert_each_change_is_refused(run, changes, LatentConfig, tmp_path)


def test_an_interrupted_latent_optimization_resumes_to_the_same_latents(tmp_path):
    sampler = unet_sampler()
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    kwargs = dict(iterations=5, lr=0.05, gradient="shortcut", noise_prior="sphere", checkpoint_every=2,
                  progress=False)
    whole = ds.optimize_latents(sampler, brightness, noise, conditions(), **kwargs)

    def die_at_3(event):
        if event["iteration"] == 3:
            raise Killed

    with pytest.raises(Killed):
        ds.optimize_latents(sampler, brightness, noise, conditions(), checkpoint_dir=tmp_path, callback=die_at_3,
                            **kwargs)
    assert load_checkpoint(tmp_path / "optimize_checkpoint.pt")["iteration"] == 2
    resumed = ds.optimize_latents(sampler, brightness, noise, conditions(), checkpoint_dir=tmp_path, resume=True,
                                  **kwargs)
    assert torch.equal(resumed.latents, whole.latents)
    assert resumed.history["reward"] == whole.history["reward"]


def test_damaged_checkpoints_and_files_are_named(tmp_path):
    path = tmp_path / "c.pt"
    for content in (b"", b"\x00garbage\xff" * 10):
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match="c.pt: not a readable checkpoint"):
            load_checkpoint(path)
    save_atomically({"weights": torch.ones(2)}, path)  # readable, but not one of ours
    with pytest.raises(CheckpointError, match="not a diffusion-shortcuts checkpoint"):
        load_checkpoint(path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")]})
    assert (tmp_path / "m.json").read_text().split() == ['{', '"a":', 'null,', '"b":', '[', '1.0,', 'null', ']', '}']
    with pytest.raises(ValueError, match="optimizer must be one of adam, adamw, sgd, got 'rmsprop'"):
        make_optimizer("rmsprop", [torch.zeros(1, requires_grad=True)], 0.1)
