"""Pictures a person would rather look at than read: image grids as PNG (PIL, no torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [0, 1] -> (B, H, W, C) uint8."""
    arr = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return arr.permute(0, 2, 3, 1).numpy()


def grid(images: torch.Tensor, nrow: int | None = None, scale: int = 3, pad: int = 2) -> Image.Image:
    """Tile images (B, C, H, W) in [0, 1] into one PIL image, ``nrow`` per row, each upscaled ``scale``x."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = np.full((rows * cell_h + pad, nrow * cell_w + pad, c), 255, np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        tile = arr[i].repeat(scale, 0).repeat(scale, 1)
        top, left = pad + r * cell_h, pad + col * cell_w
        canvas[top: top + h * scale, left: left + w * scale] = tile
    mode = "L" if c == 1 else "RGB"
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode)


def labelled(image: Image.Image, title: str, height: int = 14) -> Image.Image:
    """The image with a one-line title above it."""
    out = Image.new("RGB", (image.width, image.height + height), "white")
    out.paste(image.convert("RGB"), (0, height))
    ImageDraw.Draw(out).text((2, 1), title, fill="black")
    return out


def side_by_side(images: list[Image.Image], gap: int = 8) -> Image.Image:
    width = sum(i.width for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, max(i.height for i in images)), "white")
    x = 0
    for img in images:
        out.paste(img.convert("RGB"), (x, 0))
        x += img.width + gap
    return out


def stacked(images: list[Image.Image]) -> Image.Image:
    """Pictures one above the other, left-aligned, on white (the rows of a captioned grid or a contact sheet)."""
    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    top = 0
    for img in images:
        out.paste(img.convert("RGB"), (0, top))
        top += img.height
    return out


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, title: str | None = None) -> Path:
    img = grid(images, nrow)
    if title:
        img = labelled(img, title)
    img.save(path)
    return Path(path)


def read_image(path: str | Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """A PNG/JPEG file as a (1, C, H, W) tensor in [0, 1] with C = shape[0] (grey or RGB). An image of
    another size than (H, W) is refused: resizing it silently would change what the reward asks for."""
    from PIL import UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ValueError(f"cannot read image {path}: {reason}") from None
    if (img.height, img.width) != tuple(shape[1:]):
        raise ValueError(f"image {path} is {img.width}x{img.height} but the model makes {shape[2]}x{shape[1]} images")
    arr = torch.from_numpy(np.asarray(img.convert("L" if shape[0] == 1 else "RGB"), dtype=np.float32) / 255.0)
    return (arr[None, None] if arr.ndim == 2 else arr.permute(2, 0, 1)[None]).contiguous()
