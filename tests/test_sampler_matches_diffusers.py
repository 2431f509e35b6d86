"""With gradient=None the Sampler reproduces diffusers' own pipelines (max abs difference < 1e-5)."""

import torch
from conftest import tiny_cond_unet, tiny_dit, tiny_unet, tiny_vae
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
