"""The three jobs on local text-to-image pipeline folders from the command line, as a user runs them: tiny
Stable Diffusion and SDXL folders saved with save_pretrained, a tiny CLIP reward folder, prompts."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny.sd import sd_pipeline
from tiny.flux import flux_pipeline
from tiny.sdxl import sdxl_pipeline
from tiny.wan import wan_pipeline
from cli_runs import metrics_of, run
from tiny_pipelines import clip_model_folder

import diffusion_shortcuts as ds
from diffusion_shortcuts.checkpoints import load_checkpoint
from diffusion_shortcuts.pipelines import load_pipeline

PROMPTS = ["--prompt", "a red car", "--prompt", "a blue house"]
SMALL = ["--steps", "3", "--height", "16", "--width", "16"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    sd_pipeline()[0].save_pretrained(root / "sd")
    sdxl_pipeline()[0].save_pretrained(root / "sdxl")
    flux_pipeline().save_pretrained(root / "flux")
    wan_pipeline().save_pretrained(root / "wan")
    (root / "clip").mkdir()
    clip_model_folder(root / "clip")
    return root


def test_sample_and_steer_a_stable_diffusion_folder_with_prompts(folders, tmp_path, capsys):
    code, err = run(["sample", "--model", folders / "sd", *PROMPTS, *SMALL, "--n", "4", "--out", tmp_path / "s"],
                    capsys)
    assert code == 0, err
    assert metrics_of(tmp_path / "s")["prompts"] == ["a red car", "a blue house"]
    assert (tmp_path / "s" / "grid.png").stat().st_size > 100

    code, err = run(["optimize", "--model", folders / "sd", *PROMPTS, *SMALL, "--n", "2", "--iterations", "3",
                     "--reward", f"clip:{folders / 'clip'}", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    metrics = metrics_of(tmp_path / "o")
    assert metrics["conditions"] == ["a red car", "a blue house"] and metrics["gradient"] == "shortcut"
    assert metrics["final_reward"] > metrics["reward"][0]  # the CLIP score of each sample's own prompt rose
    assert metrics["peak_memory_mb"] > 0 and len(metrics["graph_mb"]) == 3
    assert (tmp_path / "o" / "before_after.png").exists()
    code, err = run(["optimize", "--model", folders / "sd", *PROMPTS, *SMALL, "--n", "2", "--iterations", "3",
                     "--reward", f"clip:{folders / 'clip'}", "--vae-checkpointing", "--out", tmp_path / "c"], capsys)
    assert code == 0, err  # the VAE's gradient checkpointing changes the memory, not the run
    checkpointed = metrics_of(tmp_path / "c")
    assert checkpointed["reward"] == pytest.approx(metrics["reward"], rel=1e-5)
    assert sum(checkpointed["graph_mb"]) < sum(metrics["graph_mb"])


def test_finetune_saves_a_lora_that_the_stock_pipeline_loads(folders, tmp_path, capsys):
    out = tmp_path / "f"
    code, err = run(["finetune", "--model", folders / "sd", *PROMPTS, *SMALL, "--iterations", "2", "--batch-size", "1",
                     "--lr", "0.05", "--eval-every", "1", "--eval-samples", "2", "--reward", f"clip:{folders / 'clip'}",
                     "--out", out], capsys)
    assert code == 0, err
    metrics = metrics_of(out)
    assert metrics["weights"] == "lora/pytorch_lora_weights.safetensors" and len(metrics["heldout"]) == 3

    trained = load_checkpoint(out / "finetune_checkpoint.pt")["params"]  # the weights the run ended with
    tuned = load_pipeline(folders / "sd", "cpu")
    ds.add_lora(tuned.model, rank=4)
    with torch.no_grad():
        for name, param in tuned.model.named_parameters():
            if name in trained:
                param.copy_(trained[name])
    stock = load_pipeline(folders / "sd", "cpu")
    base = stock.sampler(3).encode_prompt(["a red car"])
    noise = stock.noise(1, torch.Generator().manual_seed(0))
    before = stock.sampler(3)(noise, base)
    stock.pipe.load_lora_weights(out / "lora")  # rank, alpha and targets come from the file
    loaded = stock.sampler(3)(noise, base)
    assert torch.allclose(loaded, tuned.sampler(3)(noise, base), atol=1e-6)
    assert (loaded - before).abs().max() > 1e-4


def test_prune_over_a_prompts_file_then_sample_with_the_schedule(folders, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n# a comment\n\na blue house\na green tree\n")
    out = tmp_path / "p"
    code, err = run(["prune", "--model", folders / "sd", "--prompts", prompts, "--steps", "4", "--height", "16",
                     "--iterations", "3", "--samples", "3", "--ratio", "0.5", "--gradient", "full", "--out", out],
                    capsys)
    assert code == 0, err
    metrics = metrics_of(out)
    schedule = ds.prune.CacheSchedule.load(out / "schedule.json")
    assert schedule.num_steps == 4 and metrics["macs_ratio"] == pytest.approx(schedule.macs_ratio)
    assert metrics["search_settings"]["sampler"]["num_inference_steps"] == 4 and "ssim" in metrics
    code, err = run(["sample", "--model", folders / "sd", "--prompts", prompts, "--steps", "4", "--n", "3",
                     "--schedule", out / "schedule.json", "--out", tmp_path / "s"], capsys)
    assert code == 0, err
    assert metrics_of(tmp_path / "s")["macs_ratio"] == pytest.approx(schedule.macs_ratio)
    code, err = run(["sample", "--model", folders / "sd", "--prompts", prompts, "--steps", "5", "--strict-schedule",
                     "--schedule", out / "schedule.json", "--out", tmp_path / "s5"], capsys)
    assert code == 2 and "schedule has 4 steps, the sampler 5" in err and len(err.strip().splitlines()) == 1


def test_finetune_on_a_pipeline_folder_under_accelerate_launch(folders, tmp_path):
    """Two CPU processes with batch 1 each reach the adapter one process reaches with batch 2."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    args = ["finetune", "--model", str(folders / "sd"), *PROMPTS, "--steps", "3", "--iterations", "2", "--lr", "0.05",
            "--eval-every", "2", "--eval-samples", "2", "--reward", f"clip:{folders / 'clip'}"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29547", "--num_processes",
              "2", "-m", "diffusion_shortcuts.cli"]
    subprocess.run([*launch, *args, "--batch-size", "1", "--out", str(tmp_path / "two")], check=True, env=env,
                   capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "diffusion_shortcuts.cli", *args, "--batch-size", "2", "--out",
                    str(tmp_path / "one")], check=True, env=env, capture_output=True, timeout=300)
    two = load_file(str(tmp_path / "two" / "lora" / "pytorch_lora_weights.safetensors"))
    one = load_file(str(tmp_path / "one" / "lora" / "pytorch_lora_weights.safetensors"))
    assert two.keys() == one.keys()
    difference = sum((two[k] - one[k]).square().sum() for k in one).sqrt()
    # AdamW magnifies the float noise of the gradient all-reduce on near-zero entries; SGD is exact (test_finetune)
    assert difference / sum(one[k].square().sum() for k in one).sqrt() < 1e-4
    assert max(one[k].abs().max() for k in one if "lora_B" in k) > 1e-3  # B starts at zero: the adapter moved
    assert metrics_of(tmp_path / "two")["batch_size"] == 1


def test_bfloat16_on_cpu_keeps_what_is_trained_in_float32(folders, tmp_path, capsys):
    code, err = run(["optimize", "--model", folders / "sdxl", *PROMPTS, *SMALL, "--dtype", "bfloat16", "--n", "2",
                     "--iterations", "2", "--reward", f"clip:{folders / 'clip'}", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    latents = load_file(str(tmp_path / "o" / "latents.safetensors"))["latents"]
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    code, err = run(["finetune", "--model", folders / "sdxl", *PROMPTS, *SMALL, "--dtype", "bfloat16",
                     "--iterations", "2", "--batch-size", "1", "--eval-every", "2", "--eval-samples", "2",
                     "--reward", f"clip:{folders / 'clip'}", "--out", tmp_path / "f"], capsys)
    assert code == 0, err
    assert metrics_of(tmp_path / "f")["trainable_dtype"] == "torch.float32"
    saved = load_file(str(tmp_path / "f" / "lora" / "pytorch_lora_weights.safetensors"))
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    pipe = load_pipeline(folders / "sdxl", "cpu", "bfloat16")
    assert pipe.model.dtype == torch.bfloat16 and pipe.pipe.vae.dtype == torch.bfloat16


@pytest.mark.parametrize("argv,needle", [
    (["sample", "--model", "{tmp}", "--prompt", "a cat"], "not a diffusers model"),
    (["sample", "--model", "{broken}", "--prompt", "a cat"], "cannot load the pipeline in"),
    (["sample", "--model", "{sd}"], "--prompt: sd is a text-to-image pipeline"),
    (["sample", "--model", "digits-dit", "--prompt", "a cat"], "takes class labels (--labels), not prompts"),
    (["sample", "--model", "{sd}", "--prompts", "{tmp}/missing.txt"], "--prompts"),
    (["sample", "--model", "{sd}", "--prompt", "a cat", "--height", "18"], "must be multiples of 4"),
    (["optimize", "--model", "{sd}", "--prompt", "a cat", "--reward", "clip:{tmp}/no-clip"], "does not exist"),
    (["optimize", "--model", "{sd}", "--prompt", "a cat", "--reward", "aesthetic:{clip}"], "aesthetic head file"),
])
def test_bad_pipeline_input_is_one_line(folders, tmp_path, capsys, argv, needle):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    names = {"tmp": tmp_path, "broken": broken, "sd": folders / "sd", "clip": folders / "clip"}
    code, err = run([a.format(**names) for a in argv] + ["--out", tmp_path / "o"], capsys)
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """A tiny latent DiT pipeline saved as the hub's are: transformer, VAE, scheduler, and the class names in
    model_index.json (``id2label``, several names for a class)."""
    from tiny_models import tiny_dit, tiny_vae
    from diffusers import DDIMScheduler, DiTPipeline

    folder = tmp_path_factory.mktemp("dit") / "dit"
    # DiTPipeline hard-codes the null class 1000, so this DiT has ImageNet's 1000 classes
    DiTPipeline(transformer=tiny_dit(in_channels=4, num_classes=1000), vae=tiny_vae(),
                scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False)).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["id2label"] = {"1": "goldfish, Carassius auratus", "207": "golden retriever"}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_a_dit_pipeline_folder_samples_by_class_name_or_label_and_prunes(dit_folder, tmp_path, capsys):
    code, err = run(["sample", "--model", dit_folder, "--prompt", "golden retriever", "--prompt", "Carassius auratus",
                     "--n", "4", "--steps", "3", "--out", tmp_path / "s"], capsys)
    assert code == 0, err
    metrics = metrics_of(tmp_path / "s")
    assert metrics["n"] == 4 and "accuracy" not in metrics and "accuracy_judge" not in metrics
    assert (tmp_path / "s" / "grid.png").stat().st_size > 100
    # the same classes by id give the same images (same seed): names are only another way to say them
    code, err = run(["sample", "--model", dit_folder, "--labels", "207,1", "--n", "4", "--steps", "3",
                     "--out", tmp_path / "ids"], capsys)
    assert code == 0, err
    import numpy as np
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ids" / "grid.png")),
                          np.asarray(Image.open(tmp_path / "s" / "grid.png")))

    out = tmp_path / "p"
    code, err = run(["prune", "--model", dit_folder, "--labels", "1,207", "--steps", "4", "--iterations", "2",
                     "--samples", "2", "--ratio", "0.5", "--gradient", "full", "--start-every", "auto",
                     "--reuse-mode", "taylor1", "--out", out], capsys)
    assert code == 0, err
    pruned = metrics_of(out)
    assert "accuracy_judge" not in pruned and (out / "heatmap.png").exists()
    assert pruned["search_settings"]["start"].startswith("every(interval=")
    assert pruned["search_validation"]["samples"] == 8
    code, err = run(["sample", "--model", dit_folder, "--labels", "1", "--steps", "4", "--n", "2",
                     "--schedule", out / "schedule.json", "--out", tmp_path / "fast"], capsys)
    assert code == 0, err
    assert metrics_of(tmp_path / "fast")["macs_ratio"] < 1.0

    reference = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(reference)
    code, err = run(["optimize", "--model", dit_folder, "--labels", "207", "--steps", "3", "--n", "2",
                     "--iterations", "3", "--reward", f"reference:{reference}", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    steered = metrics_of(tmp_path / "o")
    assert steered["final_reward"] > steered["reward"][0]  # closer to the red image than it began

    code, err = run(["sample", "--model", dit_folder, "--prompt", "a red car", "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "has no class 'a red car'" in err and "golden retriever" in err
    assert len(err.strip().splitlines()) == 1
    code, err = run(["sample", "--model", dit_folder, "--labels", "1000", "--out", tmp_path / "bad2"], capsys)
    assert code == 2 and "out of range" in err


def overflowing(tmp_path, component: str):
    """A copy of the SD folder whose ``component`` (unet or vae) overflows float16: its output convolution's
    weights scaled far past float16's largest value (65504) over the activations it sees."""
    pipe, _ = sd_pipeline()
    conv = pipe.unet.conv_out if component == "unet" else pipe.vae.decoder.conv_out
    with torch.no_grad():
        conv.weight.mul_(1e6)
    pipe.save_pretrained(tmp_path / component)
    return tmp_path / component


@pytest.mark.parametrize("component,named", [("unet", "denoiser (UNet2DConditionModel) in float16"),
                                             ("vae", "VAE decoder (AutoencoderKL) in float16")])
def test_a_float16_overflow_is_one_line_naming_the_component_and_the_fix(component, named, tmp_path, capsys):
    folder = overflowing(tmp_path, component)
    capsys.readouterr()  # what building the folder printed
    code, err = run(["sample", "--model", folder, *PROMPTS, *SMALL, "--n", "2", "--dtype", "float16",
                     "--out", tmp_path / "s"], capsys)
    assert code == 2 and len(err.strip().split("\n")) == 1, err  # one line after the progress bar cleared itself
    assert named in err and "non-finite" in err and "--dtype bfloat16" in err
    assert not (tmp_path / "s" / "metrics.json").exists()
    code, err = run(["sample", "--model", folder, *PROMPTS, *SMALL, "--n", "2", "--out", tmp_path / "f"], capsys)
    assert code == 0, err  # the same folder in float32 does not overflow


def test_a_float16_overflow_of_the_sampler_raises_precision_error():
    pipe, _ = sd_pipeline()
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(1e6)
    pipe.to(torch.float16)
    sampler = ds.Sampler.from_pipeline(pipe, num_inference_steps=2, guidance_scale=1.0)
    cond = sampler.encode_prompt(["a red car"])
    with pytest.raises(ds.PrecisionError, match=r"denoiser \(UNet2DConditionModel\) in float16 produced non-finite "
                                                r"latents"):
        sampler(torch.randn(1, 4, 8, 8), cond)


def test_a_precision_the_device_cannot_run_is_one_line_naming_the_flag(monkeypatch, folders, tmp_path, capsys):
    from diffusion_shortcuts import pipelines

    real = torch.nn.functional.conv2d

    def no_half_convolutions(x, *args, **kwargs):  # a CPU build without half-precision convolutions
        if x.dtype == torch.float16:
            raise RuntimeError('"slow_conv2d_cpu" not implemented for \'Half\'')
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", no_half_convolutions)
    with pytest.raises(ValueError, match="--dtype float16: cpu cannot compute in float16 here; available: float32, "
                                         "bfloat16"):
        pipelines.check_precision(torch.device("cpu"), "float16")
    code, err = run(["sample", "--model", folders / "sd", *PROMPTS, *SMALL, "--dtype", "float16",
                     "--out", tmp_path / "s"], capsys)
    assert code == 2 and "--dtype float16: cpu cannot compute in float16" in err and len(err.strip().splitlines()) == 1
    pipelines.check_precision(torch.device("cpu"), "bfloat16")  # runs here: no error


def test_finetune_refits_a_schedule_ships_it_beside_the_lora_and_prune_refits_on_a_lora(folders, tmp_path, capsys):
    from diffusion_shortcuts.prune import CacheSchedule, ScheduleError, enable_cache, profile, summary

    tuned = load_pipeline(folders / "sd", "cpu", height=16, width=16)
    sampler = tuned.sampler(3)
    example = profile(tuned.model, tuned.noise(1), sampler.encode_prompt(["a red car"]))
    CacheSchedule.every(sampler.timesteps, example, 2, warmup=1).save(tmp_path / "rule.json")
    train = ["finetune", "--model", folders / "sd", *PROMPTS, "--height", "16", "--width", "16", "--iterations", "2",
             "--batch-size", "1", "--lr", "0.05", "--eval-every", "2", "--eval-samples", "2",
             "--reward", f"clip:{folders / 'clip'}", "--schedule", tmp_path / "rule.json"]
    other = load_pipeline(folders / "sdxl", "cpu", height=16, width=16)  # made for another base model: refused too
    other_sampler = other.sampler(3)
    other_profile = profile(other.model, other.noise(1), other_sampler.encode_prompt(["a red car"]))
    CacheSchedule.every(other_sampler.timesteps, other_profile, 2, warmup=1).save(tmp_path / "other.json")
    code, err = run([*train[:-1], tmp_path / "other.json", "--steps", "3", "--out", tmp_path / "wrong"], capsys)
    assert code == 2 and "--schedule: schedule was made for model UNet2DConditionModel:" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "wrong").exists()

    # made for 3 steps, tuned at 4: resampled to 4 before the refit, as sample and optimize resample it
    out = tmp_path / "tuned"
    code, err = run([*train, "--steps", "4", "--refit-iterations", "2", "--out", out], capsys)
    assert code == 0, err
    metrics = metrics_of(out)
    assert metrics["schedule_resampled_from"] == 3 and CacheSchedule.load(out / "lora").num_steps == 4
    refit = metrics["schedule_refit"]
    assert metrics["schedule"] == "lora/schedule.json" and refit["iterations"] == 2 and refit["kept"] in ("start",
                                                                                                        "searched")
    assert 0 < refit["ssim_start"] <= 1 and 0 < refit["ssim_searched"] <= 1  # the rule on the tuned model, the refit
    assert refit["loss_" + refit["kept"]] <= min(refit["loss_start"], refit["loss_searched"])

    # the stock pipeline with the LoRA finds the schedule in the LoRA's folder; another base model is refused
    stock = load_pipeline(folders / "sd", "cpu").pipe
    stock.load_lora_weights(out / "lora")
    net = enable_cache(stock, out / "lora")
    try:
        stock("a red car", num_inference_steps=4, height=16, width=16, output_type="latent")
        shipped = CacheSchedule.load(out / "lora")
        assert summary(net)["block_calls_reused"] == int(shipped.reuse.sum())  # one batched call a step
    finally:
        net.detach()
    with pytest.raises(ScheduleError, match="made for model UNet2DConditionModel:"):
        enable_cache(load_pipeline(folders / "sdxl", "cpu").pipe, out / "lora")

    # prune on the pipeline with that LoRA loaded, started from its schedule: a refit from the command line
    code, err = run(["prune", "--model", folders / "sd", *PROMPTS, "--height", "16", "--width", "16", "--steps", "4",
                     "--lora", out, "--start-from", out / "lora", "--ratio", "0.5", "--iterations", "2",
                     "--samples", "2", "--gradient", "full", "--out", tmp_path / "p"], capsys)
    assert code == 0, err
    assert metrics_of(tmp_path / "p")["search_settings"]["start"].endswith(
        ds.conditions.fingerprint(CacheSchedule.load(out / "lora").reuse))
    code, err = run(["prune", "--model", folders / "sd", *PROMPTS, "--lora", tmp_path, "--out", tmp_path / "q"],
                    capsys)
    assert code == 2 and "--lora" in err and "no adapter there" in err and len(err.strip().splitlines()) == 1


def test_the_stock_calls_guidance_arguments_carry_over_and_a_video_pipeline_is_refused_in_one_line(folders, tmp_path,
                                                                                                capsys):
    """Flux with true CFG from the command line as from the stock call (--true-cfg-scale with --negative-prompt); the
    flag refused where it does nothing; video flags refused on an image model, a frame count the VAE cannot take named
    with the counts it can."""
    flux = ["sample", "--model", folders / "flux", *PROMPTS, "--height", "16", "--width", "16", "--steps", "2",
            "--n", "2", "--negative-prompt", "blue sky"]
    code, err = run([*flux, "--true-cfg-scale", "2.5", "--out", tmp_path / "f"], capsys)
    assert code == 0, err
    assert metrics_of(tmp_path / "f")["true_cfg_scale"] == 2.5
    refusals = [
        ([*flux[:-2], "--true-cfg-scale", "2.5"], "--true-cfg-scale needs --negative-prompt"),
        (["sample", "--model", folders / "sd", *PROMPTS, "--true-cfg-scale", "2"],
         "--true-cfg-scale: sd-unet has no classifier-free guidance of its own; use --guidance"),
        (["sample", "--model", "digits-dit", "--true-cfg-scale", "2"],
         "--true-cfg-scale: digits-dit has no classifier-free guidance of its own"),
        (["sample", "--model", folders / "wan", *PROMPTS, "--frames", "10"],
         "--frames 10: wan's VAE takes 4k + 1 frames (such as 5, 9, 13, 17)"),
        (["sample", "--model", folders / "sd", *PROMPTS, "--frames", "9"],
         "--frames: StableDiffusionPipeline (sd-unet) makes images, not videos"),
        (["sample", "--model", "digits-dit", "--fps", "8"], "--fps: digits-dit makes images, not videos"),
    ]
    for argv, needle in refusals:
        code, err = run([*argv, "--out", tmp_path / "refused"], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "refused").exists()
