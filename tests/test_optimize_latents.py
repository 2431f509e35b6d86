"""Latent and conditioning optimization: it improves the reward, and fails loudly and safely."""

import math

import pytest
import torch
from tiny_models import tiny_cond_unet
from diffusers import DDIMScheduler

import diffusion_shortcuts as ds
from diffusion_shortcuts.optimize.latents import chi2_prior, project_to_sphere


@pytest.fixture(scope="module")
def setup():
    unet = tiny_cond_unet(seed=1)
    sampler = ds.Sampler(unet, DDIMScheduler(num_train_timesteps=1000, clip_sample=False), 6,
                         decode=lambda x: x / 2 + 0.5)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 1, 8, 8, generator=gen)
    cond = torch.randn(2, 3, 8, generator=gen)
    target = torch.rand(1, 1, 8, 8, generator=gen)
    return sampler, noise, cond, target


@pytest.mark.parametrize("policy", ["shortcut", "full"])
def test_reward_improves(setup, policy):
    sampler, noise, cond, target = setup
    reward = ds.rewards.Reference(target)
    # no noise prior: matching a reference pixel by pixel wants latents off the Gaussian shell
    res = ds.optimize_latents(sampler, reward, noise, cond, iterations=25, lr=0.05, gradient=policy, noise_prior=None,
                              progress=False)
    assert res.history["final_reward"] > res.reward[0] + 0.5 * abs(res.reward[0])
    assert len(res.history["seconds"]) == 25 and not torch.equal(res.latents, noise)


def test_the_default_prior_keeps_initial_noise_on_the_shell_and_leaves_intermediate_latents_free(setup):
    sampler, noise, cond, target = setup
    reward = ds.rewards.Reference(target)
    on_shell = ds.optimize_latents(sampler, reward, noise, cond, iterations=5, lr=0.2, progress=False)
    free = ds.optimize_latents(sampler, reward, noise, cond, iterations=5, lr=0.2, noise_prior=None, progress=False)
    assert on_shell.settings["noise_prior"] == "auto"
    assert on_shell.history["final_shell_drift"] < 1e-5 < free.history["final_shell_drift"]
    middle = ds.optimize_latents(sampler, reward, noise, cond, iterations=2, lr=0.2, start_step=3, progress=False)
    explicit = ds.optimize_latents(sampler, reward, noise, cond, iterations=2, lr=0.2, start_step=3, noise_prior=None,
                                   progress=False)
    assert torch.equal(middle.latents, explicit.latents)  # no projection of an intermediate latent


def test_optimize_cond_changes_only_what_it_should(setup):
    sampler, noise, cond, target = setup
    res = ds.optimize_latents(sampler, ds.rewards.Reference(target), noise, cond, iterations=3, lr=0.05,
                              optimize_cond=True, progress=False)
    assert not torch.equal(res.cond, cond) and res.cond.shape == cond.shape
    with pytest.raises(ValueError, match="optimize_cond"):
        ds.optimize_latents(sampler, ds.rewards.Reference(target), noise, None, iterations=1, optimize_cond=True)


def test_wrong_reward_shape_fails_at_first_call(setup):
    sampler, noise, cond, _ = setup
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        ds.optimize_latents(sampler, lambda images, c: images.mean(), noise, cond, iterations=5, progress=False)


def test_non_finite_reward_stops_with_iteration_and_keeps_last_good_latents(setup):
    sampler, noise, cond, target = setup
    ref = ds.rewards.Reference(target)
    calls = []

    def flaky(images, c):
        calls.append(1)
        value = ref(images, c)
        return value * float("nan") if len(calls) == 4 else value

    with pytest.raises(ds.OptimizationError, match="iteration 3") as info:
        ds.optimize_latents(sampler, flaky, noise, cond, iterations=10, lr=0.05, progress=False)
    kept = info.value.result
    assert torch.isfinite(kept.latents).all() and len(kept.reward) == 3
    # the last latents whose reward was finite: those evaluated at iteration 2, after two updates
    clean = ds.optimize_latents(sampler, ref, noise, cond, iterations=2, lr=0.05, progress=False)
    assert torch.equal(kept.latents, clean.latents)


def test_target_reward_stops_early(setup):
    sampler, noise, cond, target = setup
    res = ds.optimize_latents(sampler, ds.rewards.Reference(target), noise, cond, iterations=50, lr=0.05,
                              target_reward=-1e9, progress=False)
    assert res.stopped.startswith("target reached at iteration 0") and len(res.reward) == 1


def test_noise_priors(setup):
    sampler, noise, cond, target = setup
    res = ds.optimize_latents(sampler, ds.rewards.Reference(target), noise, cond, iterations=4, lr=0.3,
                              noise_prior="sphere", progress=False)
    assert torch.allclose(res.latents.flatten(1).norm(dim=1), torch.full((2,), 8.0), atol=1e-4)
    assert res.settings["noise_prior"] == "sphere"
    # chi2 prior: minimal at r = sqrt(d - 1) along any ray
    d = 64
    direction = torch.randn(1, 1, 8, 8)
    direction = direction / direction.norm()
    radii = torch.linspace(5, 11, 601)
    values = torch.stack([chi2_prior(direction * r) for r in radii]).squeeze()
    assert radii[values.argmin()].item() == pytest.approx(math.sqrt(d - 1), abs=0.01)
    assert torch.allclose(project_to_sphere(direction * 3).norm(), torch.tensor(8.0))
    with pytest.raises(ValueError, match="noise_prior"):
        ds.optimize_latents(sampler, ds.rewards.Reference(target), noise, cond, iterations=1, noise_prior="gauss")


def test_weighted_and_reference_rewards():
    gen = torch.Generator().manual_seed(0)
    ref_img = torch.rand(1, 1, 4, 4, generator=gen)
    mask = torch.zeros(4, 4)
    mask[:2] = 1
    images = torch.rand(3, 1, 4, 4, generator=gen)
    r = ds.rewards.Reference(ref_img, mask)
    expected = -((images - ref_img)[:, :, :2] ** 2).flatten(1).mean(1)
    assert torch.allclose(r(images), expected)
    w = ds.rewards.Weighted({r: 2.0, (lambda im, c: im.flatten(1).mean(1)): -1.0})
    assert torch.allclose(w(images), 2 * expected - images.flatten(1).mean(1))
    with pytest.raises(ValueError, match="no pixel"):
        ds.rewards.Reference(ref_img, torch.zeros(4, 4))


def test_editing_an_inverted_image_from_an_intermediate_step(setup):
    sampler, _, cond, target = setup
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    sampler = ds.Sampler(sampler.model, sampler.scheduler, 6, decode=lambda x: x / 2 + 0.5,
                         encode=lambda im: im * 2 - 1)
    latent = sampler.invert(image, cond, to_step=3)
    res = ds.optimize_latents(sampler, ds.rewards.Reference(target), latent, cond, iterations=10, lr=0.05,
                              start_step=3, progress=False)
    assert res.settings["start_step"] == 3
    assert res.history["final_reward"] > res.reward[0]
    with pytest.raises(ValueError, match="start_step"):
        ds.optimize_latents(sampler, ds.rewards.Reference(target), latent, cond, iterations=1, start_step=6)
