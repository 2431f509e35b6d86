"""Videos a person can play and glance at: MP4 files (H.264 through diffusers' ``export_to_video``, which plays in a
browser) and contact sheets (a few frames of each video in a row, PNG).

Videos are ``(3, F, H, W)`` tensors in [0, 1] (a batch: ``(B, 3, F, H, W)``), the layout the library's decoders give.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .images import labelled, stacked, to_uint8

SHEET_FRAMES = 4      # frames per video on a contact sheet
SHEET_HEIGHT = (48, 240)  # a frame on a sheet is scaled to at least / at most this many pixels high


def is_video(x: torch.Tensor) -> bool:
    """A batch of videos ``(B, C, F, H, W)`` rather than images ``(B, C, H, W)``."""
    return x.ndim == 5


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """(C, F, H, W) in [0, 1] -> (F, H, W, 3) uint8 (grey repeated to RGB)."""
    arr = to_uint8(video.transpose(0, 1))
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def save_video(video: torch.Tensor, path: str | Path, fps: int = 16) -> Path:
    """One video ``(C, F, H, W)`` in [0, 1] as an H.264 MP4 at ``fps`` frames a second. The file appears whole or not
    at all (written beside and renamed), so that an interrupted run never leaves half a video behind."""
    from diffusers.utils import export_to_video

    if video.ndim != 4:
        raise ValueError(f"save_video takes one video (C, F, H, W), got {tuple(video.shape)}")
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial{path.suffix}")
    frames = [Image.fromarray(frame) for frame in frames_to_uint8(video)]
    export_to_video(frames, str(partial), fps=int(fps))
    os.replace(partial, path)
    return path


def read_video(path: str | Path) -> torch.Tensor:
    """An MP4 (any format ffmpeg reads) as ``(3, F, H, W)`` in [0, 1]; a file that is not a video is named."""
    import imageio.v3 as iio

    try:
        frames = iio.imread(path, plugin="FFMPEG")
    except (OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot read video {path}: {str(exc).strip().splitlines()[0][:200] if str(exc) else exc}"
                         ) from None
    if frames.ndim != 4:
        raise ValueError(f"{path} is not a video (read {frames.shape})")
    return torch.from_numpy(frames[..., :3].copy()).float().div(255).permute(3, 0, 1, 2).contiguous()


def shown_frames(num_frames: int, count: int = SHEET_FRAMES) -> list[int]:
    """``count`` frame indices spread evenly from the first frame to the last."""
    if num_frames <= count:
        return list(range(num_frames))
    return [round(i * (num_frames - 1) / (count - 1)) for i in range(count)]


def _frame_image(frame: np.ndarray) -> Image.Image:
    image = Image.fromarray(frame)
    low, high = SHEET_HEIGHT
    scale = max(1, low // image.height) if image.height < low else min(1.0, high / image.height)
    if scale != 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.NEAREST if scale > 1 else Image.BILINEAR)
    return image


def video_row(video: torch.Tensor, count: int = SHEET_FRAMES, pad: int = 2) -> Image.Image:
    """A few frames of one video side by side, each numbered."""
    arr = frames_to_uint8(video)
    index = shown_frames(len(arr), count)
    tiles = [_frame_image(arr[i]) for i in index]
    width, height = tiles[0].size
    row = Image.new("RGB", (len(tiles) * (width + pad) + pad, height + pad * 2 + 12), "white")
    draw = ImageDraw.Draw(row)
    for k, (i, tile) in enumerate(zip(index, tiles)):
        left = pad + k * (width + pad)
        row.paste(tile, (left, pad + 12))
        draw.text((left + 1, 0), f"f{i}", fill="black")
    return row


def contact_sheet(videos: torch.Tensor, captions: list[str] | None = None, count: int = SHEET_FRAMES) -> Image.Image:
    """One row per video (``(B, C, F, H, W)``): ``count`` frames spread over it, its caption above."""
    rows = [video_row(v, count) for v in videos.float().cpu()]
    if captions:
        rows = [labelled(row, caption[:60]) for row, caption in zip(rows, captions)]
    return stacked(rows)


def video_name(index: int, stem: str = "video") -> str:
    """The file of the ``index``-th video of a run: ``video_007.mp4``."""
    return f"{stem}_{index:03d}.mp4"


def save_videos(videos: torch.Tensor, folder: Path, fps: int, indices: list[int] | None = None,
                stem: str = "video") -> list[Path]:
    """Each video of a batch as ``folder/{stem}_{index:03d}.mp4`` (``indices``: the videos' numbers in the run,
    default 0, 1, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    indices = list(range(len(videos))) if indices is None else list(indices)
    return [save_video(v, folder / video_name(i, stem), fps) for i, v in zip(indices, videos)]
