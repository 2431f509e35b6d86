"""Does the latent objective rank schedules as decoded SSIM does? Both measures on the same tables and seeds.

    OMP_NUM_THREADS=2 python benchmarks/latent_objective.py [--samples 64] [--tiny]      # about 10 minutes

On each zoo model (DDIM 50, its guidance, the ten labels), a spread of tables (the rule at intervals 3-10, the
calibrated table by steps and by blocks at 0.15-0.4 of the MACs) is judged twice on the same seeds against the full
model: by the search's latent objective (relative squared distance of the final latents, no decoding) and by SSIM of
the decoded images. The agreement is Spearman's rank correlation of the two over the tables (distance ascending
against SSIM descending) and the fraction of table pairs both order the same way (ties with ties). The zoo's
decoders are ``x / 2 + 0.5``: this measures the objective, not a VAE. Results: benchmarks/results/latent_objective.json.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402


def ranks(values: list[float]) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank (as Spearman's coefficient takes them)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):
        tied = values == value
        out[tied] = out[tied].mean()
    return out


def run_model(name: str, samples: int, steps: int) -> dict:
    import diffusion_shortcuts as ds
    from diffusion_shortcuts.metrics import ssim
    from diffusion_shortcuts.prune.compare import generate

    m = ds.zoo.load(name)
    sampler = m.sampler(steps)
    latent_sampler = copy.copy(sampler)
    latent_sampler.decode = None
    labels = torch.arange(samples) % 10
    noise = m.noise(samples, torch.Generator().manual_seed(0))
    conditions = m.encode(torch.arange(10))
    objective = ds.prune.Objective("latent")
    prof = ds.prune.profile(sampler.model, torch.zeros(1, *sampler.sample_shape), conditions[:1])
    tables = {f"rule every {n}": ds.prune.CacheSchedule.every(sampler.timesteps, prof, n) for n in (3, 5, 7, 10)}
    for macs in (0.15, 0.2, 0.3, 0.4):
        for granularity in ("step", "block"):
            tables[f"calibrated {granularity} {macs}"] = ds.prune.calibrate(
                sampler, conditions, macs=macs, batch_size=8, granularity=granularity)
    with torch.no_grad():
        full_latents = generate(latent_sampler, m.encode, labels, noise, batch_size=64)
        full_images = sampler.decode(full_latents)
        rows = []
        for label, table in tables.items():
            latents = generate(latent_sampler, m.encode, labels, noise, batch_size=64, schedule=table)
            _, figures = objective.loss(latents, full_latents, None)
            rows.append({"table": label, "macs_ratio": table.macs_ratio,
                         "latent_distance": float(figures["latent_distance"]),
                         "ssim": float(ssim(sampler.decode(latents).clamp(0, 1), full_images.clamp(0, 1)).mean())})
            print(f"{name}: {rows[-1]}", flush=True)
    distance, quality = [r["latent_distance"] for r in rows], [-r["ssim"] for r in rows]
    spearman = float(np.corrcoef(ranks(distance), ranks(quality))[0, 1])
    pairs = list(itertools.combinations(range(len(rows)), 2))
    same = sum(np.sign(distance[i] - distance[j]) == np.sign(quality[i] - quality[j]) for i, j in pairs) / len(pairs)
    return {"rows": rows, "spearman": spearman, "pairs_ordered_alike": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--models", nargs="*", default=["digits-dit", "digits-unet"])
    args = parser.parse_args()
    samples, steps = (8, 10) if args.tiny else (args.samples, 50)
    results = {name: run_model(name, samples, steps) for name in args.models}
    for name, result in results.items():
        print(f"{name}: Spearman {result['spearman']:.3f}, pairs ordered alike {result['pairs_ordered_alike']:.3f}")
    out = RESULTS / ("latent_objective_tiny.json" if args.tiny else "latent_objective.json")
    write_results(out, "latent_objective", {"samples": samples, "steps": steps, "models": results})


if __name__ == "__main__":
    main()
