"""Reward fine-tuning of a denoiser's weights or a LoRA adapter, with any gradient policy (SDO by default).

Each iteration draws fresh noise and the next conditions, samples with the policy (SDO: the graph of one
randomly chosen step, arXiv 2505.07477; ``Truncated(k)`` is DRaFT-K, ``RandomTruncated`` AlignProp), and
takes one optimizer step on ``-mean reward``. Noise, conditions and the policy's random step derive from
``(seed, iteration)``, so a run resumed from its checkpoint reaches the same weights as one never stopped.

Still to come (issue 6): held-out evaluation, EMA and the base-sample regulariser, the benchmark.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import gradients as G
from ..metrics import Timer
from ..rewards.base import check_reward_output

CHECKPOINT = "finetune_checkpoint.pt"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class FinetuneError(RuntimeError):
    """A non-finite reward, loss or gradient; the last checkpoint is left as it was."""


@dataclass
class FinetuneResult:
    model: torch.nn.Module
    trainable: dict[str, torch.nn.Parameter]
    history: dict = field(default_factory=dict)


def add_lora(model: torch.nn.Module, rank: int = 4, alpha: float | None = None,
             target_modules=LORA_TARGETS, seed: int = 0) -> list[str]:
    """Inject a LoRA adapter through peft (``add_adapter`` where the model has it, ``inject_adapter_in_model``
    where not), initialised from ``seed``; returns the names of the adapter's parameters, kept in float32."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules),
                        init_lora_weights="gaussian")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(model, "add_adapter"):
            model.add_adapter(config)
        else:
            inject_adapter_in_model(config, model)
    names = [n for n, p in model.named_parameters() if "lora_" in n]
    if not names:
        raise ValueError(f"no LoRA target modules {list(target_modules)} in {type(model).__name__}")
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            p.data = p.data.float()
    return names


def save_lora(model: torch.nn.Module, path: str | Path) -> Path:
    """The adapter alone, as safetensors (peft's state-dict naming)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(path))
    return Path(path)


def load_lora(model: torch.nn.Module, path: str | Path, rank: int, alpha: float | None = None,
              target_modules=LORA_TARGETS) -> torch.nn.Module:
    """Put an adapter saved by :func:`save_lora` onto a base model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    add_lora(model, rank, alpha, target_modules)
    result = set_peft_model_state_dict(model, load_file(str(path)))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}: adapter keys the model does not have: {result.unexpected_keys[:3]}")
    return model


def _select(model, params) -> dict[str, torch.nn.Parameter]:
    named = dict(model.named_parameters())
    if params == "all":
        chosen = list(named)
    elif params == "lora":
        chosen = [n for n in named if "lora_" in n]
        if not chosen:
            raise ValueError("params='lora' but the model has no LoRA adapter: call add_lora(model) first")
    elif callable(params):
        chosen = [n for n, p in named.items() if params(n, p)]
    else:
        raise ValueError(f"params must be 'lora', 'all' or a callable (name, param) -> bool, got {params!r}")
    if not chosen:
        raise ValueError("params selected no parameters")
    for n, p in named.items():
        p.requires_grad_(n in chosen)
    return {n: named[n] for n in chosen}


def finetune(sampler, reward: Callable, conditions, noise_shape: tuple[int, ...], params="lora",
             gradient: G.GradientPolicy | str | None = None, iterations: int = 100, batch_size: int = 4,
             lr: float = 1e-3, optimizer: str = "adamw", grad_clip: float | None = 1.0, seed: int = 0,
             checkpoint_dir: str | Path | None = None, checkpoint_every: int = 10, resume: bool = False,
             progress: bool = True, callback=None, accelerator=None) -> FinetuneResult:
    """Fine-tune ``sampler.model`` in place to raise ``reward(images, cond)``.

    Args:
        conditions: conditioning rows cycled through (a tensor batch), or None.
        noise_shape: one sample's latent shape (C, H, W).
        params: ``"lora"`` (the model's adapter, see :func:`add_lora`), ``"all"``, or a callable
            ``(name, param) -> bool``.
        gradient: the policy (default ``Shortcut(step="random")``, SDO).
        accelerator: an ``accelerate.Accelerator`` (made here when None). Under ``accelerate launch
            --num_processes P`` every process draws the same global batch of ``batch_size * P`` samples,
            samples its own slice, and the gradients are averaged across processes: P processes reach the
            weights one process reaches with the P-fold batch. Only the main process writes checkpoints.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    policy = G.resolve(gradient) if gradient is not None else G.Shortcut(step="random")
    if iterations < 1 or batch_size < 1:
        raise ValueError("iterations and batch_size must be >= 1")
    model = sampler.model
    trainable = _select(model, params)
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    optimizer_name = optimizer
    optimizer = (torch.optim.AdamW(trainable.values(), lr=lr, weight_decay=0.0) if optimizer == "adamw"
                 else torch.optim.SGD(trainable.values(), lr=lr))
    settings = {"params": params if isinstance(params, str) else "callable", "gradient": repr(policy),
                "iterations": iterations, "batch_size": batch_size, "lr": lr, "optimizer": optimizer_name, "seed": seed}
    history = {"settings": settings, "reward": [], "seconds": []}
    start = 0
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        if resume and ckpt.exists():
            state = torch.load(ckpt, weights_only=False)
            if state["settings"] != settings:
                changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
                raise ValueError(f"{ckpt}: checkpoint was made with other settings ({', '.join(changed)})")
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(state["params"][n])
            optimizer.load_state_dict(state["optimizer"])
            history, start = state["history"], state["iteration"]
    n_cond = len(conditions) if conditions is not None else 1
    model.train(False)
    device = next(iter(trainable.values())).device
    bar = tqdm(range(start, iterations), desc="finetune", disable=not progress or not accelerator.is_main_process,
               initial=start, total=iterations)
    for it in bar:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + it)
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        noise = torch.randn((batch_size * world, *noise_shape), generator=gen)[mine].to(device)
        rows = ((it * batch_size * world + torch.arange(batch_size * world)) % n_cond)[mine]
        cond = conditions[rows.to(conditions.device)] if conditions is not None else None
        with Timer() as timer:
            images = sampler(noise, cond, gradient=policy, generator=gen)
            rewards = check_reward_output(reward(images, cond), len(images), "reward")
            loss = -rewards.mean()
            if not torch.isfinite(loss):
                raise FinetuneError(f"iteration {it}: non-finite reward; the last checkpoint is left as it was")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # the mean over processes: the gradient of the mean reward of the global batch
                for p in trainable.values():
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
            grads = [p.grad for p in trainable.values() if p.grad is not None]
            if any(not torch.isfinite(g).all() for g in grads):
                raise FinetuneError(f"iteration {it}: non-finite gradient; the last checkpoint is left as it was")
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable.values(), grad_clip)
            optimizer.step()
        mean_reward = rewards.detach().mean()
        history["reward"].append(float(accelerator.reduce(mean_reward, reduction="mean") if world > 1 else mean_reward))
        history["seconds"].append(timer.seconds)
        if callback is not None:
            callback({"iteration": it, "reward": history["reward"][-1]})
        done = it + 1
        if ckpt is not None and accelerator.is_main_process and (done % checkpoint_every == 0 or done == iterations):
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"params": {n: p.detach().clone() for n, p in trainable.items()},
                        "optimizer": optimizer.state_dict(), "history": history, "iteration": done,
                        "settings": settings}, tmp)
            os.replace(tmp, ckpt)
    return FinetuneResult(model, trainable, history)
