"""The command line: outputs a person can use, one clear line and exit 2 on bad input."""

import json
import subprocess
import sys

import pytest
from tiny_models import tiny_unet
from diffusers import DDIMScheduler, DDPMPipeline

import diffusion_shortcuts as ds
from diffusion_shortcuts import cli


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sample_writes_grid_and_metrics(tmp_path, capsys):
    code, _, err = run(["sample", "--model", "digits-dit", "--labels", "0-9", "--n", "20", "--steps", "10",
                        "--seed", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n"] == 20 and metrics["seed"] == 1
    assert metrics["seconds"] > 0 and metrics["format_version"] == 1
    assert (tmp_path / "grid.png").stat().st_size > 100


@pytest.mark.parametrize("argv,needle", [
    (["sample", "--model", "digits-gan"], "digits-unet"),
    (["sample", "--model", "digits-dit", "--labels", "3-12"], "out of range"),
    (["sample", "--model", "digits-dit", "--labels", "three"], "--labels"),
    (["sample", "--model", "digits-classifier"], "classifier"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, needle):
    code, _, err = run([*argv, "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1


def test_unwritable_out_and_non_diffusers_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(["sample", "--model", "digits-dit", "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "not writable" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["sample", "--model", str(empty), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not a diffusers model" in err


def test_sample_from_a_local_diffusers_folder(tmp_path, capsys):
    pipe = DDPMPipeline(unet=tiny_unet(sample_size=8), scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.save_pretrained(tmp_path / "pipe")
    code, _, err = run(["sample", "--model", str(tmp_path / "pipe"), "--n", "4", "--steps", "3",
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["n"] == 4 and "accuracy" not in metrics  # unconditional: nothing to judge


def test_demo_writes_report(tmp_path, capsys):
    code, _, err = run(["demo", "--n", "10", "--steps", "50", "--iterations", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    generators = ("digits-unet", "digits-dit", "digits-flux")  # the flow-matching MMDiT beside the two others
    assert set(metrics["models"]) == {*generators, *(f"{name} (schedule 0.8)" for name in generators)}
    for name in generators:
        pruned = metrics["models"][f"{name} (schedule 0.8)"]
        assert pruned["macs_ratio"] < 0.25 and pruned["speedup"] > 0
    for picture in ("demo.png", "demo_pruned.png", "report.md", "before_after_sdo_pruned.png"):
        assert (tmp_path / picture).exists()
    report = (tmp_path / "report.md").read_text()
    assert "schedule 0.8" in report and "Both shortcuts" in report
    # the synergy figure from this run: SDO on the pruned model, against full backpropagation
    assert metrics["sdo_pruned"]["macs_ratio"] < 0.25 and metrics["sdo"]["macs_ratio"] == 1.0
    assert metrics["full_backprop_seconds_per_iteration"] > 0
    assert len(metrics["sdo_pruned"]["seconds_per_iteration"]) == 1


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "diffusion_shortcuts.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "sample" in out.stdout


def test_labels_parser():
    from diffusion_shortcuts.labels import parse_labels
    from diffusion_shortcuts.usage import UsageError

    assert parse_labels("0-3,7", 10) == [0, 1, 2, 3, 7]
    with pytest.raises(UsageError, match=r"--labels '9-10': labels out of range \[10\]; the model takes 0-9"):
        parse_labels("9-10", 10)


def test_optimize_writes_curve_before_after_latents(tmp_path, capsys):
    from safetensors.torch import load_file

    code, _, err = run(["optimize", "--model", "digits-dit", "--reward", "digit:3", "--iterations", "3", "--n", "2",
                        "--steps", "5", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["reward"]) == 3 and len(metrics["seconds_per_iteration"]) == 3
    assert 0 <= metrics["success_after"] <= 1 and metrics["error"] is None
    assert (tmp_path / "curve.png").exists() and (tmp_path / "before_after.png").exists()
    assert load_file(str(tmp_path / "latents.safetensors"))["latents"].shape == (2, 1, 16, 16)


def test_optimize_reference_reward_with_mask(tmp_path, capsys):
    from PIL import Image

    import numpy as np

    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "white.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:8] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, _, err = run(["optimize", "--model", "digits-dit", "--reward",
                        f"reference:{tmp_path / 'white.png'}:{tmp_path / 'mask.png'}", "--iterations", "3",
                        "--n", "1", "--steps", "4", "--lr", "0.2", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["reward_spec"].startswith("reference:") and len(metrics["reward"]) == 3
    assert metrics["final_reward"] > metrics["reward"][0]  # the masked half moved toward white
    reward = ds.rewards.from_spec(metrics["reward_spec"], ds.rewards.SpecContext((1, 16, 16)))
    assert reward.mask.sum() == 8 * 16  # the mask file's upper half, not the whole image
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "small.png")
    code, _, err = run(["optimize", "--model", "digits-dit", "--reward", f"reference:{tmp_path / 'small.png'}",
                        "--out", str(tmp_path / "o2")], capsys)
    assert code == 2 and "is 8x8 but the model makes 16x16 images" in err


@pytest.mark.parametrize("reward,needle", [("digit:12", "0-9"), ("clip:cat", "CLIP model folder cat does not exist"),
                                           ("bold:3", "unknown reward; known: clip:DIR[:TEXT]"),
                                           ("reference:/nonexistent.png", "cannot read image")])
def test_optimize_bad_reward(tmp_path, capsys, reward, needle):
    code, _, err = run(["optimize", "--model", "digits-dit", "--reward", reward, "--out", str(tmp_path)], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_prune_writes_schedule_pruner_heatmap_metrics_and_sample_uses_it(tmp_path, capsys):
    out = tmp_path / "p"
    code, _, err = run(["prune", "--model", "digits-dit", "--ratio", "0.5", "--steps", "6", "--iterations", "3",
                        "--samples", "20", "--gradient", "full", "--out", str(out)], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("macs_ratio", "speedup", "ssim", "psnr", "accuracy_full", "accuracy_pruned", "fid_full", "fid_pruned"):
        assert key in metrics, key
    schedule = ds.prune.CacheSchedule.load(out / "schedule.json")
    assert metrics["macs_ratio"] == pytest.approx(schedule.macs_ratio)
    assert schedule.num_steps == 6 and metrics["search_iterations"] == 3
    assert ds.prune.Pruner.from_pretrained(out / "pruner").config.num_steps == 6
    for picture in ("heatmap.png", "full_vs_pruned.png"):
        assert (out / picture).stat().st_size > 100
    # a killed search resumes; a finished one is not run again
    code, _, err = run(["prune", "--model", "digits-dit", "--ratio", "0.5", "--steps", "6", "--iterations", "3",
                        "--samples", "20", "--gradient", "full", "--resume", "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["search_iterations"] == 3

    code, _, err = run(["sample", "--model", "digits-dit", "--n", "10", "--steps", "6", "--schedule",
                        str(out / "schedule.json"), "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["macs_ratio"] == pytest.approx(schedule.macs_ratio)
    summary = json.loads((tmp_path / "s" / "metrics.json").read_text())["cache_summary"]
    assert summary["denoiser_calls"] == 6 * 1 and summary["block_calls_computed"] + summary["block_calls_reused"] == \
        6 * len(schedule.blocks)  # one batched call per step (10 samples in one batch)
    assert summary["block_calls_reused"] == int(schedule.reuse.sum())
    # made for 6 steps: 8 steps resample it (its cost reported); --strict-schedule refuses in one line
    code, _, err = run(["sample", "--model", "digits-dit", "--n", "10", "--steps", "8", "--schedule",
                        str(out / "schedule.json"), "--out", str(tmp_path / "s8")], capsys)
    assert code == 0, err
    resampled = json.loads((tmp_path / "s8" / "metrics.json").read_text())
    assert resampled["schedule_resampled_from"] == 6 and 0 < resampled["macs_ratio"] < 1
    code, _, err = run(["sample", "--model", "digits-dit", "--n", "10", "--steps", "8", "--schedule",
                        str(out / "schedule.json"), "--strict-schedule", "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "schedule has 6 steps, the sampler 8" in err
    code, _, err = run(["sample", "--model", "digits-unet", "--n", "10", "--steps", "6", "--schedule",
                        str(out / "schedule.json"), "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "--schedule" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,needle", [
    (["prune", "--model", "digits-dit", "--ratio", "1.5"], "--ratio"),
    (["prune", "--model", "digits-dit", "--gradient", "bogus"], "--gradient"),
    (["sample", "--model", "digits-dit", "--schedule", "missing.json"], "no such schedule"),
])
def test_prune_bad_input(tmp_path, capsys, argv, needle):
    code, _, err = run([*argv, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,needle", [
    (["finetune", "--model", "digits-dit", "--reward", "label", "--eval-samples", "1"], "--eval-samples"),
    (["finetune", "--model", "digits-dit", "--reward", "bold"], "unknown reward; known: clip:DIR[:TEXT], "
                                                                "aesthetic:DIR[:HEAD], pickscore:DIR, label, digit:N"),
    (["finetune", "--model", "digits-dit", "--reward", "label", "--ema", "1.5"], "ema"),
])
def test_finetune_bad_input(tmp_path, capsys, argv, needle):
    code, _, err = run([*argv, "--iterations", "1", "--steps", "2", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_sample_with_a_shipped_schedule_by_ratio(tmp_path, capsys):
    macs = {}
    for spec in ("zoo", "zoo:0.5"):
        code, _, err = run(["sample", "--model", "digits-dit", "--n", "4", "--schedule", spec,
                            "--out", str(tmp_path / spec.replace(":", "-"))], capsys)
        assert code == 0, err
        macs[spec] = json.loads((tmp_path / spec.replace(":", "-") / "metrics.json").read_text())["macs_ratio"]
    assert macs["zoo"] == pytest.approx(ds.zoo.load("digits-dit").cache_schedule(0.8).macs_ratio)
    assert macs["zoo:0.5"] == pytest.approx(ds.zoo.load("digits-dit").cache_schedule(0.5).macs_ratio)
    assert macs["zoo:0.5"] > macs["zoo"] + 0.2


def test_prune_against_a_reward_reports_it_and_refuses_a_resume_with_another_objective(tmp_path, capsys):
    out = tmp_path / "p"
    search = ["prune", "--model", "digits-dit", "--ratio", "0.5", "--steps", "4", "--iterations", "2", "--samples",
              "4", "--gradient", "full", "--checkpoint-every", "1", "--out", str(out)]
    code, _, err = run([*search, "--objective", "ssim+reward:digit:3:0.5"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"] == "ssim+reward:digit:3:0.5" and len(metrics["search_reward"]) == 2
    assert metrics["reward_full"] <= 0 and metrics["reward_pruned"] <= 0  # the reward classifier's log P(3)
    code, _, err = run([*search, "--resume", "--objective", "reward:digit:3"], capsys)
    assert code == 2 and "objective: checkpoint 'ssim+reward:digit:3:0.5', this run 'reward:digit:3'" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run([*search[:-1], str(tmp_path / "q"), "--objective", "reward:bold:3"], capsys)
    assert code == 2 and "--objective reward:bold:3" in err and len(err.strip().splitlines()) == 1
    # from the rule, validated against it on as many fresh samples as asked, by the reward
    code, _, err = run([*search[:-1], str(tmp_path / "v"), "--objective", "reward:digit:3", "--start-every", "2",
                        "--validation", "3"], capsys)
    assert code == 0, err
    validation = json.loads((tmp_path / "v" / "metrics.json").read_text())["search_validation"]
    assert validation["samples"] == 3 and validation["objective"] == "reward:digit:3"
    assert validation["kept"] in ("start", "searched")
