"""Every registered model family, end to end on a tiny random pipeline built from configs.

For each family: the Sampler reproduces the stock diffusers pipeline from prompts (or labels); Full()
gradients equal finite differences and Shortcut()'s equal its closed form; blocks are found, a schedule's
MACs counted by torch equal its table's accounting, a keep-everything schedule changes nothing, and a
schedule that reuses blocks gives the same output under the stock pipeline call as under the Sampler.
"""

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from tiny_models import tiny_dit, tiny_unet, tiny_vae
from diffusers import DDIMPipeline, DDIMScheduler, DiTPipeline, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from tiny_pipelines import BUILDERS, PROMPTS, VARIANTS

import diffusion_shortcuts as ds
from diffusion_shortcuts import conditions as C
from diffusion_shortcuts.families import UnknownModelError, family_of, pack_latents, unpack_latents
from diffusion_shortcuts.metrics import count_macs
from diffusion_shortcuts.prune import CacheSchedule, ScheduleError, profile

STEPS = 4
GUIDANCE = 3.0
FAMILIES = ["ddpm-unet", "sd-unet", "sdxl-unet", "dit", "pixart", "sana", "sd3", "flux"]
BLOCKS = {
    "ddpm-unet": ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"],
    "sd-unet": ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"],
    "sdxl-unet": ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"],
    "dit": ["transformer_blocks.0", "transformer_blocks.1"],
    "pixart": ["transformer_blocks.0", "transformer_blocks.1"],
    "sana": ["transformer_blocks.0", "transformer_blocks.1"],
    "sd3": ["transformer_blocks.0", "transformer_blocks.1"],
    "flux": ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"],
}


@dataclass
class Case:
    """A tiny pipeline, a Sampler on it, and two ways to run one generation: ours and the stock call."""

    pipe: object
    sampler: ds.Sampler
    cond: object
    noise: torch.Tensor
    stock: Callable[[int], torch.Tensor]   # steps -> final latents (or images) of the stock pipeline call
    ours: Callable[[], torch.Tensor]        # the same from the Sampler
    guided: bool                            # two batched guidance branches per call


def text_case(name: str, steps: int = STEPS, dtype: torch.dtype = torch.float32) -> Case:
    pipe, kwargs = BUILDERS[name]() if name in BUILDERS else VARIANTS[name][1]()
    pipe.to(dtype)
    options = {k: kwargs[k] for k in ("max_sequence_length",) if k in kwargs}
    sampler = ds.Sampler.from_pipeline(pipe, num_inference_steps=steps, guidance_scale=GUIDANCE,
                                       prompt_options=options, sample_shape=(4, 8, 8))
    cond = sampler.encode_prompt(PROMPTS)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    packed = name.startswith("flux")

    def stock(n=steps):  # the stock call keeps its latents in the pipeline's dtype; ours keeps them in float32
        latents = pack_latents(noise) if packed else noise
        out = pipe(prompt=PROMPTS, latents=latents.to(dtype), num_inference_steps=n, guidance_scale=GUIDANCE,
                   output_type="latent", **kwargs).images.float()
        return unpack_latents(out, 8, 8) if packed else out

    return Case(pipe, sampler, cond, noise, stock, lambda: sampler(noise, cond, return_latents=True)[1],
                family_of(pipe.transformer if hasattr(pipe, "transformer") else pipe.unet).guidance == "cfg")


def dit_case(steps: int = STEPS, dtype: torch.dtype = torch.float32) -> Case:
    # DiTPipeline hard-codes the null class 1000, so this DiT has ImageNet's 1000 classes
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    pipe = DiTPipeline(transformer=tiny_dit(in_channels=4, num_classes=1000), vae=tiny_vae(), scheduler=scheduler)
    pipe.to(dtype)
    labels = [1, 7]
    # the stock call draws its noise in the model's dtype from this generator
    noise = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(3), dtype=dtype).float()
    sampler = ds.Sampler.from_pipeline(pipe, num_inference_steps=steps, guidance_scale=GUIDANCE)
    cond = torch.tensor(labels)

    def stock(n=steps):
        return pipe(labels, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(3), num_inference_steps=n,
                    output_type="pt").images.float()

    return Case(pipe, sampler, cond, noise, stock, lambda: sampler(noise, cond).clamp(0, 1), True)


def ddpm_case(steps: int = STEPS, dtype: torch.dtype = torch.float32) -> Case:
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False))
    pipe.to(dtype)
    noise = randn_tensor((2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=dtype).float()
    sampler = ds.Sampler.from_pipeline(pipe, num_inference_steps=steps)

    def stock(n=steps):
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=n, eta=0.0,
                    output_type="pt").images.float()  # "np" fails on bfloat16 images in DDIMPipeline

    return Case(pipe, sampler, None, noise, stock, lambda: sampler(noise).clamp(0, 1), False)


def make_case(name: str, steps: int = STEPS, dtype: torch.dtype = torch.float32) -> Case:
    """A tiny pipeline of family ``name`` with its denoiser, text encoders and VAE in ``dtype``."""
    if name == "dit":
        return dit_case(steps, dtype)
    if name == "ddpm-unet":
        return ddpm_case(steps, dtype)
    return text_case(name, steps, dtype)


# ---- the stock pipeline, reproduced ---------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_sampler_equals_the_stock_pipeline(name):
    case = make_case(name)
    assert family_of(case.sampler.model).name == name
    assert (case.ours() - case.stock()).abs().max() < 1e-5


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_other_members_of_a_family_equal_their_stock_pipeline(variant):
    case = text_case(variant)
    assert family_of(case.sampler.model).name == VARIANTS[variant][0]
    assert (case.ours() - case.stock()).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["sd-unet", "sana", "sd3", "flux"])
def test_decoded_images_equal_the_stock_pipeline_with_the_vae_shift(name):
    case = text_case(name)
    kwargs = BUILDERS[name]()[1]
    latents = pack_latents(case.noise) if name == "flux" else case.noise
    ref = case.pipe(prompt=PROMPTS, latents=latents.clone(), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    output_type="pt", **kwargs).images
    images = case.sampler(case.noise, case.cond).clamp(0, 1)
    assert (images - ref).abs().max() < 1e-5


def test_prompts_are_encoded_through_the_pipeline_with_the_negative_prompt():
    pipe, _ = BUILDERS["sd-unet"]()
    sampler = ds.Sampler.from_pipeline(pipe, num_inference_steps=3, negative_prompt="blue sky")
    positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, ["blue sky"] * len(PROMPTS))
    assert torch.equal(sampler.encode_prompt(PROMPTS), positive)
    assert torch.equal(sampler.uncond, negative[:1])
    with pytest.raises(ValueError, match="encode_prompt needs a sampler made by Sampler.from_pipeline"):
        make_case("ddpm-unet").sampler.encode_prompt(["a cat"])


# ---- gradients ----------------------------------------------------------------------------------------

def reward(x, weights):
    return (x * weights).sum() + 0.3 * (x ** 2 * weights.abs()).sum()


def float64_sampler(case: Case, steps: int = 3):
    model = case.sampler.model.double()
    def to64(c):
        return C.tree_map(lambda t: t.double() if t.is_floating_point() else t, c)

    sampler = ds.Sampler(model, case.sampler.scheduler, steps, case.sampler.guidance_scale,
                         uncond=to64(case.sampler.uncond), sample_shape=case.sampler.sample_shape)
    return sampler, to64(case.cond), case.noise.double()


# Flow-matching Euler steps in float32 whatever the model's dtype (and Flux applies its rotary embedding in
# float32): finite differences there need a longer step and a looser tolerance. Sana's linear attention also
# computes in float32, and its ReLU kernel has kinks that a long step would cross: a short step for it.
FLOAT32_INSIDE = {"sana", "sd3", "flux"}
FD_STEP = {"sd3": 1e-2, "flux": 1e-2}


def tolerance(name):
    return 2e-3 if name in FLOAT32_INSIDE else 1e-6


@pytest.mark.parametrize("name", FAMILIES)
def test_full_gradient_equals_finite_differences(name):
    sampler, cond, noise = float64_sampler(make_case(name))
    gen = torch.Generator().manual_seed(1)
    weights, direction = torch.randn(noise.shape, generator=gen, dtype=torch.float64), \
        torch.randn(noise.shape, generator=gen, dtype=torch.float64)
    x = noise.clone().requires_grad_(True)
    reward(sampler(x, cond, gradient=ds.gradients.Full()), weights).backward()
    h = FD_STEP.get(name, 1e-4)
    with torch.no_grad():
        numeric = (reward(sampler(noise + h * direction, cond), weights)
                   - reward(sampler(noise - h * direction, cond), weights)) / (2 * h)
    analytic = (x.grad * direction).sum()
    assert abs(analytic - numeric) / abs(numeric) < tolerance(name)


@pytest.mark.parametrize("name", FAMILIES)
def test_shortcut_gradient_equals_its_closed_form(name):
    """SDO's latent gradient: (prod_{i>0} a_i) * (a_0 g + b_0 J_0^T g), the first step's Jacobian and the
    rest of the chain's linear skip path; a_i measured as the scheduler's step with a zero model output."""
    sampler, cond, noise = float64_sampler(make_case(name))
    weights = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = noise.clone().requires_grad_(True)
    reward(sampler(x, cond, gradient=ds.gradients.Shortcut()), weights).backward()

    with torch.no_grad():
        final = sampler(noise, cond)
    out = final.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(reward(out, weights), out)
    shape = tuple(noise.shape)
    sched = sampler.fresh_scheduler(latent_shape=shape)
    tail = 1.0
    for t in sched.timesteps[1:]:
        probe = sampler.fresh_scheduler(latent_shape=shape)
        if hasattr(probe, "set_begin_index"):
            probe.set_begin_index(int((probe.timesteps == t).nonzero()[0]))
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        tail *= float(probe.step(zero, t, one).prev_sample)
    first = sampler.fresh_scheduler(latent_shape=shape)
    if hasattr(first, "set_begin_index"):
        first.set_begin_index(0)
    x0 = (noise * getattr(first, "init_noise_sigma", 1.0)).requires_grad_(True)
    t0 = first.timesteps[0]
    scale_input = getattr(first, "scale_model_input", lambda x, t: x)
    x1 = first.step(sampler.predict(scale_input(x0, t0), t0, cond), t0, x0).prev_sample
    (closed,) = torch.autograd.grad(x1, x0, grad_outputs=tail * g)
    closed = closed * getattr(first, "init_noise_sigma", 1.0)
    assert ((x.grad - closed).norm() / closed.norm()) < tolerance(name)


# ---- blocks, MACs and schedules -----------------------------------------------------------------------

def alternating_schedule(case: Case) -> CacheSchedule:
    model = case.sampler.model
    prof = profile(model, case.noise, C.first(case.cond) if case.cond is not None else None)
    timesteps = case.sampler.timesteps
    reuse = torch.zeros(len(timesteps), len(prof.blocks), dtype=torch.bool)
    for t in range(1, len(timesteps)):
        for b in range(len(prof.blocks)):
            reuse[t, b] = (t + b) % 2 == 1
    return CacheSchedule.from_table(reuse, timesteps.tolist(), prof, method="test")


@pytest.mark.parametrize("name", FAMILIES)
def test_blocks_macs_and_schedules_under_the_sampler_and_the_stock_call(name):
    case = make_case(name)
    model = case.sampler.model
    assert ds.prune.default_block_names(model) == BLOCKS[name]
    plain = case.ours()
    schedule = alternating_schedule(case)
    keep = CacheSchedule.keep_all(schedule.timesteps, profile(model, case.noise, C.first(case.cond)
                                                              if case.cond is not None else None))
    with ds.prune.apply(model, keep, case.sampler):
        assert torch.equal(case.ours(), plain)

    with ds.prune.apply(model, schedule, case.sampler) as net:
        ours = case.ours()
        computed = list(net.computed)
        latent_sampler = copy.copy(case.sampler)
        latent_sampler.decode = None
        measured, _ = count_macs(lambda: latent_sampler(case.noise, case.cond))
    assert (ours - plain).abs().max() > 1e-4  # the schedule reused something
    assert measured == schedule.macs(batch=2, guidance=case.guided)
    reused_per_block = schedule.reuse.sum(0).tolist()
    assert computed == [STEPS - r for r in reused_per_block]

    ds.prune.enable(model, schedule)
    try:
        stock = case.stock()
        again = case.stock()  # a fresh generation: no stale cache from the first call
    finally:
        ds.prune.disable(model)
    assert (stock - ours).abs().max() < 1e-5
    assert torch.equal(stock, again)


PRECISIONS = [torch.float32, torch.bfloat16, torch.float16]


def computed_per_block(schedule: CacheSchedule) -> list[int]:
    return [schedule.num_steps - r for r in schedule.reuse.sum(0).tolist()]


@pytest.mark.parametrize("dtype", PRECISIONS, ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_schedule_is_followed_in_every_precision_under_the_sampler_and_the_stock_call(name, dtype):
    """The denoiser (and text encoders, VAE) in ``dtype``: a schedule is followed, not refused, under the Sampler and
    the stock call (Flux's pipeline hands its model the timestep rounded to bfloat16), blocks are computed as the
    table says, both paths agree within the precision, and SDO's gradient is finite, in float32 like the latents."""
    case = make_case(name, dtype=dtype)
    model = case.sampler.model
    assert model.dtype == dtype
    schedule = alternating_schedule(case)
    with ds.prune.apply(model, schedule, case.sampler) as net:
        ours = case.ours()
        assert net.computed == computed_per_block(schedule) and net.calls == STEPS
        noise = case.noise.clone().requires_grad_(True)
        images = case.sampler(noise, case.cond, gradient=ds.gradients.Shortcut())
        (images.float() ** 2).mean().backward()
    assert images.dtype == torch.float32 and noise.grad.dtype == torch.float32
    assert torch.isfinite(noise.grad).all() and noise.grad.abs().sum() > 0
    net = ds.prune.enable(model, schedule)
    try:
        stock = case.stock()
        assert net.computed == computed_per_block(schedule) and net.calls == STEPS
        again = case.stock()  # a new generation of the stock call, found by the clock
        assert net.computed == [2 * c for c in computed_per_block(schedule)] and net.calls == 2 * STEPS
    finally:
        ds.prune.disable(model)
    assert torch.isfinite(ours).all() and torch.equal(stock, again)
    relative = ((stock - ours).norm() / ours.norm()).item()
    assert relative < (1e-5 if dtype == torch.float32 else 3e-2)


def test_a_stock_call_with_other_steps_is_refused_not_run_on_stale_caches():
    case = make_case("sd-unet", steps=4)
    schedule = alternating_schedule(case)
    ds.prune.enable(case.sampler.model, schedule)
    try:
        first = case.stock(4)
        with pytest.raises(ScheduleError, match="generation began at timestep 501.*step 1 of 4"):
            case.stock(2)  # DDIM's 2-step timesteps (501, 1) are a subset of the 4-step ones (751, 501, 251, 1)
        with pytest.raises(ScheduleError, match="timestep 667 is not one of the schedule's 4 timesteps"):
            case.stock(3)
        assert torch.equal(case.stock(4), first)
        with pytest.raises(ScheduleError, match="from step 1 to step 3"):
            ds.Sampler(case.sampler.model, case.pipe.scheduler, 2, GUIDANCE,
                       uncond=case.sampler.uncond)(case.noise, case.cond)
    finally:
        ds.prune.disable(case.sampler.model)


# ---- the registry -------------------------------------------------------------------------------------

def test_subclasses_find_their_family_and_unknown_classes_get_one_clear_error():
    class MyUNet(UNet2DConditionModel):
        pass

    pipe, _ = BUILDERS["sdxl-unet"]()
    assert family_of(MyUNet.from_config(pipe.unet.config)).name == "sdxl-unet"
    assert family_of(BUILDERS["sd-unet"]()[0].unet).name == "sd-unet"
    with pytest.raises(UnknownModelError, match=r"no model family knows Linear; supported: .*flux "
                                                r"\(FluxTransformer2DModel\)"):
        ds.Sampler(torch.nn.Linear(2, 2), DDIMScheduler(), 3)


# ---- the three jobs take prompts ------------------------------------------------------------------------

def brightness(images, conditions):
    return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["sd-unet", "flux"])
def test_the_three_jobs_take_prompts_through_encode_prompt(name, dtype, tmp_path):
    case = text_case(name, steps=3, dtype=dtype)
    sampler = case.sampler
    before = brightness(sampler(case.noise, case.cond), None).mean()
    result = ds.optimize_latents(sampler, brightness, case.noise, case.cond, iterations=3, lr=0.1, progress=False)
    rewards = result.history["reward"]
    assert rewards[-1] > rewards[0] and abs(rewards[0] - before) < 1e-5

    schedule = ds.prune.search(sampler, case.cond, ratio=0.5, iterations=2, batch_size=1, target_batch=2,
                               pruner_kwargs={"dim": 8, "heads": 2}, progress=False)
    assert schedule.reuse.shape == (3, len(BLOCKS[name])) and schedule.blocks == BLOCKS[name]

    ds.add_lora(sampler.model, rank=2)
    lora = {n: p.detach().clone() for n, p in sampler.model.named_parameters() if "lora_B" in n}
    tuned = ds.finetune(sampler, brightness, PROMPTS, encode=sampler.encode_prompt, iterations=2, batch_size=1,
                        lr=1e-2, progress=False, checkpoint_dir=tmp_path)
    assert len(tuned.history["reward"]) == 2
    after = {n: p.detach() for n, p in sampler.model.named_parameters() if "lora_B" in n}
    assert any(not torch.equal(lora[n], after[n]) for n in lora)  # the LoRA weights moved
    assert all(p.dtype == torch.float32 for p in after.values())  # trained in float32 in a model of any dtype
    assert all(isinstance(r, float) and np.isfinite(r) for r in tuned.history["reward"] + result.history["reward"])


@pytest.mark.parametrize("name", ["sd-unet", "flux"])
def test_enable_cache_finds_the_denoiser_and_resamples_for_the_stock_call(name):
    case = make_case(name)
    schedule = alternating_schedule(case)
    net = ds.prune.enable_cache(case.pipe, schedule)
    try:
        assert (case.stock() - case.ours()).abs().max() < 1e-5 and net.model is case.sampler.model
    finally:
        ds.prune.disable(case.sampler.model)
    net = ds.prune.enable_cache(case.pipe, schedule, num_inference_steps=3, height=16, width=16)  # resampled
    try:
        three = case.stock(3)
        assert net.calls == 3 and torch.isfinite(three).all()
        assert ds.prune.summary(net)["block_calls_reused"] > 0
    finally:
        ds.prune.disable(case.sampler.model)
