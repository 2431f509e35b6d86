"""DiT: a class-conditional learned-variance transformer on ImageNet's 1000 classes (DiTPipeline hard-codes the null
class 1000), a tiny AutoencoderKL."""

import torch
from diffusers import DDIMScheduler, DiTPipeline
from diffusers.utils.torch_utils import randn_tensor
from tiny_models import tiny_dit, tiny_vae

from tiny import Tiny

LABELS = [1, 7]


def dit_pipeline():
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    return DiTPipeline(transformer=tiny_dit(in_channels=4, num_classes=1000), vae=tiny_vae(), scheduler=scheduler)


def noise(dtype):
    """The stock call draws its noise in the model's dtype from its generator: the same here."""
    return randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(3), dtype=dtype).float()


def stock(tiny, pipe, latents, steps, dtype, output_type):
    """DiTPipeline takes labels and a generator, not latents, and returns decoded images only."""
    return pipe(LABELS, guidance_scale=tiny.guidance["guidance_scale"], generator=torch.Generator().manual_seed(3),
                num_inference_steps=steps, output_type="pt").images.float()


TINY = Tiny("dit", "dit", dit_pipeline, (4, 8, 8), ["transformer_blocks.0", "transformer_blocks.1"], stock=stock,
            noise=noise, conditions=torch.tensor(LABELS))
