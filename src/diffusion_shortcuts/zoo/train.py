"""Train a zoo model from scratch on the digits data: ``python -m diffusion_shortcuts.zoo.train NAME --out DIR``.

NAME is one of ``digits-classifier``, ``digits-classifier-eval``, ``digits-unet``, ``digits-dit``.
Training is seeded and runs on the CPU; the generators are trained with the epsilon objective of
DDPM (Ho et al. 2020, eq. 14) under a cosine noise schedule, 10% of labels dropped to the null label
so that classifier-free guidance works (Ho & Salimans 2022), and an exponential moving average of the
weights is what is saved. ``DIR/train_log.json`` records the settings, the loss curve and the
wall-clock time, which the model card quotes.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..checkpoints import Checkpoint, make_optimizer, settings_of, write_json
from ..loop import LoopState, run_loop
from .architectures import NULL_LABEL, DigitClassifier, LabelEncoder, dit_config, unet_config
from .data import load_digits

CLASSIFIERS = {"digits-classifier": ("cnn", 0), "digits-classifier-eval": ("cnn5", 1)}
GENERATORS = ("digits-unet", "digits-dit")
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                      prediction_type="epsilon")
GUIDANCE_SCALE = 3.0
DEFAULT_STEPS = {"digits-unet": 3000, "digits-dit": 5000}
LABEL_DROPOUT = 0.1


def _shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to max_shift pixels (pad with background, crop back)."""
    pad = F.pad(images, (max_shift,) * 4, value=-1.0)
    n, size = images.shape[0], images.shape[-1]
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    return torch.stack([pad[i, :, dy[i]:dy[i] + size, dx[i]:dx[i] + size] for i in range(n)])


def train_classifier(name: str, out: Path, epochs: int, seed: int) -> dict:
    arch, seed_offset = CLASSIFIERS[name]
    gen = torch.Generator().manual_seed(seed + seed_offset)
    torch.manual_seed(seed + seed_offset)
    images, labels = load_digits("train")
    test_images, test_labels = load_digits("heldout")
    model = DigitClassifier(arch=arch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = len(images) // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    losses = []
    for _ in tqdm(range(epochs), desc=f"train {name}"):
        model.train()
        order = torch.randperm(len(images), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * 128:(b + 1) * 128]
            x = (_shift(images[idx], gen) + 1) / 2
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model((test_images + 1) / 2).argmax(-1) == test_labels).float().mean().item()
    model.save_pretrained(out)
    return {"epochs": epochs, "heldout_accuracy": accuracy, "loss": losses[:: max(1, len(losses) // 200)]}


def _generator_parts(name: str):
    if name == "digits-unet":
        encoder = LabelEncoder()
        model = UNet2DConditionModel(**unet_config())

        def predict(x, t, labels):
            return model(x, t, encoder_hidden_states=encoder(labels)).sample

        return {"unet": model, "label_encoder": encoder}, predict
    model = DiTTransformer2DModel(**dit_config())
    model.eval()  # diffusers' LabelEmbedding drops labels by itself in train mode; we drop them here.

    def predict(x, t, labels):
        return model(x, timestep=t, class_labels=labels).sample

    return {"transformer": model}, predict


@dataclass(frozen=True)
class GeneratorConfig:
    """Every setting that changes what training a zoo generator computes: its checkpoint is matched on all."""

    name: str
    steps: int
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0
    warmup: int = 200
    ema_decay: float = 0.999
    label_dropout: float = LABEL_DROPOUT
    noise_schedule: dict = field(default_factory=lambda: dict(NOISE_SCHEDULE))


class _Generator:
    """A torch.Generator as a checkpointable object."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self):
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["state"])


class _GeneratorRun(LoopState):
    """Training one zoo generator: the epsilon objective on noised digits, EMA weights (see the module docstring)."""

    def __init__(self, name: str, config: GeneratorConfig):
        torch.manual_seed(config.seed)
        self.config, self.gen = config, torch.Generator().manual_seed(config.seed)
        self.images, self.labels = load_digits("train")
        self.parts, self.predict = _generator_parts(name)
        self.params = [p for m in self.parts.values() for p in m.parameters()]
        self.opt = make_optimizer("adamw", self.params, config.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / config.warmup))
        self.ema = EMAModel(self.params, decay=config.ema_decay)
        self.noise_schedule = DDPMScheduler(**NOISE_SCHEDULE)
        self.history = {"losses": []}

    def objects(self) -> dict:
        return {**{f"part.{k}": m for k, m in self.parts.items()}, "opt": self.opt, "sched": self.sched,
                "ema": self.ema, "generator": _Generator(self.gen)}

    def saved(self) -> dict:
        return {"losses": self.history["losses"]}

    def restore(self, state: dict) -> None:
        self.history = {"losses": state["losses"]}

    def step(self, it: int) -> dict:
        batch, gen = self.config.batch, self.gen
        idx = torch.randint(0, len(self.images), (batch,), generator=gen)
        x0, y = self.images[idx], self.labels[idx].clone()
        y[torch.rand(batch, generator=gen) < LABEL_DROPOUT] = NULL_LABEL
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (batch,), generator=gen)
        loss = F.mse_loss(self.predict(self.noise_schedule.add_noise(x0, noise, t), t, y), noise)
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.ema.step(self.params)
        self.history["losses"].append(loss.item())
        return {"loss": self.history["losses"][-1]}


def train_generator(name: str, out: Path, steps: int, batch: int, lr: float, seed: int,
                    checkpoint_every: int = 500, resume: bool = False) -> dict:
    config = GeneratorConfig(name=name, steps=steps, batch=batch, lr=lr, seed=seed)
    run = _GeneratorRun(name, config)
    checkpoint = Checkpoint(out, "checkpoint.pt", settings_of(config), checkpoint_every, resume)
    run_loop(run, steps, checkpoint, desc=f"train {name}")
    parts, params, losses = run.parts, run.params, run.history["losses"]
    run.ema.copy_to(params)
    for sub, module in parts.items():
        module.save_pretrained(out / sub)
    DDIMScheduler(**NOISE_SCHEDULE).save_pretrained(out / "scheduler")
    write_json(out / "zoo.json", {"format_version": 1, "kind": name.split("-")[1], "guidance_scale": GUIDANCE_SCALE,
                                  "num_inference_steps": 50, "null_label": NULL_LABEL, "num_classes": 10})
    if checkpoint.path is not None:
        checkpoint.path.unlink(missing_ok=True)
    return {"steps": steps, "batch": batch, "lr": lr, "ema_decay": config.ema_decay, "label_dropout": LABEL_DROPOUT,
            "noise_schedule": NOISE_SCHEDULE, "loss": [sum(losses[i:i + 50]) / len(losses[i:i + 50])
                                                       for i in range(0, len(losses), 50)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted([*CLASSIFIERS, *GENERATORS]))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30, help="classifiers")
    parser.add_argument("--steps", type=int, default=None, help=f"generators (default: {DEFAULT_STEPS})")
    parser.add_argument("--batch", type=int, default=64, help="generators")
    parser.add_argument("--lr", type=float, default=1e-3, help="generators")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="generators: steps between checkpoints")
    parser.add_argument("--resume", action="store_true", help="generators: continue from DIR/checkpoint.pt")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.name in CLASSIFIERS:
        log = train_classifier(args.name, args.out, args.epochs, args.seed)
    else:
        steps = args.steps or DEFAULT_STEPS[args.name]
        log = train_generator(args.name, args.out, steps, args.batch, args.lr, args.seed,
                              args.checkpoint_every, args.resume)
    log.update(name=args.name, seed=args.seed, seconds=time.perf_counter() - start,
               torch_threads=torch.get_num_threads(), command=f"python -m diffusion_shortcuts.zoo.train "
               f"{args.name} --out DIR --seed {args.seed}")
    write_json(args.out / "train_log.json", log)
    print(json.dumps({k: v for k, v in log.items() if k != "loss"}))


if __name__ == "__main__":
    main()
