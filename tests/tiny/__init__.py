"""One tiny random pipeline per registered model family, found by the family tests by themselves.

Each module here defines ``TINY`` (or ``TINIES``, a list): a :class:`Tiny` that builds the pipeline from configs
(nothing downloads: word-level tokenizers and tiny text encoders from ``tiny_pipelines``) and says what proving the
family on it needs: the stock call's arguments, the guidance arguments under the stock call's names, how the stock
call's latents differ from ours (packed tokens), and the numbers that belong to the family (a finite-difference
step, a gradient tolerance). Adding a family to the tests is adding one module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import torch

from tiny_pipelines import PROMPTS

import diffusion_shortcuts as ds
from diffusion_shortcuts.families import SEPARATE


def _same(x):
    return x


@dataclass
class Tiny:
    """A tiny pipeline of one family and what its proofs need (see the module docstring)."""

    name: str                               # this pipeline: the family's name for the family's main one
    family: str                             # the registered family it proves
    build: Callable[[], object]             # -> the pipeline (float32, eval)
    sample_shape: tuple[int, ...]           # one latent's shape in the family's layout
    blocks: list[str]                       # the gated blocks the family finds
    call: dict = field(default_factory=dict)         # the stock call's arguments besides prompts, latents, steps
    guidance: dict = field(default_factory=lambda: {"guidance_scale": 3.0})  # the stock call's names, both sides
    prompt_options: dict = field(default_factory=dict)  # what encode_prompt needs (max_sequence_length, ...)
    pack: Callable = _same                  # our latents -> the stock call's ``latents``
    unpack: Callable = _same                # the stock call's latents -> ours
    fd_step: float = 1e-4                   # the finite-difference step of the gradient proof
    tolerance: float = 1e-6                 # the gradient proofs' relative tolerance
    gradient_scheduler: Callable | None = None  # a one-step scheduler for the gradient proofs (the stock is multistep)
    stock: Callable | None = None           # (tiny, pipe, noise, steps, dtype, output_type) -> decoded images: a
    #                                         pipeline that takes no latents and returns only images (DiT, DDPM)
    noise: Callable | None = None           # (dtype) -> the noise both sides start from, where the stock call draws it
    conditions: object = None               # what our Sampler is given, where it is no prompts (labels, None)

    def pipeline(self, dtype: torch.dtype = torch.float32):
        pipe = self.build()
        pipe.to(dtype)
        return pipe

    def sampler(self, pipe, steps: int) -> ds.Sampler:
        kwargs = {k: v for k, v in self.guidance.items() if k != "negative_prompt"}
        return ds.Sampler.from_pipeline(pipe, num_inference_steps=steps, sample_shape=self.sample_shape,
                                        negative_prompt=self.guidance.get("negative_prompt"),
                                        prompt_options=dict(self.prompt_options), **kwargs)

    def initial_noise(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.noise is not None:
            return self.noise(dtype)
        return torch.randn(2, *self.sample_shape, generator=torch.Generator().manual_seed(0))

    def encode(self, sampler):
        return sampler.encode_prompt(PROMPTS) if self.conditions is None and self.text else self.conditions

    @property
    def text(self) -> bool:
        return self.family not in ("dit", "ddpm-unet")

    def run_stock(self, pipe, noise: torch.Tensor, steps: int, dtype: torch.dtype,
                  output_type: str = "latent") -> torch.Tensor:
        """The stock ``pipe(...)`` call from ``noise``: final latents in our layout, or with ``output_type="pt"``
        the decoded images, videos as ``(B, 3, F, H, W)``."""
        if self.stock is not None:
            return self.stock(self, pipe, noise, steps, dtype, output_type)
        out = pipe(prompt=PROMPTS, latents=self.pack(noise).to(dtype), num_inference_steps=steps,
                   output_type=output_type, **self.guidance, **self.call)
        result = (out.frames if hasattr(out, "frames") else out.images).float()
        if output_type == "latent":
            return self.unpack(result)
        return result.transpose(1, 2) if result.ndim == 5 else result

    def branch_calls(self, sampler) -> int:
        """Denoiser calls per step: two where the family calls the guidance branches one at a time."""
        return 2 if sampler._guided and sampler.family.cfg_calls == SEPARATE else 1


def discover() -> list[Tiny]:
    """Every tiny pipeline of this package, its modules imported in name order."""
    found = []
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        namespace = importlib.import_module(f"{__name__}.{module}")
        found += list(getattr(namespace, "TINIES", [])) or [namespace.TINY]
    return found


TINIES = discover()
MAIN = {tiny.family: tiny for tiny in reversed(TINIES) if tiny.name == tiny.family}  # one per family
