"""What a reused block returns: its cached work ("copy", DiP-GO) or that work extrapolated from its two latest
computed steps ("taylor1", TaylorSeer's first-order rule), on the zoo's shipped searches re-thresholded at several
ratios (the tables were searched with "copy"; a search with "taylor1" is `prune --reuse-mode taylor1`).

SSIM and PSNR to the full model's images, 64 samples, the same noise and labels, DDIM 50, guidance 3.

    OMP_NUM_THREADS=2 python benchmarks/reuse_modes.py      # writes benchmarks/results/reuse_modes.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import diffusion_shortcuts as ds
from diffusion_shortcuts.metrics import psnr, ssim
from diffusion_shortcuts.prune.compare import generate

RESULTS = Path(__file__).parent / "results"
RATIOS = (0.5, 0.7, 0.8, 0.85)


def main(samples: int = 64) -> dict:
    out = {"command": "OMP_NUM_THREADS=2 python benchmarks/reuse_modes.py " + " ".join(sys.argv[1:]),
           "samples": samples, "models": {}}
    for name in ("digits-dit", "digits-unet"):
        m = ds.zoo.load(name)
        sampler = m.sampler(50)
        labels = torch.arange(samples) % 10
        noise = m.noise(samples, torch.Generator().manual_seed(1))
        with torch.no_grad():
            full = generate(sampler, m.encode, labels, noise, batch_size=samples)
        search = m.dipgo()
        rows = []
        for ratio in RATIOS:
            schedule = search.schedule(ratio)
            row = {"ratio": ratio, "macs_ratio": schedule.macs_ratio}
            for mode in ("copy", "taylor1"):
                with torch.no_grad():
                    images = generate(sampler, m.encode, labels, noise, batch_size=samples,
                                      schedule=schedule.with_mode(mode))
                row[f"ssim_{mode}"] = float(ssim(images, full).mean())
                row[f"psnr_{mode}"] = float(psnr(images, full).mean())
            rows.append(row)
            print(f"{name} ratio {ratio}: MACs {row['macs_ratio']:.3f}  SSIM copy {row['ssim_copy']:.4f}  "
                  f"taylor1 {row['ssim_taylor1']:.4f}  PSNR {row['psnr_copy']:.1f} / {row['psnr_taylor1']:.1f}",
                  flush=True)
        out["models"][name] = rows
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reuse_modes.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
