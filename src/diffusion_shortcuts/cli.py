"""The ``diffusion-shortcuts`` command: one command, verbs.

    diffusion-shortcuts demo     [--out DIR]
    diffusion-shortcuts sample   --model digits-unet --labels 0-9 --n 100 [--seed 0] [--steps 50] --out DIR

Every verb writes ``DIR/metrics.json`` and PNGs, shows a progress bar on long work, and on bad input
exits with status 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

METRICS_VERSION = 1


class UsageError(ValueError):
    """Bad input from the command line: reported as one line, exit status 2."""


def parse_labels(text: str, num_classes: int) -> list[int]:
    """'0-9', '3', '1,4,7' or '0-4,8' -> a list of labels, each checked against the model's classes."""
    labels: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                labels.extend(range(lo, hi + 1))
            else:
                labels.append(int(part))
    except ValueError:
        raise UsageError(f"--labels {text!r}: expected digits like 0-9, 3 or 1,4,7") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad or not labels:
        raise UsageError(f"--labels {text!r}: labels out of range {bad}; the model takes 0-{num_classes - 1}")
    return labels


def prepare_out(path: str | Path) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out}: output folder is not writable ({exc.strerror or exc})") from None
    return out


def write_metrics(out: Path, metrics: dict) -> Path:
    payload = {"format_version": METRICS_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "command": " ".join(["diffusion-shortcuts", *sys.argv[1:]]),
               "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()}, **metrics}
    path = out / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def _load_generator(name: str):
    from . import zoo

    try:
        model = zoo.load(name)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--model: {exc}") from None
    if not isinstance(model, zoo.ZooModel):
        raise UsageError(f"--model {name}: a classifier, not a generator; generators: {', '.join(zoo.GENERATORS)}")
    return model


def sample_report(model_name: str, labels_text: str, n: int, seed: int, steps: int, guidance: float | None,
                  out: Path, progress: bool = True, tag: str = "") -> dict:
    """Sample n images cycling through labels, judge them with the eval classifier, write a grid."""
    import torch

    from . import zoo
    from .images import save_grid
    from .metrics import Timer, accuracy

    model = _load_generator(model_name)
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    labels = None
    if model.conditional:
        pool = parse_labels(labels_text, model.num_classes)
        labels = torch.tensor([pool[i % len(pool)] for i in range(n)])
    with Timer() as timer:
        images = model.generate(labels, seed=seed, num_inference_steps=steps,
                                guidance_scale=guidance, progress=progress,
                                batch_size=min(n, 100))[:n]
    metrics = {"model": model_name, "n": n, "seed": seed, "num_inference_steps": steps,
               "guidance_scale": guidance if guidance is not None else model.guidance_scale,
               "scheduler": type(model.scheduler).__name__, "seconds": timer.seconds}
    if labels is not None and model.num_classes == 10:
        judge = zoo.load("digits-classifier-eval")
        metrics["accuracy"] = accuracy(judge, images, labels)
        metrics["accuracy_judge"] = "digits-classifier-eval"
    if labels is not None:  # one row per label
        images = images[torch.argsort(labels, stable=True)]
        nrow = -(-n // len(set(labels.tolist())))
    else:
        nrow = None
    grid_path = save_grid(images, out / f"grid{tag}.png", nrow=nrow)
    metrics["grid"] = grid_path.name
    return metrics


def cmd_sample(args) -> dict:
    out = prepare_out(args.out)
    metrics = sample_report(args.model, args.labels, args.n, args.seed, args.steps, args.guidance, out)
    write_metrics(out, metrics)
    return metrics


def cmd_demo(args) -> dict:
    """The embedded default: the zoo's generators sampled and judged; a short report."""
    from PIL import Image

    from .images import labelled, side_by_side

    out = prepare_out(args.out)
    report = {"models": {}}
    panels = []
    for name in ("digits-unet", "digits-dit"):
        m = sample_report(name, "0-9", args.n, args.seed, args.steps, None, out, tag=f"_{name}")
        report["models"][name] = m
        panels.append(labelled(Image.open(out / m["grid"]), f"{name}: accuracy {m.get('accuracy', 0):.0%}, "
                                                            f"{m['seconds']:.1f}s"))
    side_by_side(panels).save(out / "demo.png")
    report["picture"] = "demo.png"
    write_metrics(out, report)
    lines = ["# diffusion-shortcuts demo", "", "![samples](demo.png)", "",
             "| model | accuracy (digits-classifier-eval) | seconds | steps |", "|---|---|---|---|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | {m.get('accuracy', float('nan')):.3f} | {m['seconds']:.1f} | {m['num_inference_steps']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-shortcuts", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    demo = verbs.add_parser("demo", help="both shortcuts on the embedded zoo, with a report")
    demo.add_argument("--out", default="diffusion-shortcuts-demo")
    demo.add_argument("--n", type=int, default=100, help="samples per model")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=50)
    demo.set_defaults(func=cmd_demo)

    sample = verbs.add_parser("sample", help="sample a model and judge the samples")
    sample.add_argument("--model", default="digits-unet", help="a zoo name or a local diffusers folder")
    sample.add_argument("--labels", default="0-9", help="e.g. 0-9, 3 or 1,4,7")
    sample.add_argument("--n", type=int, default=64)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--steps", type=int, default=50)
    sample.add_argument("--guidance", type=float, default=None, help="default: the model's")
    sample.add_argument("--out", required=True)
    sample.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except UsageError as exc:
        print(f"diffusion-shortcuts {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))} or
                     {"out": str(getattr(args, "out", ""))}, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
