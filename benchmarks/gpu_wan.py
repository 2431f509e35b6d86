"""The GPU benchmark's video rows (``gpu.py`` runs them): Wan2.1-T2V-1.3B at full size with random weights.

Full size: the 1.3B transformer (its published configuration) and Wan2.1's VAE (AutoencoderKLWan's defaults), random
weights, bfloat16, 480x832 and 33 frames (9 latent frames, 14,040 tokens a call), UniPC flow sampling as Wan's 480p
pipeline (shift 3), guidance 5 in two calls a step, random 512 x 4096 text embeddings. Rows:

- sampling, the stock ``WanPipeline`` call (latents out, the denoising loop): full; our rule table at 0.3 of the MACs
  (``CacheSchedule.every_for_ratio(..., 0.7)`` through ``enable_cache``); diffusers' FirstBlockCache (its default
  threshold), TaylorSeer (the rule's interval, warm-up 3) and MagCache (calibrated on one full run, as its docs say,
  then at its default threshold); cache-dit's DBCache where cache-dit is installed;
- SDO per iteration (one reward gradient with respect to a rank-4 LoRA and the initial noise, a brightness reward on
  the first frame, decoded from the first latent frame alone), the blocks checkpointed for every policy: Shortcut
  (reaches the initial noise), ``truncated:1`` (VADER's last step: no path to the noise) and Checkpointed; seconds,
  peak memory, the graph's saved tensors and the noise's gradient norm;
- LoRA fine-tuning per iteration, Shortcut(random) against ``truncated:1``;
- the search (``train_pruner``: latent objective, a training set of one, Checkpointed, batch 1, the blocks
  checkpointed): seconds and peak memory per iteration against one generation with the rule table (latents out).
"""

from __future__ import annotations

import contextlib
import copy
import io
import time

import torch

from _common import printed_magcache_ratios

import diffusion_shortcuts as ds
from diffusion_shortcuts.prune import CacheSchedule
from diffusion_shortcuts.rewards.frames import FrameScoring

SIZES = {
    "full": dict(steps=20, frames=33, height=480, width=832, text=(512, 4096), iterations=2, repeats=1),
    "tiny": dict(steps=6, frames=9, height=16, width=16, text=(8, 32), iterations=2, repeats=1),
}


def wan_pipeline(tiny: bool, device, dtype):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from real_architectures import WAN_1_3B

    torch.manual_seed(0)
    config = WAN_1_3B["config"] if not tiny else dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    vae_config = {} if not tiny else dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                          temperal_downsample=[False, True, True])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer, vae = WanTransformer3DModel(**config), AutoencoderKLWan(**vae_config)
    finally:
        torch.set_default_dtype(default)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.eval().requires_grad_(False),
                       transformer=transformer.eval().requires_grad_(False), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def brightness(images, cond=None):
    return images.float().flatten(1).mean(1)


def magcache_ratios(model, run, steps: int) -> list[float]:
    """MagCache's magnitude ratios for this model, from one calibrating run (its hook prints them at the end)."""
    from diffusers.hooks import MagCacheConfig

    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            run()
    finally:
        model.disable_cache()
    return printed_magcache_ratios(printed.getvalue())


def with_caches(bench, model, pipe, stock, configs: dict, cachedit_seconds) -> dict:
    """Seconds of ``stock()`` under each of diffusers' cache configurations (``model.enable_cache``), and under
    cache-dit's DBCache where cache-dit is installed."""
    rows = {}
    for name, config in configs.items():
        model.enable_cache(config)
        try:
            rows[name] = bench.seconds(stock)
        finally:
            model.disable_cache()
    peer = cachedit_seconds(bench, pipe, stock)
    if peer is not None:
        rows["stock call, cache-dit DBCache (defaults)"] = peer
    return rows


def wan_rows(bench, tiny: bool, device, dtype, enabled, guarded, per_iteration, cachedit_seconds) -> dict:
    """Every video row; ``bench`` and the helpers are gpu.py's, so that both halves time and fail alike."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    size = SIZES["tiny" if tiny else "full"]
    bench.repeats = size["repeats"]
    pipe = wan_pipeline(tiny, device, dtype)
    model, steps = pipe.transformer, size["steps"]
    latent_frames = ds.families.latent_frames(size["frames"], pipe.vae_scale_factor_temporal)
    shape = (16, latent_frames, size["height"] // 8, size["width"] // 8)
    text = torch.randn(1, *size["text"], device=device, dtype=dtype)
    negative = torch.randn(1, *size["text"], device=device, dtype=dtype)
    latents = torch.randn(1, *shape, device=device, dtype=torch.float32)
    call = dict(prompt_embeds=text, negative_prompt_embeds=negative, latents=latents, num_inference_steps=steps,
                guidance_scale=5.0, num_frames=size["frames"], height=size["height"], width=size["width"],
                output_type="latent")

    def stock():
        pipe(**call)

    cond, uncond = {"encoder_hidden_states": text}, {"encoder_hidden_states": negative}
    sampler = ds.Sampler.from_pipeline(pipe, steps, 5.0, uncond=uncond, sample_shape=shape)
    prof = ds.prune.profile(model, torch.zeros(1, *shape, device=device, dtype=dtype), cond)
    rule = CacheSchedule.every_for_ratio(sampler.timesteps, prof, 0.7)
    interval = int(rule.info["method"].split("interval=")[1].split(",")[0])
    rows = {"stock call, full": bench.seconds(stock)}
    with enabled(model, rule):
        rows["stock call, our rule table"] = bench.seconds(stock)
    peers = {"stock call, diffusers FirstBlockCache (threshold 0.05)": FirstBlockCacheConfig(),
             f"stock call, diffusers TaylorSeer (interval {interval}, warm-up 3)":
                 TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=3)}
    try:
        ratios = magcache_ratios(model, stock, steps)
        peers["stock call, diffusers MagCache (calibrated, threshold 0.06)"] = MagCacheConfig(
            mag_ratios=ratios, num_inference_steps=steps)
    except Exception as exc:  # a peer's failure is a row of the table
        rows["stock call, diffusers MagCache"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    rows.update(with_caches(bench, model, pipe, stock, peers, cachedit_seconds))

    model.enable_gradient_checkpointing()  # every graph step (SDO's, the search's) recomputes its blocks backward
    try:
        sdo, lora = sdo_rows(bench, sampler, cond, latents, size, guarded, per_iteration)
        search = search_rows(bench, sampler, cond, rule, latents, size, guarded, per_iteration)
    finally:
        model.disable_gradient_checkpointing()
    return {"wan_rule_macs_ratio": rule.macs_ratio, "wan_rule": rule.info.get("method"), "wan_shape": list(shape),
            "wan_frames": size["frames"], "wan_seconds": rows, "wan_sdo": sdo, "wan_finetune": lora,
            "wan_search": search}


def reward_gradient(scored, reward, cond, noise, policy: str, repeats: int = 2) -> dict:
    """One reward gradient as an SDO (or VADER) iteration takes it, with respect to the denoiser's trainable
    weights (a LoRA, where one is on) and, where ``policy`` reaches it, the initial noise; the last of ``repeats``
    timed. Its figures: seconds, the graph's saved tensors (MB) and the norm of the noise's gradient (0: no path)."""
    for _ in range(repeats):
        graph = [0]

        def pack(t):
            graph[0] += t.numel() * t.element_size()
            return t

        x = noise.clone().requires_grad_(True)
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            value = reward(scored(x, cond, gradient=policy), None).sum()
        value.backward()
        seconds = time.perf_counter() - start
    return {"seconds_per_iteration": seconds, "graph_mb": graph[0] / 2**20,
            "noise_gradient": float(x.grad.norm()) if x.grad is not None else 0.0}


def sdo_rows(bench, sampler, cond, latents, size, guarded, per_iteration) -> tuple[dict, dict]:
    scoring = FrameScoring("first", size["frames"], 4, prefix_decode=True)
    scored, reward = scoring.sampler(sampler), scoring.reward(brightness)
    model = sampler.model
    ds.add_lora(model, rank=4)
    rows = {}
    for name in ("shortcut", "truncated:1", "checkpointed"):
        def run(spec=name):
            figures, peak = bench.peak_mb(lambda: reward_gradient(scored, reward, cond, latents, spec))
            return {**figures, "peak_mb": peak}
        rows[name] = guarded(run)
    text = cond["encoder_hidden_states"]
    conditions = {"encoder_hidden_states": text.expand(2, *text.shape[1:])}
    lora = {}
    try:
        for name in ("shortcut:random", "truncated:1"):
            def tune(spec=name):
                result, peak = bench.peak_mb(lambda: ds.finetune(
                    scored, reward, conditions, iterations=size["iterations"], batch_size=1, gradient=spec,
                    noise_shape=tuple(latents.shape[1:]), progress=False))
                return {"seconds_per_iteration": per_iteration(result.history), "peak_mb": peak}
            lora[f"lora, {name}"] = guarded(tune)
    finally:
        model.delete_adapters("default")
    return rows, lora


def search_rows(bench, sampler, cond, rule, latents, size, guarded, per_iteration) -> dict:
    from diffusion_shortcuts.prune import apply

    def search():
        result, peak = bench.peak_mb(lambda: ds.prune.train_pruner(
            sampler, cond, 0.7, iterations=size["iterations"], batch_size=1, training_set=1, target_batch=1,
            validation=1, objective=ds.prune.Objective("latent"), progress=False))
        return {"seconds_per_iteration": per_iteration(result.history), "peak_mb": peak, "batch_size": 1}

    def rollout():  # latents out: the denoising loop, as the latent objective's search runs it
        loop = copy.copy(sampler)
        loop.decode = None
        with apply(sampler.model, rule, sampler), torch.no_grad():
            _, peak = bench.peak_mb(lambda: loop(latents, cond))
        return {"peak_mb": peak}
    return {"search (latent objective, batch 1)": guarded(search), "one generation, rule table": guarded(rollout)}


def wan_targets(wan: dict) -> dict:
    """The video issue's targets: True, False, or None where this device cannot measure them (peak memory on a CPU:
    the SDO target then compares the graphs' saved tensors)."""
    seconds, sdo, search = wan["wan_seconds"], wan["wan_sdo"], wan["wan_search"]
    macs_speedup = 1 / wan["wan_rule_macs_ratio"]
    found = {"Wan 0.3-MACs schedule >= 0.9 of its MACs speedup (denoising loop)":
             seconds["stock call, full"] / seconds["stock call, our rule table"] >= 0.9 * macs_speedup}
    shortcut, truncated = sdo.get("shortcut"), sdo.get("truncated:1")
    if isinstance(shortcut, dict) and isinstance(truncated, dict):
        key = "peak_mb" if shortcut["peak_mb"] is not None else "graph_mb"
        found[f"SDO on video <= 1.2x truncated:1's memory ({key}) while moving the noise"] = \
            shortcut[key] <= 1.2 * truncated[key] and shortcut["noise_gradient"] > 0
    searching, rollout = search.get("search (latent objective, batch 1)"), search.get("one generation, rule table")
    found["search peak memory <= 2x one scheduled generation's"] = (
        searching["peak_mb"] <= 2 * rollout["peak_mb"] if isinstance(searching, dict) and isinstance(rollout, dict)
        and searching["peak_mb"] is not None and rollout["peak_mb"] is not None else None)
    return found
