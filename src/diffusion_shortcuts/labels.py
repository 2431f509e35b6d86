"""Class labels as the user types them: ``--labels 0-9``, ``3``, ``1,4,7`` or ``0-4,8``."""

from __future__ import annotations

import torch

from .usage import UsageError


def parse_labels(text: str, num_classes: int) -> list[int]:
    """'0-9', '3', '1,4,7' or '0-4,8' -> a list of labels, each checked against the model's classes."""
    labels: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                if hi - lo >= 10_000:
                    raise UsageError(f"--labels {text!r}: a range of {hi - lo + 1} labels; the model takes "
                                     f"0-{num_classes - 1}")
                labels.extend(range(lo, hi + 1))
            else:
                labels.append(int(part))
    except UsageError:
        raise
    except ValueError:
        raise UsageError(f"--labels {text!r}: expected digits like 0-9, 3 or 1,4,7") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad or not labels:
        raise UsageError(f"--labels {text!r}: labels out of range {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                         f"the model takes 0-{num_classes - 1}")
    return labels


def cycled_labels(text: str, num_classes: int, n: int) -> torch.Tensor:
    """n labels cycling through the parsed ``--labels`` (so 0-9 with n=20 gives each digit twice)."""
    pool = parse_labels(text, num_classes)
    return torch.tensor([pool[i % len(pool)] for i in range(n)])
