"""The tests' environment (offline), fixtures and the kill helpers; tiny models live in ``tiny_models.py``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from tiny_models import tiny_cond_unet


@pytest.fixture
def cond_unet():
    return tiny_cond_unet()


class Killed(Exception):
    """Raised from a progress callback to stop a run mid-way, as a kill would."""


def kill_at(iteration: int):
    """A callback that raises :class:`Killed` when the run reaches ``iteration``."""
    def callback(info):
        if info["iteration"] == iteration:
            raise Killed
    return callback
