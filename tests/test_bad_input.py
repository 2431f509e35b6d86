"""Every kind of bad input gets one clear line naming the argument, exit status 2, and leaves nothing
behind; the library's own entry points raise errors that name the argument."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_cond_unet, tiny_dit, unet_case, unet_sampler
from diffusers import DDIMScheduler

import diffusion_shortcuts as ds
from diffusion_shortcuts import cli
from diffusion_shortcuts.checkpoints import CheckpointError
from diffusion_shortcuts.zoo import ZOO_DIR


def damaged_zoo(tmp_path: Path, how: str) -> Path:
    folder = tmp_path / f"dit-{how}"
    shutil.copytree(ZOO_DIR / "digits-dit", folder, ignore=shutil.ignore_patterns("dipgo"))
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "random":
        weights.write_bytes(os.urandom(5000))
    elif how == "missing":
        weights.unlink()
    elif how == "json":
        (folder / "zoo.json").write_text("{not json")
    return folder


def schedule_file(tmp_path: Path, reuse_value) -> Path:
    data = json.loads((ZOO_DIR / "digits-dit" / "dipgo" / "schedule-0.8.json").read_text())
    data["reuse"][3][2] = reuse_value
    path = tmp_path / "bad-schedule.json"
    path.write_text(json.dumps(data))
    return path


# (argv, the words the one line must hold); {tmp} is the test's folder
CASES = [
    # damaged model folders
    *[(["sample", "--model", f"{{tmp}}/dit-{how}"], "damaged model folder") for how in
      ("truncated", "empty", "random", "missing")],
    (["sample", "--model", "{tmp}/dit-json"], "zoo.json: not valid JSON"),
    # step counts
    (["sample", "--model", "digits-dit", "--steps", "-1"], "--steps: must be >= 1"),
    (["sample", "--model", "digits-dit", "--steps", "0"], "--steps: must be >= 1"),
    (["sample", "--model", "digits-dit", "--steps", "1001"], "--steps: must be <= 1000"),
    (["demo", "--steps", "5"], "--steps 5: the demo compares with the zoo's shipped schedules"),
    # non-finite and out-of-range numbers
    (["optimize", "--model", "digits-dit", "--reward", "digit:3", "--lr", "nan"], "--lr: expected a finite number"),
    (["optimize", "--model", "digits-dit", "--reward", "digit:3", "--lr", "-1"], "--lr: must be > 0"),
    (["sample", "--model", "digits-dit", "--guidance", "nan"], "--guidance: expected a finite number"),
    (["prune", "--model", "digits-dit", "--ratio", "1.5"], "--ratio: must be < 1"),
    (["prune", "--model", "digits-dit", "--start-every", "0"], "--start-every: must be >= 1"),
    (["sample", "--model", "digits-unet", "--schedule", "zoo:0.3"], "ships 0.5, 0.7, 0.8, 0.85"),
    (["sample", "--model", "digits-unet", "--schedule", "zoo:fast"], "zoo:RATIO takes a number"),
    (["prune", "--model", "digits-dit", "--start-every", "often"], "--start-every: expected a number of steps or auto"),
    (["finetune", "--model", "digits-dit", "--reward", "label", "--ema", "1.5"], "--ema: must be < 1"),
    (["finetune", "--model", "digits-dit", "--reward", "label", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["finetune", "--model", "digits-dit", "--reward", "label", "--checkpoint-every", "-1"], "--checkpoint-every"),
    # flags that act only beside another
    (["prune", "--model", "digits-dit", "--start-from", "{tmp}/none.json"], "--start-from: "),
    (["prune", "--model", "digits-dit", "--start-from", "full", "--validation", "16"],
     "--validation needs --start-every or --start-from: it compares the searched table with the table"),
    (["finetune", "--model", "digits-dit", "--reward", "label", "--refit-iterations", "5"],
     "--refit-iterations needs --schedule: it sets the search that refits"),
    (["sample", "--model", "digits-dit", "--strict-schedule"], "--strict-schedule needs --schedule"),
    (["prune", "--model", "digits-dit", "--calibrate-only", "--iterations", "5"],
     "--calibrate-only takes no --iterations: a calibration searches nothing"),
    (["prune", "--model", "digits-dit", "--calibration-batch", "4"], "--calibration-batch needs --calibrate-only"),
    (["prune", "--model", "digits-dit", "--start-every", "3", "--start-from", "full"],
     "--start-every takes no --start-from: both say where the search starts; give one"),
    (["prune", "--model", "digits-dit", "--calibrate-only", "--calibration-batch", "16"],
     "the calibration set has 10 conditions, fewer than the batch of 16"),
    # checkpoints
    (["finetune", "--model", "digits-dit", "--reward", "label", "--resume"], "--resume: no checkpoint"),
    (["finetune", "--model", "digits-dit", "--reward", "label", "--resume", "--out", "{tmp}/corrupt"],
     "finetune_checkpoint.pt: not a readable checkpoint"),
    # rewards
    (["optimize", "--model", "digits-dit", "--reward", "digit:12"], "--reward 'digit:12'"),
    (["optimize", "--model", "digits-dit", "--reward", "reference:{tmp}/small.png"],
     "is 8x8 but the model makes 16x16"),
    # sizes
    (["sample", "--model", "digits-dit", "--n", "200000000"], "--n: must be <= 100000"),
    (["sample", "--model", "digits-dit", "--labels", "0-20000000"], "--labels '0-20000000': a range of"),
    # files
    (["sample", "--model", "digits-dit", "--schedule", "{tmp}"], "a folder, not a schedule file"),
    (["sample", "--model", "digits-dit", "--schedule", "{tmp}/bad-schedule.json"], "reuse entries must be 0/1"),
    (["sample", "--model", "digits-dit", "--out", ""], "--out: an empty path"),
]


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(c[0][:4]) for c in CASES])
def test_bad_input_is_one_line_naming_it_and_leaves_nothing(tmp_path, capsys, argv, needle):
    for how in ("truncated", "empty", "random", "missing", "json"):
        damaged_zoo(tmp_path, how)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "finetune_checkpoint.pt").write_bytes(b"\x00not a checkpoint")
    schedule_file(tmp_path, 7)
    from PIL import Image
    Image.new("L", (8, 8), 255).save(tmp_path / "small.png")
    argv = [a.format(tmp=tmp_path) for a in argv]
    out = tmp_path / "new-out"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert not out.exists()  # a folder made for the run is removed when the input is refused


def test_metrics_json_is_always_valid_json(tmp_path, capsys):
    from diffusion_shortcuts.checkpoints import write_json

    write_json(tmp_path / "m.json", {"x": float("nan")})
    json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "shared"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "diffusion_shortcuts.cli", "finetune", "--model", "digits-dit",
                              "--reward", "label", "--steps", "10", "--iterations", "200", "--out", str(out)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = out / ".diffusion-shortcuts.lock"
        deadline = time.time() + 60
        while not lock.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert lock.exists()
        second = subprocess.run([sys.executable, "-m", "diffusion_shortcuts.cli", "sample", "--model", "digits-dit",
                                 "--n", "2", "--steps", "2", "--out", str(out)], env=env, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        assert f"another run (process {first.pid}) is using this folder" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()
    # the killed run's lock is stale: the next run takes the folder over
    assert cli.main(["sample", "--model", "digits-dit", "--n", "2", "--steps", "2", "--out", str(out)]) == 0
    assert not (out / ".diffusion-shortcuts.lock").exists()


def test_ctrl_c_is_one_line_saying_where_the_checkpoint_is(tmp_path, capsys, monkeypatch):
    """Before the first checkpoint there is nothing to --resume: the line says to run the command again without it;
    after one, it names the checkpoint and --resume."""
    from diffusion_shortcuts import reports

    def interrupted(out, *args, **kwargs):
        if kwargs.get("iterations") == 7:  # the second run: a checkpoint was written before the Ctrl-C
            (out / "finetune_checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(reports, "finetune_report", interrupted)
    argv = ["finetune", "--model", "digits-dit", "--reward", "label", "--out", str(tmp_path / "o")]
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1
    assert f"nothing was checkpointed yet in {tmp_path / 'o'}: run the same command (without --resume)" in err[0]
    code = cli.main([*argv, "--iterations", "7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1
    assert f"the last checkpoint is {tmp_path / 'o' / 'finetune_checkpoint.pt'}: run the same command with " \
           "--resume to continue" in err[0]


# ---- the library's entry points -------------------------------------------------------------------------

def refit_with(**settings):
    """A refit of a rule table on the tiny UNet, with ``settings``."""
    sampler, noise, cond = unet_case(steps=4)
    rule = ds.prune.CacheSchedule.every(sampler.timesteps, ds.prune.profile(sampler.model, noise, cond), 2, warmup=1)
    return ds.prune.refit(sampler, rule, cond, iterations=1, progress=False, **settings)


@pytest.mark.parametrize("call,error,needle", [
    (lambda: unet_sampler()(torch.zeros(0, 1, 8, 8), torch.zeros(0, 3, 8)), ValueError, "B >= 1"),
    (lambda: unet_sampler()(torch.full((1, 1, 8, 8), float("nan")), torch.zeros(1, 3, 8)), ValueError,
     "1 * 1 * 8 * 8 non-finite".replace("1 * 1 * 8 * 8", "64")),
    (lambda: unet_sampler()(torch.zeros(1, 1, 8, 8), torch.zeros(1, 3, 5)), ValueError,
     "embeddings of width 5, but the model's cross-attention takes 8"),
    (lambda: unet_sampler()(torch.zeros(1, 1, 8, 8), None), ValueError,
     "cond: UNet2DConditionModel needs conditioning"),
    (lambda: ds.Sampler(tiny_dit(), DDIMScheduler(num_train_timesteps=1000), 3)(torch.zeros(1, 2, 8, 8),
                                                                               torch.tensor([11])),
     ValueError, "class labels [11] out of range 0-10"),
    (lambda: unet_sampler(guidance_scale=float("nan"), uncond=torch.zeros(1, 3, 8)), ValueError, "guidance_scale"),
    (lambda: ds.Sampler(tiny_cond_unet(), DDIMScheduler(num_train_timesteps=1000), 1001), ValueError,
     "num_inference_steps=1001 is more than the scheduler's 1000"),
    (lambda: ds.zoo.load("digits-unet").sampler(0), ValueError, "num_inference_steps must be an int >= 1, got 0"),
    (lambda: ds.optimize_latents(unet_sampler(), lambda images, cond: torch.ones(len(images)),
                                 torch.zeros(1, 1, 8, 8), torch.zeros(1, 3, 8), iterations=1, progress=False),
     ValueError, "does not depend on the images"),
    (lambda: ds.gradients.resolve("truncated:x"), ValueError, "gradient: truncated needs a positive integer"),
    (lambda: ds.rewards.from_spec("digit:x"), ValueError, "reward 'digit:x': expected digit:N"),
    *[(lambda v=v: ds.prune.train_pruner(*unet_case(steps=3)[::2], 0.5, iterations=1, validation=v, progress=False),
       ValueError, f"validation must be a whole number >= 1, got {v}") for v in (0, -2)],
    (lambda: refit_with(validation=0), ValueError, "validation must be a whole number >= 1, got 0"),
    (lambda: ds.prune.parse_objective(None), ValueError,
     "objective must be ssim, latent, reward:SPEC or ssim+reward:SPEC:W (a string), got None"),
])
def test_library_errors_name_the_argument(call, error, needle):
    with pytest.raises(error) as info:
        call()
    assert needle in str(info.value)


def test_float64_latents_need_a_float64_model():
    """float64 latents on a float32 model were silently run (the model in float32, the scheduler in float64: slow on
    GPUs, and not what was asked); now refused. On a float64 model (finite-difference checks) they run."""
    sampler = unet_sampler()
    with pytest.raises(ValueError, match="latents are float64: pass float32 latents"):
        sampler(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8))
    sampler.model.double()
    out = sampler(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_a_foreign_checkpoint_is_refused_naming_the_file(tmp_path):
    sampler = unet_sampler(decode=lambda x: x / 2 + 0.5)
    ds.add_lora(sampler.model, rank=2)
    torch.save({"settings": {}, "iteration": 1, "something": "else"}, tmp_path / "finetune_checkpoint.pt")
    with pytest.raises(CheckpointError, match="finetune_checkpoint.pt: the checkpoint was made with other settings"):
        ds.finetune(sampler, lambda images, cond: images.mean((1, 2, 3)), torch.zeros(2, 3, 8), iterations=1,
                    noise_shape=(1, 8, 8), checkpoint_dir=tmp_path, resume=True, progress=False)
