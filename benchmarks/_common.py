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
