"""Time to quality of a schedule: today's default search against the calibrated table and the search's new tricks.

    OMP_NUM_THREADS=2 python benchmarks/search_curves.py [--samples 128] [--tiny]      # about 30 minutes

On each zoo model (DDIM 50, its guidance, ratio 0.8 pruned, the ten labels), every variant's schedule is judged by
SSIM to the full model's images on the same fixed seeds (``--samples``), against the seconds it cost to make
(the search's own seconds, or the calibration's wall-clock), snapshots taken during the searches:

- ``default``: today's ``prune`` defaults (from the full model, copy, checkpointed gradient, batch 2, lr 0.01,
  200 iterations; DiP-GO's recipe);
- ``training set``: the same with a fixed training set of 16 samples (full-model images made once);
- ``calibrated``: ``ds.prune.calibrate`` alone, one generation of 8 samples (no search);
- ``calibrated + search``: a search started from the calibrated table (with the fixed training set and the start
  validation, which keeps the better of the two), 40 iterations;
- ``calibrated + search, latent``: the same with the latent objective (no decoding; the zoo's decoders are
  ``x / 2 + 0.5``, so this measures the objective, not a saving).

Results: benchmarks/results/search_curves.json and search_curves.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402

RATIO = 0.8


def run_model(name: str, samples: int, steps: int, iterations: int, short: int) -> dict:
    import diffusion_shortcuts as ds
    from diffusion_shortcuts.metrics import ssim
    from diffusion_shortcuts.prune.compare import generate

    m = ds.zoo.load(name)
    sampler = m.sampler(steps)
    labels = torch.arange(samples) % 10
    noise = m.noise(samples, torch.Generator().manual_seed(0))
    conditions = m.encode(torch.arange(10))
    with torch.no_grad():
        full = generate(sampler, m.encode, labels, noise, batch_size=64)

    def judged(schedule) -> float:
        with torch.no_grad():
            images = generate(sampler, m.encode, labels, noise, batch_size=64, schedule=schedule)
        return float(ssim(images, full).mean())

    curves = {}

    def search(label: str, snapshots: list[int], extra_seconds: float = 0.0, **settings):
        """A search whose pruner is snapshotted at ``snapshots`` iterations (with the search's seconds so far, plus
        ``extra_seconds``: a calibration before it), each snapshot judged after the search; where the search had a
        start, also its validated result (the better of the start and the searched table)."""
        taken = []

        def callback(event):
            if event["iteration"] + 1 in snapshots:
                state = {k: v.detach().clone() for k, v in event["objects"]["pruner"].state_dict().items()}
                taken.append((event["iteration"] + 1, event["elapsed"], state))

        result = ds.prune.train_pruner(sampler, conditions, RATIO, progress=False, callback=callback, **settings)
        validated = result.history.get("validation")
        final = {k: v.clone() for k, v in result.pruner.state_dict().items()}
        points = []
        for iteration, elapsed, state in taken:
            result.pruner.load_state_dict(state)
            schedule = result.schedule(RATIO)
            points.append({"iteration": iteration, "seconds": elapsed + extra_seconds,
                           "macs_ratio": schedule.macs_ratio, "ssim": judged(schedule)})
        if validated is not None:
            result.pruner.load_state_dict(final)
            schedule = result.schedule(RATIO)
            points.append({"iteration": len(result.history["loss"]), "validated": True, "kept": validated["kept"],
                           "seconds": sum(result.history["seconds"]) + extra_seconds,
                           "macs_ratio": schedule.macs_ratio, "ssim": judged(schedule)})
        curves[label] = points
        for point in points:
            print(f"{name} {label}: {point}", flush=True)

    every = max(1, iterations // 8)
    search("default", [i for i in range(every, iterations + 1, every)], iterations=iterations, batch_size=2,
           lr=0.01, gradient="checkpointed")
    search("training set", [i for i in range(every, iterations + 1, every)], iterations=iterations, batch_size=2,
           lr=0.01, gradient="checkpointed", training_set=16)

    started = time.perf_counter()
    calibrated = ds.prune.calibrate(sampler, conditions, macs=1 - RATIO, batch_size=8)
    calibration_seconds = time.perf_counter() - started
    curves["calibrated"] = [{"iteration": 0, "seconds": calibration_seconds, "macs_ratio": calibrated.macs_ratio,
                             "ssim": judged(calibrated)}]
    print(f"{name} calibrated: {curves['calibrated'][0]}", flush=True)
    for label, objective in (("calibrated + search", "ssim"), ("calibrated + search, latent", "latent")):
        search(label, [i for i in range(short // 4, short + 1, max(1, short // 4))], calibration_seconds,
               iterations=short, batch_size=2, lr=0.01, gradient="checkpointed", training_set=16, start=calibrated,
               validation=8, objective=ds.prune.Objective(objective))
    return {"curves": curves, "calibration_seconds": calibration_seconds}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        for label, points in result["curves"].items():
            shown = [p for p in points if not p.get("validated")]
            ax.plot([p["seconds"] for p in shown], [p["ssim"] for p in shown], marker="o", label=label)
            for p in points:
                if p.get("validated"):
                    ax.scatter([p["seconds"]], [p["ssim"]], marker="*", s=120)
        ax.set_xscale("log")
        ax.set_title(f"{name}, ratio {RATIO}")
        ax.set_xlabel("seconds to make the schedule (log)")
        ax.set_ylabel("SSIM to the full model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--models", nargs="*", default=["digits-unet", "digits-dit"])
    args = parser.parse_args()
    samples, steps, iterations, short = (16, 10, 8, 4) if args.tiny else (args.samples, 50, 200, 40)
    results = {name: run_model(name, samples, steps, iterations, short) for name in args.models}
    out = RESULTS / ("search_curves_tiny.json" if args.tiny else "search_curves.json")
    write_results(out, "search_curves", {"samples": samples, "steps": steps, "ratio": RATIO, "models": results})
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
