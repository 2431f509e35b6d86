"""How a command that stopped says so: one line naming what happened, its exit status, and what was kept.

Bad input (a ``ValueError`` or ``TypeError``: ``UsageError``, ``ScheduleError``, ``CheckpointError``, ...) exits 2; an
interruption (Ctrl-C, a launcher that died) 130; out of memory, a full disk, a process of the launch that failed or
anything else 1, each with where the run's work is and the command that continues it.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path


def ctrl_c_remembered(interrupted: threading.Event):
    """Python's own Ctrl-C (a KeyboardInterrupt), remembered in ``interrupted``: a library that swallows it while it
    imports or loads (a bare ``except:`` around an optional import) would otherwise let the verb run as if nothing
    was pressed. The event belongs to one call of the command, so no later call inherits a press."""
    def on_ctrl_c(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt
    return on_ctrl_c


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""


CHECKPOINTS = {"prune": "search_checkpoint.pt", "finetune": "finetune_checkpoint.pt"}  # the verbs that --resume
# what lowers the memory of a verb, by the flag it needs: only the verb's own flags are named
LOWER_MEMORY = (("gradient", "--gradient shortcut or checkpointed"), ("vae_checkpointing", "--vae-checkpointing"),
                ("batch_size", "a smaller --batch-size"), ("n", "a smaller --n"), ("dtype", "--dtype bfloat16"))


def what_was_kept(verb: str, out: str) -> str:
    """Where a run that stopped left its work, and the command that continues it."""
    name = CHECKPOINTS.get(verb)
    if name is None:
        return f"what was saved is in {out}; run the same command to start again"
    if (Path(out) / name).exists():
        return f"the last checkpoint is {Path(out) / name}: run the same command with --resume to continue"
    return f"nothing was checkpointed yet in {out}: run the same command (without --resume) to start again"


def out_of_memory(verb: str, flags: dict, exc: BaseException, verb_flags) -> str:
    """One line for a ``torch.OutOfMemoryError``: what ran out, the peak so far, and the flags that lower it (of
    ``verb_flags``, the verb's own)."""
    import torch

    from .metrics import peak_memory_mb

    device = "cuda" if "cuda" in str(exc).lower() and torch.cuda.is_available() else "cpu"
    hints = [hint for flag, hint in LOWER_MEMORY if flag in verb_flags and not
             (flag == "dtype" and flags.get("dtype") != "float32") and not (flag == "vae_checkpointing" and
                                                                              flags.get("vae_checkpointing"))]
    lower = f"; lower it with {', '.join(hints)}" if hints else ""
    return (f"out of memory on {device} (peak {peak_memory_mb(device):.0f} MB so far){lower}; "
            f"{what_was_kept(verb, flags['out'])}")


def explain(verb: str, exc: BaseException, flags: dict, verb_flags) -> tuple[str, int]:
    """The one line and exit status for ``exc``, which stopped ``verb`` run with ``flags`` (``out`` among them)."""
    from . import distributed  # torch: only once a verb ran

    out = flags["out"]
    if isinstance(exc, (ValueError, TypeError)):
        return first_line(exc) or type(exc).__name__, 2
    if isinstance(exc, KeyboardInterrupt):
        why = "the accelerate launcher of this process died" if distributed.launcher_gone() else "interrupted"
        return f"{why}; {what_was_kept(verb, out)}", 130
    if isinstance(exc, distributed.LaunchStopped):
        return (f"a process of the launch failed (the launcher stopped this one with SIGTERM, as it does when another "
                f"exits or it is stopped itself); {what_was_kept(verb, out)}", 1)
    if distributed.peer_failed(exc):
        return f"a process of the launch failed ({distributed.peer_failure_reason(exc)}); {what_was_kept(verb, out)}", 1
    if type(exc).__name__ == "OutOfMemoryError":
        return out_of_memory(verb, flags, exc, verb_flags), 1
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"{exc.strerror}; {what_was_kept(verb, out)}", 1
    return f"{type(exc).__name__}: {first_line(exc)} (--debug shows the traceback; what was saved is in {out})", 1
