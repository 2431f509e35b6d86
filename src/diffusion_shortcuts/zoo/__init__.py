"""The embedded model zoo: small digit models that ship inside the package, so everything runs offline.

``load(name)`` returns, for the generators ``digits-unet`` and ``digits-dit``, a :class:`ZooModel`
(the denoiser, its scheduler, its conditioning encoder and guidance defaults), for ``digits-flux`` (a stock
``FluxPipeline`` folder, ``path("digits-flux")``) one behind prompts (:mod:`.prompted`); for
``digits-classifier`` (a reward) and ``digits-classifier-eval`` (never a reward, only a judge), the
classifier module. ``load`` also takes a local folder: one written by ``zoo.train``, or a diffusers
pipeline folder (``model_index.json``: DDPM/DDIM, DiT).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..families import sample_shape as _sample_shape
from .architectures import NULL_LABEL, NUM_CLASSES, DigitClassifier, LabelEncoder

ZOO_DIR = Path(__file__).parent
GENERATORS = ("digits-unet", "digits-dit", "digits-flux")
CLASSIFIERS = ("digits-classifier", "digits-classifier-eval")
NAMES = GENERATORS + CLASSIFIERS


@dataclass
class ZooModel:
    """A generator with what sampling it needs. ``cond = m.encode(labels)`` is what ``m.model`` takes."""

    name: str
    model: torch.nn.Module
    scheduler: Any
    guidance_scale: float
    num_inference_steps: int
    num_classes: int | None
    null_label: int | None
    label_encoder: LabelEncoder | None = None
    path: Path | None = None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return _sample_shape(self.model)

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if not self.conditional:
            raise ValueError(f"{self.name} is unconditional: it takes no labels")
        highest = self.null_label if self.null_label is not None else self.num_classes - 1
        bad = labels[(labels < 0) | (labels > highest)]
        if len(bad):
            null = f" (and {self.null_label} for no condition)" if self.null_label is not None else ""
            raise ValueError(f"labels out of range: {bad.tolist()[:5]}; {self.name} takes "
                             f"0-{self.num_classes - 1}{null}")
        return labels

    def encode(self, labels) -> torch.Tensor | None:
        """Conditioning for ``labels``: token embeddings (B, L, D) for the UNet, the labels for the DiT."""
        if not self.conditional:
            return None
        labels = self.check_labels(labels).to(self.model.device)
        return self.label_encoder(labels) if self.label_encoder is not None else labels

    def null_cond(self) -> torch.Tensor | None:
        """The unconditional conditioning (batch 1) used by classifier-free guidance."""
        return self.encode([self.null_label]) if self.conditional else None

    @property
    def dipgo_dir(self) -> Path | None:
        """Where the DiP-GO search for this model is shipped (``dipgo/``: pruner, schedules, history)."""
        return self.path / "dipgo" if self.path is not None else None

    @property
    def schedule_ratios(self) -> list[float]:
        """The ratios this model ships a cache schedule for (``dipgo/schedule-RATIO.json``), ascending."""
        return shipped_schedule_ratios(self.dipgo_dir) if self.dipgo_dir is not None else []

    def cache_schedule(self, ratio: float = 0.8):
        """The cache schedule searched for ``ratio`` and shipped as ``dipgo/schedule-RATIO.json`` (see its README)."""
        from ..prune import CacheSchedule

        path = self.dipgo_dir / f"schedule-{ratio:g}.json" if self.dipgo_dir is not None else None
        if path is None or not path.exists():
            raise FileNotFoundError(f"{self.name} ships no cache schedule at ratio {ratio:g} (it ships "
                                    f"{', '.join(f'{r:g}' for r in self.schedule_ratios) or 'none'}); make one "
                                    "with `diffusion-shortcuts prune`")
        return CacheSchedule.load(path)

    def dipgo(self):
        """The shipped DiP-GO search (trained pruner and its history) as a :class:`~diffusion_shortcuts.prune.
        SearchResult`, from which ``.schedule(ratio)`` gives a schedule at any ratio."""
        from ..prune import SearchResult

        folder = self.dipgo_dir
        if folder is None or not (folder / "pruner").exists():
            raise FileNotFoundError(f"{self.name} ships no DiP-GO pruner; train one with `diffusion-shortcuts prune`")
        return SearchResult.load(folder, self.model, self.noise(1), self.encode([0]) if self.conditional else None)

    @staticmethod
    def decode(x: torch.Tensor) -> torch.Tensor:
        """Model space [-1, 1] -> images in [0, 1] (not clamped, so that it stays differentiable)."""
        return x / 2 + 0.5

    @staticmethod
    def encode_images(images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((n, *self.sample_shape), generator=generator).to(self.model.device)

    def sampler(self, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                scheduler=None, **kwargs):
        """A :class:`~diffusion_shortcuts.Sampler` with this model's defaults (DDIM, its guidance)."""
        from ..sampling import Sampler

        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        uncond = self.null_cond() if guidance != 1.0 else None
        if uncond is not None:
            uncond = uncond.detach()
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        return Sampler(self.model, scheduler or self.scheduler, steps,
                       guidance, decode=self.decode, encode=self.encode_images, uncond=uncond, **kwargs)


    @torch.no_grad()
    def generate(self, labels, seed: int = 0, num_inference_steps: int | None = None, batch_size: int = 100,
                 guidance_scale: float | None = None, progress: bool = False, scheduler=None) -> torch.Tensor:
        """Images in [0, 1] for ``labels`` (None: unconditional), ``batch_size`` at a time, seeded."""
        from tqdm.auto import tqdm

        labels = None if labels is None else self.check_labels(labels)
        n = len(labels) if labels is not None else batch_size
        sampler = self.sampler(num_inference_steps, guidance_scale if self.conditional else 1.0, scheduler)
        gen = torch.Generator().manual_seed(seed)
        noise = self.noise(n, gen)
        out = []
        for i in tqdm(range(0, n, batch_size), desc=f"sampling {self.name}", disable=not progress):
            cond = self.encode(labels[i:i + batch_size]) if labels is not None else None
            out.append(sampler(noise[i:i + batch_size], cond).clamp(0, 1))
        return torch.cat(out)


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


def _resolve(name_or_path: str | Path) -> Path:
    if str(name_or_path) in NAMES:
        path = ZOO_DIR / str(name_or_path)
        if not path.exists():
            raise FileNotFoundError(f"zoo model {name_or_path!r} has no weights at {path}; train it with "
                                    f"{training_command(str(name_or_path))} --out {path}")
        return path
    path = Path(name_or_path)
    if not path.is_dir():
        raise ValueError(f"unknown model {str(name_or_path)!r}: not a zoo name ({', '.join(NAMES)}) "
                         "and not a local folder")
    return path


def training_command(name: str) -> str:
    """The command that trains a zoo model (``--out DIR`` and its options follow)."""
    if name == "digits-flux":
        return "python -m diffusion_shortcuts.zoo.flux"
    return f"python -m diffusion_shortcuts.zoo.train {name}"


def path(name: str) -> Path:
    """The folder a zoo model ships in: for ``digits-flux`` a stock pipeline folder,
    ``FluxPipeline.from_pretrained(ds.zoo.path("digits-flux"))``."""
    if str(name) not in NAMES:
        raise ValueError(f"unknown zoo model {str(name)!r}; the zoo: {', '.join(NAMES)}")
    return _resolve(name)


def shipped_schedule_ratios(dipgo_dir: Path) -> list[float]:
    """The ratios of the ``schedule-RATIO.json`` files in a zoo model's ``dipgo/`` folder, ascending."""
    return sorted(float(p.stem.split("-", 1)[1]) for p in Path(dipgo_dir).glob("schedule-*.json"))


def load(name_or_path: str | Path, device: str | torch.device = "cpu"):
    """Load a zoo model by name, or a local folder (a zoo folder or a diffusers pipeline folder). A damaged
    folder (missing, truncated or corrupt weights, a broken ``zoo.json``) is a ValueError naming the file."""
    try:
        return _load(name_or_path, device)
    except (OSError, json.JSONDecodeError, KeyError, EnvironmentError) as exc:
        if isinstance(exc, FileNotFoundError) and str(name_or_path) in NAMES:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{name_or_path}: a damaged model folder ({type(exc).__name__}: {first[:300]})") from None


def _load(name_or_path: str | Path, device):
    path = _resolve(name_or_path)
    if (path / "zoo.json").exists():
        return _load_generator(path, device)
    if (path / "config.json").exists() and json.loads((path / "config.json").read_text()).get(
            "_class_name") == "DigitClassifier":
        return _frozen(DigitClassifier.from_pretrained(path)).to(device)
    if (path / "model_index.json").exists():
        return _load_pipeline(path, device)
    raise ValueError(f"{path} is not a diffusers model: no zoo.json, model_index.json or classifier config.json")


def _load_generator(path: Path, device) -> ZooModel:
    from diffusers import DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel

    try:
        meta = json.loads((path / "zoo.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / 'zoo.json'}: not valid JSON ({exc})") from None
    if meta["kind"] == "flux":  # a stock pipeline folder behind prompts
        from .prompted import load_prompted

        return load_prompted(path, meta, device)
    scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
    encoder = None
    if meta["kind"] == "unet":
        model = UNet2DConditionModel.from_pretrained(path / "unet")
        encoder = _frozen(LabelEncoder.from_pretrained(path / "label_encoder")).to(device)
    elif meta["kind"] == "dit":
        model = DiTTransformer2DModel.from_pretrained(path / "transformer")
    else:
        raise ValueError(f"{path / 'zoo.json'}: unknown kind {meta['kind']!r}")
    return ZooModel(name=path.name, model=_frozen(model).to(device), scheduler=scheduler,
                    guidance_scale=float(meta["guidance_scale"]), num_inference_steps=int(meta["num_inference_steps"]),
                    num_classes=int(meta.get("num_classes", NUM_CLASSES)),
                    null_label=int(meta.get("null_label", NULL_LABEL)), label_encoder=encoder, path=path)


def _load_pipeline(path: Path, device) -> ZooModel:
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # diffusers raises many types for a broken folder
        raise ValueError(f"{path} is not a loadable diffusers pipeline: {exc}") from exc
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None or getattr(pipe, "vae", None) is not None or getattr(pipe, "text_encoder", None) is not None:
        raise ValueError(f"{path}: ds.zoo.load takes pixel-space pipelines without a VAE or text encoder (DDPM/DDIM, "
                         f"class-conditional); for {type(pipe).__name__} use ds.Sampler.from_pipeline, or the command "
                         f"line's --model {path}")
    null_label = getattr(model.config, "num_embeds_ada_norm", None)  # DiT: the extra row is the null class
    num_classes = null_label or getattr(model.config, "num_class_embeds", None)
    return ZooModel(name=path.name, model=_frozen(model).to(device), scheduler=pipe.scheduler,
                    guidance_scale=4.0 if null_label else 1.0, num_inference_steps=50,
                    num_classes=num_classes, null_label=null_label, path=path)
