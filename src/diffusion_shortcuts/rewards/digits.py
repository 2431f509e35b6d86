"""Rewards on the digits zoo: a class log-probability and closeness to a reference image."""

from __future__ import annotations

from typing import Any

import torch

from .base import SpecContext, register_spec


class DigitClass:
    """``log p(target | image)`` under the zoo's ``digits-classifier`` (never the eval classifier).

    ``target=None`` takes each image's own label from the condition passed with it, ``reward(images,
    labels)``: the reward that makes a class-conditional model draw its classes more clearly.
    """

    def __init__(self, target: int | torch.Tensor | None, classifier=None):
        from .. import zoo

        self.classifier = classifier if classifier is not None else zoo.load("digits-classifier")
        if target is not None:
            target = torch.as_tensor(target, dtype=torch.long)
            _check_digits(target)
        self.target = target
        self.name = "digit:label" if target is None else f"digit:{target.tolist()}"

    def __call__(self, images: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if self.target is None:
            if cond is None:
                raise ValueError("DigitClass(None) takes the labels from the condition, but none was given")
            target = _check_digits(torch.as_tensor(cond, dtype=torch.long).reshape(-1))
            if len(target) != len(images):
                raise ValueError(f"DigitClass(None): {len(target)} labels for {len(images)} images")
        else:
            target = self.target.expand(images.shape[0]) if self.target.ndim == 0 else self.target
        return self.classifier.log_prob(images, target.to(images.device))


def _check_digits(target: torch.Tensor) -> torch.Tensor:
    if ((target < 0) | (target > 9)).any():
        raise ValueError(f"DigitClass: target must be a digit 0-9, got {target.tolist()}")
    return target


@register_spec("label", help="each sample's own class (class-conditional models)")
def _label_spec(arg, context: SpecContext):
    if arg is not None:
        raise ValueError("label takes no argument")
    if not context.conditional:
        raise ValueError("label needs a class-conditional model")
    return DigitClass(None)


@register_spec("digit", arg="N", help="log p(N | image) under digits-classifier")
def _digit_spec(arg, context: SpecContext):
    if arg is None or not arg.isdigit() or not 0 <= int(arg) <= 9:
        raise ValueError(f"expected digit:N with N in 0-9, got {arg}")
    return DigitClass(int(arg))


class Reference:
    """Negative mean squared error to a reference image inside a mask (inpainting, editing).

    ``image``: (C, H, W) or (1|B, C, H, W) in [0, 1]; ``mask``: same spatial size, 1 where the sample
    must match the reference (None: everywhere).
    """

    def __init__(self, image: torch.Tensor, mask: torch.Tensor | None = None):
        image = image.unsqueeze(0) if image.ndim == 3 else image
        if image.ndim != 4:
            raise ValueError(f"Reference: image must be (C, H, W) or (B, C, H, W), got {tuple(image.shape)}")
        if mask is None:
            mask = torch.ones_like(image[:, :1])
        mask = mask.reshape(-1, 1, *mask.shape[-2:]) if mask.ndim in (2, 3) else mask
        if mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"Reference: mask size {tuple(mask.shape[-2:])} != image size {tuple(image.shape[-2:])}")
        if mask.sum() <= 0:
            raise ValueError("Reference: the mask selects no pixel")
        self.image, self.mask = image.detach(), mask.detach().float()
        self.name = "reference"

    def __call__(self, images: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if images.shape[1:] != self.image.shape[1:]:
            raise ValueError(f"Reference: images {tuple(images.shape[1:])} != reference {tuple(self.image.shape[1:])}")
        mask = self.mask.to(images.device)
        err = (images - self.image.to(images.device)).square() * mask
        return -err.flatten(1).sum(1) / (mask.expand_as(err).flatten(1).sum(1))


@register_spec("reference", arg="IMAGE[:MASK]", help="closeness to an image file inside a mask file")
def _reference_spec(arg, context: SpecContext):
    from ..images import read_image

    parts = (arg or "").split(":")
    if not parts[0] or len(parts) > 2:
        raise ValueError("expected reference:IMAGE.png[:MASK.png]")
    if context.sample_shape is None:
        raise ValueError("the model's image size is not known")
    image = read_image(parts[0], context.sample_shape)
    mask = read_image(parts[1], (1, *context.sample_shape[1:]))[:, :1].gt(0.5).float() if len(parts) == 2 else None
    return Reference(image, mask)
