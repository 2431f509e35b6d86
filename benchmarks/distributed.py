"""Across processes, and the gradient of the search, on this machine's two cores.

    python benchmarks/distributed.py [--parts scaling,gradients,equal_seconds] [--iterations 40] [--tiny]

``scaling``: the three jobs under ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`` (one thread
each) against one process (two threads): the same two cores either way, so this measures what the processes cost and
share, not what more devices add. The search (digits-dit, data parallel): one process at batch 2, one at batch 4 (the
two processes' global batch) and two processes at batch 2 each, seconds per iteration and samples per second;
``optimize`` (8 samples) and ``sample`` (64 samples) sharded: samples per second of the job (the slowest process) and
the whole command's wall-clock (imports and loading included).

``gradients``: ``prune --gradient shortcut:random``, ``checkpointed`` and ``full`` at equal iterations on both zoo
models (50 steps, batch 2, ratio 0.8, the comparison on 256 samples): seconds per iteration, peak memory (this
process's resident memory on the CPU), and the schedule's SSIM to the full model and evaluation-classifier accuracy.
``equal_seconds``: the Shortcut search again, for as many iterations as fit in the seconds the Checkpointed search
took in the ``gradients`` part (read from the results file, whose other parts are kept).

Every configuration is a fresh command (its own process); results: benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_results  # noqa: E402

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29611"]


def command(argv: list[str], out: Path, processes: int, threads: int) -> tuple[dict, float]:
    """``diffusion-shortcuts ARGV --out OUT`` in ``processes`` processes of ``threads`` threads; its metrics and
    the command's wall-clock seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "ACCELERATE_USE_CPU": "1"}
    cli = ["-m", "diffusion_shortcuts.cli", *argv, "--out", str(out)]
    full = [*LAUNCH, "--num_processes", str(processes), *cli] if processes > 1 else [sys.executable, *cli]
    start = time.perf_counter()
    done = subprocess.run(full, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} ({processes} processes) failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text()), wall


def scaling(work: Path, tiny: bool) -> dict:
    steps, iterations = ("4", "3") if tiny else ("20", "8")
    search = ["prune", "--model", "digits-dit", "--ratio", "0.8", "--steps", steps, "--iterations", iterations,
              "--gradient", "full", "--samples", "4"]
    rows = {}
    for name, processes, batch in (("1 process, batch 2", 1, 2), ("1 process, batch 4", 1, 4),
                                   ("2 processes, batch 2 each", 2, 2)):
        out = work / f"search-{processes}-{batch}"
        metrics, wall = command([*search, "--batch-size", str(batch)], out, processes, 2 // processes)
        seconds = json.loads((out / "search.json").read_text())["seconds"]
        per_iteration = statistics.median(seconds[1:] or seconds)  # the first pays for the targets' rollout
        rows[f"search: {name}"] = {"processes": processes, "global_batch": batch * processes,
                                   "seconds_per_iteration": per_iteration,
                                   "samples_per_second": batch * processes / per_iteration, "command_seconds": wall}
    n_optimize, n_sample = ("2", "4") if tiny else ("8", "64")
    jobs = {"optimize": ["optimize", "--model", "digits-dit", "--labels", "0-9", "--reward", "digit:3", "--n",
                         n_optimize, "--iterations", "3" if tiny else "5", "--steps", steps],
            "sample": ["sample", "--model", "digits-dit", "--labels", "0-9", "--n", n_sample, "--steps", steps]}
    for job, argv in jobs.items():
        for processes in (1, 2):
            metrics, wall = command(argv, work / f"{job}-{processes}", processes, 2 // processes)
            n = metrics["n"]
            if job == "optimize":
                seconds = sum(metrics["seconds_per_iteration"])
                rate = n * len(metrics["seconds_per_iteration"]) / seconds  # sample-iterations per second
            else:
                seconds = metrics["seconds"]
                rate = n / seconds
            rows[f"{job}: {processes} process{'es' if processes > 1 else ''}"] = {
                "processes": processes, "samples": n, "job_seconds": seconds, "samples_per_second": rate,
                "command_seconds": wall, "shards": metrics["shards"]}
    for job in ("search", "optimize", "sample"):
        one = rows[f"{job}: 1 process" + (", batch 2" if job == "search" else "")]
        two = rows[f"{job}: 2 processes" + (", batch 2 each" if job == "search" else "")]
        rows[f"{job}: throughput, 2 processes / 1"] = {"ratio": two["samples_per_second"] / one["samples_per_second"]}
    return rows


def gradients(work: Path, iterations: int, tiny: bool) -> dict:
    rows = {}
    for model in ("digits-dit",) if tiny else ("digits-unet", "digits-dit"):
        for gradient in ("shortcut:random", "checkpointed", "full"):
            out = work / f"gradient-{model}-{gradient.replace(':', '-')}"
            argv = ["prune", "--model", model, "--ratio", "0.8", "--steps", "4" if tiny else "50", "--iterations",
                    str(iterations), "--batch-size", "2", "--gradient", gradient, "--samples", "4" if tiny else "256"]
            metrics, wall = command(argv, out, 1, 2)
            seconds = json.loads((out / "search.json").read_text())["seconds"]
            rows[f"{model}: {gradient}"] = {
                "iterations": iterations, "seconds_per_iteration": statistics.median(seconds[1:] or seconds),
                "search_seconds": sum(seconds), "peak_memory_mb": metrics["search_peak_memory_mb"],
                "macs_ratio": metrics["macs_ratio"], "ssim": metrics["ssim"],
                "accuracy_pruned": metrics.get("accuracy_pruned"), "accuracy_full": metrics.get("accuracy_full"),
                "final_search_ssim": metrics["search_ssim"][-1]}
    return rows


def equal_seconds(work: Path, gradients_rows: dict, tiny: bool) -> dict:
    """The Shortcut search given the seconds the Checkpointed one took (its measured seconds per iteration against
    the Shortcut's, from the ``gradients`` part): as many iterations as fit, everything else as there."""
    rows = {}
    for model in ("digits-dit",) if tiny else ("digits-unet", "digits-dit"):
        checkpointed, shortcut = gradients_rows[f"{model}: checkpointed"], gradients_rows[f"{model}: shortcut:random"]
        iterations = round(checkpointed["search_seconds"] / shortcut["seconds_per_iteration"])
        out = work / f"equal-seconds-{model}"
        argv = ["prune", "--model", model, "--ratio", "0.8", "--steps", "4" if tiny else "50", "--iterations",
                str(iterations), "--batch-size", "2", "--gradient", "shortcut:random", "--samples",
                "4" if tiny else "256"]
        metrics, wall = command(argv, out, 1, 2)
        seconds = json.loads((out / "search.json").read_text())["seconds"]
        rows[f"{model}: shortcut:random for checkpointed's seconds"] = {
            "iterations": iterations, "search_seconds": sum(seconds), "seconds_of_checkpointed":
            checkpointed["search_seconds"], "macs_ratio": metrics["macs_ratio"], "ssim": metrics["ssim"],
            "accuracy_pruned": metrics.get("accuracy_pruned"), "final_search_ssim": metrics["search_ssim"][-1]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="scaling,gradients,equal_seconds")
    parser.add_argument("--iterations", type=int, default=40, help="search iterations of the gradients part")
    parser.add_argument("--tiny", action="store_true", help="a few seconds a configuration: checks the script runs")
    parser.add_argument("--results", default=str(RESULTS / "distributed.json"))
    args = parser.parse_args()
    results = Path(args.results)
    payload = {k: v for k, v in json.loads(results.read_text()).items() if k in ("scaling", "gradients")} \
        if results.exists() else {}  # the parts not run this time are kept
    with tempfile.TemporaryDirectory() as work:
        if "scaling" in args.parts:
            payload["scaling"] = scaling(Path(work), args.tiny)
        if "gradients" in args.parts:
            payload["gradients"] = gradients(Path(work), 2 if args.tiny else args.iterations, args.tiny)
        if "equal_seconds" in args.parts:
            payload["equal_seconds"] = equal_seconds(Path(work), payload["gradients"], args.tiny)
    write_results(Path(args.results), "distributed", payload)
    for part, rows in payload.items():
        print(f"\n{part}")
        for name, row in rows.items():
            print(f"  {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in row.items()))


if __name__ == "__main__":
    main()
