"""Reward fine-tuning (issue 6, first part): LoRA through peft, any gradient policy, exact resume."""

import pytest
import torch
from conftest import Killed, kill_at
import tiny_models
from tiny_models import tiny_cond_unet, tiny_dit

import diffusion_shortcuts as ds
from diffusion_shortcuts import FinetuneError, add_lora, finetune


def brightness(images, cond):
    return images.mean(dim=(1, 2, 3))


def unet_sampler():
    return tiny_models.unet_sampler(steps=4, guidance_scale=2.0, decode=lambda x: x / 2 + 0.5)


def test_lora_is_injected_through_peft_in_both_ways():
    unet_names = add_lora(tiny_cond_unet(), rank=2)
    dit = tiny_dit()
    dit_names = add_lora(dit, rank=2, target_modules=("to_q", "to_v"))
    assert unet_names and all("lora_" in n for n in unet_names)
    assert dit_names and all(p.dtype == torch.float32 for n, p in dit.named_parameters() if n in dit_names)
    with pytest.raises(ValueError, match="not found|no LoRA target"):
        add_lora(tiny_cond_unet(), target_modules=("nothing_here",))


@pytest.mark.parametrize("policy", [ds.gradients.Shortcut(step="random"), ds.gradients.Truncated(1), "full",
                                    "checkpointed", ds.gradients.RandomTruncated(3)])
def test_finetune_raises_the_reward_and_touches_only_the_adapter(policy):
    sampler = unet_sampler()
    add_lora(sampler.model, rank=2)
    frozen = {n: p.detach().clone() for n, p in sampler.model.named_parameters() if "lora_" not in n}
    conditions = torch.randn(3, 3, 8, generator=torch.Generator().manual_seed(0))
    result = finetune(sampler, brightness, conditions, noise_shape=(1, 8, 8), gradient=policy, iterations=12,
                      batch_size=2, lr=0.05, progress=False)
    rewards = result.history["reward"]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3
    for n, p in sampler.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_finetune_resumes_to_the_same_weights_and_stops_on_non_finite(tmp_path):
    conditions = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    heldout = ds.HeldOut.per_condition(conditions, 2, (1, 8, 8), every=2)

    def run(sampler=None, **kwargs):  # with every stateful option: EMA, warm-up, held-out evaluation, base regulariser
        if sampler is None:
            sampler = unet_sampler()
            add_lora(sampler.model, rank=2)
        return finetune(sampler, brightness, conditions, noise_shape=(1, 8, 8), iterations=6, batch_size=2, lr=0.05,
                        progress=False, ema=0.8, warmup=2, heldout=heldout, base_weight=0.5, **kwargs)

    whole = run()

    crashed = unet_sampler()
    add_lora(crashed.model, rank=2)
    with pytest.raises(Killed):
        run(crashed, checkpoint_dir=tmp_path, checkpoint_every=2, callback=kill_at(3))
    # resumed in the same process on the model the crash left half-trained: the base comes from the checkpoint
    resumed = run(crashed, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True)
    for n, p in whole.trainable.items():
        assert torch.equal(p, resumed.trainable[n]), n
    assert resumed.history["reward"] == whole.history["reward"]
    assert [e["reward"] for e in resumed.history["eval"]] == [e["reward"] for e in whole.history["eval"]]
    assert [e["iteration"] for e in whole.history["eval"]] == [0, 2, 4, 6]

    def nan_after_two(images, cond):
        nan_after_two.calls += 1
        return brightness(images, cond) * (float("nan") if nan_after_two.calls > 2 else 1.0)

    nan_after_two.calls = 0
    sampler = unet_sampler()
    add_lora(sampler.model, rank=2)
    with pytest.raises(FinetuneError, match="iteration 2: non-finite reward"):
        finetune(sampler, nan_after_two, torch.randn(1, 3, 8), noise_shape=(1, 8, 8), iterations=4, batch_size=1,
                 progress=False, checkpoint_dir=tmp_path / "nan", checkpoint_every=1)
    assert torch.load(tmp_path / "nan" / "finetune_checkpoint.pt", weights_only=False)["iteration"] == 2


def test_the_adapter_saves_alone_and_loads_onto_the_base_model(tmp_path):
    from diffusion_shortcuts.optimize import load_lora, save_lora

    sampler = unet_sampler()
    add_lora(sampler.model, rank=2)
    finetune(sampler, brightness, torch.randn(2, 3, 8), noise_shape=(1, 8, 8), iterations=2, batch_size=1, lr=0.05,
             progress=False)
    path = save_lora(sampler.model, tmp_path / "adapter.safetensors")
    base = tiny_cond_unet()
    load_lora(base, path, rank=2)
    x, t, c = torch.randn(1, 1, 8, 8), torch.tensor(500), torch.randn(1, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(base(x, t, c).sample, sampler.model(x, t, c).sample)
        assert not torch.allclose(tiny_cond_unet()(x, t, c).sample, base(x, t, c).sample)


def test_cli_finetune_killed_by_a_signal_resumes_to_the_same_adapter(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    def command(out, *extra):
        return [sys.executable, "-m", "diffusion_shortcuts.cli", "finetune", "--model", "digits-dit", "--reward",
                "label", "--rank", "2", "--iterations", "6", "--batch-size", "1", "--steps", "4", "--ema", "0.9",
                "--eval-every", "3", "--eval-samples", "2", "--checkpoint-every", "1", "--lr", "0.01",
                "--out", str(out), *extra]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "whole"), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "finetune_checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists():
            try:
                if torch.load(checkpoint, weights_only=False)["iteration"] >= 2:
                    break
            except Exception:  # caught mid-rename: try again
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter.safetensors").exists()  # really killed before the end
    subprocess.run(command(killed, "--resume"), check=True, env=env, capture_output=True)
    a, b = load_file(str(tmp_path / "whole" / "adapter.safetensors")), load_file(str(killed / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((killed / "metrics.json").read_text())
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    def figures(evaluations):  # everything but the clock
        return [{k: v for k, v in e.items() if k != "seconds"} for e in evaluations]

    assert metrics["reward"] == whole["reward"] and figures(metrics["heldout"]) == figures(whole["heldout"])
    assert [e["iteration"] for e in metrics["heldout"]] == [0, 3, 6]
    assert all(0 <= e["accuracy"] <= 1 and e["diversity"] > 0 for e in metrics["heldout"])
    assert (killed / "heldout.png").stat().st_size > 1000


def test_two_processes_under_accelerate_equal_one_process_with_the_doubled_batch(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    script = str(Path(__file__).parent / "finetune_distributed.py")
    # accelerate's multi-process CPU launch: torchrun through --multi_gpu, with ACCELERATE_USE_CPU (gloo)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"]
    subprocess.run([*launch, "--num_processes", "2", script, str(tmp_path / "two"), "1"], check=True, env=env,
                   capture_output=True, timeout=300)
    subprocess.run([sys.executable, script, str(tmp_path / "one"), "2"], check=True, env=env, capture_output=True,
                   timeout=300)
    rank0, rank1 = (load_file(str(tmp_path / "two" / f"rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    initial = tiny_cond_unet()
    add_lora(initial, rank=2)
    initial = dict(initial.named_parameters())
    moved = 0.0
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key  # the processes never drift apart
        # plain SGD, so a sum instead of a mean over processes would double the step and show here
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-6)
        moved = max(moved, float((single[key] - initial[key].detach()).abs().max()))
    assert moved > 1e-3


def test_diversity_is_the_mean_within_group_pairwise_rms_distance():
    from diffusion_shortcuts.metrics import diversity

    images = torch.rand(7, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    by_hand = []
    for g in (0, 1, 2):
        members = [images[i] for i in range(7) if groups[i] == g]
        pairs = [(a - b).square().mean().sqrt() for i, a in enumerate(members) for b in members[i + 1:]]
        by_hand.append(sum(pairs) / len(pairs))
    assert diversity(images, groups) == pytest.approx(float(sum(by_hand) / 3), rel=1e-6)
    assert diversity(images[:1].expand(3, -1, -1, -1), torch.zeros(3, dtype=torch.long)) == 0.0
    with pytest.raises(ValueError, match="no group has two"):
        diversity(images[:2], torch.tensor([0, 1]))


def test_heldout_evaluation_measures_the_final_model_on_fixed_noise_and_stops_on_request():
    labels = torch.tensor([0, 1, 2])
    encoder = torch.nn.Embedding(3, 24).requires_grad_(False)

    def encode(rows):
        return encoder(rows).view(-1, 3, 8)

    def judged(images, conditions):
        return {"mean_label": float(conditions.float().mean())}

    heldout = ds.HeldOut.per_condition(labels, 3, (1, 8, 8), every=2, judge=judged)
    assert heldout.groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    sampler = unet_sampler()
    add_lora(sampler.model, rank=2)
    seen = []

    def label_brightness(images, cond):  # the reward sees the labels, the sampler their encoding
        seen.append(cond)
        return images.mean(dim=(1, 2, 3)) * (1 + cond.float())

    result = finetune(sampler, label_brightness, labels, noise_shape=(1, 8, 8), encode=encode, iterations=20,
                      batch_size=2, lr=0.05, heldout=heldout, progress=False,
                      callback=lambda info: info["iteration"] == 4)
    evals = result.history["eval"]
    assert len(result.history["reward"]) == 5 and [e["iteration"] for e in evals] == [0, 2, 4, 5]
    assert all(c.dtype == torch.long for c in seen)
    with torch.no_grad():
        final = sampler(heldout.noise, encode(heldout.conditions))
    assert evals[-1]["reward"] == pytest.approx(float(label_brightness(final, heldout.conditions).mean()), rel=1e-5)
    assert evals[-1]["reward"] > evals[0]["reward"] and evals[-1]["mean_label"] == 1.0
    assert evals[-1]["diversity"] > 0 and evals[-1]["seconds"] == pytest.approx(sum(result.history["seconds"]))
    with pytest.raises(ValueError, match="2 conditions for 9 noise"):
        ds.HeldOut(heldout.noise, labels[:2])


def test_ema_weights_follow_the_closed_form_average_of_the_trajectory():
    sampler = unet_sampler()
    add_lora(sampler.model, rank=2)
    names = [n for n, _ in sampler.model.named_parameters() if "lora_" in n]
    params = dict(sampler.model.named_parameters())
    trajectory = [{n: params[n].detach().clone() for n in names}]

    def record(info):
        trajectory.append({n: params[n].detach().clone() for n in names})

    decay = 0.7
    result = finetune(sampler, brightness, torch.randn(2, 3, 8), iterations=5, batch_size=1,  # shape from config
                      lr=0.05, ema=decay, progress=False, callback=record)
    # diffusers' EMAModel: decay 0 at the first update, then min(decay, (1 + k) / (10 + k)) at update k + 1
    average = trajectory[0]
    for k, weights in enumerate(trajectory[1:]):
        d = 0.0 if k == 0 else min(decay, (1 + k) / (10 + k))
        average = {n: d * average[n] + (1 - d) * weights[n] for n in names}
    for n in names:
        torch.testing.assert_close(result.trainable[n].detach(), average[n])
    assert not torch.equal(average[names[1]], trajectory[-1][names[1]])


def test_base_regulariser_pulls_toward_the_base_models_samples_from_the_same_noise():
    """Two SGD iterations under Full reproduced by hand: loss = -mean reward + w * mean (x - x_base)^2 with
    x_base sampled by the INITIAL weights (not the current ones) from the same noise and conditions."""
    conditions = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    w, lr = 3.0, 0.2

    def trained(base_weight):
        sampler = unet_sampler()
        add_lora(sampler.model, rank=2)
        finetune(sampler, brightness, conditions, noise_shape=(1, 8, 8), gradient="full", iterations=2, batch_size=2,
                 lr=lr, optimizer="sgd", grad_clip=None, base_weight=base_weight, progress=False)
        return {n: p.detach() for n, p in sampler.model.named_parameters() if "lora_" in n}

    sampler, base_sampler = unet_sampler(), unet_sampler()
    add_lora(sampler.model, rank=2)
    lora = {n: p for n, p in sampler.model.named_parameters() if "lora_" in n}
    for it in range(2):
        gen = torch.Generator().manual_seed(it)
        noise = torch.randn((2, 1, 8, 8), generator=gen)
        x = sampler(noise, conditions, gradient=ds.gradients.Full())
        with torch.no_grad():
            x_base = base_sampler(noise, conditions)
        loss = -brightness(x, None).mean() + w * (x - x_base).square().mean()
        grads = torch.autograd.grad(loss, list(lora.values()), allow_unused=True)
        with torch.no_grad():
            for p, g in zip(lora.values(), grads):
                if g is not None:
                    p -= lr * g
    regularised, plain = trained(w), trained(0.0)
    for n, p in lora.items():
        torch.testing.assert_close(regularised[n], p.detach(), rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(regularised[n], plain[n]) for n in lora)


def test_digit_class_takes_each_images_label_from_the_condition():
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 1, 4, 1])
    reward = ds.rewards.DigitClass(None)
    torch.testing.assert_close(reward(images, labels), ds.rewards.DigitClass(labels)(images))
    with pytest.raises(ValueError, match="takes the labels from the condition"):
        reward(images)
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        reward(images, labels[:3])


def test_cli_full_weight_tuning_saves_a_loadable_model(tmp_path, capsys):
    from diffusers import DiTTransformer2DModel

    from diffusion_shortcuts import cli

    code = cli.main(["finetune", "--model", "digits-dit", "--reward", "label", "--params", "all", "--iterations", "2",
                     "--batch-size", "2", "--steps", "3", "--eval-samples", "2", "--lr", "1e-3",
                     "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    saved = DiTTransformer2DModel.from_pretrained(tmp_path / "model")
    base = ds.zoo.load("digits-dit").model
    moved = [n for n, p in saved.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(moved) > 10 and not (tmp_path / "adapter.safetensors").exists()


def test_the_noise_shape_comes_from_the_models_config():
    from diffusion_shortcuts.families import UnknownModelError, sample_shape

    assert sample_shape(tiny_cond_unet()) == (1, 8, 8) and sample_shape(tiny_dit()) == (2, 8, 8)
    with pytest.raises(UnknownModelError, match=r"no model family knows Linear; supported: .*ddpm-unet \(UNet2DModel"):
        sample_shape(torch.nn.Linear(2, 2))


def test_conditions_are_counted_by_rows_whatever_their_container():
    from diffusion_shortcuts.conditions import count as count_rows

    rows = torch.randn(3, 4, 8)
    assert count_rows(rows) == 3 and count_rows({"a": rows, "b": rows[:, 0]}) == 3  # not the number of keys
    assert count_rows(["a cat", "a dog"]) == 2 and count_rows(None) == 1
    with pytest.raises(ValueError, match="different batch sizes"):
        count_rows({"a": rows, "b": rows[:2]})
    with pytest.raises(ValueError, match="non-empty batch"):
        count_rows([])


def test_an_iteration_whose_graph_step_a_schedule_reuses_counts_without_an_update():
    """Under a cache schedule the graph step may reuse every block (the UNet call comes from its cache): no
    trained weight ran there, the images carry no gradient; the iteration is counted, not an error."""
    from diffusion_shortcuts.prune import CacheSchedule, apply, profile

    sampler = unet_sampler()
    names = set(add_lora(sampler.model, rank=2))
    conditions = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    prof = profile(sampler.model, torch.zeros(1, 1, 8, 8), conditions[:1])
    reuse = torch.ones(4, len(prof.blocks), dtype=torch.bool)
    reuse[0] = False
    schedule = CacheSchedule.from_table(reuse, sampler.timesteps, prof)
    before = {n: p.detach().clone() for n, p in sampler.model.named_parameters() if n in names}
    with apply(sampler.model, schedule, sampler):
        pruned = finetune(sampler, brightness, conditions, noise_shape=(1, 8, 8),
                          gradient=ds.gradients.Shortcut(step=2), iterations=3, batch_size=2, lr=0.05, progress=False)
        assert pruned.history["no_gradient_iterations"] == [0, 1, 2] and len(pruned.history["reward"]) == 3
        for n, p in sampler.model.named_parameters():
            if n in names:
                assert torch.equal(p, before[n]), n
        computed = finetune(sampler, brightness, conditions, noise_shape=(1, 8, 8),
                            gradient=ds.gradients.Shortcut(step=0), iterations=2, batch_size=2, lr=0.05, progress=False)
    assert "no_gradient_iterations" not in computed.history
    assert any(not torch.equal(p, before[n]) for n, p in sampler.model.named_parameters() if n in names)
