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

import dataclasses
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import conditions as C
from .. import distributed
from .. import gradients as G
from ..checkpoints import Checkpoint, configured, make_optimizer, settings_of
from ..loop import LoopState, iteration_generator, run_loop
from ..metrics import Timer
from ..rewards.base import check_reward_output, reward_name
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


def load_lora_file(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Put an adapter saved by :func:`save_lora` (or ``finetune``'s ``adapter.safetensors``) onto a base model, its
    rank read from the file (alpha = rank, as :func:`add_lora` made it). A file that is no adapter is a ValueError
    naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            ranks = [f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_A" in k]
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable adapter file ({exc})") from None
    if not ranks:
        raise ValueError(f"{path}: holds no LoRA weights (no lora_A tensors)")
    return load_lora(model, path, rank=ranks[0])


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


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of a fine-tuning run (:func:`finetune` takes it, or its fields as keywords); a checkpoint is
    matched on all of them. The last fields are derived from the objects the run is given (the sampler, the reward,
    the trained parameters).

    Attributes:
        noise_shape: one sample's latent shape (C, H, W); default: the sampler's ``sample_shape``.
        params: ``"lora"`` (the model's adapter, see :func:`add_lora`), ``"all"``, or a callable
            ``(name, param) -> bool`` (recorded as ``"callable"``).
        gradient: the policy or its spec; ``"shortcut:random"`` (``Shortcut(step="random")``) is SDO.
        iterations, batch_size, lr, optimizer, grad_clip: the optimizer's run (the gradient norm clipped to
            ``grad_clip``, None for none).
        warmup: iterations of linear learning-rate warm-up (diffusers' ``constant_with_warmup``).
        seed: every iteration's noise, conditions and sampler draws follow ``(seed, iteration)``.
        base_weight: weight of ``mean (x - x_base)^2``, the distance to the base model's samples. The
            starting values of the trained parameters are kept (one more copy of them, also in checkpoints).
        ema: decay of an exponential moving average of the trained weights (e.g. 0.99), or None. With it,
            held-out evaluation uses the EMA weights and the model ends with them.
    """

    noise_shape: tuple[int, ...] | None = None
    params: str | Callable = "lora"
    gradient: str | G.GradientPolicy = "shortcut:random"
    iterations: int = 100
    batch_size: int = 4
    lr: float = 1e-3
    optimizer: str = "adamw"
    grad_clip: float | None = 1.0
    warmup: int = 0
    seed: int = 0
    base_weight: float = 0.0
    ema: float | None = None
    sampler: dict = field(default_factory=dict, metadata={"derived": True})
    reward: str = field(default="", metadata={"derived": True})
    trainable_parameters: int = field(default=0, metadata={"derived": True})
    # processes sharing each iteration's batch (accelerate launch): a resume with another count is refused
    num_processes: int = field(default=1, metadata={"derived": True})


class _Params:
    """The trained parameters as a checkpointable object (state_dict / load_state_dict)."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.params):
            raise ValueError(f"other parameters ({len(state)} saved, {len(self.params)} trained)")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state[n])


def _check_finetune_args(config: FinetuneConfig) -> None:
    if config.iterations < 1 or config.batch_size < 1 or config.warmup < 0:
        raise ValueError("iterations and batch_size must be >= 1 and warmup >= 0")
    if config.base_weight < 0 or (config.ema is not None and not 0 < config.ema < 1):
        raise ValueError(f"base_weight must be >= 0 and ema in (0, 1), got {config.base_weight} and {config.ema}")
    if config.noise_shape is None:
        raise ValueError("noise_shape: the model's configuration has no sample size; pass noise_shape=(C, H, W)")


def finetune(sampler, reward: Callable, conditions, config: FinetuneConfig | None = None, *,
             encode: Callable | None = None, heldout: HeldOut | None = None, checkpoint_dir: str | Path | None = None,
             checkpoint_every: int = 10, resume: bool = False, progress: bool = True, callback=None,
             accelerator=None, **settings) -> FinetuneResult:
    """Fine-tune ``sampler.model`` in place to raise ``reward(images, conditions)``.

    Args:
        conditions: conditions cycled through (a tensor batch, a dict of them or a list), or None. The reward receives
            them as given; the sampler receives ``encode(conditions)`` when ``encode`` is set (labels or
            prompts -> embeddings), else the conditions themselves.
        config / settings: a :class:`FinetuneConfig`, and any of its fields as keywords over it
            (``finetune(sampler, reward, labels, iterations=50, params="lora")``).
        heldout: a :class:`HeldOut` set evaluated before the first iteration, every ``heldout.every``
            iterations and after the last, into ``history["eval"]`` (main process only).
        checkpoint_dir / checkpoint_every / resume: an atomic checkpoint (weights, optimizer, warm-up
            schedule, EMA, RNG, history) every ``checkpoint_every`` iterations; ``resume`` continues from it
            and refuses one made with other settings (:class:`FinetuneConfig`), naming the first difference.
        callback: ``callback(event)`` after each iteration (the loop kit's contract, :mod:`diffusion_shortcuts.loop`:
            ``iteration``, ``elapsed`` (seconds of training so far), ``reward``, ``seconds``); returning True stops
            the run there (a time budget, early stopping).
        accelerator: an ``accelerate.Accelerator`` (made here when None). Under ``accelerate launch
            --num_processes P`` every process draws the same global batch of ``batch_size * P`` samples,
            samples its own slice, and the gradients are averaged across processes: P processes reach the
            weights one process reaches with the P-fold batch. Only the main process writes checkpoints.
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    config = configured(FinetuneConfig, config, settings)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    policy = G.resolve(config.gradient)
    if policy is None:
        raise ValueError("gradient: fine-tuning needs a gradient policy, e.g. Shortcut(step='random'), got None")
    noise_shape = config.noise_shape if config.noise_shape is not None else sampler.sample_shape
    config = dataclasses.replace(config, noise_shape=tuple(noise_shape) if noise_shape is not None else None)
    _check_finetune_args(config)
    trainable = _select(sampler.model, config.params)
    config = dataclasses.replace(
        config, params=config.params if isinstance(config.params, str) else "callable", gradient=policy.spec,
        sampler=sampler.describe(), reward=reward_name(reward),
        trainable_parameters=sum(p.numel() for p in trainable.values()), num_processes=accelerator.num_processes)
    opt = make_optimizer(config.optimizer, trainable.values(), config.lr)
    run = _Run(sampler, reward, conditions, encode, policy, config, trainable, heldout, accelerator,
               opt=opt, lr_schedule=get_scheduler("constant_with_warmup", opt, num_warmup_steps=config.warmup),
               averaged=EMAModel(trainable.values(), decay=config.ema) if config.ema is not None else None)
    checkpoint = Checkpoint(checkpoint_dir, CHECKPOINT, settings_of(config), checkpoint_every, resume)
    run_loop(run, config.iterations, checkpoint, desc="finetune", progress=progress, callback=callback,
             main_process=accelerator.is_main_process)
    if run.averaged is not None:
        run.averaged.copy_to(trainable.values())
    return FinetuneResult(sampler.model, trainable, run.history, run.averaged)


class _Run(LoopState):
    """The state of one fine-tuning run and its iteration (see :func:`finetune`)."""

    def __init__(self, sampler, reward, conditions, encode, policy, config: FinetuneConfig, trainable, heldout,
                 accelerator, opt, lr_schedule, averaged):
        self.sampler, self.reward, self.conditions, self.encode = sampler, reward, conditions, encode
        self.policy, self.config, self.trainable, self.heldout = policy, config, trainable, heldout
        self.accelerator, self.opt, self.lr_schedule, self.averaged = accelerator, opt, lr_schedule, averaged
        self.base = {n: p.detach().clone() for n, p in trainable.items()} if config.base_weight else None
        self.history = {"settings": settings_of(config), "reward": [], "seconds": [], "eval": []}
        self.n_cond = C.count(conditions)
        self.device = next(iter(trainable.values())).device
        sampler.model.train(False)

    def objects(self) -> dict:
        return {"params": _Params(self.trainable), "optimizer": self.opt, "lr_schedule": self.lr_schedule,
                "ema": self.averaged}

    def saved(self) -> dict:
        return {"base": self.base, "history": self.history}

    def restore(self, state: dict) -> None:
        if self.base is not None:  # the weights the run started from, not whatever the model holds now
            self.base = state["base"]
        self.history = state["history"]

    def begin(self, first: int) -> None:
        if first == 0:
            self.evaluate(0)

    def after(self, done: int, stopping: bool) -> None:
        if done % (self.heldout.every if self.heldout else self.config.iterations) == 0 or \
                done == self.config.iterations or stopping:
            self.evaluate(done)

    def postfix(self, record: dict) -> dict:
        return {"reward": f"{record['reward']:.4g}"}

    def evaluate(self, done: int) -> None:
        if self.heldout is None or not self.accelerator.is_main_process:
            return
        averaged = self.averaged
        swap = swapped_in(self.trainable, dict(zip(self.trainable, averaged.shadow_params))) if averaged else \
            nullcontext()
        with swap:
            figures = self.heldout.evaluate(self.sampler, self.reward, self.encode)
        self.history["eval"].append({"iteration": done, "seconds": sum(self.history["seconds"]), **figures})

    def batch(self, it: int):
        """Noise and conditions of iteration ``it``: this process's slice of the global batch."""
        cfg = self.config
        size, mine = cfg.batch_size * cfg.num_processes, distributed.my_slice(cfg.batch_size)
        gen = iteration_generator(cfg.seed, it)
        noise = torch.randn((size, *cfg.noise_shape), generator=gen)[mine].to(self.device)
        rows = ((it * size + torch.arange(size)) % self.n_cond)[mine]
        return noise, C.take(self.conditions, rows), gen

    def step(self, it: int) -> dict:
        cfg = self.config
        noise, cond, gen = self.batch(it)
        model_cond = self.encode(cond) if self.encode is not None and cond is not None else cond
        with Timer() as timer:
            if self.base is not None:  # the base model's samples from the same noise, condition and scheduler noise
                with swapped_in(self.trainable, self.base), torch.no_grad():
                    base_images = self.sampler(noise, model_cond, generator=iteration_generator(cfg.seed, it))
            images = self.sampler(noise, model_cond, gradient=self.policy, generator=gen)
            rewards = check_reward_output(self.reward(images, cond), len(images), "reward")
            if images.requires_grad:
                self._update(it, images, rewards, base_images if self.base is not None else None)
            else:  # the graph step ran none of the trained weights: a cache schedule reused them all there
                self.history.setdefault("no_gradient_iterations", []).append(it)
            self.lr_schedule.step()
            if self.averaged is not None:
                self.averaged.step(self.trainable.values())
        self.history["reward"].append(float(distributed.mean(rewards.detach().mean())))
        self.history["seconds"].append(timer.seconds)
        return {"reward": self.history["reward"][-1], "seconds": timer.seconds}

    def _update(self, it: int, images: torch.Tensor, rewards: torch.Tensor, base_images) -> None:
        """One optimizer step on ``-mean reward`` (plus the distance to the base model's images).

        An iteration whose images carry no gradient does not come here: under a cache schedule the graph
        step's call may run none of the trained weights (every block reused there); it counts (reward,
        seconds, learning-rate schedule) without an update, listed in ``history["no_gradient_iterations"]``.
        """
        cfg = self.config
        if not rewards.requires_grad:
            raise ValueError(f"reward {reward_name(self.reward)} does not depend on the images (its value carries "
                             "no gradient): it cannot train the model")
        loss = -rewards.mean()
        if base_images is not None:
            loss = loss + cfg.base_weight * (images - base_images).square().mean()
        if not torch.isfinite(loss):
            raise FinetuneError(f"iteration {it}: non-finite reward or loss; the last checkpoint is left as it was")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._reduce_and_check(it)
        self.opt.step()

    def _reduce_and_check(self, it: int) -> None:
        distributed.average_gradients(self.trainable.values())  # the gradient of the global batch's mean loss
        grads = [p.grad for p in self.trainable.values() if p.grad is not None]
        if any(not torch.isfinite(g).all() for g in grads):
            raise FinetuneError(f"iteration {it}: non-finite gradient; the last checkpoint is left as it was")
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable.values(), self.config.grad_clip)
