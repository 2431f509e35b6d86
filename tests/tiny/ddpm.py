"""A DDPM/DDIM pixel UNet with no conditioning."""

import torch
from diffusers import DDIMPipeline, DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tiny_models import tiny_unet

from tiny import Tiny


def ddpm_pipeline():
    return DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False))


def noise(dtype):
    return randn_tensor((2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=dtype).float()


def stock(tiny, pipe, latents, steps, dtype, output_type):
    """DDIMPipeline draws its noise from its generator and returns images only ("np" fails on bfloat16 images)."""
    return pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, eta=0.0,
                output_type="pt").images.float()


TINY = Tiny("ddpm-unet", "ddpm-unet", ddpm_pipeline, (1, 8, 8),
            ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"], guidance={}, stock=stock,
            noise=noise)
