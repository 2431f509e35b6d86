"""Ship DiP-GO searches into the zoo: ``python -m diffusion_shortcuts.zoo.dipgo NAME RUN_DIR [RUN_DIR ...]``.

Each ``RUN_DIR`` is the ``--out`` of ``diffusion-shortcuts prune --model NAME --ratio R``, one per ratio. Every
run's schedule is shipped as ``zoo/NAME/dipgo/schedule-R.json`` (what ``m.cache_schedule(R)`` loads), with its
search history, comparison figures and heatmap under ``runs/R/``. The first run's trained pruner, history and
heatmap are the zoo's search (``m.dipgo()``, whose ``.schedule(r)`` re-thresholds its keep scores at any ratio).
A README states how each was made and what it measured.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from . import ZOO_DIR
from ..prune import CacheSchedule


def _command(name: str, settings: dict) -> str:
    """The ``prune`` command line that a search's recorded settings correspond to."""
    flags = [f"--ratio {settings['ratio']:g}", f"--iterations {settings['iterations']}",
             f"--batch-size {settings['batch_size']}",
             f"--gradient {'full' if 'Full' in settings['gradient'] else 'checkpointed'}"]
    if settings.get("reuse_mode", "copy") != "copy":
        flags.append(f"--reuse-mode {settings['reuse_mode']}")
    interval = re.match(r"every\(interval=(\d+)", settings.get("start", ""))
    if interval:
        flags.append(f"--start-every {interval.group(1)}")
    return f"diffusion-shortcuts prune --model {name} {' '.join(flags)} --out RUN"


def _describe(name: str, run_dir: Path, schedule: CacheSchedule, history: dict, metrics: dict) -> list[str]:
    s = history["settings"]
    start = s.get("start", "")
    lines = [f"### Ratio {s['ratio']:g}", "",
             f"`{_command(name, s)}`", "",
             f"- search: {len(history['loss'])} iterations, batch {s['batch_size']}, {s['optimizer']} lr {s['lr']}, "
             f"alpha {s['alpha']}, tau {s['tau']:.2f}, gradient {s['gradient']}, reuse {s.get('reuse_mode', 'copy')}, "
             f"started from {start.split(':')[0] if start else 'the full model'}, DDIM {s['num_inference_steps']} "
             f"steps, guidance {s['guidance_scale']}; {sum(history['seconds']) / 60:.1f} min of search on this "
             "machine's CPU",
             f"- schedule-{s['ratio']:g}.json: {schedule.summary()}"]
    if metrics:
        lines += ["", f"Measured by the same command on {metrics.get('samples')} samples (same seeds as the full "
                      "model):", "",
                  "| MACs of full | speedup (batch 16) | SSIM to full | PSNR | accuracy full / pruned | "
                  "FID full / pruned |", "|---|---|---|---|---|---|",
                  f"| {metrics['macs_ratio']:.3f} | {metrics['speedup']:.2f}x | {metrics['ssim']:.3f} | "
                  f"{metrics['psnr']:.1f} | {metrics['accuracy_full']:.3f} / {metrics['accuracy_pruned']:.3f} | "
                  f"{metrics['fid_full']:.1f} / {metrics['fid_pruned']:.1f} |"]
    return lines + [""]


def ship(name: str, run_dirs: list[Path], zoo_dir: Path = ZOO_DIR) -> Path:
    """Copy the searches in ``run_dirs`` (one per ratio; the first one's pruner becomes ``m.dipgo()``) to the zoo,
    replacing what was shipped before."""
    if not run_dirs:
        raise ValueError("give at least one prune output folder")
    dest = Path(zoo_dir) / name / "dipgo"
    runs = []
    for run_dir in run_dirs:
        for needed in ("schedule.json", "search.json", "pruner"):
            if not (run_dir / needed).exists():
                raise FileNotFoundError(f"{run_dir} has no {needed}: is it a finished `diffusion-shortcuts prune` "
                                        "output folder?")
        history = json.loads((run_dir / "search.json").read_text())
        metrics_path = run_dir / "metrics.json"
        runs.append((run_dir, CacheSchedule.load(run_dir / "schedule.json"), history,
                     json.loads(metrics_path.read_text()) if metrics_path.exists() else {}))
    ratios = [history["settings"]["ratio"] for _, _, history, _ in runs]
    if len(set(ratios)) != len(ratios):
        raise ValueError(f"one search per ratio: the runs were searched at ratios {ratios}")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    main_dir = runs[0][0]
    shutil.copytree(main_dir / "pruner", dest / "pruner")
    shutil.copy(main_dir / "search.json", dest / "search.json")
    shutil.copy(main_dir / "heatmap.png", dest / "heatmap.png")
    lines = [f"# DiP-GO searches for {name}", "",
             f"Shipped with `python -m diffusion_shortcuts.zoo.dipgo {name} RUN ...`. One search per ratio; "
             f"`m.cache_schedule(r)` loads the schedule searched at r ({', '.join(f'{r:g}' for r in sorted(ratios))}). "
             f"The ratio-{ratios[0]:g} search's trained gate network is `pruner/` (`m.dipgo()`, "
             "`ds.prune.Pruner.from_pretrained`); `m.dipgo().schedule(r)` re-thresholds its keep scores at any "
             "ratio r (a search at r itself is better: a table searched for one ratio does not carry to another).",
             "", "MACs count attention's own matrix products (Q K^T and the product with V).", ""]
    for run_dir, schedule, history, metrics in runs:
        ratio = history["settings"]["ratio"]
        schedule.save(dest / f"schedule-{ratio:g}.json")
        record = dest / "runs" / f"{ratio:g}"
        record.mkdir(parents=True)
        for file in ("search.json", "metrics.json", "heatmap.png"):
            if (run_dir / file).exists():
                shutil.copy(run_dir / file, record / file)
        lines += _describe(name, run_dir, schedule, history, metrics)
        lines += [f"![schedule at {ratio:g}](runs/{ratio:g}/heatmap.png)", ""]
    (dest / "README.md").write_text("\n".join(lines))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name")
    parser.add_argument("run_dirs", type=Path, nargs="+", help="prune output folders, one per ratio; the first "
                        "one's pruner becomes m.dipgo()")
    args = parser.parse_args()
    print(ship(args.name, args.run_dirs))


if __name__ == "__main__":
    main()
