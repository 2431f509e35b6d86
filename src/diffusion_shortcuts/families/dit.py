"""DiT (``dit``, Peebles & Xie 2023): a class-conditional latent transformer with learned variance; its
"prompts" are class names (``DiTPipeline.get_label_ids``) and its unconditional input is the null class."""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel

from .base import CLASS_NAMES, TransformerFamily, as_kwargs, output_of, unwrap
from .registry import register


@register(DiTTransformer2DModel)
class DiT(TransformerFamily):
    name = "dit"
    learned_sigma = True
    default_guidance = 4.0
    conditioning = CLASS_NAMES

    def forward(self, model, x, timestep, cond, guidance):
        return output_of(model(x, timestep=timestep, **as_kwargs(cond, "class_labels")))

    def encode_prompt(self, pipe, prompts, negative, device, size, **options):
        labels = torch.tensor(pipe.get_label_ids(list(prompts)), device=device)
        return labels, self.null_cond(pipe.transformer).expand(len(prompts))

    def null_cond(self, model) -> torch.Tensor:
        model = unwrap(model)
        return torch.tensor([model.config.num_embeds_ada_norm], device=model.device)

    def check_cond(self, model, cond) -> None:
        if not isinstance(cond, torch.Tensor) or cond.is_floating_point():
            raise ValueError("cond: DiT takes integer class labels, got "
                             f"{type(cond).__name__ if cond is not None else None}")
        highest = model.config.num_embeds_ada_norm  # the null class
        bad = cond[(cond < 0) | (cond > highest)]
        if len(bad):
            raise ValueError(f"cond: class labels {bad.tolist()[:5]} out of range 0-{highest} ({highest}: no class)")
