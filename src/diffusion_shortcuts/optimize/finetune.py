"""Reward fine-tuning of a denoiser's weights or a LoRA adapter, with any gradient policy (SDO by default).

Each iteration draws fresh noise and the next conditions, samples with the policy (SDO: the graph of one
randomly chosen step, arXiv 2505.07477; ``Truncated(k)`` is DRaFT-K, ``RandomTruncated`` AlignProp), and
takes one optimizer step on ``-mean reward``. Noise, conditions and the policy's random step derive from
``(seed, iteration)``, so a run resumed from its checkpoint reaches the same weights as one never stopped.

Two KL-free regularisers: ``base_weight`` adds ``base_weight * mean (x - x_base)^2``, the distance of each
sample to the base model's sample from the same noise and condition (the base weights are swapped in for
one no-grad rollout), and ``ema`` keeps an exponential moving average of the trained weights (diffusers'
``EMAModel``) that is evaluated and returned. A :class:`~.heldout.HeldOut` set is evaluated every few
iterations so that reward hacking (collapse) shows.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import conditions as C
from .. import gradients as G
from ..checkpoints import load_matching, save_atomically
from ..metrics import Timer
from ..rewards.base import check_reward_output
from .heldout import HeldOut

CHECKPOINT = "finetune_checkpoint.pt"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class FinetuneError(RuntimeError):
    """A non-finite reward, loss or gradient; the last checkpoint is left as it was."""


@dataclass
class FinetuneResult:
    """``model`` holds the final weights (the EMA's when ``ema`` was set); ``history`` has the training
    rewards and seconds per iteration, and ``history["eval"]`` the held-out figures."""

    model: torch.nn.Module
    trainable: dict[str, torch.nn.Parameter]
    history: dict = field(default_factory=dict)
    ema: object | None = None


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


@contextmanager
def swapped_in(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]):
    """Temporarily give ``params`` the ``values`` (base weights, EMA weights); restored on exit."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


def finetune(sampler, reward: Callable, conditions, noise_shape: tuple[int, ...] | None = None, params="lora",
             gradient: G.GradientPolicy | str | None = None, iterations: int = 100, batch_size: int = 4,
             lr: float = 1e-3, optimizer: str = "adamw", grad_clip: float | None = 1.0, warmup: int = 0,
             seed: int = 0, encode: Callable | None = None, base_weight: float = 0.0, ema: float | None = None,
             heldout: HeldOut | None = None, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 10,
             resume: bool = False, progress: bool = True, callback=None, accelerator=None) -> FinetuneResult:
    """Fine-tune ``sampler.model`` in place to raise ``reward(images, conditions)``.

    Args:
        conditions: conditions cycled through (a tensor batch, a dict of them or a list), or None. The reward receives
            them as given; the sampler receives ``encode(conditions)`` when ``encode`` is set (labels or
            prompts -> embeddings), else the conditions themselves.
        noise_shape: one sample's latent shape (C, H, W); default: the sampler's ``sample_shape``.
        params: ``"lora"`` (the model's adapter, see :func:`add_lora`), ``"all"``, or a callable
            ``(name, param) -> bool``.
        gradient: the policy (default ``Shortcut(step="random")``, SDO).
        warmup: iterations of linear learning-rate warm-up (diffusers' ``constant_with_warmup``).
        base_weight: weight of ``mean (x - x_base)^2``, the distance to the base model's samples. The
            starting values of the trained parameters are kept (one more copy of them, also in checkpoints).
        ema: decay of an exponential moving average of the trained weights (e.g. 0.99), or None. With it,
            held-out evaluation uses the EMA weights and the model ends with them.
        heldout: a :class:`HeldOut` set evaluated before the first iteration, every ``heldout.every``
            iterations and after the last, into ``history["eval"]`` (main process only).
        callback: called after each iteration with ``{"iteration", "reward", "seconds"}`` (seconds of
            training so far); returning True stops the run there (a time budget, early stopping).
        accelerator: an ``accelerate.Accelerator`` (made here when None). Under ``accelerate launch
            --num_processes P`` every process draws the same global batch of ``batch_size * P`` samples,
            samples its own slice, and the gradients are averaged across processes: P processes reach the
            weights one process reaches with the P-fold batch. Only the main process writes checkpoints.
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    policy = G.resolve(gradient) if gradient is not None else G.Shortcut(step="random")
    if iterations < 1 or batch_size < 1 or warmup < 0:
        raise ValueError("iterations and batch_size must be >= 1 and warmup >= 0")
    if base_weight < 0 or (ema is not None and not 0 < ema < 1):
        raise ValueError(f"base_weight must be >= 0 and ema in (0, 1), got {base_weight} and {ema}")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    model = sampler.model
    noise_shape = noise_shape if noise_shape is not None else sampler.sample_shape
    if noise_shape is None:
        raise ValueError("noise_shape: the model's configuration has no sample size; pass noise_shape=(C, H, W)")
    noise_shape = tuple(noise_shape)
    trainable = _select(model, params)
    base = {n: p.detach().clone() for n, p in trainable.items()} if base_weight else None
    settings = {"params": params if isinstance(params, str) else "callable", "gradient": repr(policy),
                "iterations": iterations, "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "seed": seed,
                "warmup": warmup, "base_weight": base_weight, "ema": ema}
    opt = (torch.optim.AdamW(trainable.values(), lr=lr, weight_decay=0.0) if optimizer == "adamw"
           else torch.optim.SGD(trainable.values(), lr=lr))
    lr_schedule = get_scheduler("constant_with_warmup", opt, num_warmup_steps=warmup)
    averaged = EMAModel(trainable.values(), decay=ema) if ema is not None else None
    history = {"settings": settings, "reward": [], "seconds": [], "eval": []}
    start = 0
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        if resume and ckpt.exists():
            state = load_matching(ckpt, settings)
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(state["params"][n])
            opt.load_state_dict(state["optimizer"])
            lr_schedule.load_state_dict(state["lr_schedule"])
            if averaged is not None:
                averaged.load_state_dict(state["ema"])
            torch.set_rng_state(state["rng"])
            if base is not None:  # the weights the run started from, not whatever the model holds now
                base = state["base"]
            history, start = state["history"], state["iteration"]
    n_cond = C.count(conditions)
    model.train(False)
    device = next(iter(trainable.values())).device

    def evaluate(done: int) -> None:
        if heldout is None or not accelerator.is_main_process:
            return
        with swapped_in(trainable, dict(zip(trainable, averaged.shadow_params))) if averaged is not None else nullcontext():
            figures = heldout.evaluate(sampler, reward, encode)
        history["eval"].append({"iteration": done, "seconds": sum(history["seconds"]), **figures})

    if start == 0:
        evaluate(0)
    bar = tqdm(range(start, iterations), desc="finetune", disable=not progress or not accelerator.is_main_process,
               initial=start, total=iterations)
    for it in bar:
        step_seed = seed * 1_000_003 + it
        gen = torch.Generator().manual_seed(step_seed)
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        noise = torch.randn((batch_size * world, *noise_shape), generator=gen)[mine].to(device)
        rows = ((it * batch_size * world + torch.arange(batch_size * world)) % n_cond)[mine]
        cond = C.take(conditions, rows)
        model_cond = encode(cond) if encode is not None and cond is not None else cond
        with Timer() as timer:
            if base is not None:  # the base model's samples from the same noise, condition and scheduler noise
                with swapped_in(trainable, base), torch.no_grad():
                    base_images = sampler(noise, model_cond, generator=torch.Generator().manual_seed(step_seed))
            images = sampler(noise, model_cond, gradient=policy, generator=gen)
            rewards = check_reward_output(reward(images, cond), len(images), "reward")
            loss = -rewards.mean()
            if base is not None:
                loss = loss + base_weight * (images - base_images).square().mean()
            if not torch.isfinite(loss):
                raise FinetuneError(f"iteration {it}: non-finite reward or loss; the last checkpoint is left as it was")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # the mean over processes: the gradient of the mean loss of the global batch
                for p in trainable.values():
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
            grads = [p.grad for p in trainable.values() if p.grad is not None]
            if any(not torch.isfinite(g).all() for g in grads):
                raise FinetuneError(f"iteration {it}: non-finite gradient; the last checkpoint is left as it was")
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable.values(), grad_clip)
            opt.step()
            lr_schedule.step()
            if averaged is not None:
                averaged.step(trainable.values())
        mean_reward = rewards.detach().mean()
        history["reward"].append(float(accelerator.reduce(mean_reward, reduction="mean") if world > 1 else mean_reward))
        history["seconds"].append(timer.seconds)
        bar.set_postfix(reward=f"{history['reward'][-1]:.4g}", refresh=False)
        done = it + 1
        stop = callback is not None and callback({"iteration": it, "reward": history["reward"][-1],
                                                  "seconds": sum(history["seconds"])}) is True
        if done % (heldout.every if heldout else iterations) == 0 or done == iterations or stop:
            evaluate(done)
        if ckpt is not None and accelerator.is_main_process and (done % checkpoint_every == 0 or done == iterations):
            save_atomically({"params": {n: p.detach().clone() for n, p in trainable.items()},
                             "optimizer": opt.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                             "ema": averaged.state_dict() if averaged is not None else None,
                             "rng": torch.get_rng_state(), "base": base, "history": history, "iteration": done,
                             "settings": settings}, ckpt)
        if stop:
            break
    bar.close()
    if averaged is not None:
        averaged.copy_to(trainable.values())
    return FinetuneResult(model, trainable, history, averaged)
