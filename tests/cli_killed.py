"""Run by tests/test_distributed.py under a two-process `accelerate launch`: a command through ``cli.main``, as the
`diffusion-shortcuts` command runs it, in which process 1 kills itself (SIGKILL) at the search's iteration IT, as a
real failure would take a worker down. Arguments: IT ARGV..."""

import os
import signal
import sys

from diffusion_shortcuts import cli, distributed
from diffusion_shortcuts.prune import train

kill_at, argv = int(sys.argv[1]), sys.argv[2:]
step = train._Search.step


def step_that_dies(self, it: int) -> dict:
    if it == kill_at and distributed.process_index() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, it)


train._Search.step = step_that_dies
sys.exit(cli.main(argv))
