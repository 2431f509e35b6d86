"""Ship a DiP-GO search into the zoo: ``python -m diffusion_shortcuts.zoo.dipgo NAME RUN_DIR``.

``RUN_DIR`` is the ``--out`` of ``diffusion-shortcuts prune --model NAME --ratio R``. Its pruner,
search history, schedule (as ``schedule-R.json``) and heatmap are copied to ``zoo/NAME/dipgo/``,
with a README that states how they were made and what they measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from . import ZOO_DIR
from ..prune import CacheSchedule


def ship(name: str, run_dir: Path) -> Path:
    dest = ZOO_DIR / name / "dipgo"
    schedule = CacheSchedule.load(run_dir / "schedule.json")
    history = json.loads((run_dir / "search.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    ratio = history["settings"]["ratio"]
    dest.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest / "pruner", ignore_errors=True)
    shutil.copytree(run_dir / "pruner", dest / "pruner")
    shutil.copy(run_dir / "search.json", dest / "search.json")
    shutil.copy(run_dir / "heatmap.png", dest / "heatmap.png")
    schedule.save(dest / f"schedule-{ratio:g}.json")
    s = history["settings"]
    lines = [f"# DiP-GO search for {name}", "",
             f"Made by `diffusion-shortcuts prune --model {name} --ratio {ratio:g} --gradient "
             f"{'full' if 'Full' in s['gradient'] else 'checkpointed'} --out RUN` and shipped with "
             f"`python -m diffusion_shortcuts.zoo.dipgo {name} RUN`.", "",
             f"- search: {len(history['loss'])} iterations, batch {s['batch_size']}, {s['optimizer']} lr {s['lr']}, "
             f"alpha {s['alpha']}, tau {s['tau']:.2f}, gradient {s['gradient']}, DDIM {s['sampler']['num_inference_steps']} steps, "
             f"guidance {s['sampler']['guidance_scale']}; {sum(history['seconds']) / 60:.1f} min on this machine's CPU",
             f"- schedule-{ratio:g}.json: {schedule.summary()}",
             "- pruner/: the trained gate network (`ds.prune.Pruner.from_pretrained`); `m.dipgo().schedule(r)` "
             "re-thresholds its keep scores at any ratio r", ""]
    if metrics:
        lines += [f"Measured by the same command on {metrics.get('samples')} samples (same seeds as the full model):", "",
                  "| MACs of full | speedup (batch 16) | SSIM to full | PSNR | accuracy full / pruned | FID full / pruned |",
                  "|---|---|---|---|---|---|",
                  f"| {metrics['macs_ratio']:.3f} | {metrics['speedup']:.2f}x | {metrics['ssim']:.3f} | "
                  f"{metrics['psnr']:.1f} | {metrics['accuracy_full']:.3f} / {metrics['accuracy_pruned']:.3f} | "
                  f"{metrics['fid_full']:.1f} / {metrics['fid_pruned']:.1f} |", ""]
    lines += ["![schedule](heatmap.png)", ""]
    (dest / "README.md").write_text("\n".join(lines))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    print(ship(args.name, args.run_dir))


if __name__ == "__main__":
    main()
