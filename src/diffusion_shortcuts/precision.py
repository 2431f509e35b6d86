"""Half precision's one failure: an overflow to NaN or inf, checked once per generation and named."""

from __future__ import annotations

import torch

HALF_PRECISION = (torch.float16, torch.bfloat16)


class PrecisionError(ValueError):
    """A generation in half precision that went non-finite (an overflow): names the component and the fix."""


def check_finite(values: torch.Tensor, dtype: torch.dtype, component: str, what: str) -> None:
    """Once per generation, where ``component`` ran in half precision: a :class:`PrecisionError` if ``values``
    hold NaN or inf (one read back from the device; none in float32, where the loop reads nothing extra)."""
    if dtype in HALF_PRECISION and not torch.isfinite(values.detach()).all():
        fix = "float32" if dtype == torch.bfloat16 else "bfloat16 or float32"
        raise PrecisionError(f"the {component} in {str(dtype).removeprefix('torch.')} produced non-finite {what} "
                             f"(NaN or inf: it overflowed); run it in {fix} (--dtype "
                             f"{fix.split()[0]})")
