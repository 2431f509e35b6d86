"""A zoo generator behind prompts: ``digits-flux``, a stock diffusers pipeline folder whose labels are written as
prompts ("the digit 7") and encoded by the pipeline's own text encoders.

It answers what the other zoo generators answer (:class:`~diffusion_shortcuts.zoo.ZooModel`: ``encode(labels)``,
``sampler()``, ``noise()``, ``generate()``, the shipped schedules), so that the command line, the judges and the
benchmarks take it by name; its images are grey (the mean of the pipeline's RGB), as the digit classifiers read them.
``guidance_scale`` is the pipeline's true classifier-free guidance (``true_cfg_scale``, the empty prompt as the
negative one): the model was trained with 10% of its prompts dropped to the empty prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .architectures import NULL_LABEL, NUM_CLASSES
from . import ZooModel


@dataclass
class PromptZooModel(ZooModel):
    """See the module docstring. ``prompt`` is the template a label is written in (``{d}``: the digit)."""

    pipe: Any = None
    prompt: str = "the digit {d}"
    prompt_options: dict = field(default_factory=dict)
    latent_shape: tuple[int, ...] = ()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.latent_shape)

    def prompts(self, labels) -> list[str]:
        """The prompts behind ``labels`` (the null label: the empty prompt)."""
        return ["" if int(label) == self.null_label else self.prompt.format(d=int(label))
                for label in self.check_labels(labels)]

    @cached_property
    def _encoder(self):
        """An unguided sampler kept for encoding prompts through the pipeline's text encoders (every ``encode``)."""
        from ..sampling import Sampler

        return Sampler.from_pipeline(self.pipe, 1, true_cfg_scale=1.0, sample_shape=self.sample_shape,
                                     prompt_options=dict(self.prompt_options))

    def encode(self, labels) -> Any:
        if not self.conditional:
            return None
        return self._encoder.encode_prompt(self.prompts(labels))

    def _sampler(self, steps: int, guidance: float, **kwargs):
        from ..sampling import Sampler

        sampler = Sampler.from_pipeline(self.pipe, steps, true_cfg_scale=guidance, uncond=self._null() if
                                        guidance != 1.0 else None, sample_shape=self.sample_shape,
                                        prompt_options=dict(self.prompt_options), **kwargs)
        decode = sampler.decode
        sampler.decode = lambda z: decode(z).mean(1, keepdim=True)  # grey, as the classifiers read digits
        encode = sampler.encode
        sampler.encode = lambda images: encode(images.expand(-1, 3, -1, -1))
        return sampler

    def _null(self):
        return self._encoder.encode_prompt([""])

    def null_cond(self) -> Any:
        return self._null() if self.conditional else None

    def sampler(self, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                scheduler=None, **kwargs):
        """A :class:`~diffusion_shortcuts.Sampler` on the pipeline: its flow-matching scheduler, ``guidance_scale`` as
        the true CFG weight (default the model's), grey images in [0, 1]."""
        if scheduler is not None:
            raise ValueError(f"{self.name} samples with its pipeline's own scheduler")
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        return self._sampler(steps, float(guidance), **kwargs)

    def decode(self, x: torch.Tensor) -> torch.Tensor:  # the sampler decodes through the VAE
        raise NotImplementedError(f"{self.name} decodes through its VAE: use m.sampler()")


def load_prompted(path: Path, meta: dict, device) -> PromptZooModel:
    """``digits-flux`` (``zoo.json`` kind ``flux``): its pipeline folder, loaded offline and frozen."""
    from diffusers import DiffusionPipeline

    from ..loading import quiet_loading

    try:
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # diffusers raises many kinds for a damaged folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: a damaged pipeline folder ({first[:300]})") from None
    pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (pipe.vae.config.latent_channels, int(meta["height"]) // factor, int(meta["width"]) // factor)
    return PromptZooModel(name=path.name, model=pipe.transformer, scheduler=pipe.scheduler,
                          guidance_scale=float(meta.get("guidance_scale", 1.0)),
                          num_inference_steps=int(meta["num_inference_steps"]),
                          num_classes=int(meta.get("num_classes", NUM_CLASSES)), null_label=NULL_LABEL, path=path,
                          pipe=pipe, prompt=meta.get("prompt", "the digit {d}"),
                          prompt_options={"max_sequence_length": int(meta["max_sequence_length"])},
                          latent_shape=shape)
