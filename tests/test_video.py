"""Video end to end on the tiny random video pipelines: MP4s and contact sheets, video quality measures, rewards by
frames with the partial decode (which VAEs allow it, and the gradient through it), SDO's gradients on video, and the
three verbs on a Wan pipeline folder from the command line, bad input included."""

import numpy as np
import pytest
import torch
from tiny import MAIN
from tiny.wan import flow_euler, wan_pipeline
from cli_runs import metrics_of, run
from tiny_pipelines import PROMPTS, clip_model_folder

import diffusion_shortcuts as ds
from diffusion_shortcuts import conditions as C
from diffusion_shortcuts.families import family_of
from diffusion_shortcuts.pipelines import load_pipeline
from diffusion_shortcuts.metrics import frame_psnr, frame_ssim, latent_distance, psnr, quality_to, ssim, temporal_error
from diffusion_shortcuts.rewards.frames import ByFrames, FrameScoring, parse_frames
from diffusion_shortcuts.videos import contact_sheet, read_video, save_video, shown_frames

VIDEO_FAMILIES = sorted(name for name, tiny in MAIN.items() if len(tiny.sample_shape) == 4)  # (C, F, H, W)
SMALL = ["--height", "16", "--width", "16", "--frames", "9", "--steps", "3"]


def moving_square(frames: int = 9, size: int = 16, batch: int = 1) -> torch.Tensor:
    """(B, 3, F, H, W): a bright square moving right by one pixel a frame on a dark ground."""
    video = torch.full((batch, 3, frames, size, size), 0.1)
    for f in range(frames):
        video[:, :, f, 4:9, f:f + 5] = 0.9
    return video


# ---- files and pictures ---------------------------------------------------------------------------------------

def test_a_video_is_written_as_an_mp4_that_reads_back_frame_for_frame(tmp_path):
    video = moving_square()[0]
    path = save_video(video, tmp_path / "square.mp4", fps=8)
    assert path.is_file() and not list(tmp_path.glob(".*"))  # written whole, no partial file left
    back = read_video(path)
    assert back.shape == video.shape
    assert float(psnr(back[None].transpose(1, 2), video[None].transpose(1, 2)).mean()) > 25  # lossy H.264, close
    with pytest.raises(ValueError, match="cannot read video"):
        (tmp_path / "broken.mp4").write_bytes(b"not a video")
        read_video(tmp_path / "broken.mp4")


def test_a_contact_sheet_shows_a_few_frames_of_each_video_one_row_each():
    assert shown_frames(9, 4) == [0, 3, 5, 8] and shown_frames(3, 4) == [0, 1, 2]
    one = contact_sheet(moving_square(batch=1))
    three = contact_sheet(moving_square(batch=3), captions=["a", "b", "c"])
    assert three.width == one.width and three.height > 3 * one.height  # three rows, each with its caption above
    frame_width = (one.width - 2) // 4
    assert frame_width >= 48  # 16-pixel frames are enlarged to be seen


# ---- quality measures ------------------------------------------------------------------------------------------

def test_video_quality_is_measured_frame_by_frame_and_in_motion():
    reference = moving_square(batch=2)
    noisy = (reference + 0.05 * torch.randn(reference.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    per_frame = frame_ssim(noisy, reference)
    assert per_frame.shape == (2, 9)
    assert torch.allclose(ssim(noisy, reference), per_frame.mean(1))
    assert torch.allclose(psnr(noisy, reference), frame_psnr(noisy, reference).mean(1))
    brighter = reference + 0.05  # every frame wrong, the motion exactly right
    assert float(temporal_error(brighter, reference).max()) < 1e-6 and float(psnr(brighter, reference)[0]) < 30
    frozen = reference[:, :, :1].expand_as(reference)  # the first frame held: a cache that stops the motion
    assert float(temporal_error(frozen, reference).min()) > 0.01
    figures = quality_to(noisy, reference)
    assert len(figures["ssim_per_frame"]) == 9 and figures["temporal_error"] > 0
    z = torch.randn(2, 16, 3, 2, 2)
    assert torch.allclose(latent_distance(2 * z, z), torch.ones(2))
    with pytest.raises(ValueError, match="two .B, C, F, H, W. videos"):
        temporal_error(reference[:, :, 0], reference[:, :, 0])


# ---- the partial decode ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VIDEO_FAMILIES)
def test_which_video_vaes_decode_a_prefix_of_latent_frames_alone(name):
    """A family marked ``prefix_decode`` decodes its first k latent frames to exactly the whole video's first frames
    (so a reward on early frames decodes only those); the others' decoders look at later latent frames, and are not
    marked."""
    pipe = MAIN[name].build()
    family = family_of(pipe.transformer)
    decode, _ = family.codec(pipe)
    shape = list(MAIN[name].sample_shape)
    latents = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    axis = family.frame_axis()
    with torch.no_grad():
        whole = decode(latents)
        prefix = decode(latents.narrow(axis, 0, 2))
    same = torch.allclose(whole[:, :, :prefix.shape[2]], prefix, atol=1e-5)
    assert same == family.prefix_decode, f"{name}: prefix decodes {'alike' if same else 'differently'}"


def wan_float64(steps: int = 3):
    """The tiny Wan pipeline in float64 on a one-step flow scheduler, decoding through its VAE."""
    pipe = wan_pipeline()
    sampler = ds.Sampler.from_pipeline(pipe, num_inference_steps=steps, guidance_scale=3.0, sample_shape=(16, 3, 2, 2),
                                       prompt_options={"max_sequence_length": 12})
    cond, uncond = sampler.encode_prompt(PROMPTS[:1]), sampler.uncond
    pipe.to(torch.float64)
    decode, _ = family_of(pipe.transformer).codec(pipe)

    def to64(c):
        return C.tree_map(lambda t: t.double() if t.is_floating_point() else t, c)

    sampler = ds.Sampler(pipe.transformer, flow_euler(pipe), steps, 3.0, decode=decode, uncond=to64(uncond),
                         sample_shape=(16, 3, 2, 2))
    noise = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return pipe, sampler, to64(cond), noise


def frame_reward(images, cond=None):
    weights = torch.linspace(-1, 1, images[0].numel(), dtype=images.dtype).view(images.shape[1:])
    return (images * weights).flatten(1).sum(1) + 0.3 * images.square().flatten(1).mean(1)


def test_the_first_frame_decodes_one_latent_frame_and_scores_what_the_whole_decode_would():
    pipe, sampler, cond, noise = wan_float64()
    scoring = FrameScoring("first", 9, 4, prefix_decode=True)
    scored, reward = scoring.sampler(sampler), scoring.reward(frame_reward)
    video = scored(noise, cond, gradient=ds.gradients.Shortcut())  # the gradient flows: the partial decode
    assert video.shape[2] == 1 and scoring.decoded_latent_frames == 1
    with torch.no_grad():
        whole = sampler(noise, cond)
    assert whole.shape[2] == 9
    assert torch.allclose(reward(video.detach(), None), frame_reward(whole[:, :, 0]), atol=1e-8)
    assert torch.allclose(reward(whole, None), frame_reward(whole[:, :, 0]))  # a whole video: its first frame

    k = FrameScoring(3, 9, 4, prefix_decode=True, seed=1)
    drawn = [k.frames(grad=True) for _ in range(20)]
    assert all(len(f) == 3 == len(set(f)) and 0 <= min(f) and max(f) < 9 for f in drawn)
    assert len({tuple(f) for f in drawn}) > 5  # drawn afresh
    assert k.frames(grad=False) == list(range(9))  # without gradient: every frame
    assert k.latent_frames_needed(0) == 1 and k.latent_frames_needed(4) == 2 and k.latent_frames_needed(5) == 3
    by_frames = ByFrames(frame_reward)
    assert torch.allclose(by_frames(whole, None), torch.stack([frame_reward(whole[:, :, f]) for f in range(9)]).mean(0))


def test_sdo_on_video_shortcut_equals_its_closed_form_and_full_equals_finite_differences_through_the_partial_decode():
    """The reward on the frames a partial decode gives (frames 0 and 3 of 9: two of three latent frames decoded):
    Shortcut's gradient is the first step's Jacobian on the rest's linear skip path (its closed form); Full's equals
    central finite differences; both the same with the blocks checkpointed."""
    pipe, sampler, cond, noise = wan_float64()

    class Fixed(FrameScoring):
        def frames(self, grad):
            return [0, 3] if grad else list(range(self.num_frames))

    scoring = Fixed(2, 9, 4, prefix_decode=True)
    scored, reward = scoring.sampler(sampler), scoring.reward(frame_reward)

    def gradient(policy):
        x = noise.clone().requires_grad_(True)
        reward(scored(x, cond, gradient=policy), None).sum().backward()
        return x.grad

    shortcut = gradient(ds.gradients.Shortcut())
    assert scoring.decoded_latent_frames == 2

    with torch.no_grad():
        final = sampler.decode  # the closed form: g at the final latents through the same partial decode
        _, z = sampler(noise, cond, return_latents=True)
    z = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(reward(final(z.narrow(2, 0, 2))[:, :, [0, 3]], None).sum(), z)
    sched = sampler.fresh_scheduler(latent_shape=tuple(noise.shape))
    tail = 1.0
    for t in sched.timesteps[1:]:
        probe = sampler.fresh_scheduler(latent_shape=tuple(noise.shape))
        probe.set_begin_index(int((probe.timesteps == t).nonzero()[0]))
        tail *= float(probe.step(torch.zeros(1, dtype=torch.float64), t, torch.ones(1, dtype=torch.float64))
                      .prev_sample)
    first = sampler.fresh_scheduler(latent_shape=tuple(noise.shape))
    first.set_begin_index(0)
    x0 = noise.clone().requires_grad_(True)
    t0 = first.timesteps[0]
    x1 = first.step(sampler.predict(x0, t0, cond), t0, x0).prev_sample
    (closed,) = torch.autograd.grad(x1, x0, grad_outputs=tail * g)
    assert float((shortcut - closed).norm() / closed.norm()) < 1e-6

    full = gradient(ds.gradients.Full())
    direction = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h, tolerance = 3e-3, 1e-3  # the flow scheduler steps in float32: a step well above its rounding
    with torch.enable_grad():  # the partial decode is what the gradient sees: measure through it, without a graph
        plus = reward(scored(noise + h * direction, cond, gradient=ds.gradients.Full()), None).sum().item()
        minus = reward(scored(noise - h * direction, cond, gradient=ds.gradients.Full()), None).sum().item()
    numeric = (plus - minus) / (2 * h)
    assert abs(float((full * direction).sum()) - numeric) / abs(numeric) < tolerance

    pipe.transformer.enable_gradient_checkpointing()
    try:
        assert torch.allclose(gradient(ds.gradients.Shortcut()), shortcut, rtol=1e-9, atol=1e-12)
    finally:
        pipe.transformer.disable_gradient_checkpointing()


def test_on_wans_unipc_sampler_shortcut_moves_the_noise_and_vaders_last_step_cannot():
    """Truncated(K) cuts the latent before the last K steps; UniPC's corrector mixes the previous sample into the
    step after the cut, and the cut must hold there too (it did not: the stored sample carried the gradient past it,
    0.79 at most into the noise under truncated:2)."""
    pipe = wan_pipeline()
    sampler = ds.Sampler.from_pipeline(pipe, num_inference_steps=6, guidance_scale=3.0, sample_shape=(16, 3, 2, 2),
                                       prompt_options={"max_sequence_length": 12})
    cond = sampler.encode_prompt(PROMPTS[:1])
    scoring = FrameScoring("first", 9, 4, prefix_decode=True)
    scored, reward = scoring.sampler(sampler), scoring.reward(frame_reward)
    noise = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    grads = {}
    for spec in ("shortcut", "truncated:1", "truncated:2"):
        x = noise.clone().requires_grad_(True)
        value = reward(scored(x, cond, gradient=spec), None).sum()
        grads[spec] = torch.autograd.grad(value, x, allow_unused=True)[0]
    assert grads["truncated:1"] is None and grads["truncated:2"] is None  # no path to the noise at all
    assert float(grads["shortcut"].abs().max()) > 0
    with pytest.raises(ValueError, match="gradient truncated:2 gives the latents no gradient"):
        ds.optimize_latents(scored, reward, noise, cond, iterations=1, gradient="truncated:2", progress=False)


def test_a_few_sdo_iterations_on_the_first_frame_raise_the_reward():
    pipe, sampler, cond, noise = wan_float64()
    scoring = FrameScoring("first", 9, 4, prefix_decode=True)
    result = ds.optimize_latents(scoring.sampler(sampler), scoring.reward(frame_reward), noise, cond, iterations=4,
                                 lr=0.1, progress=False)
    rewards = result.history["reward"]
    assert rewards[-1] > rewards[0]
    assert result.images.shape[2] == 9  # the result is decoded whole


def test_the_search_with_checkpointed_blocks_computes_what_it_computes_without():
    pipe = wan_pipeline()
    sampler = ds.Sampler.from_pipeline(pipe, num_inference_steps=4, guidance_scale=3.0, sample_shape=(16, 3, 2, 2),
                                       prompt_options={"max_sequence_length": 12})
    cond = sampler.encode_prompt(PROMPTS)
    searches = []
    for checkpointed in (False, True):
        if checkpointed:
            pipe.transformer.enable_gradient_checkpointing()
        result = ds.prune.train_pruner(sampler, cond, 0.5, iterations=3, batch_size=2, training_set=2, target_batch=2,
                                       validation=1, objective=ds.prune.Objective("latent"), progress=False)
        searches.append((result.history["loss"], result.pruner.keep_scores(False).detach()))
    (plain_loss, plain_scores), (checkpointed_loss, checkpointed_scores) = searches
    assert np.allclose(plain_loss, checkpointed_loss, rtol=1e-6)
    assert torch.allclose(plain_scores, checkpointed_scores, atol=1e-3)  # Adam magnifies float32 recompute noise


def test_parse_frames_names_what_is_wrong():
    assert parse_frames(None, 9) is None and parse_frames("first", 9) == "first" and parse_frames("3", 9) == 3
    for text, num_frames, needle in (("20", 9, "the videos have 9 frames"), ("0", 9, "give 1 to 9"),
                                     ("some", 9, "takes `first` or a number"), ("2", None, "makes images")):
        with pytest.raises(ValueError, match=needle):
            parse_frames(text, num_frames)


# ---- the command line on a Wan folder --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    wan_pipeline().save_pretrained(root / "wan")
    (root / "clip").mkdir()
    clip_model_folder(root / "clip")
    return root


def test_sample_writes_playable_videos_and_a_contact_sheet(folders, tmp_path, capsys):
    prompts = ["--prompt", "a red car", "--prompt", "a blue house"]
    code, err = run(["sample", "--model", folders / "wan", *prompts, *SMALL, "--n", "3", "--fps", "8",
                     "--out", tmp_path / "s"], capsys)
    assert code == 0, err
    metrics = metrics_of(tmp_path / "s")
    assert metrics["frames"] == 9 and metrics["fps"] == 8 and metrics["sheet"] == "sheet.png"
    assert [p for p in metrics["videos"]] == [f"videos/video_{i:03d}.mp4" for i in range(3)]
    for name in metrics["videos"]:
        assert read_video(tmp_path / "s" / name).shape == (3, 9, 16, 16)
    assert (tmp_path / "s" / "sheet.png").is_file()


def test_an_interrupted_sample_keeps_the_videos_it_finished(folders, tmp_path, capsys, monkeypatch):
    import diffusion_shortcuts.videos as videos

    written = videos.save_videos
    calls = []

    def interrupted_at_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return written(*args, **kwargs)

    monkeypatch.setattr(videos, "save_videos", interrupted_at_the_second_batch)
    code, err = run(["sample", "--model", folders / "wan", *PROMPTS_FLAGS, *SMALL, "--n", "8", "--out",
                     tmp_path / "s"], capsys)
    assert code == 130, err
    kept = sorted(p.name for p in (tmp_path / "s" / "videos").iterdir())
    assert kept == [f"video_{i:03d}.mp4" for i in range(4)]  # the first batch of 4, whole
    assert all(read_video(tmp_path / "s" / "videos" / name).shape[1] == 9 for name in kept)


def test_optimize_finetune_and_prune_run_on_a_video_pipeline(folders, tmp_path, capsys):
    reward = ["--reward", f"clip:{folders / 'clip'}"]
    code, err = run(["optimize", "--model", folders / "wan", *PROMPTS_FLAGS, *SMALL, *reward, "--n", "2",
                     "--iterations", "2", "--reward-frames", "first", "--block-checkpointing", "--out",
                     tmp_path / "o"], capsys)
    assert code == 0, err
    metrics = metrics_of(tmp_path / "o")
    assert metrics["reward_frames"] == "first" and len(metrics["reward"]) == 2
    assert len(metrics["videos"]["before"]) == len(metrics["videos"]["after"]) == 2
    assert all(np.isfinite(r) for r in metrics["reward"])

    code, err = run(["finetune", "--model", folders / "wan", *PROMPTS_FLAGS, *SMALL, *reward, "--iterations", "2",
                     "--batch-size", "1", "--rank", "2", "--eval-every", "2", "--eval-samples", "2",
                     "--reward-frames", "2", "--out", tmp_path / "f"], capsys)
    assert code == 0, err
    assert (tmp_path / "f" / "lora" / "pytorch_lora_weights.safetensors").is_file()

    code, err = run(["prune", "--model", folders / "wan", *PROMPTS_FLAGS, *SMALL, "--iterations", "2",
                     "--samples", "2", "--ratio", "0.5", "--block-checkpointing", "--out", tmp_path / "p"], capsys)
    assert code == 0, err
    metrics = metrics_of(tmp_path / "p")
    assert metrics["objective"] == "latent" and len(metrics["ssim_per_frame"]) == 9
    assert metrics["temporal_error"] >= 0 and metrics["latent_distance"] >= 0
    assert [read_video(tmp_path / "p" / v).shape for v in metrics["videos"]] == [(3, 9, 16, 32)] * 2  # full | pruned


PROMPTS_FLAGS = ["--prompt", "a red car"]


def test_a_search_at_fewer_frames_gives_a_schedule_priced_and_compared_at_the_sampled_frames(folders, tmp_path,
                                                                                                capsys):
    code, err = run(["prune", "--model", folders / "wan", *PROMPTS_FLAGS, "--height", "16", "--width", "16",
                     "--steps", "3", "--frames", "13", "--search-frames", "5", "--iterations", "2", "--samples", "2",
                     "--ratio", "0.5", "--out", tmp_path / "p"], capsys)
    assert code == 0, err
    metrics = metrics_of(tmp_path / "p")
    assert metrics["search_frames"] == 5 and metrics["frames"] == 13 and len(metrics["ssim_per_frame"]) == 13
    schedule = ds.prune.CacheSchedule.load(tmp_path / "p" / "schedule.json")
    pipe = load_pipeline(folders / "wan", height=16, width=16, frames=13)
    cond = pipe.sampler(3).encode_prompt(["a red car"])
    sampled = ds.prune.profile(pipe.model, torch.zeros(1, *pipe.sample_shape), cond)  # 4 latent frames, not 2
    assert schedule.total_macs == sampled.total_macs
    assert metrics["macs_ratio"] == pytest.approx(schedule.macs_ratio) and schedule.macs_ratio < 1  # priced there

    for argv, needle in ((["--frames", "13", "--search-frames", "6"], "--search-frames 6: wan's VAE takes 4k + 1"),):
        code, err = run(["prune", "--model", folders / "wan", *PROMPTS_FLAGS, "--height", "16", "--width", "16",
                         *argv, "--out", tmp_path / "refused"], capsys)
        assert code == 2 and needle in err, err
    code, err = run(["prune", "--model", "digits-dit", "--search-frames", "5", "--out", tmp_path / "refused"], capsys)
    assert code == 2 and "--search-frames: digits-dit makes images, not videos" in err, err
    assert not (tmp_path / "refused").exists()


def test_video_flags_on_what_cannot_take_them_are_one_line_and_write_nothing(folders, tmp_path, capsys):
    reward = ["--reward", f"clip:{folders / 'clip'}"]
    wan = ["optimize", "--model", folders / "wan", *PROMPTS_FLAGS, *SMALL, *reward, "--iterations", "1"]
    refusals = [
        ([*wan, "--reward-frames", "12"], "--reward-frames 12: the videos have 9 frames; give 1 to 9 or `first`"),
        ([*wan, "--reward-frames", "last"], "--reward-frames takes `first` or a number of frames, got 'last'"),
        (["optimize", "--model", "digits-unet", "--reward", "digit:3", "--reward-frames", "first"],
         "--reward-frames: the model makes images, not videos (digits-unet)"),
        (["sample", "--model", folders / "wan", *PROMPTS_FLAGS, "--frames", "8"], "--frames 8: wan's VAE takes 4k + 1"),
        (["sample", "--model", "digits-unet", "--frames", "9"], "--frames: digits-unet makes images, not videos"),
    ]
    for argv, needle in refusals:
        code, err = run([*argv, "--out", tmp_path / "refused"], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "refused").exists()
