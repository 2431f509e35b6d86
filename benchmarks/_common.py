"""Shared plumbing of the benchmark scripts: one configuration per child process, results as JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from diffusion_shortcuts.metrics import peak_rss_mb  # noqa: F401  (re-exported for the scripts)

RESULTS = Path(__file__).parent / "results"


def run_child(script: str, args: list[str]) -> dict:
    """Run ``script --child ARGS`` in a fresh process; it prints one line ``RESULT {json}``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def write_results(path: Path, benchmark: str, payload: dict) -> None:
    import torch

    header = {"format_version": 1, "benchmark": benchmark,
              "command": f"python benchmarks/{benchmark}.py " + " ".join(sys.argv[1:]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, **payload}, indent=1) + "\n")


def diffusers_hooks(model, apply):
    """A context factory: ``apply()`` puts diffusers cache hooks on ``model`` (``apply_first_block_cache``,
    ``apply_taylorseer_cache``, ...) for the duration of the context, and every hook it added is removed after.

    The UNet and DiT of the zoo are not ``CacheMixin`` models, so the cache context diffusers' pipelines set around
    each denoiser call is set through diffusers' private ``_set_cache_context`` (imported here, so that a diffusers
    change fails loudly rather than silently measuring the uncached model), before every call: a generation's
    reset of the stateful hooks clears it. One context name: both guidance branches are one batched call. A
    ``CacheMixin`` model (digits-flux's Flux) gets none here: the Sampler names each call's context itself, one per
    guidance branch (forcing one name on both would mix the branches' caches).
    """
    import contextlib

    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    def names(module) -> set[str]:
        registry = getattr(module, "_diffusers_hook", None)
        return set(registry.hooks) if registry is not None else set()

    @contextlib.contextmanager
    def context():
        before = {id(module): names(module) for module in model.modules()}
        apply()
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
        handle = None if hasattr(model, "cache_context") else model.register_forward_pre_hook(
            lambda *_: _set_cache_context(model, CacheContext("cond")))
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()
            for module in model.modules():
                for name in names(module) - before.get(id(module), set()):
                    module._diffusers_hook.remove_hook(name, recurse=False)
            HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    return context


def finish_panel(ax, title: str, xlabel: str, ylabel: str = "SSIM to the full model") -> None:
    """A curve panel's title, axis labels, grid and legend, as every benchmark figure draws them."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def printed_magcache_ratios(printed: str) -> list[float]:
    """The magnitude ratios diffusers' MagCache prints at the end of a calibrating run (``calibrate=True``), as its
    docs say to read them."""
    import ast

    lines = [line for line in printed.splitlines() if line.strip().startswith("[")]
    if not lines:
        raise RuntimeError(f"MagCache printed no calibration ratios: {printed[-500:]}")
    return [float(v) for v in ast.literal_eval(lines[-1].strip())]
