"""A schedule with no search: the calibrated table against the fixed-interval rule and diffusers' FirstBlockCache.

    OMP_NUM_THREADS=2 python benchmarks/calibrate.py [--samples 256] [--tiny]      # about 15 minutes

For each zoo model (DDIM 50, its guidance, the same 256 seeds and labels for every variant, SSIM and PSNR to the full
model's images, accuracy by digits-classifier-eval): the rule table (every block computed at steps 0-2 and every n-th
step after, n = 3, 5, 7, 10) in copy and taylor1 modes, and at each of its MACs the calibrated table
(``ds.prune.calibrate``: one generation of 8 samples, granularity ``step`` and ``block``) in the same mode. On
digits-dit, diffusers' FirstBlockCache at thresholds 0.02 ... 0.4, and the calibrated table at each one's measured
MACs. MACs are counted (torch's FLOP counter over one batch's whole run, attention's products included). The
calibration's cost is its wall-clock over that of one full generation of its batch, measured side by side.
Results: benchmarks/results/calibrate.json and calibrate.png (MACs against SSIM per model).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, diffusers_hooks, finish_panel, write_results  # noqa: E402

INTERVALS = (3, 5, 7, 10)
FBC_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.4)


def run_model(name: str, samples: int, steps: int, tiny: bool) -> dict:
    import diffusion_shortcuts as ds
    from diffusion_shortcuts.metrics import accuracy, count_macs, psnr, ssim
    from diffusion_shortcuts.prune import CacheSchedule, apply
    from diffusion_shortcuts.prune.compare import generate

    m = ds.zoo.load(name)
    sampler = m.sampler(steps)
    judge = ds.zoo.load("digits-classifier-eval")
    labels = torch.arange(samples) % 10
    noise = m.noise(samples, torch.Generator().manual_seed(0))
    noise16, cond16 = m.noise(16, torch.Generator().manual_seed(1)), m.encode(torch.arange(16) % 10)
    calibration_set = m.encode(torch.arange(10))
    with torch.no_grad():
        full_macs, _ = count_macs(sampler, noise16, cond16)
        full = generate(sampler, m.encode, labels, noise, batch_size=64)
    rows = []

    def measure(method: str, context, **extra) -> dict:
        with torch.no_grad():
            with context():
                macs, _ = count_macs(sampler, noise16, cond16)
            with context():
                images = generate(sampler, m.encode, labels, noise, batch_size=64)
        row = {"model": name, "method": method, "macs_ratio": macs / full_macs,
               "ssim": float(ssim(images, full).mean()), "psnr": float(psnr(images, full).mean()),
               "accuracy": accuracy(judge, images, labels), **extra}
        rows.append(row)
        print(f"{name} {method} {extra}: MACs {row['macs_ratio']:.3f} SSIM {row['ssim']:.4f} "
              f"PSNR {row['psnr']:.1f} acc {row['accuracy']:.3f}", flush=True)
        return row

    def calibrated(macs: float, mode: str, granularity: str):
        return ds.prune.calibrate(sampler, calibration_set, macs=macs, mode=mode, granularity=granularity,
                                  batch_size=8)

    prof = ds.prune.profile(m.model, noise[:1], m.encode(labels[:1]))
    for interval in INTERVALS[:2] if tiny else INTERVALS:
        rule = CacheSchedule.every(sampler.timesteps, prof, interval)
        for mode in ("copy", "taylor1"):
            target = measure(f"rule {mode}", lambda s=rule.with_mode(mode): apply(m.model, s, sampler),
                             interval=interval)
            for granularity in ("step", "block"):
                schedule = calibrated(target["macs_ratio"], mode, granularity)
                measure(f"calibrated {granularity} {mode}", lambda s=schedule: apply(m.model, s, sampler),
                        interval=interval, target_macs=target["macs_ratio"])

    if ds.families.family_of(m.model).name == "dit":
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        for threshold in FBC_THRESHOLDS[:2] if tiny else FBC_THRESHOLDS:
            context = diffusers_hooks(m.model, lambda t=threshold: apply_first_block_cache(
                m.model, FirstBlockCacheConfig(threshold=t)))
            peer = measure("firstblockcache", context, threshold=threshold)
            for mode in ("copy", "taylor1"):
                schedule = calibrated(peer["macs_ratio"], mode, "step")
                measure(f"calibrated step {mode}", lambda s=schedule: apply(m.model, s, sampler),
                        target_macs=peer["macs_ratio"], against="firstblockcache", threshold=threshold)

    # the calibration's cost in full generations of its batch, side by side
    batch = m.noise(8, torch.Generator().manual_seed(2)), calibration_set[:8]
    costs = []
    for _ in range(2 if tiny else 3):
        with torch.no_grad():
            start = time.perf_counter()
            sampler(*batch)
            generation = time.perf_counter() - start
        start = time.perf_counter()
        calibrated(0.3, "copy", "step")
        costs.append((time.perf_counter() - start) / generation)
    return {"rows": rows, "calibration_cost_in_generations": sorted(costs)[len(costs) // 2],
            "calibration_costs": costs}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        by_method: dict[str, list] = {}
        for row in results[name]["rows"]:
            by_method.setdefault(row["method"], []).append((row["macs_ratio"], row["ssim"]))
        for method, points in sorted(by_method.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        finish_panel(ax, name, "MACs kept (of the full model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="a few samples and steps: a quick check it runs")
    parser.add_argument("--models", nargs="*", default=["digits-unet", "digits-dit"])
    args = parser.parse_args()
    samples, steps = (16, 10) if args.tiny else (args.samples, 50)
    results = {name: run_model(name, samples, steps, args.tiny) for name in args.models}
    out = RESULTS / ("calibrate_tiny.json" if args.tiny else "calibrate.json")
    write_results(out, "calibrate", {"samples": samples, "steps": steps, "models": results})
    plot(results, out.with_suffix(".png"))
    for name, result in results.items():
        print(f"{name}: calibration costs {result['calibration_cost_in_generations']:.2f} generations of its batch")


if __name__ == "__main__":
    main()
