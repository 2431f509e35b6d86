"""cache-dit (the leading cache library, a benchmark-only install) on the zoo's digits-dit, as its docs say to use it
on a transformer that no pipeline adapter knows: a ``BlockAdapter`` over ``transformer_blocks``.

    pip install --no-deps cache-dit==1.5.3
    OMP_NUM_THREADS=2 python benchmarks/cachedit.py

Tries its DBCache at its defaults and, since those need more than the model's 6 blocks, at F1B0 (its FBCache
setting), with and without its TaylorSeer calibrator; for each the SSIM of 8 samples to the full model's (DDIM 50,
guidance 3), or the error that stopped it. Writes benchmarks/results/cachedit.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402

import diffusion_shortcuts as ds  # noqa: E402
from diffusion_shortcuts.metrics import ssim  # noqa: E402


def attempt(m, sampler, noise, cond, full, **config) -> dict:
    import cache_dit

    calibrated = config.pop("taylorseer", False)
    adapter = cache_dit.BlockAdapter(transformer=m.model, blocks=m.model.transformer_blocks,
                                     forward_pattern=cache_dit.ForwardPattern.Pattern_3, check_forward_pattern=False)
    try:
        cache_dit.enable_cache(adapter, cache_config=cache_dit.DBCacheConfig(num_inference_steps=50, **config),
                               calibrator_config=cache_dit.TaylorSeerCalibratorConfig() if calibrated else None)
        images = sampler(noise, cond)
        return {"ssim": float(ssim(images, full).mean())}
    except Exception as exc:  # the outcome to record: what stops cache-dit on this model
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    finally:
        try:
            cache_dit.disable_cache(adapter)
        except Exception:
            pass


def main() -> dict:
    import cache_dit

    m = ds.zoo.load("digits-dit")
    sampler = m.sampler(50)
    noise, cond = m.noise(8, torch.Generator().manual_seed(0)), m.encode(torch.arange(8) % 10)
    full = sampler(noise, cond)
    rows = {"DBCache defaults (F8B0)": attempt(m, sampler, noise, cond, full),
            "DBCache F1B0": attempt(m, sampler, noise, cond, full, Fn_compute_blocks=1, Bn_compute_blocks=0),
            "DBCache F1B0 + TaylorSeer calibrator": attempt(m, sampler, noise, cond, full, Fn_compute_blocks=1,
                                                            Bn_compute_blocks=0, taylorseer=True)}
    return {"cache_dit": cache_dit.__version__, "model": "digits-dit", "blocks": len(m.model.transformer_blocks),
            "rows": rows}


if __name__ == "__main__":
    out = main()
    write_results(RESULTS / "cachedit.json", "cachedit", out)
    for name, row in out["rows"].items():
        print(f"{name:40s} {row}")
