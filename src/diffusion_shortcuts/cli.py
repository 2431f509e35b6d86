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
import math
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

from .failures import ctrl_c_remembered

METRICS_VERSION = 1


def _interval_or_auto(text: str):
    """``--start-every``: a whole number of steps >= 1, or ``auto``."""
    if text == "auto":
        return text
    try:
        int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or auto, got {text!r}") from None
    return number(int, 1)(text)


def number(kind: type, low: float | None = None, high: float | None = None, open_low: bool = False,
           open_high: bool = False):
    """An argparse type: a finite int or float within bounds, else one line naming the allowed range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value < low or (open_low and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if open_low else '>='} {low}, got {text}")
        if high is not None and (value > high or (open_high and value == high)):
            raise argparse.ArgumentTypeError(f"must be {'<' if open_high else '<='} {high}, got {text}")
        return value
    return parse


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
    "seed": dict(type=number(int, 0), default=0),
    "steps": dict(type=number(int, 1, 1000), default=50, help="denoising steps"),
    "n": dict(type=number(int, 1, 100_000), default=8, help="number of samples"),
    "labels": dict(default="0-9", help="labels like 0-9, 3 or 1,4,7"),
    "guidance": dict(type=number(float, 0), default=None, help="guidance scale (default: the model's)"),
    "iterations": dict(type=number(int, 1, 1_000_000), default=100),
    "lr": dict(type=number(float, 0, open_low=True), default=0.05, help="learning rate"),
    "gradient": dict(default="shortcut", help=_gradient_help),
    "reward": dict(required=True, help=_reward_help),
    "resume": dict(action="store_true", help="continue a run killed in the same --out"),
    "batch_size": dict(type=number(int, 1, 4096), default=4),
    "checkpoint_every": dict(type=number(int, 1), default=10, help="iterations between checkpoints"),
    "schedule": dict(default=None, help="a cache schedule JSON (from `prune`) or a folder holding one, or `zoo` / "
                     "`zoo:RATIO` for the model's shipped one (0.8 / 0.5, 0.7, 0.8 or 0.85); sample and optimize run "
                     "with it (resampled to --steps when made for another step count), finetune refits it to the "
                     "tuned model and ships it beside the adapter"),
    "refit_iterations": dict(type=number(int, 1), default=50,
                             help="iterations of the search that refits --schedule to the tuned model"),
    "start_from": dict(default=None, help="where the search starts: `calibrated` (the default), the table calibrated "
                       "at --ratio on one full generation (as --calibrate-only makes it); `full`, the full model "
                       "(DiP-GO's); or a schedule (a file, a folder holding one, or zoo / zoo:RATIO): a refit, e.g. "
                       "of the base model's schedule on a --lora"),
    "objective": dict(default="latent", help="what the gates keep: latent (the full model's final latents, the "
                      "default: no VAE decode in the search), ssim (its images, DiP-GO's), reward:SPEC (the reward "
                      "of the full model's sample from the same noise, as a hinge on its drop) or ssim+reward:SPEC:W "
                      "(both, the reward's term weighted W)"),
    "validation": dict(type=number(int, 1, 100_000), default=8,
                       help="fresh samples on which the search compares its table with the table it started from "
                            "and keeps the better; more for a reward's small differences"),
    "lora": dict(default=None, help="a LoRA adapter loaded onto the denoiser first: `finetune`'s output folder (its "
                 "lora/ or adapter.safetensors)"),
    "strict_schedule": dict(action="store_true", help="refuse a schedule made for other timesteps"),
    "start_every": dict(type=_interval_or_auto, default=None,
                        help="start the search from the rule table that computes every block at the first 3 steps and "
                             "every N-th step after (TaylorSeer's), instead of the calibrated table; auto: the N whose "
                             "table prunes nearest --ratio"),
    "reuse_mode": dict(choices=["copy", "taylor1", "taylor2"], default="copy",
                       help="what a reused block returns: its cached work, or that work extrapolated (first or second "
                            "order) from its latest computed steps"),
    "noise_prior": dict(choices=["sphere", "chi2", "none"], default="sphere",
                        help="keep the optimized noise on the Gaussian shell (none: let it drift)"),
    "ratio": dict(type=number(float, 0, 1, open_low=True, open_high=True), default=0.8,
                  help="fraction of the MACs to prune"),
    "samples": dict(type=number(int, 1, 100_000), default=1000, help="samples for the quality comparison"),
    "params": dict(choices=["lora", "all"], default="lora"),
    "rank": dict(type=number(int, 1, 1024), default=4, help="LoRA rank"),
    "ema": dict(type=number(float, 0, 1, open_low=True, open_high=True), default=None,
                help="EMA decay of the trained weights, e.g. 0.99"),
    "base_weight": dict(type=number(float, 0), default=0.0, help="weight on the distance to the base model's samples"),
    "warmup": dict(type=number(int, 0), default=0, help="iterations of learning-rate warm-up"),
    "eval_every": dict(type=number(int, 1), default=10, help="held-out evaluation every K iterations"),
    "eval_samples": dict(type=number(int, 2, 1000), default=5, help="held-out samples per class (diversity needs 2)"),
    "digit": dict(type=number(int, 0, 9), default=3, help="the digit the SDO part steers toward"),
    "prompt": dict(action="append", default=None, help="a prompt (repeatable), for a text-to-image pipeline folder"),
    "prompts": dict(default=None, help="a file of prompts, one a line"),
    "negative_prompt": dict(default=None, help="the negative prompt of classifier-free guidance"),
    "true_cfg_scale": dict(type=number(float, 0), default=None,
                           help="the stock call's true_cfg_scale: the classifier-free guidance of families that have "
                                "one besides embedded guidance (Flux, Qwen-Image, HunyuanVideo), with "
                                "--negative-prompt (default: the stock call's where a negative prompt is given)"),
    "scheduler": dict(choices=["ddim", "dpm++", "euler", "flow-euler"], default=None,
                      help="a diffusers scheduler made from the pipeline's scheduler config (default: the pipeline's)"),
    "height": dict(type=number(int, 8, 8192), default=None, help="image height in pixels (default: the model's)"),
    "width": dict(type=number(int, 8, 8192), default=None, help="image width in pixels (default: the model's)"),
    "frames": dict(type=number(int, 1, 100_000), default=None,
                   help="frames of each video, for a video pipeline (default: the model's; Wan's VAE takes 4k + 1)"),
    "fps": dict(type=number(int, 1, 240), default=None,
                help="frame rate of the MP4s a video pipeline's videos are written as (default: the model card's)"),
    "device": dict(choices=["auto", "cpu", "cuda"], default="auto"),
    "dtype": dict(choices=["float32", "bfloat16", "float16"], default="float32",
                  help="precision of the denoiser, text encoders and VAE; trained tensors stay float32"),
    "vae_checkpointing": dict(action="store_true", help="decode with VAE gradient checkpointing (less memory)"),
    "block_checkpointing": dict(action="store_true", help="recompute each denoiser block in the backward pass "
                                "(diffusers' gradient checkpointing): the graph step holds one block's activations "
                                "at a time"),
    "reward_frames": dict(default=None, help="a video pipeline's frames the reward scores: `first`, or K drawn "
                          "afresh each iteration (an estimate of the mean over all frames; decoded alone where the "
                          "VAE allows: Wan's); default: every frame"),
    "training_set": dict(type=number(int, 0, 1_000_000), default=None,
                         help="a fixed set of N samples whose full-model images are made once and reused every "
                              "iteration (default 16, or an iteration's batch where larger; 0: fresh samples and their "
                              "full-model images every iteration, DiP-GO's)"),
    "granularity": dict(choices=["block", "step", "step+block"], default="block",
                        help="what one gate decides: a block at a step (DiP-GO's), a whole step, or whole steps for "
                             "the first half of the iterations and blocks after"),
    "search_steps": dict(type=number(int, 0, 10_000), default=0,
                         help="search at this many steps (cheaper), the schedule read at --steps from the gates' "
                              "keep scores (0: at --steps)"),
    "search_frames": dict(type=number(int, 1, 100_000), default=None,
                          help="a video pipeline's search at this many frames (cheaper; its VAE's 4k + 1), the "
                               "schedule thresholded on the MACs at --frames and compared there"),
    "calibrate_only": dict(action="store_true", help="no search: build the table from full generations measured "
                           "once (a few seconds to minutes), at --ratio"),
    "calibration_batch": dict(type=number(int, 1, 4096), default=None,
                              help="samples per calibration generation (default: one per label or prompt, at most 8)"),
    "calibration_generations": dict(type=number(int, 1, 100), default=1,
                                    help="full generations the calibration measures"),
    "compile": dict(action="store_true", help="compile each gated block of the denoiser (torch.compile, "
                    "fullgraph=True; a cache schedule decides outside the compiled regions)"),
}
NO_START = "full"  # --start-from full: the search starts from the full model, with no table to validate against
# flags that act only beside another: given alone they would do nothing, so they are refused naming what they need
NEEDS = {
    "validation": (("start_every", "start_from"), "it compares the searched table with the table the search starts "
                   "from"),
    "refit_iterations": (("schedule",), "it sets the search that refits that schedule to the tuned model"),
    "strict_schedule": (("schedule",), "it refuses a schedule made for other timesteps"),
    "calibration_batch": (("calibrate_only",), "it sets the calibration's generations"),
    "calibration_generations": (("calibrate_only",), "it sets the calibration"),
}
# flags that contradict another: given together, one would do nothing
EXCLUDES = {
    "start_every": (("start_from",), "both say where the search starts; give one"),
    "calibrate_only": (("iterations", "lr", "gradient", "start_every", "start_from", "objective", "validation",
                        "resume", "checkpoint_every", "batch_size", "training_set", "granularity",
                        "search_steps", "search_frames", "block_checkpointing"), "a calibration searches nothing"),
}
MODEL = dict(model=None, prompt=None, prompts=None, negative_prompt=None, true_cfg_scale=None, scheduler=None,
             height=None, width=None, frames=None, fps=None, device=None, dtype=None)
TRAIN = dict(vae_checkpointing=None, block_checkpointing=None, reward_frames=None)  # the verbs that backpropagate
#                                                                                     through a reward

VERBS = {
    "demo": ("both shortcuts on the embedded zoo, with a report",
             dict(out="diffusion-shortcuts-demo", n=100, seed=0, steps=50, digit=3, iterations=15)),
    "sample": ("sample a model and judge the samples",
               dict(**MODEL, labels=None, n=64, seed=0, steps=50, guidance=None, schedule=None, strict_schedule=None,
                    compile=None, lora=None, out=None)),
    "optimize": ("optimize initial noise against a reward (SDO by default)",
                 dict(**MODEL, **TRAIN, reward=None, gradient=None, iterations=None, n=None, lr=None, steps=None,
                      seed=None, guidance=None, noise_prior=None, labels="null", schedule=None, strict_schedule=None,
                      compile=None, out=None)),
    "prune": ("learn a cache schedule (DiP-GO) and compare it with the full model",
              dict(**MODEL, labels=None, ratio=None, iterations=40, batch_size=2, lr=0.01, gradient="checkpointed",
                   steps=None, guidance=None, samples=None, seed=None, checkpoint_every=25, reuse_mode=None,
                   start_every=None, start_from="calibrated", objective=None, validation=None, lora=None, resume=None,
                   training_set=None, granularity=None, search_steps=None, search_frames=None, block_checkpointing=None,
                   calibrate_only=None,
                   calibration_batch=None, calibration_generations=None, compile=None, out=None)),
    "finetune": ("fine-tune LoRA or all weights against a reward (SDO by default)",
                 dict(**MODEL, **TRAIN, labels=None, reward=None, params=None, rank=None, gradient="shortcut:random",
                      iterations=None, batch_size=None, lr=1e-3, steps=None, guidance=None, seed=None, ema=None,
                      base_weight=None, warmup=None, eval_every=None, eval_samples=None, checkpoint_every=None,
                      schedule=None, refit_iterations=None, resume=None, out=None)),
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


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), exit status 2, and exact flags only (no prefix of
    a flag stands for it: ``--schedule`` must never become ``--scheduler``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusion-shortcuts", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    for verb, (help_text, flags) in VERBS.items():
        add_flags(verbs.add_parser(verb, help=help_text), flags)
    return parser


def flag_without_its_partner(flags: dict, argv: list[str]) -> str | None:
    """The line refusing a flag typed without the flag it acts beside (:data:`NEEDS`), or with one it contradicts
    (:data:`EXCLUDES`); None if there is none."""
    typed = {str(a).split("=")[0] for a in argv if str(a).startswith("--")}

    def option(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name, (partners, why) in NEEDS.items():
        if name in flags and option(name) in typed and not any(flags.get(p) not in (None, False, NO_START)
                                                               for p in partners):
            return f"{option(name)} needs {' or '.join(option(p) for p in partners)}: {why}"
    for name, (others, why) in EXCLUDES.items():
        clash = [option(o) for o in others if option(o) in typed]
        if flags.get(name) and clash:
            return f"{option(name)} takes no {', '.join(clash)}: {why}"
    return None


def write_metrics(out: Path, metrics: dict) -> Path:
    from .checkpoints import write_json

    payload = {"format_version": METRICS_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "command": " ".join(["diffusion-shortcuts", *sys.argv[1:]]),
               "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()}, **metrics}
    return write_json(out / "metrics.json", payload)


def run_verb(verb: str, flags: dict, out: Path, interrupted: threading.Event | None = None) -> dict:
    """``interrupted``: set by this call's own Ctrl-C handler (see :func:`main`), never by an earlier call's."""
    from . import reports

    if verb == "demo":
        return reports.demo_report(out, **flags)
    subject = reports.subject_from(flags)
    if interrupted is not None and interrupted.is_set():  # pressed while loading, and swallowed there
        raise KeyboardInterrupt
    return getattr(reports, f"{verb}_report")(out, subject, **flags)


def _fail(verb: str, message: str, code: int) -> int:
    print(f"diffusion-shortcuts {verb}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run a verb; bad input is one line and status 2, an interruption one line and 130, anything else one
    line and 1 (``--debug`` shows its traceback). A Ctrl-C while torch loads is one line too."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    watch = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not where Ctrl-C is ignored or handled
    interrupted = threading.Event()  # this call's own: nothing pressed during another call reaches it
    if watch:
        signal.signal(signal.SIGINT, ctrl_c_remembered(interrupted))
    try:
        return _main(argv, interrupted)
    except KeyboardInterrupt:  # before a verb began: while the parser and its imports load
        print("diffusion-shortcuts: interrupted while starting; nothing was run", file=sys.stderr)
        return 130
    finally:
        if watch:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _main(argv: list[str] | None, interrupted: threading.Event) -> int:
    from .failures import explain
    from .outdir import OutputFolder

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, its one line already printed)
        return int(exc.code or 0)
    from . import distributed

    flags = {k: v for k, v in vars(args).items() if k not in ("verb", "out", "debug")}
    if shortfall := distributed.launch_shortfall():
        print(f"diffusion-shortcuts {args.verb}: warning: {shortfall}", file=sys.stderr)
    distributed.watch_the_launcher()
    alone = flag_without_its_partner(flags, argv if argv is not None else sys.argv[1:])
    if alone:
        return _fail(args.verb, alone, 2)
    given = {**flags, "out": args.out}  # run_verb takes the model's flags out of ``flags``
    try:
        with distributed.sigterm_stops_the_command(), OutputFolder(args.out) as out:
            metrics = run_verb(args.verb, flags, out, interrupted)
            if metrics:  # empty on the other processes of an `accelerate launch` run: the main one writes
                write_metrics(out, metrics)
    except (ValueError, TypeError, KeyboardInterrupt, OSError, RuntimeError) as exc:
        from .usage import UsageError

        if args.debug and not isinstance(exc, (UsageError, KeyboardInterrupt)):
            raise
        return _fail(args.verb, *explain(args.verb, exc, given, VERBS[args.verb][1]))
    if metrics:
        if metrics.get("warning"):
            print(f"diffusion-shortcuts {args.verb}: warning: {metrics['warning']}", file=sys.stderr)
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
