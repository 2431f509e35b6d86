"""digits-flux: the zoo's flow-matching MMDiT is a stock FluxPipeline folder that diffusers loads and calls unchanged,
that draws the prompted digit, and that the library takes by name like the other zoo models (the shipped folder is
loaded, never trained, here)."""

import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline

import diffusion_shortcuts as ds
from diffusion_shortcuts import cli

JUDGE_NAME = "digits-classifier-eval"  # the classifier that judges, never a reward


@pytest.fixture(scope="module")
def flux():
    return ds.zoo.load("digits-flux")


def test_the_folder_is_a_stock_flux_pipeline_that_draws_the_prompted_digit():
    pipe = FluxPipeline.from_pretrained(ds.zoo.path("digits-flux"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a handwritten seven", "the digit 3", "0", "a handwritten 5"]
    images = pipe(prompts, height=16, width=16, max_sequence_length=16, negative_prompt="", true_cfg_scale=2.0,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (4, 3, 16, 16)
    judged = ds.zoo.load(JUDGE_NAME)(images.mean(1, keepdim=True)).argmax(-1)
    assert judged.tolist() == [7, 3, 0, 5]


def test_the_zoo_model_samples_labels_as_prompts_and_the_judge_agrees(flux):
    assert flux.prompts(torch.tensor([7, 10])) == ["the digit 7", ""]
    images = flux.generate(torch.arange(10).repeat(3), seed=0)
    assert images.shape == (30, 1, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1
    accuracy = ds.metrics.accuracy(ds.zoo.load(JUDGE_NAME), images, torch.arange(10).repeat(3))
    assert accuracy >= 0.9, accuracy  # the card measures 1,000 samples


def test_sdo_and_a_schedule_run_on_it(flux):
    sampler = flux.sampler(8)
    cond = flux.encode(torch.tensor([3, 3]))
    noise = flux.noise(2, torch.Generator().manual_seed(0))
    reward = ds.rewards.DigitClass(3)
    result = ds.optimize_latents(sampler, reward, noise, cond, iterations=3, lr=0.05, progress=False)
    assert len(result.history["reward"]) == 3
    schedule = ds.prune.calibrate(sampler, cond, macs=0.5)
    assert schedule.blocks[0].startswith("transformer_blocks") and len(schedule.blocks) == 12


def test_the_command_line_takes_it_by_name(tmp_path, capsys):
    code = cli.main(["sample", "--model", "digits-flux", "--labels", "0-9", "--n", "10", "--steps", "12",
                     "--out", str(tmp_path / "s")])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["accuracy_judge"] == JUDGE_NAME and metrics["accuracy"] >= 0.8


def test_an_unknown_name_lists_the_zoo_and_a_damaged_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="digits-flux"):
        ds.zoo.path("digits-sdxl")
    broken = tmp_path / "digits-flux"
    shutil.copytree(ds.zoo.path("digits-flux"), broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="digits-flux"):
        ds.zoo.load(broken)
