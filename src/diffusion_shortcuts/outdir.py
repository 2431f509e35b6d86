"""The command line's output folder: made when a run starts, held by one run at a time, removed again when a
run fails before writing anything into it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

LOCK = ".diffusion-shortcuts.lock"


class OutputFolderError(ValueError):
    """An output folder that cannot be used: empty path, not writable, or held by another run."""


def process_alive(pid: int) -> bool:
    """True while process ``pid`` exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(folder: Path, name: str = "*") -> None:
    """Temporary files (``.NAME.PID.tmp``, :func:`~.checkpoints.write_atomically`'s) in ``folder`` left by writers
    that were killed mid-write, whose process is gone; a live writer's is left alone. ``name``: a glob of the
    files whose temporaries to remove (default: all)."""
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        pid = tmp.name[:-len(".tmp")].rpartition(".")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


class OutputFolder:
    """``with OutputFolder(path) as out:`` makes ``path`` (if needed), takes its lock file, and on exit drops the
    lock; a folder this run made and left empty (bad input found after it was made) is removed. What a dead run left
    there (its lock, the temporary files of a write it was killed in) is cleaned when the next run takes it."""

    def __init__(self, path: str):
        if not str(path).strip():
            raise OutputFolderError("--out: an empty path; name an output folder")
        self.path = Path(path)
        self.created = False
        self.lock = self.path / LOCK

    def __enter__(self) -> Path:
        if os.environ.get("RANK", "0") != "0":  # a helper process of `accelerate launch`: the main one makes the
            return self.path                     # folder, holds it and alone writes into it
        if self.path.exists() and not self.path.is_dir():
            raise OutputFolderError(f"--out {self.path} is a file; name a folder (new or one of an earlier run)")
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = self._holder()
            if holder is not None and holder != os.getpid() and process_alive(holder):
                raise OutputFolderError(f"--out {self.path}: another run (process {holder}) is using this folder; "
                                        "wait for it or choose another --out") from None
            self.lock.unlink(missing_ok=True)  # a stale lock from a run that was killed
            return self.__enter__()
        except OSError as exc:
            raise OutputFolderError(f"--out {self.path}: output folder is not writable "
                                    f"({exc.strerror or exc})") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
        except OSError as exc:  # a full disk: no empty lock, no empty folder left behind
            self.lock.unlink(missing_ok=True)
            self._remove_if_made_and_empty()
            raise OutputFolderError(f"--out {self.path}: cannot write its lock file ({exc.strerror or exc})") from None
        remove_stale_temporaries(self.path)
        return self.path

    def _holder(self) -> int | None:
        try:
            return int(self.lock.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        if self._holder() == os.getpid():
            self.lock.unlink(missing_ok=True)
        self._remove_if_made_and_empty()

    def _remove_if_made_and_empty(self) -> None:
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)
