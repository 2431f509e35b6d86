"""What a command-line verb works on: a zoo model with labels, or a local pipeline folder with prompts.

Both kinds answer the same questions (:class:`Subject`): which conditions the user asked for, how they
become the denoiser's conditioning, a sampler, noise, how samples are judged and captioned, and where a
fine-tuned adapter goes. The verbs in :mod:`.reports` are written once against this.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import zoo
from .metrics import accuracy
from .pipelines import DTYPES, PipelineModel, is_pipeline_folder, load_pipeline, resolve_device
from .rewards import SpecContext

JUDGE = "digits-classifier-eval"


class SubjectError(ValueError):
    """A model or condition flag that does not fit the model (reported as one line)."""


class ZooSubject:
    """A zoo generator (or a DDPM/DiT folder): class labels, judged by the evaluation classifier."""

    def __init__(self, model: zoo.ZooModel, labels: str = "0-9"):
        self.m, self.labels_text = model, labels
        self.name, self.model, self.sample_shape = model.name, model.model, model.sample_shape
        self.default_guidance, self.conditional, self.device = model.guidance_scale, model.conditional, model.model.device
        self.text = False

    def conditions(self, n: int):
        """n labels cycling through the user's ``--labels`` ('null': the unconditional label)."""
        from .reports import cycled_labels

        if not self.conditional:
            return None
        if self.labels_text == "null":
            return torch.full((n,), self.m.null_label)
        return cycled_labels(self.labels_text, self.m.num_classes, n)

    def distinct_conditions(self):
        return torch.arange(self.m.num_classes) if self.conditional else None

    def encode(self, conditions):
        return self.m.encode(conditions).detach() if conditions is not None else None

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

    def save_adapter(self, out: Path) -> str:
        from .optimize import save_lora

        save_lora(self.model, out / "adapter.safetensors")
        return "adapter.safetensors"


class PipelineSubject:
    """A local text-to-image pipeline folder: prompts through its own encoders; no judge of its own."""

    def __init__(self, model: PipelineModel, prompts: list[str]):
        if model.text and not prompts:
            raise SubjectError(f"--prompt: {model.name} is a text-to-image pipeline; give --prompt TEXT or --prompts FILE")
        self.m, self.prompts = model, list(prompts)
        self.name, self.model, self.sample_shape = model.name, model.model, model.sample_shape
        self.default_guidance, self.conditional, self.device = model.family.default_guidance, True, model.device
        self.text = True

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
        return SpecContext(None, True, str(self.device))

    def save_adapter(self, out: Path) -> str:
        from .optimize import save_lora as save_adapter_file
        from .pipelines import save_lora

        try:
            return save_lora(self.m.pipe, out / "lora").relative_to(out).as_posix()
        except ValueError:  # a pipeline without LoRA loading of its own (PixArt): the adapter file alone
            save_adapter_file(self.model, out / "adapter.safetensors")
            return "adapter.safetensors"


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


def load_subject(model: str, *, labels: str = "0-9", prompt=None, prompts=None, negative_prompt=None,
                 scheduler=None, height=None, width=None, device="auto", dtype="float32", vae_checkpointing=False):
    """A zoo name or a folder: a pipeline folder of a text family becomes a :class:`PipelineSubject`."""
    texts = read_prompts(prompt, prompts)
    if is_pipeline_folder(model):
        pipeline = load_pipeline(model, device, dtype, scheduler, negative_prompt, height, width, vae_checkpointing)
        if pipeline.text:
            return PipelineSubject(pipeline, texts)
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
    return ZooSubject(generator, labels)
