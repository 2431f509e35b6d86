"""Run by tests/test_finetune.py under `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`:
fine-tune a tiny UNet's LoRA for a few iterations and save each process's adapter."""

import sys

import torch
from tiny_models import tiny_cond_unet
from diffusers import DDIMScheduler
from safetensors.torch import save_file

import diffusion_shortcuts as ds

out, batch = sys.argv[1], int(sys.argv[2])
model = tiny_cond_unet()
sampler = ds.Sampler(model, DDIMScheduler(num_train_timesteps=1000, clip_sample=False), 4, guidance_scale=2.0,
                     uncond=torch.zeros(1, 3, 8), decode=lambda x: x / 2 + 0.5)
ds.add_lora(model, rank=2)
result = ds.finetune(sampler, lambda images, cond: images.mean(dim=(1, 2, 3)),
                     torch.randn(3, 3, 8, generator=torch.Generator().manual_seed(0)), noise_shape=(1, 8, 8),
                     iterations=3, batch_size=batch, lr=0.5, optimizer="sgd", grad_clip=None,
                     progress=False)
from accelerate import PartialState  # noqa: E402

save_file({k: v.detach().contiguous() for k, v in result.trainable.items()},
          f"{out}/rank{PartialState().process_index}.safetensors")
