"""torch.compile and cache schedules: what to compile, and the refusals where it cannot be done.

A schedule decides outside every compiled region: each gated block's own forward is compiled (``fullgraph=True``),
and the hooks around it stay Python. A model compiled whole gets its hooks run outside its graphs
(:class:`~diffusion_shortcuts.prune.SuperNet`); compiled with ``fullgraph=True`` it cannot, and is refused.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch

from ..families import unwrap
from .schedule import ScheduleError


def compiled_whole(model) -> bool:
    """True for a model compiled whole (``torch.compile(model)``: an ``OptimizedModule``); a schedule's decision runs
    between its graphs, which ``fullgraph=True`` forbids: refused with what to do instead."""
    context = getattr(model, "dynamo_ctx", None)
    if context is None:
        return False
    if getattr(context, "fullgraph", False):
        raise ScheduleError(f"{type(unwrap(model)).__name__} is compiled with fullgraph=True, and a cache schedule "
                            "decides between its blocks, outside any graph: compile it with fullgraph=False, or "
                            "leave it uncompiled and pass compile=True to compile each block with fullgraph=True")
    return True


class CompileUnavailable(ValueError):
    """torch cannot compile here: no C++ compiler for inductor on the CPU, no Triton on a GPU."""


def why_not_compilable(device: torch.device, backend: str = "inductor") -> str | None:
    """What keeps ``torch.compile`` (inductor) from compiling on ``device`` (None when nothing does)."""
    if backend != "inductor":
        return None
    if device.type == "cpu":
        compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        return None if any(c and shutil.which(c) for c in compilers) else \
            "no C++ compiler (inductor needs one on the CPU: install g++, or set CXX)"
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "no Triton (inductor needs it on a GPU)"
    return f"inductor does not compile for {device.type} here"


def compile_options(compile: bool | dict, compiled_model: bool, device: torch.device) -> dict | None:
    """``torch.compile``'s keyword arguments for the blocks (None: run them as they are); a
    :class:`CompileUnavailable` where torch cannot compile on ``device``."""
    if not (compile or compiled_model):
        return None
    options = {"fullgraph": True, **(compile if isinstance(compile, dict) else {})}
    reason = why_not_compilable(device, options.get("backend", "inductor"))
    if reason is not None:
        raise CompileUnavailable(f"compile: torch cannot compile on {device.type} here: {reason}; run without "
                                 "compiling (no --compile)")
    return options
