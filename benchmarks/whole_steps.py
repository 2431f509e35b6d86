"""Wall-clock of the zoo's digits-unet DiP-GO search at 0.8 (``m.dipgo().schedule(0.8)``) with and without
skipping the denoiser call at steps that reuse every block, against the full model and DDIM with as many steps as
the schedule's MACs
(issue: a schedule should turn its MACs saving into time as a fewer-step sampler does).

All variants are timed round-robin in one process, batch 16, guidance 3, DDIM 50; medians of the rounds.
Writes benchmarks/results/whole_steps.json.

    OMP_NUM_THREADS=2 python benchmarks/whole_steps.py [--sd15]

``--sd15`` adds a full-size SD-1.5 UNet with random weights (see :func:`sd15`; a few minutes).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

import diffusion_shortcuts as ds
from diffusion_shortcuts.metrics import Timer
from diffusion_shortcuts.prune import CacheSchedule, apply

RESULTS = Path(__file__).parent / "results"


def variants(model, sampler, fewer, noise, cond, schedule, computing) -> dict:
    """The four ways to sample one batch: full, the schedule with and without whole steps, fewer steps."""
    def scheduled(s):
        def run():
            with apply(model, s, sampler):
                sampler(noise, cond)
        return run

    return {"full": lambda: sampler(noise, cond), "schedule, every call run": scheduled(computing),
            "schedule, whole steps skipped": scheduled(schedule),
            f"DDIM {fewer.num_inference_steps} steps": lambda: fewer(noise, cond)}


def round_robin(runs: dict, rounds: int) -> dict:
    """Median seconds of each run, timed in turn for ``rounds`` rounds after one warm-up round."""
    times = {name: [] for name in runs}
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, run in runs.items():
                with Timer() as t:
                    run()
                if r:
                    times[name].append(t.seconds)
    return {name: statistics.median(v) for name, v in times.items()}


def block_seconds(model, sampler, noise, cond, blocks: list[str]) -> tuple[list[float], float]:
    """Seconds each block takes in one full sampling run, and the run's: where a schedule's time goes when
    the blocks' cost per MAC differs (on a CPU, the 16x16 attention blocks cost more per MAC than the others)."""
    modules, spent, started = dict(model.named_modules()), dict.fromkeys(blocks, 0.0), {}
    handles = []
    for name in blocks:
        handles.append(modules[name].register_forward_pre_hook(
            lambda _m, _a, name=name: started.__setitem__(name, time.perf_counter())))
        handles.append(modules[name].register_forward_hook(
            lambda _m, _a, _o, name=name: spent.__setitem__(name, spent[name] + time.perf_counter() - started[name])))
    with torch.no_grad(), Timer() as whole:
        sampler(noise, cond)
    for handle in handles:
        handle.remove()
    return [spent[name] for name in blocks], whole.seconds


def time_weighted_kept(schedule, seconds: list[float], total: float) -> float:
    """The schedule's kept fraction with each block weighted by its measured time instead of its MACs: the
    speedup a hook-free implementation of the schedule could reach on this machine is its inverse."""
    share = torch.tensor(seconds, dtype=torch.float64) / total
    kept = (~schedule.reuse).double().mean(0)
    return float(1 - share.sum() + (share * kept).sum())


def main(rounds: int = 7, batch: int = 16) -> dict:
    m = ds.zoo.load("digits-unet")
    sampler = m.sampler(50)
    schedule = m.dipgo().schedule(0.8)
    computing = CacheSchedule(schedule.reuse, schedule.timesteps, schedule.blocks, schedule.kinds,
                              schedule.block_macs, schedule.total_macs, schedule.model_id, dict(schedule.info), False)
    fewer = max(1, round(50 * schedule.macs_ratio))
    ddim = m.sampler(fewer)
    noise = m.noise(batch, torch.Generator().manual_seed(0))
    cond = m.encode(torch.arange(batch) % 10)

    median = round_robin(variants(m.model, sampler, ddim, noise, cond, schedule, computing), rounds)
    seconds, total = block_seconds(m.model, sampler, noise, cond, list(schedule.blocks))
    weighted = time_weighted_kept(schedule, seconds, total)
    macs_speedup = 1 / schedule.macs_ratio
    rows = {name: {"seconds": s, "speedup": median["full"] / s} for name, s in median.items()}
    result = {"command": "OMP_NUM_THREADS=2 python benchmarks/whole_steps.py " + " ".join(sys.argv[1:]),
              "batch": batch, "rounds": rounds, "macs_ratio": schedule.macs_ratio, "macs_speedup": macs_speedup,
              "whole_steps": int(schedule.reuse.all(1).sum()), "threads": torch.get_num_threads(), "rows": rows,
              "fraction_of_macs_speedup": {name: r["speedup"] / macs_speedup for name, r in rows.items()},
              "ddim_macs_ratio": fewer / 50,
              "block_share_of_time": dict(zip(schedule.blocks, (s / total for s in seconds))),
              "block_share_of_macs": dict(zip(schedule.blocks, (b / schedule.total_macs for b in schedule.block_macs))),
              "time_weighted_kept": weighted, "time_weighted_speedup": 1 / weighted,
              "fraction_of_time_weighted_speedup": {name: r["speedup"] * weighted for name, r in rows.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "whole_steps.json").write_text(json.dumps(result, indent=1) + "\n")
    return result




def sd15(rounds: int = 3) -> dict:
    """A full-size SD-1.5 UNet (random weights, 32x32 latents, batch 1, 77 prompt tokens, no guidance): a
    DiP-GO-style table that keeps every block at 10 of 50 steps (0, 5, ..., 45) and reuses all nine at the
    other 40, with and without skipping the whole steps, against the full model and DDIM with 10 steps."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    sys.path.insert(0, str(Path(__file__).parent))
    from real_architectures import SD15

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15["config"]).eval().requires_grad_(False)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sampler, ddim = ds.Sampler(unet, scheduler, 50), ds.Sampler(unet, scheduler, 10)
    noise, cond = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 768)
    prof = ds.prune.profile(unet, noise, cond)
    reuse = torch.ones(50, len(prof.blocks), dtype=torch.bool)
    reuse[::5] = False
    schedule = CacheSchedule.from_table(reuse, sampler.timesteps, prof, method="dipgo-style: keep 10 of 50")
    computing = CacheSchedule(schedule.reuse, schedule.timesteps, schedule.blocks, schedule.kinds,
                              schedule.block_macs, schedule.total_macs, schedule.model_id, {}, False)

    median = round_robin(variants(unet, sampler, ddim, noise, cond, schedule, computing), rounds)
    return {"macs_ratio": schedule.macs_ratio, "macs_ratio_every_call_run": computing.macs_ratio, "rounds": rounds,
            "rows": {name: {"seconds": s, "speedup": median["full"] / s} for name, s in median.items()}}


if __name__ == "__main__":
    out = main()
    for name, row in out["rows"].items():
        print(f"{name:32s} {row['seconds']:.3f} s  {row['speedup']:.2f}x  "
              f"({out['fraction_of_macs_speedup'][name]:.2f} of the MACs speedup {out['macs_speedup']:.2f}x, "
              f"{out['fraction_of_time_weighted_speedup'][name]:.2f} of the time-weighted "
              f"{out['time_weighted_speedup']:.2f}x)")
    if "--sd15" in sys.argv:
        out["sd15"] = sd15()
        (RESULTS / "whole_steps.json").write_text(json.dumps(out, indent=1) + "\n")
        for name, row in out["sd15"]["rows"].items():
            print(f"SD-1.5 {name:32s} {row['seconds']:.3f} s  {row['speedup']:.2f}x")
        print(f"SD-1.5 schedule MACs {out['sd15']['macs_ratio']:.3f} (every call run: "
              f"{out['sd15']['macs_ratio_every_call_run']:.3f})")
