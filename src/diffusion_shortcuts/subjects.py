"""What a command-line verb works on: a zoo model with labels, or a local pipeline folder with prompts (or, for a
class-conditional latent pipeline such as DiT, class names or labels).

Both kinds answer the same questions (:class:`Subject`): which conditions the user asked for, how they
become the denoiser's conditioning, a sampler, noise, how samples are judged and captioned, which cache schedule
ships with the model, and where a fine-tuned adapter goes. The verbs in :mod:`.reports` are written once against
this protocol and reach no further into a subject.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from . import conditions as C
from . import zoo
from .families import CLASS_NAMES
from .labels import cycled_labels, parse_labels
from .metrics import accuracy
from .pipelines import DTYPES, PipelineModel, is_pipeline_folder, load_pipeline, resolve_device
from .rewards import SpecContext

JUDGE = "digits-classifier-eval"


class SubjectError(ValueError):
    """A model or condition flag that does not fit the model (reported as one line)."""


class Subject(Protocol):
    """What a verb works on. ``conditions`` are what the user asked for (labels, prompts), as rewards and captions
    see them; ``encode`` turns them into the denoiser's conditioning."""

    name: str
    model: torch.nn.Module
    sample_shape: tuple[int, int, int]
    device: torch.device
    conditional: bool
    text: bool                       # the conditions are prompts
    default_guidance: float
    accuracy_judge: str | None       # the classifier behind judge()'s accuracy, None where there is none
    adapter: str | None              # the adapter (--lora) loaded onto the denoiser, None where there is none
    num_frames: int | None           # frames of each video, None where the subject makes images
    fps: int | None                  # the frame rate its videos are written at

    def conditions(self, n: int) -> Any: ...
    def distinct_conditions(self) -> Any: ...
    def encode(self, conditions) -> Any: ...
    def sampler(self, steps: int, guidance: float | None = None): ...
    def noise(self, n: int, generator=None) -> torch.Tensor: ...
    def judge(self, images: torch.Tensor, conditions) -> dict: ...
    def schedule_judge(self): ...
    def captions(self, conditions) -> list[str] | None: ...
    def reward_context(self) -> SpecContext: ...
    def shipped_schedule(self, ratio: float): ...
    def save_adapter(self, out: Path) -> str: ...
    def load_adapter(self, path: Path) -> None: ...


class ZooSubject:
    """A zoo generator (or a DDPM/DiT folder): class labels, judged by the evaluation classifier."""

    adapter: str | None = None
    num_frames: int | None = None
    fps: int | None = None

    def __init__(self, model: zoo.ZooModel, labels: str = "0-9"):
        self.m, self.labels_text = model, labels
        self.name, self.model, self.sample_shape = model.name, model.model, model.sample_shape
        self.default_guidance, self.conditional = model.guidance_scale, model.conditional
        self.device = model.model.device
        self.text = False
        self.accuracy_judge = JUDGE if model.conditional and model.num_classes == 10 else None  # what judge() uses

    def conditions(self, n: int):
        """n labels cycling through the user's ``--labels`` ('null': the unconditional label)."""
        if not self.conditional:
            return None
        if self.labels_text == "null":
            return torch.full((n,), self.m.null_label)
        return cycled_labels(self.labels_text, self.m.num_classes, n)

    def distinct_conditions(self):
        return torch.arange(self.m.num_classes) if self.conditional else None

    def encode(self, conditions):
        if conditions is None:
            return None
        return C.tree_map(lambda t: t.detach(), self.m.encode(conditions))  # a tensor, or a dict (digits-flux)

    def sampler(self, steps: int, guidance: float | None = None):
        unconditional = self.labels_text == "null"  # the null label in both branches: guidance changes nothing
        return self.m.sampler(steps, guidance_scale=1.0 if unconditional else guidance)

    def noise(self, n: int, generator=None) -> torch.Tensor:
        return self.m.noise(n, generator)

    def judge(self, images: torch.Tensor, conditions) -> dict:
        if conditions is None or self.m.num_classes != 10:
            return {}
        return {"accuracy": accuracy(zoo.load(JUDGE), images, conditions)}

    def schedule_judge(self):
        """Accuracy and FID of many samples (the digits judge), for comparing a schedule with the full model."""
        from .zoo.judge import DigitJudge

        return DigitJudge() if self.m.num_classes in (None, 10) else None

    def captions(self, conditions) -> list[str] | None:
        return None if conditions is None else [str(int(c)) for c in conditions]

    def reward_context(self) -> SpecContext:
        return SpecContext(self.sample_shape, self.conditional, str(self.device))

    def shipped_schedule(self, ratio: float):
        """The zoo's schedule at ``ratio`` (``--schedule zoo:RATIO``)."""
        if not hasattr(self.m, "cache_schedule"):
            raise ValueError(f"{self.name} ships no schedule: pass a schedule file")
        return self.m.cache_schedule(ratio)

    def save_adapter(self, out: Path) -> str:
        from .optimize import save_lora

        save_lora(self.model, out / "adapter.safetensors")
        return "adapter.safetensors"

    def load_adapter(self, path: Path) -> None:
        """``finetune``'s adapter (its output folder or the ``adapter.safetensors`` in it) onto the model."""
        load_adapter_file(self.model, path, "adapter.safetensors")


class PipelineSubject:
    """A local text-to-image pipeline folder: prompts through its own encoders; no judge of its own."""

    adapter: str | None = None

    def __init__(self, model: PipelineModel, prompts: list[str]):
        if model.text and not prompts:
            raise SubjectError(f"--prompt: {model.name} is a text-to-image pipeline; give --prompt TEXT or "
                               "--prompts FILE")
        self.m, self.prompts = model, list(prompts)
        self.name, self.model, self.sample_shape = model.name, model.model, model.sample_shape
        self.default_guidance, self.conditional, self.device = model.family.default_guidance, True, model.device
        self.text = True
        self.accuracy_judge = None
        self.num_frames, self.fps = model.num_frames, model.frame_rate

    def conditions(self, n: int) -> list[str]:
        return [self.prompts[i % len(self.prompts)] for i in range(n)]

    def distinct_conditions(self) -> list[str]:
        return list(self.prompts)

    def encode(self, conditions):
        return self.m.encode(list(conditions))

    def sampler(self, steps: int, guidance: float | None = None):
        return self.m.sampler(steps, guidance)

    def noise(self, n: int, generator=None) -> torch.Tensor:
        return self.m.noise(n, generator)

    def judge(self, images, conditions) -> dict:
        return {}

    def schedule_judge(self):
        return None

    def captions(self, conditions) -> list[str]:
        return list(conditions)

    def reward_context(self) -> SpecContext:
        return SpecContext(self.m.image_shape, True, str(self.device))

    def shipped_schedule(self, ratio: float):
        raise ValueError(f"{self.name} ships no schedule: pass a schedule file")

    def save_adapter(self, out: Path) -> str:
        from .optimize import save_lora as save_adapter_file
        from .pipelines import save_lora

        try:
            return save_lora(self.m.pipe, out / "lora").relative_to(out).as_posix()
        except ValueError:  # a pipeline without LoRA loading of its own (PixArt): the adapter file alone
            save_adapter_file(self.model, out / "adapter.safetensors")
            return "adapter.safetensors"

    def load_adapter(self, path: Path) -> None:
        """A LoRA folder in the pipeline's own format (``pipe.load_lora_weights``; ``finetune``'s output folder,
        whose ``lora/`` holds it, will do), or the adapter file that a pipeline without LoRA loading of its own was
        fine-tuned into."""
        path = Path(path)
        folder = next((f for f in (path, path / "lora") if (f / "pytorch_lora_weights.safetensors").is_file()), None)
        if folder is not None and hasattr(self.m.pipe, "load_lora_weights"):  # finetune's output or its lora/
            try:
                self.m.pipe.load_lora_weights(str(folder))
            except (ValueError, OSError, KeyError) as exc:
                raise SubjectError(f"--lora {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                                   ) from None
            return
        load_adapter_file(self.model, path, "adapter.safetensors")


class ClassPipelineSubject(PipelineSubject):
    """A local class-conditional latent pipeline folder (DiT): class ids (``--labels``, ``null`` for the null
    class) or the pipeline's class names (``--prompt``, as ``DiTPipeline.get_label_ids`` reads its ``id2label``),
    sampled through its VAE; no judge of its own."""

    def __init__(self, model: PipelineModel, names: list[str], labels: str = "0-9"):
        super().__init__(model, names)
        self.labels_text, self.text = labels, False
        self.null_label = int(model.family.null_cond(model.model).reshape(-1)[0])  # DiT: the row after the classes
        known = dict(getattr(model.pipe, "labels", None) or {})
        self.names = {}
        for name, index in known.items():  # the first name of each class, for captions
            self.names.setdefault(index, name)
        if names:
            unknown = [n for n in names if n not in known]
            if unknown:
                hint = (f"its classes are named like {', '.join(list(known)[:5])}" if known else
                        "it names no classes (no id2label in model_index.json): use --labels with class ids")
                raise SubjectError(f"--prompt: {model.name} has no class {', '.join(map(repr, unknown))}; {hint}")
            self.ids = [known[n] for n in names]
        elif labels == "null":
            self.ids = [self.null_label]
        else:
            self.ids = parse_labels(labels, self.null_label)

    def conditions(self, n: int) -> torch.Tensor:
        return torch.tensor([self.ids[i % len(self.ids)] for i in range(n)])

    def distinct_conditions(self) -> torch.Tensor:
        return torch.tensor(list(dict.fromkeys(self.ids)))

    def encode(self, conditions):
        return conditions.to(self.device)

    def sampler(self, steps: int, guidance: float | None = None):
        unconditional = self.ids == [self.null_label]  # the null class in both branches: guidance changes nothing
        return self.m.sampler(steps, 1.0 if unconditional else guidance)

    def captions(self, conditions) -> list[str]:
        return [self.names.get(int(c), "null" if int(c) == self.null_label else str(int(c))) for c in conditions]


def read_prompts(prompt: list[str] | None, prompts_file: str | None) -> list[str]:
    """``--prompt`` (repeatable) and ``--prompts FILE`` (one a line; blank lines and ``#`` comments skipped)."""
    prompts = list(prompt or [])
    if prompts_file:
        try:
            lines = Path(prompts_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise SubjectError(f"--prompts {prompts_file}: cannot read it ({exc})") from None
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not prompts:
            raise SubjectError(f"--prompts {prompts_file}: holds no prompt")
    if any(not p.strip() for p in prompts):
        raise SubjectError("--prompt: an empty prompt")
    return prompts


def load_adapter_file(model, path: Path, name: str) -> None:
    """The adapter file ``path`` (or ``path/name``) onto ``model``; one line naming ``--lora`` where there is none."""
    from .optimize.finetune import load_lora_file

    path = Path(path)
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise SubjectError(f"--lora {path}: no adapter there (a `finetune` output: {name}, or a LoRA folder with "
                           "pytorch_lora_weights.safetensors)")
    try:
        load_lora_file(model, file)
    except ValueError as exc:
        raise SubjectError(f"--lora: {exc}") from None


def load_subject(model: str, *, labels: str = "0-9", prompt=None, prompts=None, negative_prompt=None,
                 true_cfg_scale=None, scheduler=None, height=None, width=None, device="auto", dtype="float32",
                 vae_checkpointing=False, lora=None, frames=None, fps=None):
    """A zoo name or a folder: a pipeline folder of a text family becomes a :class:`PipelineSubject`; ``lora``: an
    adapter loaded onto its denoiser (``finetune``'s output); ``frames`` and ``fps``: a video pipeline's."""
    subject = _load_subject(model, labels=labels, prompt=prompt, prompts=prompts, negative_prompt=negative_prompt,
                            true_cfg_scale=true_cfg_scale, scheduler=scheduler, height=height, width=width,
                            device=device, dtype=dtype, vae_checkpointing=vae_checkpointing, frames=frames, fps=fps)
    if lora is not None:
        subject.load_adapter(Path(lora))
        subject.adapter = str(lora)
    return subject


def _load_subject(model: str, *, labels, prompt, prompts, negative_prompt, true_cfg_scale, scheduler, height, width,
                  device, dtype, vae_checkpointing, frames, fps):
    texts = read_prompts(prompt, prompts)
    if is_pipeline_folder(model):
        pipeline = load_pipeline(model, device, dtype, scheduler, negative_prompt, height, width, vae_checkpointing,
                                 true_cfg_scale, frames, fps)
        if pipeline.text:
            return PipelineSubject(pipeline, texts)
        if pipeline.family.conditioning == CLASS_NAMES and getattr(pipeline.pipe, "vae", None) is not None:
            return ClassPipelineSubject(pipeline, texts, labels)
    try:
        generator = zoo.load(model, device=resolve_device(device))
    except (ValueError, FileNotFoundError) as exc:
        raise SubjectError(f"--model: {exc}") from None
    if not isinstance(generator, zoo.ZooModel):
        raise SubjectError(f"--model {model}: a classifier, not a generator; generators: {', '.join(zoo.GENERATORS)}")
    if DTYPES[dtype] != torch.float32:
        generator.model.to(DTYPES[dtype])
    if texts:
        raise SubjectError(f"--prompt: {model} takes class labels (--labels), not prompts")
    if true_cfg_scale is not None:
        raise SubjectError(f"--true-cfg-scale: {model} has no classifier-free guidance of its own; use --guidance")
    for flag, value in (("--frames", frames), ("--fps", fps)):
        if value is not None:
            raise SubjectError(f"{flag}: {model} makes images, not videos")
    return ZooSubject(generator, labels)
