"""The ``diffusion-shortcuts`` command: one command, verbs.

    diffusion-shortcuts demo     [--out DIR]
    diffusion-shortcuts sample   --model digits-unet --labels 0-9 --n 100 [--seed 0] [--steps 50] --out DIR
    diffusion-shortcuts optimize --model digits-unet --reward digit:3 --gradient shortcut --iterations 100 --out DIR
    diffusion-shortcuts prune    --model digits-unet --ratio 0.8 --out DIR
    diffusion-shortcuts finetune --model digits-unet --reward label --params lora --rank 4 --out DIR
    diffusion-shortcuts sample   --model digits-unet --schedule DIR/schedule.json --out DIR2

Every verb writes ``DIR/metrics.json`` and PNGs, shows a progress bar on long work, and on bad input
exits with status 2 and one line naming the problem. What a verb does lives in :mod:`.reports`; this
module only parses flags (each declared once, in ``FLAGS``), owns the output folder and writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from .reports import UsageError

METRICS_VERSION = 1


def _gradient_help() -> str:
    from .gradients import known_specs
    return f"gradient policy: {known_specs()}"


def _reward_help() -> str:
    from .rewards import known_specs
    return f"reward: {known_specs()}"


# Every flag once: name -> argparse keyword arguments; verbs pick theirs and may override the default.
FLAGS = {
    "model": dict(default="digits-unet", help="a zoo name or a local diffusers pipeline folder"),
    "out": dict(required=True, help="output folder (metrics.json, pictures, checkpoints)"),
    "seed": dict(type=int, default=0),
    "steps": dict(type=int, default=50, help="denoising steps"),
    "n": dict(type=int, default=8, help="number of samples"),
    "labels": dict(default="0-9", help="labels like 0-9, 3 or 1,4,7"),
    "guidance": dict(type=float, default=None, help="guidance scale (default: the model's)"),
    "iterations": dict(type=int, default=100),
    "lr": dict(type=float, default=0.05, help="learning rate"),
    "gradient": dict(default="shortcut", help=_gradient_help),
    "reward": dict(required=True, help=_reward_help),
    "resume": dict(action="store_true", help="continue a run killed in the same --out"),
    "batch_size": dict(type=int, default=4),
    "checkpoint_every": dict(type=int, default=10, help="iterations between checkpoints"),
    "schedule": dict(default=None, help="a cache schedule JSON (from `prune`), or `zoo` for the model's shipped one"),
    "noise_prior": dict(choices=["chi2", "sphere"], default=None, help="keep optimized noise on the Gaussian shell"),
    "ratio": dict(type=float, default=0.8, help="fraction of the MACs to prune"),
    "samples": dict(type=int, default=1000, help="samples for the quality comparison"),
    "params": dict(choices=["lora", "all"], default="lora"),
    "rank": dict(type=int, default=4, help="LoRA rank"),
    "ema": dict(type=float, default=None, help="EMA decay of the trained weights, e.g. 0.99"),
    "base_weight": dict(type=float, default=0.0, help="weight on the distance to the base model's samples"),
    "warmup": dict(type=int, default=0, help="iterations of learning-rate warm-up"),
    "eval_every": dict(type=int, default=10, help="held-out evaluation every K iterations"),
    "eval_samples": dict(type=int, default=5, help="held-out samples per class (diversity needs 2)"),
    "digit": dict(type=int, default=3, help="the digit the SDO part steers toward"),
    "prompt": dict(action="append", default=None, help="a prompt (repeatable), for a text-to-image pipeline folder"),
    "prompts": dict(default=None, help="a file of prompts, one a line"),
    "negative_prompt": dict(default=None, help="the negative prompt of classifier-free guidance"),
    "scheduler": dict(choices=["ddim", "dpm++", "euler", "flow-euler"], default=None,
                      help="a diffusers scheduler made from the pipeline's scheduler config (default: the pipeline's)"),
    "height": dict(type=int, default=None, help="image height in pixels (pipelines; default: the model's)"),
    "width": dict(type=int, default=None, help="image width in pixels (pipelines; default: the model's)"),
    "device": dict(choices=["auto", "cpu", "cuda"], default="auto"),
    "dtype": dict(choices=["float32", "bfloat16", "float16"], default="float32",
                  help="precision of the denoiser, text encoders and VAE; trained tensors stay float32"),
    "vae_checkpointing": dict(action="store_true", help="decode with VAE gradient checkpointing (less memory)"),
}
MODEL = dict(model=None, prompt=None, prompts=None, negative_prompt=None, scheduler=None, height=None, width=None,
             device=None, dtype=None)
TRAIN = dict(vae_checkpointing=None)  # for the verbs that backpropagate through the decoder

VERBS = {
    "demo": ("both shortcuts on the embedded zoo, with a report",
             dict(out="diffusion-shortcuts-demo", n=100, seed=0, steps=50, digit=3, iterations=15)),
    "sample": ("sample a model and judge the samples",
               dict(**MODEL, labels=None, n=64, seed=0, steps=50, guidance=None, schedule=None, out=None)),
    "optimize": ("optimize initial noise against a reward (SDO by default)",
                 dict(**MODEL, **TRAIN, reward=None, gradient=None, iterations=None, n=None, lr=None, steps=None,
                      seed=None, guidance=None, noise_prior=None, labels="null", out=None)),
    "prune": ("learn a cache schedule (DiP-GO) and compare it with the full model",
              dict(**MODEL, labels=None, ratio=None, iterations=200, batch_size=2, lr=0.01, gradient="checkpointed",
                   steps=None, guidance=None, samples=None, seed=None, resume=None, out=None)),
    "finetune": ("fine-tune LoRA or all weights against a reward (SDO by default)",
                 dict(**MODEL, **TRAIN, labels=None, reward=None, params=None, rank=None, gradient="shortcut:random",
                      iterations=None, batch_size=None, lr=1e-3, steps=None, guidance=None, seed=None, ema=None,
                      base_weight=None, warmup=None, eval_every=None, eval_samples=None, checkpoint_every=None,
                      resume=None, out=None)),
}


def add_flags(parser: argparse.ArgumentParser, flags: dict) -> None:
    """Declare ``flags`` (name -> default override, None: keep FLAGS's) from the one table."""
    for name, default in flags.items():
        spec = dict(FLAGS[name])
        if callable(spec.get("help")):
            spec["help"] = spec["help"]()
        if default is not None:
            spec.pop("required", None)
            spec["default"] = default
        parser.add_argument("--" + name.replace("_", "-"), **spec)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-shortcuts", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb, (help_text, flags) in VERBS.items():
        add_flags(verbs.add_parser(verb, help=help_text), flags)
    return parser


def prepare_out(path: str) -> Path:
    if not str(path).strip():
        raise UsageError("--out: an empty path; name an output folder")
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out}: output folder is not writable ({exc.strerror or exc})") from None
    return out


def write_metrics(out: Path, metrics: dict) -> Path:
    from .checkpoints import write_json

    payload = {"format_version": METRICS_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "command": " ".join(["diffusion-shortcuts", *sys.argv[1:]]),
               "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()}, **metrics}
    return write_json(out / "metrics.json", payload)


def run_verb(verb: str, flags: dict, out: Path) -> dict:
    from . import reports

    if verb == "demo":
        return reports.demo_report(out, **flags)
    subject = reports.subject_from(flags)
    return getattr(reports, f"{verb}_report")(out, subject, **flags)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("verb", "out")}
    try:
        out = prepare_out(args.out)
        metrics = run_verb(args.verb, flags, out)
        if metrics:  # empty on the other processes of an `accelerate launch` run: the main one writes
            write_metrics(out, metrics)
    except UsageError as exc:
        print(f"diffusion-shortcuts {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    if metrics:
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
