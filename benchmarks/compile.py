"""torch.compile with cache schedules on the zoo's models, on the CPU: eager and compiled, full and with the zoo's
0.8 schedule, and what compiling costs.

    OMP_NUM_THREADS=2 python benchmarks/compile.py [--models digits-dit digits-unet]

For each model: DDIM 20 steps, the model's guidance, batch 4. Four ways to sample, timed round-robin in one process
after each one's first (compiling) run, medians of 5: eager full, compiled full (the keep-everything table with the
blocks compiled, so both compiled rows run the same hooks), eager with the schedule, compiled with the schedule
(``ds.prune.apply(..., compile=True)``: each gated block compiled with ``fullgraph=True``). Also: the first
generation's seconds (compiling included), dynamo's graph breaks and distinct graphs, and the largest difference
between compiled and eager images. Writes benchmarks/results/compile.json. The GPU rows are in
``benchmarks/gpu.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402

import diffusion_shortcuts as ds  # noqa: E402
from diffusion_shortcuts.prune.compare import keep_everything  # noqa: E402


def measure(name: str, steps: int = 20, batch: int = 4, repeats: int = 5) -> dict:
    m = ds.zoo.load(name)
    sampler = m.sampler(steps)
    noise, cond = m.noise(batch, torch.Generator().manual_seed(0)), m.encode(torch.arange(batch) % 10)
    schedule = m.cache_schedule(0.8).fitted(sampler.timesteps)
    full = keep_everything(sampler, noise, cond[:1] if cond is not None else None)
    variants = {"eager, full": (None, False), "compiled, full": (full, True),
                "eager, schedule 0.8": (schedule, False), "compiled, schedule 0.8": (schedule, True)}

    def run(table, compile):
        if table is None:
            return sampler(noise, cond)
        with ds.prune.apply(m.model, table, sampler, compile=compile):
            return sampler(noise, cond)

    torch._dynamo.reset()
    counters.clear()
    first, images = {}, {}
    with torch.no_grad():
        for label, (table, compile) in variants.items():
            start = time.perf_counter()
            images[label] = run(table, compile)
            first[label] = time.perf_counter() - start
        times = {label: [] for label in variants}
        for _ in range(repeats):
            for label, (table, compile) in variants.items():
                start = time.perf_counter()
                run(table, compile)
                times[label].append(time.perf_counter() - start)
    seconds = {label: statistics.median(v) for label, v in times.items()}
    return {"steps": steps, "batch": batch, "schedule_macs_ratio": schedule.macs_ratio, "seconds": seconds,
            "first_generation_seconds": first,
            "compile_seconds": {label: first[label] - seconds[label] for label in variants if "compiled" in label},
            "speedup_over_eager_full": {label: seconds["eager, full"] / s for label, s in seconds.items()},
            "schedule_speedup": {"eager": seconds["eager, full"] / seconds["eager, schedule 0.8"],
                                 "compiled": seconds["compiled, full"] / seconds["compiled, schedule 0.8"]},
            "graph_breaks": sum(counters["graph_break"].values()),
            "unique_graphs": counters["stats"]["unique_graphs"],
            "max_difference_compiled_vs_eager": {
                "full": float((images["compiled, full"] - images["eager, full"]).abs().max()),
                "schedule": float((images["compiled, schedule 0.8"] - images["eager, schedule 0.8"]).abs().max())}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits-dit", "digits-unet"])
    args = parser.parse_args()
    out = {"threads": torch.get_num_threads(), "models": {name: measure(name) for name in args.models}}
    write_results(RESULTS / "compile.json", "compile", out)
    for name, row in out["models"].items():
        print(name, f"(schedule MACs {row['schedule_macs_ratio']:.3f}; graph breaks {row['graph_breaks']}, "
                    f"graphs {row['unique_graphs']})")
        for label, sec in row["seconds"].items():
            print(f"  {label:24s} {sec:7.3f} s  {row['speedup_over_eager_full'][label]:5.2f}x eager full  "
                  f"first run {row['first_generation_seconds'][label]:7.1f} s")
