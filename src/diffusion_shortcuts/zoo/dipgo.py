"""Ship DiP-GO searches into the zoo:
``python -m diffusion_shortcuts.zoo.dipgo NAME RUN_DIR [RUN_DIR ...] [--search RUN_DIR]``
(``--calibrated``: the folders are ``prune --calibrate-only`` runs, shipped as tables with no search).

Each ``RUN_DIR`` is the ``--out`` of ``diffusion-shortcuts prune --model NAME --ratio R``, one per ratio. Every
run's schedule is shipped as ``zoo/NAME/dipgo/schedule-R.json`` (what ``m.cache_schedule(R)`` loads), with its
search history, comparison figures and heatmap under ``runs/R/``. ``--search``'s trained pruner, history and
heatmap become the zoo's search (``m.dipgo()``, whose ``.schedule(r)`` re-thresholds its keep scores at any
ratio); without it the shipped search stays. A README states how each was made and what it measured.
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
             f"--gradient {'full' if 'full' in settings['gradient'].lower() else 'checkpointed'}"]
    if settings.get("reuse_mode", "copy") != "copy":
        flags.append(f"--reuse-mode {settings['reuse_mode']}")
    interval = re.match(r"every\(interval=(\d+)", settings.get("start", ""))
    if interval:
        flags.append(f"--start-every {interval.group(1)}")
    return f"diffusion-shortcuts prune --model {name} {' '.join(flags)} --out RUN"


def _search_line(history: dict) -> str:
    s = history["settings"]
    start = s.get("start", "")
    sampler = s.get("sampler", s)  # older searches recorded the sampler's settings at the top level
    line = (f"search: {len(history['loss'])} iterations, batch {s['batch_size']}, {s['optimizer']} lr {s['lr']}, "
            f"alpha {s['alpha']}, tau {s['tau']:.2f}, gradient {s['gradient']}, reuse {s.get('reuse_mode', 'copy')}, "
            f"started from {start.split(':')[0] if start else 'the full model'}, DDIM {sampler['num_inference_steps']} "
            f"steps, guidance {sampler['guidance_scale']}; {sum(history['seconds']) / 60:.1f} min of search on this "
            "machine's CPU")
    validation = history.get("validation")
    if validation:
        line += (f"; validated on {validation['samples']} fresh samples against its start (SSIM "
                 f"{validation['ssim_searched']:.4f} searched, {validation['ssim_start']:.4f} start): kept the "
                 f"{validation['kept']} table")
    return line


def _describe(name: str, schedule: CacheSchedule, history: dict, metrics: dict) -> list[str]:
    lines = [f"### Ratio {history['settings']['ratio']:g}", "",
             f"`{_command(name, history['settings'])}`", "",
             f"- {_search_line(history)}",
             f"- schedule-{history['settings']['ratio']:g}.json: {schedule.summary()}"]
    if metrics:
        lines += ["", f"Measured by the same command on {metrics.get('samples')} samples (same seeds as the full "
                      "model):", "", *_figures_table(metrics)]
    return lines + [""]


def _figures_table(metrics: dict) -> list[str]:
    """A ``prune`` run's comparison with the full model, as a markdown table."""
    return ["| MACs of full | speedup (batch 16) | SSIM to full | PSNR | accuracy full / pruned | "
            "FID full / pruned |", "|---|---|---|---|---|---|",
            f"| {metrics['macs_ratio']:.3f} | {metrics['speedup']:.2f}x | {metrics['ssim']:.3f} | "
            f"{metrics['psnr']:.1f} | {metrics['accuracy_full']:.3f} / {metrics['accuracy_pruned']:.3f} | "
            f"{metrics['fid_full']:.1f} / {metrics['fid_pruned']:.1f} |"]


def ship(name: str, run_dirs: list[Path], search: Path | None = None, zoo_dir: Path = ZOO_DIR) -> Path:
    """Ship the schedules of ``run_dirs`` (one search per ratio) as ``schedule-R.json``, replacing the schedules
    shipped before; ``search`` (a ``prune`` output folder) replaces the shipped pruner (``m.dipgo()``), which
    otherwise stays as it is."""
    if not run_dirs:
        raise ValueError("give at least one prune output folder")
    dest = Path(zoo_dir) / name / "dipgo"
    runs = [_read_run(run_dir) for run_dir in run_dirs]
    ratios = [history["settings"]["ratio"] for _, _, history, _ in runs]
    if len(set(ratios)) != len(ratios):
        raise ValueError(f"one search per ratio: the runs were searched at ratios {ratios}")
    if search is not None:
        _read_run(search)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest / "pruner", ignore_errors=True)
        shutil.copytree(search / "pruner", dest / "pruner")
        for file in ("search.json", "heatmap.png"):
            shutil.copy(search / file, dest / file)
    if not (dest / "pruner").is_dir() or not (dest / "search.json").exists():
        raise FileNotFoundError(f"{dest} has no pruner: pass search=RUN_DIR (--search) to ship one")
    for old in dest.glob("schedule-*.json"):
        old.unlink()
    shutil.rmtree(dest / "runs", ignore_errors=True)
    history = json.loads((dest / "search.json").read_text())
    settings = history["settings"]
    lines = [f"# DiP-GO for {name}", "",
             f"Shipped with `python -m diffusion_shortcuts.zoo.dipgo {name} RUN ... [--search RUN]`.", "",
             "## The search (`m.dipgo()`)", "",
             f"`{_command(name, settings)}`", "",
             f"- {_search_line(history)}",
             "- pruner/: its trained gate network (`ds.prune.Pruner.from_pretrained`); `m.dipgo().schedule(r)` "
             "re-thresholds its keep scores at any ratio r",
             "- measured at several ratios against fewer-step samplers and DeepCache by `benchmarks/prune.py`, and "
             "against diffusers' TaylorSeer and MagCache by `benchmarks/peers.py` (BENCHMARKS.md)", "",
             "![the search's schedule](heatmap.png)", "",
             f"## The schedules (`m.cache_schedule(r)`, r = {', '.join(f'{r:g}' for r in sorted(ratios))})", "",
             "One search per ratio (a table searched for one ratio does not carry to another). MACs count "
             "attention's own matrix products (Q K^T and the product with V).", ""]
    for run_dir, schedule, run_history, metrics in runs:
        ratio = run_history["settings"]["ratio"]
        schedule.save(dest / f"schedule-{ratio:g}.json")
        record = dest / "runs" / f"{ratio:g}"
        record.mkdir(parents=True)
        for file in ("search.json", "metrics.json", "heatmap.png"):
            if (run_dir / file).exists():
                shutil.copy(run_dir / file, record / file)
        lines += _describe(name, schedule, run_history, metrics)
        lines += [f"![schedule at {ratio:g}](runs/{ratio:g}/heatmap.png)", ""]
    (dest / "README.md").write_text("\n".join(lines))
    return dest


def ship_calibrated(name: str, run_dirs: list[Path], zoo_dir: Path = ZOO_DIR) -> Path:
    """Ship calibrated tables (``prune --calibrate-only`` output folders, one per ratio) as ``schedule-R.json`` for a
    model that ships no search (``m.cache_schedule(r)`` loads them; ``m.dipgo()`` stays unavailable)."""
    dest = Path(zoo_dir) / name / "dipgo"
    runs = []
    for run_dir in run_dirs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if not str(metrics.get("method")).startswith("calibrated"):
            raise ValueError(f"{run_dir}: not a `prune --calibrate-only` output folder (method "
                             f"{metrics.get('method')!r})")
        runs.append((run_dir, CacheSchedule.load(run_dir / "schedule.json"), metrics))
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    ratios = sorted(m["ratio"] for _, _, m in runs)
    lines = [f"# Cache schedules for {name}", "",
             f"Shipped with `python -m diffusion_shortcuts.zoo.dipgo {name} RUN ... --calibrated`: calibrated tables "
             "(`ds.prune.calibrate`, one full generation measured; no search), one per ratio, "
             f"r = {', '.join(f'{r:g}' for r in ratios)} (`m.cache_schedule(r)`). No searched pruner ships for this "
             "model (`m.dipgo()`): a search iteration here costs 30-40 s on the development machine's CPU.", ""]
    for run_dir, schedule, metrics in sorted(runs, key=lambda run: run[2]["ratio"]):
        ratio = metrics["ratio"]
        schedule.save(dest / f"schedule-{ratio:g}.json")
        record = dest / "runs" / f"{ratio:g}"
        record.mkdir(parents=True)
        for file in ("metrics.json", "heatmap.png"):
            shutil.copy(run_dir / file, record / file)
        lines += [f"### Ratio {ratio:g}", "",
                  f"`diffusion-shortcuts prune --model {name} --calibrate-only --ratio {ratio:g} "
                  f"--samples {metrics['samples']} --out RUN` ({metrics['calibration_seconds']:.1f} s)", "",
                  f"- schedule-{ratio:g}.json: {schedule.summary()}", "", *_figures_table(metrics), "",
                  f"![schedule at {ratio:g}](runs/{ratio:g}/heatmap.png)", ""]
    (dest / "README.md").write_text("\n".join(lines))
    return dest


def _read_run(run_dir: Path):
    """A finished ``prune`` output folder: (folder, schedule, search history, comparison metrics)."""
    for needed in ("schedule.json", "search.json", "pruner", "heatmap.png"):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(f"{run_dir} has no {needed}: is it a finished `diffusion-shortcuts prune` "
                                    "output folder?")
    metrics_path = run_dir / "metrics.json"
    return (run_dir, CacheSchedule.load(run_dir / "schedule.json"), json.loads((run_dir / "search.json").read_text()),
            json.loads(metrics_path.read_text()) if metrics_path.exists() else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name")
    parser.add_argument("run_dirs", type=Path, nargs="+", help="prune output folders, one per ratio")
    parser.add_argument("--search", type=Path, default=None,
                        help="a prune output folder whose pruner replaces the shipped one (m.dipgo())")
    parser.add_argument("--calibrated", action="store_true",
                        help="the folders are `prune --calibrate-only` runs: ship their tables, no search")
    args = parser.parse_args()
    print(ship_calibrated(args.name, args.run_dirs) if args.calibrated else
          ship(args.name, args.run_dirs, args.search))


if __name__ == "__main__":
    main()
