"""The command line under `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` (N CPU processes):
sample, optimize and prune, one after another in one launch (each through ``cli.main``, as the `diffusion-shortcuts`
command runs them), into OUT/NAME, then the bad input of ``REFUSED``; each command's exit status goes to
OUT/codes-RANK.json. tests/test_distributed.py runs the same ``COMMANDS`` in one process and compares."""

import json
import os
import sys

COMMANDS = {
    "sample": ["sample", "--model", "digits-dit", "--labels", "0-9", "--n", "5", "--steps", "4", "--seed", "3"],
    "optimize": ["optimize", "--model", "digits-dit", "--labels", "1,7", "--reward", "digit:3", "--n", "3",
                 "--iterations", "2", "--steps", "4", "--lr", "0.05"],
    "prune": ["prune", "--model", "digits-dit", "--ratio", "0.5", "--steps", "4", "--iterations", "2",
              "--batch-size", "1", "--samples", "4", "--checkpoint-every", "1"],
}
REFUSED = {"too_few": ["sample", "--model", "digits-dit", "--n", "1", "--steps", "2"]}

if __name__ == "__main__":
    from diffusion_shortcuts import cli

    out = sys.argv[1]
    codes = {name: cli.main([*argv, "--out", f"{out}/{name}"]) for name, argv in {**COMMANDS, **REFUSED}.items()}
    with open(f"{out}/codes-{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump(codes, f)
