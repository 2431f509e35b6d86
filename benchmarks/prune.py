"""DiP-GO schedules against the honest baselines at matched MACs, side by side in one process per model.

    python benchmarks/prune.py                      # both zoo generators, the shipped pruners
    python benchmarks/prune.py --models digits-unet    # one model; the other's earlier results are kept

For each model (DDIM 50 steps, the model's guidance) the full model's images (``--samples``, 100 per
class, fixed seed) are the reference; every variant samples from the same noise and labels:
- ``dipgo``: the schedule at each ratio, post-processed from the trained pruner shipped in the zoo
  (one search at 0.8; the other ratios re-threshold its keep scores);
- ``uniform``: DeepCache-style schedules (recompute all every n steps, else all but the outermost
  blocks), n chosen for the MACs closest to the DiP-GO schedule's (it cannot go below the outer blocks' share);
- ``ddim`` / ``dpm``: DDIM and DPM-Solver++ 2M with the same number of full denoiser calls;
- on the DiT, diffusers' FirstBlockCache at a few thresholds (its cost depends on the data: MACs
  counted on one batch).
Figures: MACs ratio, speedup (batch 16, timed alternately with the full model), FID on
digits-classifier features against the held-out set, accuracy by digits-classifier-eval, SSIM/PSNR to
the full model's images. Results: benchmarks/results/prune.json and prune.png.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, diffusers_hooks, emit, run_child, write_results  # noqa: E402


def run_model(name: str, ratios: list[float], samples: int, batch: int, repeats: int, fbc_thresholds) -> dict:
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from tqdm.auto import tqdm

    import diffusion_shortcuts as ds
    from diffusion_shortcuts.metrics import count_macs, psnr, ssim, timed_pair
    from diffusion_shortcuts.prune import CacheSchedule, apply, profile
    from diffusion_shortcuts.zoo.judge import DigitJudge

    torch.manual_seed(0)
    m = ds.zoo.load(name)
    judge = DigitJudge()
    sampler = m.sampler()
    labels = torch.arange(samples) % m.num_classes
    noise = m.noise(samples, torch.Generator().manual_seed(0))
    noise16, cond16 = m.noise(16, torch.Generator().manual_seed(1)), m.encode(torch.arange(16) % 10)
    prof = profile(m.model, noise16, cond16)
    search = m.dipgo()
    with torch.no_grad():
        keep_scores = search.pruner.keep_scores()

    def generate(smp, context=nullcontext, desc=""):
        out = []
        with context():
            for i in tqdm(range(0, samples, batch), desc=desc, leave=False):
                out.append(smp(noise[i:i + batch], m.encode(labels[i:i + batch])).clamp(0, 1))
        return torch.cat(out)

    full_images = generate(sampler, desc="full")
    rows = [{"method": "full", "ratio": 0.0, "macs_ratio": 1.0, "speedup": 1.0, **judge(full_images, labels),
             "ssim": 1.0, "psnr": float("inf")}]

    def measure(method: str, ratio: float, smp, context, macs_ratio: float, **extra):
        images = generate(smp, context, desc=method)

        def variant():
            with context():
                smp(noise16, cond16)

        full_s, variant_s = timed_pair(lambda: sampler(noise16, cond16), variant, repeats)
        row = {"method": method, "ratio": ratio, "macs_ratio": macs_ratio, "speedup": full_s / variant_s,
               "seconds_full_batch16": full_s, "seconds_batch16": variant_s, **judge(images, labels),
               "ssim": float(ssim(images, full_images).mean()), "psnr": float(psnr(images, full_images).mean()),
               **extra}
        rows.append(row)
        print(f"{name} {method} r={ratio}: MACs {macs_ratio:.3f} speedup {row['speedup']:.2f} FID {row['fid']:.2f} "
              f"acc {row['accuracy']:.3f} SSIM {row['ssim']:.3f}", flush=True)

    uniform = {n: CacheSchedule.uniform(sampler.timesteps, prof, n) for n in range(2, 51)}
    for ratio in ratios:
        sched = CacheSchedule.from_scores(keep_scores, sampler.timesteps, prof, ratio)
        measure("dipgo", ratio, sampler, lambda s=sched: apply(m.model, s, sampler), sched.macs_ratio,
                within_tolerance=sched.info["within_tolerance"])
        n, uni = min(uniform.items(), key=lambda kv: abs(kv[1].macs_ratio - sched.macs_ratio))
        measure("uniform", ratio, sampler, lambda s=uni: apply(m.model, s, sampler), uni.macs_ratio, interval=n)
        calls = max(1, round(sched.macs_ratio * sampler.num_inference_steps))
        for method, scheduler in (("ddim", m.scheduler),
                                  ("dpm", DPMSolverMultistepScheduler.from_config(m.scheduler.config,
                                                                                  algorithm_type="dpmsolver++",
                                                                                  solver_order=2))):
            few = m.sampler(calls, scheduler=scheduler)
            measure(method, ratio, few, nullcontext, calls / sampler.num_inference_steps, steps=calls)
    if type(m.model).__name__ == "DiTTransformer2DModel":
        for threshold in fbc_thresholds:
            context = first_block_cache(m.model, threshold)
            with context():
                total, _ = count_macs(sampler, noise16, cond16)
            full_total, _ = count_macs(sampler, noise16, cond16)
            measure("first_block_cache", threshold, sampler, context, total / full_total, threshold=threshold)
    return {"model": name, "samples": samples, "num_inference_steps": sampler.num_inference_steps,
            "guidance_scale": sampler.guidance_scale, "search": search.history.get("settings", {}),
            "search_seconds": sum(search.history.get("seconds", [])), "rows": rows,
            "block_profile": {"blocks": list(prof.blocks), "block_macs": list(prof.block_macs),
                              "total_macs": prof.total_macs}}


def first_block_cache(model, threshold: float):
    """diffusers' FirstBlockCache on a DiT, as a context (see ``_common.diffusers_hooks``)."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    return diffusers_hooks(model, lambda: apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold)))


def plot(results: list[dict], path: Path) -> None:
    """Quality against measured speedup: FID (top; off-scale points drawn at the top edge) and SSIM to
    the full model's images (bottom), one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusion_shortcuts.plots import save_figure

    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 7), squeeze=False)
    for column, result in enumerate(results):
        fid_ax, ssim_ax = axes[0][column], axes[1][column]
        full = next(r for r in result["rows"] if r["method"] == "full")
        top = 2.5 * full["fid"]
        for method in sorted({r["method"] for r in result["rows"]} - {"full"}):
            rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["speedup"])
            speed = [r["speedup"] for r in rows]
            fid_ax.plot(speed, [min(r["fid"], top) for r in rows], marker="o", label=method)
            ssim_ax.plot(speed, [r["ssim"] for r in rows], marker="o", label=method)
        fid_ax.axhline(full["fid"], color="gray", ls="--", lw=1, label="full model (50 steps)")
        fid_ax.set(ylim=(0, top * 1.05), ylabel=f"FID (lower is better; clipped at {top:.0f})",
                   title=f"{result['model']}, {result['samples']} samples")
        ssim_ax.set(ylim=(max(0.8, min(r["ssim"] for r in result["rows"]) - 0.01), 1.001),
                    xlabel="measured speedup (batch 16)", ylabel="SSIM to the full model's images")
        for ax in (fid_ax, ssim_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path)


def table(results: list[dict]) -> str:
    """The markdown rows BENCHMARKS.md shows, per model."""
    lines = []
    for result in results:
        lines += [f"{result['model']} ({result['samples']} samples, DDIM {result['num_inference_steps']} steps, "
                  f"guidance {result['guidance_scale']}):", "",
                  "| target ratio | method | MACs of full | speedup | FID | accuracy | SSIM to full | PSNR |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(result["rows"], key=lambda r: (r["method"] != "full", r["method"] == "first_block_cache",
                                                        r["ratio"], r["method"])):
            label = {"dipgo": "DiP-GO", "uniform": f"uniform (n={r.get('interval')})",
                     "ddim": f"DDIM {r.get('steps')} steps", "dpm": f"DPM-Solver++ {r.get('steps')} steps",
                     "first_block_cache": f"FirstBlockCache (threshold {r.get('threshold')})"
                     }.get(r["method"], r["method"])
            ratio = "-" if r["method"] in ("full", "first_block_cache") else f"{r['ratio']:g}"
            lines.append(f"| {ratio} | {label} | {r['macs_ratio']:.3f} | {r['speedup']:.2f}x | {r['fid']:.1f} | "
                         f"{r['accuracy']:.3f} | {r['ssim']:.3f} | {r['psnr']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits-unet", "digits-dit"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.7, 0.8, 0.85])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds per variant")
    parser.add_argument("--fbc-thresholds", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--out", type=Path, default=RESULTS / "prune.json")
    parser.add_argument("--replot", action="store_true", help="redraw the plot from --out and print the table")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = ["--ratios", *map(str, args.ratios), "--samples", str(args.samples), "--batch", str(args.batch),
              "--repeats", str(args.repeats), "--fbc-thresholds", *map(str, args.fbc_thresholds)]
    import json

    if args.child:
        return emit(run_model(args.model, args.ratios, args.samples, args.batch, args.repeats, args.fbc_thresholds))
    if args.replot:
        results = json.loads(args.out.read_text())["results"]
        plot(results, args.out.with_suffix(".png"))
        return print(table(results))
    results = [run_child(__file__, ["--model", name, *common]) for name in args.models]
    if args.out.exists():  # keep the other models' results from an earlier run (one model at a time is fine)
        earlier = json.loads(args.out.read_text())["results"]
        results = [r for r in earlier if r["model"] not in args.models] + results
    write_results(args.out, "prune", {"ratios": args.ratios, "samples": args.samples, "results": results})
    plot(results, args.out.with_suffix(".png"))
    print(table(results))


if __name__ == "__main__":
    main()
