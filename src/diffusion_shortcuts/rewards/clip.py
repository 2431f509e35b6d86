"""Rewards that Stable Diffusion users optimize, on a CLIP model loaded from a LOCAL folder (never downloaded).

- ``ClipScore(model_path, prompt)``: ``100 * cos(E_image(x), E_text(prompt))``, the CLIPScore of Hessel
  et al. 2021 without its clipping at 0 (kept differentiable); with ``prompt=None`` each image is scored
  against its own prompt (the conditions the reward is given).
- ``PickScore(model_path)``: a CLIP preference model (Kirstain et al. 2023): ``exp(logit_scale) *
  cos(E_image(x), E_text(prompt))`` against each image's own prompt.
- ``Aesthetic(clip_path, head_path)``: a linear or MLP head on the L2-normalised CLIP image embedding,
  as the LAION aesthetic predictor is built (a stack of Linear layers, no activations); the head is
  read from a safetensors or torch state-dict file whose Linear weights are taken in key order.

Spec strings (``from_spec``): ``clip:DIR[:TEXT]``, ``aesthetic:DIR[:HEAD]`` (the head file defaults to
``DIR/aesthetic_head.safetensors``), ``pickscore:DIR``.

Images (B, C, H, W) in [0, 1] are resized (bicubic) and centre-cropped to the model's input size and
normalised with the processor's mean and std, all differentiably. Needs ``transformers``
(``pip install -e '.[clip]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..loading import quiet_loading
from .base import SpecContext, register_spec


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("CLIP rewards need transformers: pip install -e '.[clip]'") from exc
    return transformers


class _ClipImages:
    """Differentiable CLIP preprocessing and image embedding."""

    def __init__(self, model_path: str | Path, device: str | torch.device = "cpu"):
        tf = _transformers()
        path = Path(model_path)
        if not path.is_dir():
            raise ValueError(f"CLIP model folder {path} does not exist (rewards load local folders only)")
        try:
            with quiet_loading():
                self.model = tf.CLIPModel.from_pretrained(path, local_files_only=True)
            self.model = self.model.eval().requires_grad_(False).to(device)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a loadable CLIP model folder: {exc}") from exc
        try:
            processor = tf.CLIPImageProcessor.from_pretrained(path, local_files_only=True)
            mean, std = processor.image_mean, processor.image_std
        except OSError:
            mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
        self.size = self.model.config.vision_config.image_size
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.path = path

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"CLIP rewards need images (B, 1|3, H, W), got {tuple(images.shape)}")
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                          mode="bicubic", align_corners=False)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        emb = self.model.get_image_features(pixel_values=x)
        emb = getattr(emb, "pooler_output", emb)
        return F.normalize(emb, dim=-1)


class _ClipTexts:
    """Normalised CLIP text embeddings of prompts, computed once per prompt."""

    def __init__(self, clip: _ClipImages, device):
        tf = _transformers()
        try:
            self.tokenizer = tf.AutoTokenizer.from_pretrained(clip.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{clip.path} has no loadable tokenizer: {exc}") from exc
        self.clip, self.device, self.cache = clip, device, {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            tokens = self.tokenizer(missing, padding=True, truncation=True, return_tensors="pt").to(self.device)
            with torch.no_grad():
                text = self.clip.model.get_text_features(**tokens)
            text = F.normalize(getattr(text, "pooler_output", text), dim=-1)
            self.cache.update(zip(missing, text))
        return torch.stack([self.cache[p] for p in prompts])


def _prompts_of(cond, batch: int, fixed: str | None, name: str) -> list[str]:
    if fixed is not None:
        return [fixed] * batch
    if isinstance(cond, (list, tuple)) and len(cond) == batch and all(isinstance(c, str) for c in cond):
        return list(cond)
    raise ValueError(f"{name} without a text scores each image against its prompt, but the conditions are "
                     f"{type(cond).__name__}, not {batch} prompts")


class ClipScore:
    """``100 * cos(CLIP image embedding, CLIP text embedding)`` per image, against ``prompt`` or (None) each
    image's own prompt."""

    def __init__(self, model_path: str | Path, prompt: str | None = None, device: str | torch.device = "cpu"):
        self.clip = _ClipImages(model_path, device)
        self.texts = _ClipTexts(self.clip, device)
        self.prompt = prompt
        self.name = f"clip:{prompt}" if prompt is not None else "clip:prompt"

    @property
    def text(self) -> torch.Tensor:
        return self.texts([self.prompt])

    def __call__(self, images: torch.Tensor, cond: Any = None) -> torch.Tensor:
        text = self.texts(_prompts_of(cond, len(images), self.prompt, self.name))
        return 100 * (self.clip.embed(images) * text.to(images.dtype)).sum(-1)


class PickScore:
    """A CLIP preference model's score of each image for its own prompt: ``exp(logit_scale) * cos``."""

    def __init__(self, model_path: str | Path, device: str | torch.device = "cpu"):
        self.clip = _ClipImages(model_path, device)
        self.texts = _ClipTexts(self.clip, device)
        self.scale = float(self.clip.model.logit_scale.exp())
        self.name = "pickscore"

    def __call__(self, images: torch.Tensor, cond: Any = None) -> torch.Tensor:
        text = self.texts(_prompts_of(cond, len(images), None, self.name))
        return self.scale * (self.clip.embed(images) * text.to(images.dtype)).sum(-1)


def load_linear_head(path: str | Path) -> torch.nn.Sequential:
    """A stack of Linear layers from a state dict (safetensors or torch): weights taken in key order."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"aesthetic head file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file: any loader error
        raise ValueError(f"cannot read aesthetic head {path}: {exc}") from exc
    weights = [k for k in state if k.endswith("weight") and state[k].ndim == 2]
    if not weights:
        raise ValueError(f"aesthetic head {path} holds no Linear weight (2-D '*weight' tensor)")
    layers = []
    for key in weights:
        w = state[key]
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=key[: -len("weight")] + "bias" in state)
        layer.weight.data.copy_(w)
        if layer.bias is not None:
            layer.bias.data.copy_(state[key[: -len("weight")] + "bias"])
        layers.append(layer)
    for a, b in zip(layers, layers[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"aesthetic head {path}: layer sizes do not chain ({a.out_features} -> {b.in_features})")
    if layers[-1].out_features != 1:
        raise ValueError(f"aesthetic head {path} must end in one output, ends in {layers[-1].out_features}")
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)


class Aesthetic:
    """A linear/MLP head on the normalised CLIP image embedding (LAION aesthetic predictor style)."""

    def __init__(self, clip_path: str | Path, head_path: str | Path, device: str | torch.device = "cpu"):
        self.head = load_linear_head(head_path).to(device)
        self.clip = _ClipImages(clip_path, device)
        dim = self.clip.model.config.projection_dim
        if self.head[0].in_features != dim:
            raise ValueError(f"aesthetic head takes {self.head[0].in_features} features, the CLIP model gives {dim}")
        self.name = "aesthetic"

    def __call__(self, images: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.head(self.clip.embed(images)).squeeze(-1)


@register_spec("clip", arg="DIR[:TEXT]", help="CLIP score of TEXT (default: each image's prompt), CLIP in DIR")
def _clip_spec(arg, context: SpecContext):
    folder, _, text = (arg or "").partition(":")
    if not folder:
        raise ValueError("expected clip:DIR[:TEXT]")
    return ClipScore(folder, text or None, context.device)


@register_spec("aesthetic", arg="DIR[:HEAD]", help="a LAION-style aesthetic head on the CLIP model in DIR")
def _aesthetic_spec(arg, context: SpecContext):
    folder, _, head = (arg or "").partition(":")
    if not folder:
        raise ValueError("expected aesthetic:DIR[:HEAD]")
    head_path = Path(head) if head else Path(folder) / "aesthetic_head.safetensors"
    return Aesthetic(folder, head_path, context.device)


@register_spec("pickscore", arg="DIR", help="a CLIP preference model (PickScore) in DIR, against each prompt")
def _pickscore_spec(arg, context: SpecContext):
    if not arg:
        raise ValueError("expected pickscore:DIR")
    return PickScore(arg, context.device)
