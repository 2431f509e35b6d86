"""Loading local model folders quietly: diffusers' and transformers' per-file progress bars are noise for a
folder that loads in a blink, and they would sit above a one-line error."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def quiet_loading():
    """diffusers' and transformers' loading progress bars off inside the block."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
