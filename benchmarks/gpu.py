"""The GPU benchmark: what the "Real GPUs" issue measured, side by side in one run, on one GPU.

    python benchmarks/gpu.py            # full size, on the GPU (at most about 8 minutes on one H100/H200)
    python benchmarks/gpu.py --tiny     # the same code on tiny models, on the CPU, in seconds (a test runs it)

Full size: SD-1.5 (UNet and VAE from their published configurations, random weights; prompt embeddings random,
77 x 768) at 512x512, DDIM 50, guidance 7.5, batch 1, bfloat16; FLUX.1-dev's transformer at 1024x1024 (random
weights, embeddings random) in bfloat16 under the stock FluxPipeline call, 28 steps, guidance 3.5. Rows:

- sampling (SD-1.5): the stock call and our Sampler, each full, with the rule table at 0.2 of the MACs
  (``CacheSchedule.every_for_ratio(..., 0.8)``) and (ours) DDIM with as many computed calls as the table; the
  denoising loop (latents out) apart from the whole call (VAE decode included); DeepCache's package at its
  default branch (0) and interval 3 where it is installed;
- SDO per iteration (``optimize_latents``, a brightness reward): Full, Checkpointed, Shortcut, and Shortcut on
  the rule table's rollout (``full_graph_steps=True``); seconds and peak memory (``max_memory_allocated``);
- LoRA fine-tuning per iteration: Shortcut(step="random"), and on the rule table's rollout;
- the pruner search (``train_pruner``, Checkpointed, batch 2): seconds per iteration and peak memory of today's
  default and of each cheaper setting (a fixed training set, the latent objective, the search at 2/5 of the steps),
  and the calibration's seconds (``ds.prune.calibrate``, also in generations of the same batch);
- compile: our loop eager and with each gated block compiled (``fullgraph=True``), full and with the rule table,
  and the seconds the first compiled run spends compiling;
- Flux (stock call): full, our rule table (``enable_cache``), diffusers' TaylorSeer hook on the same table
  (``cache_interval`` = the rule's interval, ``disable_cache_before_step=3``), diffusers' FirstBlockCache at its
  default threshold, and cache-dit's DBCache at its defaults where cache-dit is installed;
- Wan2.1-1.3B (video, 480x832 x 33 frames): the stock call with our rule table and diffusers' caches, SDO and LoRA
  against VADER's last step, the search against one generation (:mod:`gpu_wan`).

Every time is the median of repeated runs after a warm-up, with the GPU synchronised around each. Writes
benchmarks/results/gpu.json (``--tiny``: gpu_tiny.json) with the command and the GPU's name, and prints a table
last, with the issue's targets met or missed. Runs where diffusers is not installed by carrying its wheels (see
BENCHMARKS.md, "GPU").
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402
from gpu_wan import wan_rows, wan_targets, with_caches  # noqa: E402

import diffusion_shortcuts as ds  # noqa: E402
from diffusion_shortcuts.prune import CacheSchedule  # noqa: E402

SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=4, sample_size=512, scaling_factor=0.18215)
SIZES = {
    "full": dict(sd_steps=50, flux_steps=28, repeats=3, flux_repeats=2, iterations=2, compile_backend="inductor",
                 sd_latent=(4, 64, 64), text=(77, 768), flux_latent=(16, 128, 128), flux_text=(512, 4096),
                 flux_pooled=768),
    "tiny": dict(sd_steps=12, flux_steps=8, repeats=2, flux_repeats=1, iterations=2, compile_backend="aot_eager",
                 sd_latent=(4, 8, 8), text=(8, 32), flux_latent=(4, 8, 8), flux_text=(6, 32), flux_pooled=32),
}


class Bench:
    """Timing and memory on one device: synchronised around each run, medians after a warm-up run."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def seconds(self, run) -> float:
        times = []
        for r in range(self.repeats + 1):
            self.sync()
            start = time.perf_counter()
            with torch.no_grad():
                run()
            self.sync()
            if r:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    def peak_mb(self, run) -> tuple[object, float | None]:
        """``run()``'s result and the device's peak memory during it (None on the CPU)."""
        if self.device.type != "cuda":
            return run(), None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        out = run()
        self.sync()
        return out, torch.cuda.max_memory_allocated(self.device) / 2**20


# ---- models ----------------------------------------------------------------------------------------------

def sd_pipeline(tiny: bool, device, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from real_architectures import SD15

    torch.manual_seed(0)
    if tiny:
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
            norm_num_groups=4)
        vae = AutoencoderKL(**{**SD_VAE, "down_block_types": ("DownEncoderBlock2D",) * 2, "sample_size": 16,
                               "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (8, 16),
                               "layers_per_block": 1, "norm_num_groups": 4})
    else:
        with torch.device(device):
            unet, vae = UNet2DConditionModel(**SD15["config"]), AutoencoderKL(**SD_VAE)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def flux_pipeline(tiny: bool, device, dtype):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from real_architectures import FLUX

    torch.manual_seed(0)
    config = FLUX["config"] if not tiny else dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # 12B parameters: made in bfloat16 on the GPU, never in float32
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(default)
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer.eval().requires_grad_(False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def brightness(images, cond=None):
    return images.float().mean(dim=(1, 2, 3))


@contextlib.contextmanager
def enabled(model, schedule, sampler=None, **kwargs):
    net = ds.prune.enable(model, schedule, sampler, **kwargs)
    try:
        yield net
    finally:
        ds.prune.disable(model)


# ---- SD-1.5 ----------------------------------------------------------------------------------------------

def sd_rows(bench: Bench, size: dict, tiny: bool, device, dtype) -> dict:
    pipe = sd_pipeline(tiny, device, dtype)
    unet, steps = pipe.unet, size["sd_steps"]
    cond = torch.randn(1, *size["text"], device=device, dtype=dtype)
    uncond = torch.randn(1, *size["text"], device=device, dtype=dtype)
    noise = torch.randn(1, *size["sd_latent"], device=device)
    c, h, w = size["sd_latent"]
    pixels = dict(height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor)
    sampler = ds.Sampler.from_pipeline(pipe, steps, 7.5, uncond=uncond)
    loop = ds.Sampler(unet, pipe.scheduler, steps, 7.5, uncond=uncond)  # latents out: the denoising loop alone
    prof = ds.prune.profile(unet, noise, cond)
    rule = CacheSchedule.every_for_ratio(sampler.timesteps, prof, 0.8)
    computed = int((~rule.reuse.all(1)).sum())
    fewer = ds.Sampler.from_pipeline(pipe, computed, 7.5, uncond=uncond)

    def stock(output_type):
        return lambda: pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise.to(dtype),
                            num_inference_steps=steps, guidance_scale=7.5, output_type=output_type, **pixels)

    def scheduled(run, with_sampler=None):
        def go():
            with enabled(unet, rule, with_sampler):
                run()
        return go

    rows = {"stock call, full": bench.seconds(stock("pt")), "stock loop, full": bench.seconds(stock("latent")),
            "ours, full": bench.seconds(lambda: sampler(noise, cond)),
            "our loop, full": bench.seconds(lambda: loop(noise, cond)),
            "stock call, rule 0.2": bench.seconds(scheduled(stock("pt"))),
            "stock loop, rule 0.2": bench.seconds(scheduled(stock("latent"))),
            "ours, rule 0.2": bench.seconds(scheduled(lambda: sampler(noise, cond), sampler)),
            "our loop, rule 0.2": bench.seconds(scheduled(lambda: loop(noise, cond), loop)),
            f"ours, DDIM {computed} steps": bench.seconds(lambda: fewer(noise, cond))}
    deepcache = deepcache_seconds(bench, pipe, stock("pt"))
    if deepcache is not None:
        rows["stock call, DeepCache package (interval 3, branch 0)"] = deepcache
    out = {"rule_macs_ratio": rule.macs_ratio, "rule": rule.info.get("method"), "computed_calls": computed,
           "sampling_seconds": rows, "compile": compile_rows(bench, loop, noise, cond, rule, size)}
    out.update(gradient_rows(bench, sampler, noise, cond, rule, size, device))
    out.update(finetune_rows(bench, sampler, cond, rule, size))
    out["search"] = search_rows(bench, sampler, cond, size)
    return out


def compile_rows(bench: Bench, loop, noise, cond, rule, size) -> dict:
    """Our denoising loop eager and with each gated block compiled (``fullgraph=True``), full (the keep-everything
    table, so both compiled rows run the same hooks) and with the rule table; the first run's compile seconds."""
    from diffusion_shortcuts.prune.compare import keep_everything

    options = {"backend": size["compile_backend"]}
    full = keep_everything(loop, noise, cond)
    rows, first = {}, {}
    for label, table, compile in (("eager, full", full, False), ("compiled, full", full, options),
                                  ("eager, rule 0.2", rule, False), ("compiled, rule 0.2", rule, options)):
        def run(table=table, compile=compile):
            with enabled(loop.model, table, loop, compile=compile):
                loop(noise, cond)
        start = time.perf_counter()
        with torch.no_grad():
            run()
        bench.sync()
        first[label] = time.perf_counter() - start
        rows[label] = bench.seconds(run)
    return {"backend": size["compile_backend"], "loop_seconds": rows,
            "compile_seconds": {k: first[k] - rows[k] for k in rows if k.startswith("compiled")}}


def deepcache_seconds(bench: Bench, pipe, run) -> float | None:
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        return None
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        return bench.seconds(run)
    finally:
        helper.disable()


def guarded(run):
    """``run()``, or ``"out of memory"`` where the GPU ran out (Full backpropagation at 512x512 may)."""
    try:
        return run()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"


def per_iteration(history: dict) -> float:
    """Seconds of the last iteration (the first pays for warm-up)."""
    return float(history["seconds"][-1])


def gradient_rows(bench: Bench, sampler, noise, cond, rule, size, device) -> dict:
    policies = {"full": "full", "checkpointed": "checkpointed", "shortcut": "shortcut"}
    rows = {}
    for name, spec in policies.items():
        def run(spec=spec):
            result, peak = bench.peak_mb(lambda: ds.optimize_latents(
                sampler, brightness, noise, cond, iterations=size["iterations"], lr=0.01, gradient=spec,
                progress=False))
            return {"seconds_per_iteration": per_iteration(result.history), "peak_mb": peak}
        rows[name] = guarded(run)

    def pruned():
        with enabled(sampler.model, rule, sampler, full_graph_steps=True):
            result, peak = bench.peak_mb(lambda: ds.optimize_latents(
                sampler, brightness, noise, cond, iterations=size["iterations"], lr=0.01, gradient="shortcut",
                progress=False))
        return {"seconds_per_iteration": per_iteration(result.history), "peak_mb": peak}
    rows["shortcut on the rule 0.2 rollout"] = guarded(pruned)
    return {"sdo_latents": rows}


def finetune_rows(bench: Bench, sampler, cond, rule, size) -> dict:
    model = sampler.model
    ds.add_lora(model, rank=4)
    conditions = cond.expand(2, *cond.shape[1:])
    rows = {}

    def tune():
        result, peak = bench.peak_mb(lambda: ds.finetune(
            sampler, brightness, conditions, iterations=size["iterations"], batch_size=1, progress=False))
        return {"seconds_per_iteration": per_iteration(result.history), "peak_mb": peak}

    try:
        rows["lora, shortcut random"] = guarded(tune)

        def pruned():
            with enabled(model, rule, sampler, full_graph_steps=True):
                return tune()
        rows["lora, shortcut random on the rule 0.2 rollout"] = guarded(pruned)
    finally:
        model.delete_adapters("default") if hasattr(model, "delete_adapters") else None
    return {"finetune": rows}


def search_rows(bench: Bench, sampler, cond, size) -> dict:
    """The search's cost per iteration for today's default and each cheaper setting, and a calibration's seconds
    (in generations of the same batch): what the search-cost issue's estimates on paper scale from."""
    steps = sampler.num_inference_steps
    settings = {"default (checkpointed, fresh targets)": {},
                "training set 4 (targets made once)": dict(training_set=4),
                "latent objective": dict(objective=ds.prune.Objective("latent")),
                f"search at {steps * 2 // 5} steps": dict(search_steps=steps * 2 // 5)}
    rows = {}
    for name, extra in settings.items():
        def run(extra=extra):
            result, peak = bench.peak_mb(lambda: ds.prune.train_pruner(
                sampler, cond, 0.8, iterations=size["iterations"], batch_size=2, target_batch=size["iterations"],
                validation=1, progress=False, **extra))
            return {"seconds_per_iteration": per_iteration(result.history), "peak_mb": peak,
                    "gradient": "checkpointed", "batch_size": 2}
        rows[name] = guarded(run)

    def calibration():
        schedule, peak = bench.peak_mb(lambda: ds.prune.calibrate(sampler, cond.expand(2, *cond.shape[1:]),
                                                                  macs=0.2, batch_size=2))
        noise = torch.randn(2, *sampler.sample_shape, device=cond.device)
        with torch.no_grad():
            generation = bench.seconds(lambda: sampler(noise, cond.expand(2, *cond.shape[1:])))
        return {"seconds": schedule.info["seconds"], "generations": schedule.info["seconds"] / generation,
                "peak_mb": peak, "batch_size": 2}
    rows["calibration"] = guarded(calibration)
    return rows


# ---- Flux ------------------------------------------------------------------------------------------------

def flux_rows(bench: Bench, size: dict, tiny: bool, device, dtype) -> dict:
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    pipe = flux_pipeline(tiny, device, dtype)
    model, steps = pipe.transformer, size["flux_steps"]
    c, h, w = size["flux_latent"]
    text = torch.randn(1, *size["flux_text"], device=device, dtype=dtype)
    pooled = torch.randn(1, size["flux_pooled"], device=device, dtype=dtype)
    latents = ds.families.pack_latents(torch.randn(1, c, h, w, device=device)).to(dtype)
    pixels = dict(height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor)

    def stock():
        pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, latents=latents, num_inference_steps=steps,
             guidance_scale=3.5, output_type="latent", **pixels)

    sampler = ds.Sampler(model, pipe.scheduler, steps, 3.5, sample_shape=(c, h, w))
    prof = ds.prune.profile(model, torch.zeros(1, c, h, w, device=device, dtype=dtype),
                            {"encoder_hidden_states": text, "pooled_projections": pooled})
    rule = CacheSchedule.every_for_ratio(sampler.timesteps, prof, 0.8)
    interval = int(rule.info["method"].split("interval=")[1].split(",")[0])
    rows = {"stock call, full": bench.seconds(stock)}
    with enabled(model, rule):
        rows["stock call, our rule table"] = bench.seconds(stock)
    rows.update(with_caches(bench, model, pipe, stock, {
        f"stock call, diffusers TaylorSeer (interval {interval}, warm-up 3)":
            TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=3),
        "stock call, diffusers FirstBlockCache (threshold 0.05)": FirstBlockCacheConfig()}, cachedit_seconds))
    return {"flux_rule_macs_ratio": rule.macs_ratio, "flux_rule": rule.info.get("method"), "flux_seconds": rows}


def cachedit_seconds(bench: Bench, pipe, run) -> float | str | None:
    """cache-dit's DBCache at its defaults on the pipeline (None where it is not installed; what stopped it, where
    it does not run: its defaults need more than 8 blocks, which the tiny Flux has not)."""
    try:
        import cache_dit
    except ImportError:
        return None
    try:
        cache_dit.enable_cache(pipe)
        return bench.seconds(run)
    except Exception as exc:  # a peer's failure is a row of the table, not the end of the benchmark
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        cache_dit.disable_cache(pipe)


# ---- the table and the targets ---------------------------------------------------------------------------

def targets(out: dict) -> dict:
    s, sdo, flux = out["sd"]["sampling_seconds"], out["sd"]["sdo_latents"], out["flux"]["flux_seconds"]
    computed = out["sd"]["computed_calls"]
    ddim = s[f"ours, DDIM {computed} steps"]
    found = {
        "loop with the 0.2 schedule >= 4.5x our full loop": s["our loop, full"] / s["our loop, rule 0.2"] >= 4.5,
        "scheduled call within 5% of DDIM with as many calls": s["ours, rule 0.2"] <= 1.05 * ddim,
        "scheduled call no slower than the stock call with the table": s["ours, rule 0.2"] <= s["stock call, rule 0.2"],
        "stock loop with enable_cache >= 4.5x the stock loop":
            s["stock loop, full"] / s["stock loop, rule 0.2"] >= 4.5,
        "Flux rule table at least as fast as TaylorSeer on it":
            flux["stock call, our rule table"] <= min(v for k, v in flux.items() if "TaylorSeer" in k and
                                                      not isinstance(v, str)),
    }
    compiled = out["sd"]["compile"]["loop_seconds"]
    macs_speedup = 1 / out["sd"]["rule_macs_ratio"]
    found["compiled + rule 0.2 >= 0.9 of the MACs speedup over compiled full"] = \
        compiled["compiled, full"] / compiled["compiled, rule 0.2"] >= 0.9 * macs_speedup
    found["compiled + rule 0.2 faster than the eager rule 0.2"] = \
        compiled["compiled, rule 0.2"] < compiled["eager, rule 0.2"]
    full, pruned = sdo.get("full"), sdo.get("shortcut on the rule 0.2 rollout")
    if isinstance(full, dict) and isinstance(pruned, dict):
        found["SDO on the pruned rollout <= 0.12x Full per iteration"] = \
            pruned["seconds_per_iteration"] <= 0.12 * full["seconds_per_iteration"]
    return found


def megabytes(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:9.0f} MB"


def table(out: dict) -> str:
    lines = [f"device: {out['device_name']}  dtype: {out['dtype']}"]
    for group, key in (("SD-1.5 sampling", "sampling_seconds"),):
        full = out["sd"][key]["ours, full"]
        lines.append(f"{group} (rule {out['sd']['rule']}, MACs {out['sd']['rule_macs_ratio']:.3f})")
        lines += [f"  {name:58s} {sec:8.3f} s  {full / sec:5.2f}x ours full" for name, sec in out["sd"][key].items()]
    compiled = out["sd"]["compile"]
    lines.append(f"SD-1.5 loop with compiled blocks ({compiled['backend']})")
    lines += [f"  {name:58s} {sec:8.3f} s" for name, sec in compiled["loop_seconds"].items()]
    lines += [f"  compile seconds, {name:41s} {sec:8.1f} s" for name, sec in compiled["compile_seconds"].items()]
    for group in ("sdo_latents", "finetune"):
        lines.append(f"SD-1.5 {group}")
        for name, row in out["sd"][group].items():
            lines.append(f"  {name:58s} " + (row if isinstance(row, str) else
                         f"{row['seconds_per_iteration']:8.3f} s/it  peak {megabytes(row['peak_mb'])}"))
    lines.append("SD-1.5 search (batch 2)")
    for name, row in out["sd"]["search"].items():
        lines.append(f"  {name:58s} " + (row if isinstance(row, str) else
                     f"{row['seconds']:8.3f} s ({row['generations']:.2f} generations)  peak "
                     f"{megabytes(row['peak_mb'])}" if "generations" in row else
                     f"{row['seconds_per_iteration']:8.3f} s/it  peak {megabytes(row['peak_mb'])}"))
    full = out["flux"]["flux_seconds"]["stock call, full"]
    lines.append(f"Flux (rule {out['flux']['flux_rule']}, MACs {out['flux']['flux_rule_macs_ratio']:.3f})")
    lines += [f"  {name:58s} " + (sec if isinstance(sec, str) else f"{sec:8.3f} s  {full / sec:5.2f}x")
              for name, sec in out["flux"]["flux_seconds"].items()]
    wan = out["wan"]
    full = wan["wan_seconds"]["stock call, full"]
    lines.append(f"Wan2.1-1.3B, {wan['wan_frames']} frames (rule {wan['wan_rule']}, MACs "
                 f"{wan['wan_rule_macs_ratio']:.3f})")
    lines += [f"  {name:58s} " + (sec if isinstance(sec, str) else f"{sec:8.3f} s  {full / sec:5.2f}x")
              for name, sec in wan["wan_seconds"].items()]
    for name, row in {**wan["wan_sdo"], **wan["wan_finetune"], **wan["wan_search"]}.items():
        lines.append(f"  {name:58s} " + (row if isinstance(row, str) else
                     (f"{row['seconds_per_iteration']:8.3f} s/it  " if "seconds_per_iteration" in row else "") +
                     f"peak {megabytes(row['peak_mb'])}" +
                     (f"  graph {row['graph_mb']:.1f} MB" if "graph_mb" in row else "")))
    lines.append("targets")
    verdicts = {True: "met   ", False: "MISSED", None: "n/a   "}
    lines += [f"  {verdicts[ok]} {name}" for name, ok in out["targets"].items()]
    return "\n".join(lines)


def main(tiny: bool) -> dict:
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    if not tiny and device.type != "cuda":
        raise SystemExit("gpu.py: no CUDA device here; --tiny runs the same code on the CPU")
    dtype = torch.bfloat16
    size = SIZES["tiny" if tiny else "full"]
    bench = Bench(device, size["repeats"])
    out = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "dtype": "bfloat16", "tiny": tiny, "sizes": size}
    out["sd"] = sd_rows(bench, size, tiny, device, dtype)
    out["flux"] = flux_rows(Bench(device, size["flux_repeats"]), size, tiny, device, dtype)
    out["wan"] = wan_rows(Bench(device, 1), tiny, device, dtype, enabled, guarded, per_iteration, cachedit_seconds)
    out["targets"] = {**targets(out), **wan_targets(out["wan"])}
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU, in seconds")
    args = parser.parse_args()
    result = main(args.tiny)
    write_results(RESULTS / ("gpu_tiny.json" if args.tiny else "gpu.json"), "gpu", result)
    print(table(result))
