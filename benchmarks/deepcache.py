"""DeepCache's branches as our cache schedules, against the DeepCache package itself on the same UNet.

    pip install --no-deps DeepCache==0.1.1      # a benchmark-only tool, not a dependency of the library
    OMP_NUM_THREADS=2 python benchmarks/deepcache.py

digits-unet (the UNet of benchmarks/prune.py), DDIM 50, guidance 3, batch 16. For DeepCache's default
branch 0 and for branch 2, at intervals 3 and 5: the images of ``DeepCacheSDHelper`` (the package's
own module wrappers) and of ``CacheSchedule.uniform(..., branch=k)`` applied with ``ds.prune.apply``, from
the same noise: the largest absolute difference (0 is bit for bit), the MACs ratio of our schedule, and
the seconds of both, timed alternately (medians). Results: benchmarks/results/deepcache.json.

The package reads the step from ``pipe.scheduler.timesteps.index(t)`` with a scalar ``t``; our Sampler
passes the timestep once per sample, so a shim hands the package its first entry (the UNet broadcasts a
scalar timestep to the same values, so the model's computation is unchanged).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

import diffusion_shortcuts as ds
from diffusion_shortcuts.metrics import timed_pair
from diffusion_shortcuts.prune import CacheSchedule, apply, profile

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402


class PackageDeepCache:
    """The DeepCache package's helper on a bare UNet and our sampler's timesteps."""

    def __init__(self, unet, sampler, interval: int, branch: int):
        from DeepCache import DeepCacheSDHelper

        self.unet = unet
        self.helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=unet, scheduler=sampler.fresh_scheduler()))
        self.helper.set_params(cache_interval=interval, cache_branch_id=branch)

    def __enter__(self):
        self.helper.enable()
        wrapped = self.unet.forward

        def scalar_timestep(sample, timestep, *args, **kwargs):
            return wrapped(sample, timestep.reshape(-1)[0], *args, **kwargs)

        self.unet.forward = scalar_timestep
        return self

    def __exit__(self, *exc):
        self.helper.disable()
        # the helper puts bound methods back as instance attributes and leaves its block-level wrappers in
        # place: drop every instance-level forward so that the next variant sees the plain modules
        for module in self.unet.modules():
            vars(module).pop("forward", None)


def main(intervals=(3, 5), branches=(0, 2), batch: int = 16, repeats: int = 5) -> dict:
    m = ds.zoo.load("digits-unet")
    sampler = m.sampler(50)
    noise = m.noise(batch, torch.Generator().manual_seed(0))
    cond = m.encode(torch.arange(batch) % 10)
    rows = []
    with torch.no_grad():
        for branch in branches:
            prof = profile(m.model, noise, cond, branch=branch)
            for interval in intervals:
                schedule = CacheSchedule.uniform(sampler.timesteps, prof, interval, branch=branch)

                def package():
                    with PackageDeepCache(m.model, sampler, interval, branch):
                        return sampler(noise, cond)

                def ours():
                    with apply(m.model, schedule, sampler):
                        return sampler(noise, cond)

                theirs_images, our_images = package(), ours()
                package_s, ours_s = timed_pair(package, ours, repeats)
                row = {"branch": branch, "interval": interval, "blocks": list(schedule.blocks),
                       "macs_ratio": schedule.macs_ratio,
                       "max_abs_difference": float((theirs_images - our_images).abs().max()),
                       "bit_identical": bool(torch.equal(theirs_images, our_images)),
                       "seconds_package": package_s, "seconds_ours": ours_s, "ours_vs_package": package_s / ours_s}
                rows.append(row)
                print(f"branch {branch} interval {interval}: MACs {row['macs_ratio']:.3f}, identical "
                      f"{row['bit_identical']} (max diff {row['max_abs_difference']:.2e}), package {package_s:.3f} s, "
                      f"ours {ours_s:.3f} s", flush=True)
    return {"model": "digits-unet", "steps": 50, "guidance": 3.0, "batch": batch, "repeats": repeats, "rows": rows}


if __name__ == "__main__":
    import importlib.util

    if importlib.util.find_spec("DeepCache") is None:
        sys.exit("this benchmark compares against the DeepCache package: pip install --no-deps DeepCache==0.1.1")
    write_results(RESULTS / "deepcache.json", "deepcache", main())
