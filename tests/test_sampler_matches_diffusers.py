"""With gradient=None the Sampler reproduces diffusers' own pipelines (max abs difference < 1e-5)."""

import torch
from tiny_models import tiny_cond_unet, tiny_dit, tiny_unet, tiny_vae
from diffusers import (DDIMPipeline, DDIMScheduler, DiTPipeline, DPMSolverMultistepScheduler,
                       StableDiffusionPipeline)
from diffusers.utils.torch_utils import randn_tensor

import diffusion_shortcuts as ds


def test_ddim_pipeline_match():
    unet = tiny_unet()
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    noise = randn_tensor((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    ref = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=12, eta=0.0,
               output_type="np").images
    ours = ds.Sampler.from_pipeline(pipe, num_inference_steps=12)(noise).clamp(0, 1)
    ours = ours.permute(0, 2, 3, 1).numpy()
    assert abs(ours - ref).max() < 1e-5


def _tiny_sd_pipeline(scheduler):
    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=tiny_cond_unet(in_channels=4, cross_dim=8),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def test_stable_diffusion_pipeline_match_latents_and_images():
    pipe = _tiny_sd_pipeline(DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False))
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randn(2, 5, 8, generator=gen)
    negative = torch.randn(2, 5, 8, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    kwargs = dict(prompt_embeds=prompt, negative_prompt_embeds=negative, num_inference_steps=10,
                  guidance_scale=5.0, height=16, width=16)
    ref_latents = pipe(latents=noise.clone(), output_type="latent", **kwargs).images
    ref_images = pipe(latents=noise.clone(), output_type="pt", **kwargs).images
    sampler = ds.Sampler.from_pipeline(pipe, num_inference_steps=10, guidance_scale=5.0, uncond=negative)
    images, latents = sampler(noise, prompt, return_latents=True)
    assert (latents - ref_latents).abs().max() < 1e-5
    assert (images.clamp(0, 1) - ref_images).abs().max() < 1e-5


def test_dit_pipeline_match_with_learned_sigma():
    # DiTPipeline hard-codes the null class 1000, so this DiT has ImageNet's 1000 classes.
    dit = tiny_dit(in_channels=4, learned_sigma=True, num_classes=1000)
    pipe = DiTPipeline(transformer=dit, vae=tiny_vae(), scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000))
    labels = [1, 7]
    ref = pipe(labels, guidance_scale=4.0, generator=torch.Generator().manual_seed(3), num_inference_steps=8,
               output_type="pt").images
    noise = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    sampler = ds.Sampler.from_pipeline(pipe, num_inference_steps=8, guidance_scale=4.0)
    assert sampler.uncond.tolist() == [1000]
    images = sampler(noise, torch.tensor(labels))
    assert (images.clamp(0, 1) - ref).abs().max() < 1e-5


def test_pixart_pipeline_match_with_dict_conditioning():
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=8, sample_size=8, patch_size=2, caption_channels=8, norm_type="ada_norm_single",
        use_additional_conditions=False, norm_num_groups=2).eval()
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                               scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False))
    gen = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    mask = torch.ones(2, 5)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    ref = pipe(prompt=None, negative_prompt=None, prompt_embeds=prompt, prompt_attention_mask=mask,
               negative_prompt_embeds=negative, negative_prompt_attention_mask=mask, latents=noise.clone(),
               num_inference_steps=6, guidance_scale=4.5, output_type="latent", height=16, width=16,
               use_resolution_binning=False).images
    sampler = ds.Sampler.from_pipeline(pipe, num_inference_steps=6,
                                       uncond={"encoder_hidden_states": negative, "encoder_attention_mask": mask})
    _, latents = sampler(noise, {"encoder_hidden_states": prompt, "encoder_attention_mask": mask},
                         return_latents=True)
    assert (latents - ref).abs().max() < 1e-5


def test_ddim_inversion_round_trip_improves_with_steps():
    unet = tiny_unet(seed=2)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 8, 8, generator=gen)
    errors = {}
    for steps in (10, 100):
        sampler = ds.Sampler(unet, DDIMScheduler(num_train_timesteps=1000, clip_sample=False),
                             steps, decode=lambda x: x / 2 + 0.5, encode=lambda im: im * 2 - 1)
        for depth in (0.5, 0.75):  # fraction of the steps left to run after inversion
            to_step = int(steps * depth)
            latent = sampler.invert(images, to_step=to_step)
            recon = sampler(latent, start_step=to_step)
            errors[steps, depth] = (recon - images).abs().max().item()
    # A random network is far from smooth along the trajectory, so deep inversion drifts; the error must
    # still shrink with more steps (the discretisation error of eq. 13) and with a shallower inversion.
    assert errors[100, 0.75] < 0.02
    assert errors[100, 0.5] < errors[10, 0.5] and errors[100, 0.75] < errors[10, 0.75]
    assert errors[100, 0.75] < errors[100, 0.5]


def test_the_callback_sees_every_step_with_the_schedulers_x0_estimate():
    unet = tiny_unet()
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sampler = ds.Sampler(unet, scheduler, 5)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    final = sampler(noise, callback=seen.append)
    assert [s["i"] for s in seen] == list(range(5)) and torch.equal(seen[-1]["x"], final)
    reference = DDIMScheduler.from_config(scheduler.config)
    reference.set_timesteps(5)
    x = noise
    for state, t in zip(seen, reference.timesteps):
        with torch.no_grad():
            out = reference.step(unet(x, t).sample, t, x)
        torch.testing.assert_close(state["denoised"], out.pred_original_sample)
        x = out.prev_sample
