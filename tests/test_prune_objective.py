"""What the search keeps: the reward objective (its gradient reaches the gates, as finite differences say), the
objective's spelling, and the refit of a schedule to a changed model."""

import pytest
import torch
from tiny_models import ddim, tiny_cond_unet, unet_case

import diffusion_shortcuts as ds
from diffusion_shortcuts.prune import CacheSchedule, Objective, SuperNet, parse_objective, profile
from diffusion_shortcuts.prune.pruner import KEEP, REUSE

SMALL = dict(sample_shape=(1, 8, 8), pruner_kwargs={"dim": 8, "heads": 2}, progress=False)


@pytest.mark.parametrize("kind", ["reward", "ssim+reward"])
def test_the_reward_objectives_gradient_reaches_the_gates_as_finite_differences_say(kind):
    gen = torch.Generator().manual_seed(4)
    model = tiny_cond_unet().double()
    sampler = ds.Sampler(model, ddim(), 4, guidance_scale=2.0, uncond=torch.randn(1, 3, 8, generator=gen).double())
    noise, cond = torch.randn(2, 1, 8, 8, generator=gen).double(), torch.randn(2, 3, 8, generator=gen).double()
    net = SuperNet(model, sampler.timesteps).attach()
    try:
        blocks = len(net.names)
        net.use_table(torch.zeros(4, blocks, dtype=torch.bool))
        with torch.no_grad():
            full = sampler(noise, cond)

        def reward(images, _cond):  # highest at the full model's samples: any mixed gate costs reward
            return -(images - full).square().mean(dim=(1, 2, 3))

        objective = Objective(kind, reward, weight=0.5)
        base = torch.full((4, blocks, 2), 0.5, dtype=torch.float64)
        base[0, :, KEEP], base[0, :, REUSE] = 1.0, 0.0  # step 0 computes every block

        def loss_at(gates):
            net.use_gates(gates)
            images = sampler(noise, cond, gradient=ds.gradients.Full())
            return objective.loss(images, full, None)

        gates = base.clone().requires_grad_(True)
        loss, figures = loss_at(gates)
        assert figures["reward_drop"] > 0  # the hinge is active: the gated samples reward worse than the full ones
        loss.backward()
        eps = 1e-6
        for t, b in [(1, 0), (2, blocks - 1), (3, blocks // 2)]:
            up, down = base.clone(), base.clone()
            up[t, b, KEEP] += eps
            down[t, b, KEEP] -= eps
            with torch.no_grad():
                numeric = (loss_at(up)[0] - loss_at(down)[0]) / (2 * eps)
            assert float(gates.grad[t, b, KEEP]) == pytest.approx(float(numeric), rel=1e-4, abs=1e-9)
        assert gates.grad[1:].abs().sum() > 0 and gates.grad[0].abs().sum() == 0  # no gate acts at step 0
    finally:
        net.detach()


def test_a_search_against_a_reward_records_it_and_a_resume_with_another_objective_is_refused(tmp_path):
    sampler, _, _ = unet_case(steps=4)
    conditions = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(9))
    labels = torch.arange(4)
    seen = []

    def reward(images, cond):
        seen.append(cond.clone())
        return images.mean(dim=(1, 2, 3)) + 0.1 * cond.to(images.dtype)

    kwargs = dict(ratio=0.5, iterations=2, batch_size=2, target_batch=1, lr=0.5, checkpoint_dir=tmp_path, **SMALL)
    result = ds.prune.train_pruner(sampler, conditions, objective=Objective("reward", reward),
                                   reward_conditions=labels, **kwargs)
    history = result.history
    assert len(history["reward"]) == len(history["reward_full"]) == len(history["reward_drop"]) == 2
    assert history["settings"]["objective"] == f"reward:{ds.rewards.base.reward_name(reward)}"
    assert all(set(c.tolist()) <= set(range(4)) for c in seen)  # the reward saw the labels, not the embeddings
    with pytest.raises(ValueError, match="objective: checkpoint 'reward:.*this run 'ssim'"):
        ds.prune.train_pruner(sampler, conditions, resume=True, **kwargs)
    with pytest.raises(ValueError, match="reward_conditions has 3 rows, conditions 4"):
        ds.prune.train_pruner(sampler, conditions, objective=Objective("reward", reward),
                              reward_conditions=labels[:3], **dict(kwargs, checkpoint_dir=None))


@pytest.mark.parametrize("text,parsed", [
    ("ssim", ("ssim", None, 1.0)), ("reward:digit:3", ("reward", "digit:3", 1.0)),
    ("ssim+reward:clip:/models/clip:0.5", ("ssim+reward", "clip:/models/clip", 0.5)),
    ("reward:label", ("reward", "label", 1.0))])
def test_objectives_are_spelled_as_the_command_line_takes_them(text, parsed):
    assert parse_objective(text) == parsed


@pytest.mark.parametrize("text", ["lpips", "reward", "reward:", "ssim+reward:label", "ssim+reward:digit:3:-1",
                                  "ssim+reward:digit:3:inf"])
def test_a_misspelled_objective_is_refused_naming_it(text):
    with pytest.raises(ValueError, match="objective"):
        parse_objective(text)


def test_an_objective_without_its_reward_or_with_one_it_does_not_take_is_refused():
    with pytest.raises(ValueError, match="'reward' needs a reward"):
        Objective("reward")
    with pytest.raises(ValueError, match="'ssim' takes no reward"):
        Objective("ssim", lambda images, cond: images.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="one of ssim, reward, ssim\\+reward"):
        Objective("lpips")


def test_a_refit_starts_from_the_given_table_and_never_returns_a_worse_one():
    sampler, noise, cond = unet_case(steps=6)
    conditions = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(9))
    rule = CacheSchedule.every(sampler.timesteps, profile(sampler.model, noise[:1], cond[:1]), 2, warmup=1)
    # the model changed since the rule was made (a fine-tuned copy): the refit works on the model as it is now
    with torch.no_grad():
        for p in sampler.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    unmoved = ds.prune.refit(sampler, rule, conditions, iterations=1, lr=0.0, validation=4, **SMALL)
    assert torch.equal(unmoved.reuse, rule.reuse)  # it starts from the table, and with no step it is the table
    assert unmoved.info["refit"]["ssim_start"] > 0 and unmoved.info["refit"]["iterations"] == 1
    for lr in (0.05, 5.0):  # a gentle and a wild search: neither is worse than the start by its own validation
        refitted = ds.prune.refit(sampler, rule, conditions, iterations=3, lr=lr, batch_size=2, validation=4, **SMALL)
        figures = refitted.info["refit"]
        searched_prunes_enough = 1 - figures["macs_searched"] >= rule.pruned_fraction - 0.0125
        if figures["kept"] == "start":  # the start was better, or the search's table prunes less than asked
            assert torch.equal(refitted.reuse, rule.reuse)
            assert figures["loss_start"] <= figures["loss_searched"] or not searched_prunes_enough
        else:
            assert figures["loss_searched"] <= figures["loss_start"] and searched_prunes_enough
        assert refitted.mode == rule.mode and abs(refitted.pruned_fraction - rule.pruned_fraction) <= 0.0125
    with pytest.raises(ds.prune.ScheduleError, match="schedule has 6 steps, the sampler 4"):
        ds.prune.refit(ds.Sampler(sampler.model, ddim(), 4), rule, conditions, iterations=1, **SMALL)
