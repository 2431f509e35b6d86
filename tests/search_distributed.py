"""Run by tests/test_distributed.py under `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` (or
plainly, as one process): a pruner search on the tiny UNet, checkpointed every 2 iterations; the main process saves the
gates, every process its own copy. Arguments: OUT BATCH [--kill-at IT] [--resume]; with --kill-at, process 1 kills
itself (SIGKILL) after iteration IT, taking the launch down as a real failure would."""

import os
import signal
import sys

import torch
from safetensors.torch import save_file
from tiny_models import unet_case

import diffusion_shortcuts as ds
from diffusion_shortcuts import distributed

out, batch = sys.argv[1], int(sys.argv[2])
kill_at = int(sys.argv[sys.argv.index("--kill-at") + 1]) if "--kill-at" in sys.argv else None


def kill(event):
    if event["iteration"] == kill_at and distributed.process_index() == 1:
        os.kill(os.getpid(), signal.SIGKILL)


sampler, _, _ = unet_case(steps=4)
result = ds.prune.train_pruner(
    sampler, torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(9)), ratio=0.6, iterations=6,
    batch_size=batch, lr=2.0, optimizer="sgd", target_batch=2, sample_shape=(1, 8, 8),
    pruner_kwargs={"dim": 8, "heads": 2}, progress=False, checkpoint_dir=out, checkpoint_every=2,
    resume="--resume" in sys.argv, callback=kill)
gates = {k: v.detach().contiguous() for k, v in result.pruner.state_dict().items()}
save_file(gates, os.path.join(out, f"gates{distributed.process_index()}.safetensors"))
save_file({**{key: torch.tensor(result.history[key]) for key in ("loss", "ssim", "macs_ratio")},
           "schedule": result.schedule(0.6).reuse.to(torch.uint8)},
          os.path.join(out, f"history{distributed.process_index()}.safetensors"))
