"""A schedule searched at 50 steps, used at 25 and 30 steps, against schedules searched at those step counts.

    OMP_NUM_THREADS=2 python benchmarks/resample.py --searched 25=RUN_25 30=RUN_30 [--model digits-dit]

RUN_M is a ``prune`` output folder of the same model searched with ``--steps M`` (the zoo's search settings:
``--ratio 0.8 --iterations 200 --batch-size 2 --gradient full``). At each step count M, from the same 256 noises
and labels, SSIM to the full model's images at M steps for:
- ``nearest rows``: the zoo search's 50-step schedule at 0.8 (``m.dipgo().schedule(0.8)``) resampled by nearest
  timestep (``CacheSchedule.resampled``,
  what ``sample --schedule`` and ``apply(..., strict=False)`` do);
- ``scores``: the shipped pruner's keep scores interpolated to the M timesteps and thresholded at 0.8
  (``SearchResult.schedule(0.8, timesteps=...)``);
- ``searched``: the schedule searched at M steps.
Results: benchmarks/results/resample.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402
from peers import load_search  # noqa: E402


def main() -> None:
    import diffusion_shortcuts as ds
    from diffusion_shortcuts.metrics import ssim
    from diffusion_shortcuts.prune.compare import generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--searched", nargs="+", required=True, metavar="STEPS=RUN_DIR")
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    m = ds.zoo.load(args.model)
    search = m.dipgo()
    shipped = search.schedule(0.8)
    labels = torch.arange(args.samples) % 10
    noise = m.noise(args.samples, torch.Generator().manual_seed(0))
    rows = []
    for item in args.searched:
        steps, run = item.split("=", 1)
        sampler = m.sampler(int(steps))
        sampler.progress = False
        variants = {"nearest rows": shipped.resampled(sampler.timesteps),
                    "scores": search.schedule(0.8, timesteps=sampler.timesteps),
                    "searched": load_search(m, Path(run)).schedule(0.8)}
        with torch.no_grad():
            full = generate(sampler, m.encode, labels, noise, batch_size=64)
            for name, schedule in variants.items():
                images = generate(sampler, m.encode, labels, noise, batch_size=64, schedule=schedule)
                rows.append({"steps": int(steps), "variant": name, "macs_ratio": schedule.macs_ratio,
                             "ssim": float(ssim(images, full).mean())})
                print(f"{steps} steps, {name}: MACs {schedule.macs_ratio:.3f} SSIM {rows[-1]['ssim']:.4f}", flush=True)
    summary = []
    for steps in sorted({r["steps"] for r in rows}):
        at = {r["variant"]: r for r in rows if r["steps"] == steps}
        for name in ("nearest rows", "scores"):
            gap = at["searched"]["ssim"] - at[name]["ssim"]
            summary.append({"steps": steps, "variant": name, "ssim_gap_to_searched": gap, "within_0.01": gap <= 0.01})
    write_results(RESULTS / "resample.json", "resample", {"model": args.model, "samples": args.samples, "rows": rows,
                                                          "summary": summary})


if __name__ == "__main__":
    main()
