"""Time to quality of a schedule: today's default search against the calibrated table and each of the search's tricks.

    OMP_NUM_THREADS=2 python benchmarks/search_cost.py [--samples 256] [--models ...] [--tiny]   # about 80 minutes

On each zoo model (DDIM 50, its guidance, ratio 0.8 pruned, the ten labels), every variant's schedule is judged by
SSIM to the full model's images on the same fixed seeds (``--samples``), against the wall-clock seconds it cost to
make (snapshots of the gates taken during each search, judged after it; the judging is not counted):

- ``rule``: the fixed-interval table nearest the ratio (TaylorSeer's every-N-th step after 3 warm-up steps; no cost);
- ``default``: today's ``prune`` defaults (from the full model, copy, checkpointed gradient, batch 2, lr 0.01,
  200 iterations, fresh samples and their full-model images every iteration: DiP-GO's recipe);
- each trick alone, 100 iterations on today's defaults otherwise: ``training set`` (16 fixed samples, their full-model
  images made once), ``latent`` (the latent objective: no decode or SSIM; the zoo's decoders are ``x / 2 + 0.5``,
  so this measures the objective, not a saving), ``step+block`` (step-level gates for 50 iterations, then block-level
  ones from that table), ``20 steps`` (the search at 20 steps, the schedule read at 50);
- ``calibrated``: ``ds.prune.calibrate`` alone, one generation of 8 samples (no search);
- ``new default`` (``prune``'s defaults now): a search started from the calibrated table with the fixed training set
  and the latent objective, 40 iterations, ended by the start validation on 8 fresh samples (the better of the two
  kept; the star);
- ``calibrated + step+block``: the same start with ``step+block`` gates instead, 40 iterations, the validation.

``--only VARIANT ...`` runs those variants and adds them to the results file. (The committed results were made with
these two named ``combined`` and ``new default``; ``labels_renamed`` in the JSON says so.)

Results: benchmarks/results/search_cost.json and search_cost.png, written after every variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, finish_panel, write_results  # noqa: E402

RATIO = 0.8


def run_model(name: str, samples: int, steps: int, iterations: int, trick: int, short: int, result: dict,
              save, only: list[str] | None = None) -> None:
    """Fill ``result`` with every variant's points (or those in ``only``) on zoo model ``name``, calling ``save``
    after each."""
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

    curves = result.setdefault("curves", {})

    def wanted(label: str) -> bool:
        return only is None or label in only

    def record(label: str, points: list[dict]) -> None:
        if not wanted(label):
            return
        curves[label] = points
        for point in points:
            print(f"{name} {label}: {point}", flush=True)
        save()

    def search(label: str, count: int, snapshots: int, extra_seconds: float = 0.0, **settings):
        """A search of ``count`` iterations whose gates are snapshotted ``snapshots`` times (with the wall-clock
        seconds so far, plus ``extra_seconds``: a calibration before it), each judged after the search; where the
        search had a start, also its validated result (the better of the start and the searched table)."""
        if not wanted(label):
            return
        every = max(1, count // snapshots)
        taken, started = [], time.perf_counter()

        def callback(event):
            if (event["iteration"] + 1) % every == 0 or event["iteration"] + 1 == count:
                state = {k: v.detach().clone() for k, v in event["objects"]["pruner"].state_dict().items()}
                taken.append((event["iteration"] + 1, time.perf_counter() - started, state))

        outcome = ds.prune.train_pruner(sampler, conditions, RATIO, iterations=count, batch_size=2, lr=0.01,
                                        gradient="checkpointed", progress=False, callback=callback, **settings)
        wall = time.perf_counter() - started
        validated = outcome.history.get("validation")
        final = {k: v.clone() for k, v in outcome.pruner.state_dict().items()}
        points = []
        for iteration, elapsed, state in taken:
            outcome.pruner.load_state_dict(state)
            schedule = outcome.schedule(RATIO)
            points.append({"iteration": iteration, "seconds": elapsed + extra_seconds,
                           "macs_ratio": schedule.macs_ratio, "ssim": judged(schedule)})
        if validated is not None:
            outcome.pruner.load_state_dict(final)
            schedule = outcome.schedule(RATIO)
            points.append({"iteration": count, "validated": True, "kept": validated["kept"],
                           "seconds": wall + extra_seconds, "macs_ratio": schedule.macs_ratio,
                           "ssim": judged(schedule)})
        record(label, points)

    example = torch.zeros(1, *sampler.sample_shape)
    rule = ds.prune.CacheSchedule.every_for_ratio(sampler.timesteps, ds.prune.profile(sampler.model, example,
                                                  conditions[:1]), RATIO)
    if wanted("rule"):
        record("rule", [{"iteration": 0, "seconds": 0.0, "macs_ratio": rule.macs_ratio, "ssim": judged(rule)}])
    started = time.perf_counter()
    calibrated = ds.prune.calibrate(sampler, conditions, macs=1 - RATIO, batch_size=8)
    calibration_seconds = time.perf_counter() - started
    result["calibration_seconds"] = calibration_seconds
    if wanted("calibrated"):
        record("calibrated", [{"iteration": 0, "seconds": calibration_seconds,
                               "macs_ratio": calibrated.macs_ratio, "ssim": judged(calibrated)}])
    search("new default", short, 2, calibration_seconds, training_set=16, start=calibrated, validation=8,
           objective=ds.prune.Objective("latent"))
    search("default", iterations, 4)
    for label, settings in (("training set", dict(training_set=16)),
                            ("latent", dict(objective=ds.prune.Objective("latent"))),
                            ("step+block", dict(granularity="step+block")),
                            (f"{steps * 2 // 5} steps", dict(search_steps=steps * 2 // 5))):
        search(label, trick, 4, **settings)
    search("calibrated + step+block", short, 2, calibration_seconds, start=calibrated, validation=8,
           granularity="step+block")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    labels = list(dict.fromkeys(label for result in results.values() for label in result["curves"]))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour a variant in every panel
    for ax, (name, result) in zip(axes[0], results.items()):
        for label, points in result["curves"].items():
            if points and points[0]["seconds"] == 0.0:  # no cost: a level to compare with
                ax.axhline(points[0]["ssim"], linestyle="--", color="gray", label=f"{label} (no cost)")
                continue
            shown = [p for p in points if not p.get("validated")]
            line, = ax.plot([p["seconds"] for p in shown], [p["ssim"] for p in shown], marker="o", label=label,
                            color=colours[label])
            for p in points:
                if p.get("validated"):
                    ax.scatter([p["seconds"]], [p["ssim"]], marker="*", s=160, color=line.get_color(),
                               label=f"{label}, validated ({p['kept']} kept)")
        ax.set_xscale("log")
        finish_panel(ax, f"{name}, ratio {RATIO}", "seconds to make the schedule (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--models", nargs="*", default=["digits-unet", "digits-dit"])
    parser.add_argument("--only", nargs="*", default=None,
                        help="run these variants only, added to the results file's other variants")
    args = parser.parse_args()
    samples, steps, iterations, trick, short = (16, 10, 8, 4, 4) if args.tiny else (args.samples, 50, 200, 100, 40)
    out = RESULTS / ("search_cost_tiny.json" if args.tiny else "search_cost.json")
    results: dict = {}
    earlier: list[str] = []
    if args.only and out.exists():
        previous = json.loads(out.read_text())
        results, earlier = previous["models"], previous.get("earlier_commands", []) + [previous["command"]]

    def save() -> None:
        write_results(out, "search_cost", {"samples": samples, "steps": steps, "ratio": RATIO, "models": results,
                                           **({"earlier_commands": earlier} if earlier else {})})
        plot(results, out.with_suffix(".png"))

    for name in args.models:
        results.setdefault(name, {})
        run_model(name, samples, steps, iterations, trick, short, results[name], save, args.only)


if __name__ == "__main__":
    main()
