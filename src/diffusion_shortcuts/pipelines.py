"""Local diffusers pipeline folders as the command line's subjects: load, sample with prompts, save LoRA.

``load_pipeline(folder, device, dtype)`` loads a text-to-image pipeline of any registered model family
(:mod:`diffusion_shortcuts.families`) with ``local_files_only=True`` (nothing downloads), frozen, in the
chosen precision; a folder that is not a pipeline, or one of a family the library does not know, is a
``ValueError`` naming it. :func:`save_lora` writes a LoRA adapter in the format the pipeline's own
``load_lora_weights`` reads, with its rank, alpha and target modules in the file.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from .families import TEXT, UnknownModelError, denoiser_of, family_of, latent_frames, vae_scale, vae_time_scale
from .loading import quiet_loading
from .sampling import Sampler

SCHEDULERS = {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
              "flow-euler": "FlowMatchEulerDiscreteScheduler"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA where there is one, else CPU), ``cpu`` or ``cuda``; under a multi-GPU ``accelerate launch``
    each process's own GPU, and under ``accelerate launch --cpu`` the CPU for ``auto``."""
    from .distributed import cpu_only, local_device

    if name == "auto":
        return local_device("cpu" if cpu_only() else "cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return local_device(name)


def check_precision(device: torch.device, dtype: str) -> None:
    """One line naming ``--dtype`` and what is available where ``device`` cannot compute in ``dtype`` (bfloat16 on a
    GPU before Ampere; a half-precision convolution a CPU build lacks): tried on a tiny convolution and matmul."""
    def runs(name: str) -> bool:
        if device.type == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
            return False
        try:
            x = torch.ones(1, 1, 4, 4, device=device, dtype=DTYPES[name])
            torch.nn.functional.conv2d(x, torch.ones(1, 1, 3, 3, device=device, dtype=DTYPES[name])) @ x[..., :2, :]
            return True
        except (RuntimeError, TypeError, NotImplementedError):
            return False

    if not runs(dtype):
        available = [name for name in DTYPES if runs(name)]
        raise ValueError(f"--dtype {dtype}: {device.type} cannot compute in {dtype} here; available: "
                         f"{', '.join(available)}")


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


@dataclass
class PipelineModel:
    """A loaded pipeline with the sampling settings the user chose (steps are the verb's)."""

    path: Path
    pipe: object
    device: torch.device
    dtype: torch.dtype
    negative_prompt: str | None = None
    sample_size: tuple[int, int] | None = None   # (height, width) of the images, None: the model's default
    true_cfg_scale: float | None = None          # the stock call's, None: its default (with a negative prompt)
    frames: int | None = None                    # frames of a video pipeline's videos, None: the model's default
    fps: int | None = None                       # their frame rate in the MP4s, None: the family's

    @property
    def video(self) -> bool:
        return self.family.latent_layout != "CHW"

    @property
    def num_frames(self) -> int | None:
        """Frames of each video (the decoded count), None for an image pipeline."""
        if not self.video:
            return None
        return self.frames if self.frames is not None else self.family.default_video[0]

    @property
    def frame_rate(self) -> int | None:
        return None if not self.video else self.fps or self.family.default_fps

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> torch.nn.Module:
        return denoiser_of(self.pipe)[1]

    @property
    def family(self):
        return family_of(self.model)

    @property
    def text(self) -> bool:
        return self.family.conditioning == TEXT

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One latent's shape in the family's layout: ``(C, H, W)``, or with a frame axis for a video pipeline."""
        layout = self.family.latent_layout
        sizes = dict(zip(layout, self.family.latent_shape(self.model)))
        if self.sample_size is not None:
            factor = vae_scale(self.pipe)
            height, width = self.sample_size
            multiple = factor * self.family.spatial_multiple(self.model)
            if height % multiple or width % multiple:
                raise ValueError(f"--height/--width {height}x{width}: must be multiples of {multiple} for "
                                 f"{self.family.name}")
            sizes["H"], sizes["W"] = height // factor, width // factor
        if self.frames is not None:
            sizes["F"] = latent_frames(self.frames, vae_time_scale(self.pipe))
        return tuple(sizes[axis] for axis in layout)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the decoded images (of each frame, for a video pipeline): RGB at the latents' size times the
        VAE's downsampling."""
        h, w = self.sample_shape[-2:]
        factor = vae_scale(self.pipe)
        return 3, h * factor, w * factor

    def sampler(self, steps: int, guidance: float | None = None, true_cfg_scale: float | None = None) -> Sampler:
        return Sampler.from_pipeline(self.pipe, steps, guidance, negative_prompt=self.negative_prompt,
                                     sample_shape=self.sample_shape, true_cfg_scale=true_cfg_scale if true_cfg_scale
                                     is not None else self.true_cfg_scale)

    @cached_property
    def _encoder(self) -> Sampler:
        """An unguided sampler kept for encoding prompts (fine-tuning encodes every iteration's batch)."""
        return self.sampler(1, 1.0, 1.0)

    def encode(self, prompts: list[str]):
        return self._encoder.encode_prompt(prompts)

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((n, *self.sample_shape), generator=generator).to(self.device)


def load_pipeline(path: str | Path, device: str = "auto", dtype: str = "float32", scheduler: str | None = None,
                  negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
                  vae_checkpointing: bool = False, true_cfg_scale: float | None = None, frames: int | None = None,
                  fps: int | None = None) -> PipelineModel:
    """A local pipeline folder, frozen, on ``device`` in ``dtype`` (see the module docstring).

    ``frames`` and ``fps``: a video pipeline's frame count (what its VAE takes: ``4k + 1`` for Wan's) and the frame
    rate its MP4s are written at; an image pipeline takes neither.

    ``vae_checkpointing``: decode through the VAE with gradient checkpointing (diffusers' own), so that the
    reward's gradient through a large decoder keeps the memory of one block; same gradient, more time.
    """
    import diffusers

    path = Path(path)
    if not is_pipeline_folder(path):
        raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_device = resolve_device(device)
    check_precision(torch_device, dtype)
    try:
        index = json.loads((path / "model_index.json").read_text())
        absent = {k: None for k, v in index.items() if not k.startswith("_") and v in (None, [None, None])}
        with quiet_loading():
            pipe = diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype],
                                                               **absent)
    except Exception as exc:  # diffusers raises many kinds for a damaged folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load the pipeline in {path}: {first[:300]}") from None
    try:
        component, model = denoiser_of(pipe)
        family = family_of(model)
        family.check_pipeline(pipe)
    except (UnknownModelError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    check_frames(pipe, family, frames, fps)
    if true_cfg_scale is not None and not family.true_cfg:
        raise ValueError(f"--true-cfg-scale: {family.name} has no classifier-free guidance of its own; use --guidance")
    if true_cfg_scale is not None and true_cfg_scale != 1.0 and negative_prompt is None:
        raise ValueError("--true-cfg-scale needs --negative-prompt: without one the stock call runs no "
                         "classifier-free guidance")
    pipe.to(torch_device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    if vae_checkpointing:
        vae = getattr(pipe, "vae", None)
        if vae is None or not getattr(vae, "_supports_gradient_checkpointing", False):
            raise ValueError(f"--vae-checkpointing: the VAE of {path} ({type(vae).__name__}) does not support it")
        vae.enable_gradient_checkpointing()
    if scheduler is not None:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    size = None
    if height is not None or width is not None:
        default = vae_scale(pipe) * family_of(model).latent_shape(model)[1]
        size = (height or default, width or default)
    return PipelineModel(path, pipe, torch_device, DTYPES[dtype], negative_prompt, size, true_cfg_scale, frames, fps)


def check_frames(pipe, family, frames: int | None, fps: int | None) -> None:
    """One line naming ``--frames`` or ``--fps`` where the pipeline cannot take them: either on an image pipeline, or a
    frame count its causal VAE cannot make (the first frame, then whole groups of ``time_scale``)."""
    if family.latent_layout == "CHW":
        for flag, value in (("--frames", frames), ("--fps", fps)):
            if value is not None:
                raise ValueError(f"{flag}: {type(pipe).__name__} ({family.name}) makes images, not videos")
        return
    scale = vae_time_scale(pipe)
    if frames is not None and (frames < 1 or (frames - 1) % scale):
        near = [n for n in range(max(1, frames - 2 * scale), frames + 2 * scale + 1) if (n - 1) % scale == 0]
        raise ValueError(f"--frames {frames}: {family.name}'s VAE takes {scale}k + 1 frames (such as "
                         f"{', '.join(map(str, near))})")


def save_lora(pipe, folder: str | Path) -> Path:
    """The denoiser's LoRA adapter as ``folder/pytorch_lora_weights.safetensors`` through the pipeline's own
    ``save_lora_weights``, with the adapter's configuration (rank, alpha, target modules) in the file, so
    that ``pipe.load_lora_weights(folder)`` restores the fine-tuned model without repeating them."""
    from peft.utils import get_peft_model_state_dict

    component, model = denoiser_of(pipe)
    saver = getattr(type(pipe), "save_lora_weights", None)
    params = inspect.signature(saver).parameters if saver is not None else {}
    if f"{component}_lora_layers" not in params:
        raise ValueError(f"{type(pipe).__name__} cannot save LoRA weights in its own format")
    config = model.peft_config["default"]
    metadata = json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    saver(folder, **{f"{component}_lora_layers": get_peft_model_state_dict(model),
                     f"{component}_lora_adapter_metadata": metadata})
    return Path(folder) / "pytorch_lora_weights.safetensors"
