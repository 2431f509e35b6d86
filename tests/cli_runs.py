"""Running the command line inside a test: its exit code and what it printed to stderr, and what it wrote."""

import json

from diffusion_shortcuts import cli


def run(argv, capsys):
    """``diffusion-shortcuts ARGV`` in this process: (exit code, stderr)."""
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def metrics_of(folder):
    return json.loads((folder / "metrics.json").read_text())
