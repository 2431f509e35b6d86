"""Our cache schedules against diffusers' rule-based caches (TaylorSeer, MagCache) at equal MACs.

    OMP_NUM_THREADS=2 python benchmarks/peers.py [--models digits-dit digits-unet digits-flux] [--searched NAME=RUN_DIR]

For each model: 50 steps (DDIM; digits-flux: its flow-matching Euler), the model's guidance (3; digits-flux: none, its
true CFG off as in its stock call), 64 samples (same noise and labels for every variant). The
reference is the full model's images; every variant is judged by SSIM and PSNR to them, by FID on
digits-classifier features against the held-out digits and by digits-classifier-eval's accuracy.

MACs are counted, not predicted: one batch of the variant's whole sampling run under torch's FLOP counter
(attention's products included), over the same count for the full model. That is exact for data-dependent
caches (MagCache) and counts only what really ran. Seconds: batch 16, the variant and the full model timed
alternately (medians of 3).

Variants:
- ``dipgo copy`` / ``dipgo taylor1``: the zoo's shipped DiP-GO search, re-thresholded at ratios 0.5, 0.7, 0.8
  and 0.85, reusing by copy and by the bounded first-order forecast (the table searched for copying);
- ``searched NAME``: the schedules of another search (``--searched "taylor1 search=RUN_DIR"``, a ``prune``
  output folder, run on the model it was made for), at the same ratios (``--own-ratio``: at the ratio it was
  searched for only), in the mode it was searched with;
- ``rule table``: TaylorSeer's table (every block computed at steps 0-2 and every n-th step after, n = 5, 7, 10)
  applied by our hooks, reusing by copy and by our bounded first- and second-order forecasts: the same table as
  the hook, so a difference is the forecast's, not the table's;
- ``taylorseer``: ``diffusers.hooks.TaylorSeerCacheConfig`` on the denoiser's blocks (the DiT's
  ``transformer_blocks.*``; the UNet's resnets, samplers and attention transformer blocks: ``BLOCK_PATTERNS``),
  first order, the documented warm-up (``disable_cache_before_step=3``), Taylor factors
  in float32 (the docs: higher precision improves accuracy), ``cache_interval`` swept from 2 to 10 (and second
  order, ``max_order=2``, at 5, 7 and 10);
- ``firstblockcache``: ``diffusers.hooks.FirstBlockCacheConfig`` (Flux only here), threshold swept;
- ``magcache``: ``diffusers.hooks.MagCacheConfig`` calibrated on this model and sampler as its docs say (one run
  with ``calibrate=True``; the printed ratios passed back), ``num_inference_steps=50``, the documented
  ``max_skip_steps=3`` and ``retention_ratio=0.2``, threshold swept (DiT and Flux: it hooks transformer blocks).

The comparison the issue asks for: for each of our rows, the best SSIM a peer reaches at MACs no higher than
ours (plus 0.005). Results: benchmarks/results/peers.json (other --models: peers_NAMES.json, e.g. peers_flux.json).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, diffusers_hooks, printed_magcache_ratios, write_results  # noqa: E402

RATIOS = (0.5, 0.7, 0.8, 0.85)
# the modules diffusers' TaylorSeer caches, per family: a DiT's transformer blocks; on a UNet its hooks need modules
# that return one tensor (a down block returns a tuple with its residuals, an attention a 1-tuple that the hook
# unwraps), so each resnet, sampler and attention's transformer block (proj_in / proj_out stay computed)
BLOCK_PATTERNS = {"dit": r"transformer_blocks\.\d+", "flux": r"(single_)?transformer_blocks\.\d+",
                  "sd-unet": r"(down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)(resnets\.\d+|downsamplers\.\d+|"
                             r"upsamplers\.\d+|attentions\.\d+\.transformer_blocks\.\d+)"}
PEERS = ("taylorseer", "magcache", "firstblockcache")
MAGCACHE_FAMILIES = ("dit", "flux")  # MagCache measures one residual stream from its first to its last block


def diffusers_cache(model, config):
    """A diffusers cache (TaylorSeer or MagCache, by its config) on ``model`` as a context."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache, apply_taylorseer_cache

    apply = apply_mag_cache if isinstance(config, MagCacheConfig) else apply_taylorseer_cache
    return diffusers_hooks(model, lambda: apply(model, config))


def calibrate_magcache(model, sampler, noise, cond) -> list[float]:
    """MagCache's calibration as its docs describe it: one run with ``calibrate=True``, ratios read from what it
    prints."""
    from diffusers.hooks import MagCacheConfig

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), diffusers_cache(model, MagCacheConfig(
            calibrate=True, num_inference_steps=sampler.num_inference_steps))(), torch.no_grad():
        sampler(noise, cond)
    return printed_magcache_ratios(printed.getvalue())


def searches_of(m, model_id: str, searched: list[tuple[str, Path]]) -> dict:
    """The ``prune`` output folders made for zoo model ``m`` (whose id is ``model_id``, matched against their
    schedules') as SearchResults by label; folders made for another model are left to that model's run (so one
    label can name a search per model)."""
    from diffusion_shortcuts.prune import CacheSchedule, SearchResult

    return {label: SearchResult.load(path, m.model, m.noise(1), m.encode([0])) for label, path in searched
            if CacheSchedule.load(path / "schedule.json").model_id == model_id}


def run_model(name: str, samples: int, searched: list[tuple[str, Path]], own_ratio: bool = False) -> list[dict]:
    from diffusers.hooks import MagCacheConfig, TaylorSeerCacheConfig

    import diffusion_shortcuts as ds
    from diffusion_shortcuts.metrics import count_macs, psnr, ssim, timed_pair
    from diffusion_shortcuts.prune import CacheSchedule, apply
    from diffusion_shortcuts.prune.compare import generate
    from diffusion_shortcuts.zoo.judge import DigitJudge

    torch.manual_seed(0)
    m = ds.zoo.load(name)
    sampler = m.sampler(50)
    sampler.progress = False
    judge = DigitJudge()
    labels = torch.arange(samples) % 10
    noise = m.noise(samples, torch.Generator().manual_seed(0))
    noise16, cond16 = m.noise(16, torch.Generator().manual_seed(1)), m.encode(torch.arange(16) % 10)
    with torch.no_grad():
        full_macs, _ = count_macs(sampler, noise16, cond16)
        full = generate(sampler, m.encode, labels, noise, batch_size=64)
    rows = []

    def measure(method: str, context, **extra):
        with torch.no_grad():
            with context():
                macs, _ = count_macs(sampler, noise16, cond16)
            with context():
                images = generate(sampler, m.encode, labels, noise, batch_size=64)

            def variant():
                with context():
                    sampler(noise16, cond16)

            full_s, variant_s = timed_pair(lambda: sampler(noise16, cond16), variant, repeats=3)
        row = {"model": name, "method": method, "macs_ratio": macs / full_macs, "speedup": full_s / variant_s,
               "ssim": float(ssim(images, full).mean()), "psnr": float(psnr(images, full).mean()),
               **judge(images, labels), **extra}
        rows.append(row)
        print(f"{name} {method} {extra}: MACs {row['macs_ratio']:.3f} SSIM {row['ssim']:.4f} PSNR {row['psnr']:.1f} "
              f"FID {row['fid']:.2f} acc {row['accuracy']:.3f} speedup {row['speedup']:.2f}", flush=True)

    try:
        dipgo = m.dipgo()
    except FileNotFoundError:  # a model that ships calibrated tables and no search (digits-flux)
        dipgo = None
    profile = dipgo.profile if dipgo is not None else ds.prune.profile(
        m.model, noise16[:1], ds.conditions.first(cond16))
    if dipgo is None:
        for ratio in m.schedule_ratios:
            for mode in ("copy", "taylor1"):
                measure(f"shipped calibrated {mode}", lambda s=m.cache_schedule(ratio).with_mode(mode):
                        apply(m.model, s, sampler), ratio=ratio)
    searches = {**({"dipgo": dipgo} if dipgo is not None else {}), **searches_of(m, profile.model_id, searched)}
    for label, search in searches.items():
        modes = ("copy", "taylor1") if label == "dipgo" else (search.reuse_mode,)
        own = search.history["settings"]["ratio"]
        for ratio in (own,) if own_ratio and label != "dipgo" else RATIOS:
            base = search.schedule(ratio)
            for mode in modes:
                schedule = base.with_mode(mode)
                measure(f"{label} {mode}", lambda s=schedule: apply(m.model, s, sampler), ratio=ratio)

    # TaylorSeer's own table (full steps 0-2, then every n-th) in our framework: which part of a difference is
    # the table and which the forecast
    for interval in (5, 7, 10):
        table = CacheSchedule.every(sampler.timesteps, profile, interval, warmup=3)
        for mode in ("copy", "taylor1", "taylor2"):
            measure(f"rule table {mode}", lambda s=table.with_mode(mode): apply(m.model, s, sampler),
                    cache_interval=interval)

    family = ds.families.family_of(m.model).name
    pattern = BLOCK_PATTERNS.get(family)
    if pattern is None:
        print(f"{name}: no TaylorSeer module pattern for the {family} family", flush=True)
        return rows
    for interval in range(2, 11):
        config = TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=3, max_order=1,
                                       taylor_factors_dtype=torch.float32, cache_identifiers=[pattern])
        measure("taylorseer", diffusers_cache(m.model, config), cache_interval=interval)
    for interval in (5, 7, 10):  # second order, against our taylor2 on the same table
        config = TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=3, max_order=2,
                                       taylor_factors_dtype=torch.float32, cache_identifiers=[pattern])
        measure("taylorseer order 2", diffusers_cache(m.model, config), cache_interval=interval)
    if family == "flux":  # FirstBlockCache hooks a Flux's double and single blocks
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        for threshold in (0.02, 0.05, 0.1, 0.2, 0.4):
            config = FirstBlockCacheConfig(threshold=threshold)
            measure("firstblockcache", diffusers_hooks(m.model, lambda c=config: apply_first_block_cache(m.model, c)),
                    threshold=threshold)
    if family not in MAGCACHE_FAMILIES:
        return rows
    ratios = calibrate_magcache(m.model, sampler, noise16, cond16)
    for threshold in (0.01, 0.03, 0.06, 0.1, 0.2, 0.4):
        config = MagCacheConfig(threshold=threshold, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=50,
                                mag_ratios=ratios)
        measure("magcache", diffusers_cache(m.model, config), threshold=threshold)
    return rows


def frontier(rows: list[dict], slack: float = 0.005) -> list[dict]:
    """For each of our rows, the best peer at no more MACs (plus ``slack``): the issue's comparison."""
    ours = [r for r in rows if r["method"].split()[0] not in (*PEERS, "rule")]
    peers = [r for r in rows if r["method"].split()[0] in PEERS]
    out = []
    for row in ours:
        for peer_name in PEERS:
            candidates = [p for p in peers if p["model"] == row["model"] and p["method"].split()[0] == peer_name
                          and p["macs_ratio"] <= row["macs_ratio"] + slack]
            if not candidates:
                continue
            best = max(candidates, key=lambda p: p["ssim"])
            out.append({"model": row["model"], "ours": row["method"], "ratio": row.get("ratio"),
                        "macs_ratio": row["macs_ratio"], "ssim": row["ssim"], "fid": row["fid"],
                        "speedup": row["speedup"], "peer": peer_name, "peer_macs_ratio": best["macs_ratio"],
                        "peer_ssim": best["ssim"], "peer_fid": best["fid"], "peer_speedup": best["speedup"],
                        "peer_setting": best.get("cache_interval", best.get("threshold")),
                        "peer_method": best["method"],
                        "ssim_at_least_peer": row["ssim"] >= best["ssim"]})
    return out


def pareto_plot(rows: list[dict], path: Path) -> None:
    """MACs against SSIM to the full model, one panel per model, one series per method (ours and each peer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from _common import finish_panel

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model):
            points = sorted((r["macs_ratio"], r["ssim"]) for r in rows if r["model"] == model and r["method"] == method)
            ax.plot(*zip(*points), marker="o", ms=3, label=method)
        finish_panel(ax, model, "MACs (counted) / full model's")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits-dit", "digits-unet"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--searched", nargs="*", default=[], metavar="LABEL=RUN_DIR",
                        help="more searches to compare (prune output folders); each is run on the model it was "
                             "made for")
    parser.add_argument("--own-ratio", action="store_true",
                        help="judge each --searched search at the ratio it was searched for only")
    args = parser.parse_args()
    searched = [(label, Path(path)) for label, path in (item.split("=", 1) for item in args.searched)]
    rows = []
    for name in args.models:
        rows += run_model(name, args.samples, searched, args.own_ratio)
    comparison = frontier(rows)
    for c in comparison:
        print(f"{c['model']} {c['ours']} r={c['ratio']}: MACs {c['macs_ratio']:.3f} SSIM {c['ssim']:.4f} | best "
              f"{c['peer_method']} at MACs <= : {c['peer_macs_ratio']:.3f} SSIM {c['peer_ssim']:.4f} "
              f"({c['peer_setting']})"
              f" -> {'at least' if c['ssim_at_least_peer'] else 'below'}")
    name = "peers" if args.models == ["digits-dit", "digits-unet"] else "peers_" + "_".join(
        model.removeprefix("digits-") for model in args.models)  # the default run's file is not overwritten
    write_results(RESULTS / f"{name}.json", "peers", {"samples": args.samples, "rows": rows, "comparison": comparison})
    pareto_plot(rows, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
