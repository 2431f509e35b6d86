"""What the pruner search on digits-unet costs now, and whether it still finds what the shipped search found.

    OMP_NUM_THREADS=2 python benchmarks/search_reproduce.py [--out RUN_DIR]      # about 10 minutes

Runs the command that made the zoo's shipped search (``diffusion-shortcuts prune --model digits-unet --ratio 0.8
--iterations 200 --batch-size 2 --gradient full``), then compares its schedule with the shipped one on the same 256
seeds (SSIM to the full model's images, MACs with attention's products). Results:
benchmarks/results/search_reproduce.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402

COMMAND = ["prune", "--model", "digits-unet", "--ratio", "0.8", "--iterations", "200", "--batch-size", "2",
           "--gradient", "full"]


def same_seeds(schedule_path: Path, samples: int = 256) -> dict:
    import diffusion_shortcuts as ds
    from diffusion_shortcuts.metrics import ssim
    from diffusion_shortcuts.prune import CacheSchedule
    from diffusion_shortcuts.prune.compare import generate

    m = ds.zoo.load("digits-unet")
    sampler = m.sampler(50)
    sampler.progress = False
    labels = torch.arange(samples) % 10
    noise = m.noise(samples, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = generate(sampler, m.encode, labels, noise, batch_size=64)
        out = {}
        for name, schedule in (("shipped", m.dipgo().schedule(0.8)), ("new", CacheSchedule.load(schedule_path))):
            images = generate(sampler, m.encode, labels, noise, batch_size=64, schedule=schedule)
            out[name] = {"macs_ratio": schedule.macs_ratio, "ssim": float(ssim(images, full).mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp()) / "search"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffusion_shortcuts.cli", *COMMAND, "--out", str(out)], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    shipped = json.loads((Path(__file__).parents[1] / "src/diffusion_shortcuts/zoo/digits-unet/dipgo/search.json"
                          ).read_text())
    result = {"prune_command": "diffusion-shortcuts " + " ".join(COMMAND), "search_seconds": metrics["search_seconds"],
              "command_wall_seconds": wall, "macs_ratio": metrics["macs_ratio"], "ssim_1000": metrics["ssim"],
              "fid_full": metrics["fid_full"], "fid_pruned": metrics["fid_pruned"], "speedup": metrics["speedup"],
              "shipped_search_seconds_recorded": sum(shipped["seconds"]),
              "same_seeds_256": same_seeds(out / "schedule.json")}
    print(json.dumps(result, indent=1))
    write_results(RESULTS / "search_reproduce.json", "search_reproduce", result)


if __name__ == "__main__":
    main()
