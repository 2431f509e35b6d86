"""Every registered model family, end to end on its tiny random pipelines (``tests/tiny/``, found by themselves).

For each: the Sampler reproduces the stock diffusers pipeline from prompts (or labels), latents and decoded images or
videos; Full() gradients equal finite differences and Shortcut()'s equal its closed form; blocks are found, a
schedule's MACs counted by torch equal its table's accounting, a keep-everything schedule changes nothing, and a
schedule that reuses blocks is followed, block by block, under the Sampler and under the stock pipeline call, in
float32, bfloat16 and float16 (per guidance branch where a family calls them one at a time, per expert where a
pipeline has two); the three jobs (steer, search, LoRA) run from prompts.
"""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from tiny import MAIN, TINIES, Tiny
from tiny.sd import sd_pipeline
from tiny.sdxl import sdxl_pipeline
from tiny_pipelines import PROMPTS

import diffusion_shortcuts as ds
from diffusion_shortcuts import conditions as C
from diffusion_shortcuts.families import FAMILIES, UnknownModelError, family_of
from diffusion_shortcuts.metrics import count_macs
from diffusion_shortcuts.prune import CacheSchedule, ScheduleError, profile

STEPS = 4
BY_NAME = {tiny.name: tiny for tiny in TINIES}
FAMILY_TINIES = sorted(MAIN)


class Case:
    """A tiny pipeline in ``dtype``, a Sampler on it, the noise both start from, and one generation each way."""

    def __init__(self, tiny: Tiny, steps: int = STEPS, dtype: torch.dtype = torch.float32):
        self.tiny, self.steps, self.dtype = tiny, steps, dtype
        self.pipe = tiny.pipeline(dtype)
        self.sampler = tiny.sampler(self.pipe, steps)
        self.cond = tiny.encode(self.sampler)
        self.noise = tiny.initial_noise(dtype)

    @property
    def model(self):
        return self.sampler.model

    def stock(self, steps: int | None = None) -> torch.Tensor:
        """The stock call's final latents (decoded images where the pipeline gives only those)."""
        return self.tiny.run_stock(self.pipe, self.noise, steps or self.steps, self.dtype)

    @property
    def latent_sampler(self) -> ds.Sampler:
        """The sampler without its decoder: final latents (a half-precision 3-D VAE is slow on a CPU)."""
        sampler = copy.copy(self.sampler)
        sampler.decode = None
        return sampler

    @property
    def video(self) -> bool:
        return family_of(self.model).latent_layout != "CHW"

    def ours(self) -> torch.Tensor:
        """Ours, as the stock call gives it."""
        if self.tiny.stock is not None:
            return self.sampler(self.noise, self.cond).clamp(0, 1)
        return self.latent_sampler(self.noise, self.cond)


def reward(x, weights):
    return (x * weights).sum() + 0.3 * (x ** 2 * weights.abs()).sum()


# ---- the stock pipeline, reproduced ---------------------------------------------------------------------

def test_every_registered_family_has_a_tiny_pipeline():
    registered = {name.split(" ")[0] for name in FAMILIES.names()}
    assert registered == set(MAIN), f"families without a tiny pipeline in tests/tiny/: {registered - set(MAIN)}"


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_sampler_equals_the_stock_pipeline(name):
    case = Case(BY_NAME[name])
    assert family_of(case.model).name == case.tiny.family
    assert (case.ours() - case.stock()).abs().max() < 1e-5


@pytest.mark.parametrize("name", sorted(n for n, tiny in BY_NAME.items() if tiny.stock is None and tiny.text))
def test_decoded_images_and_videos_equal_the_stock_pipeline(name):
    case = Case(BY_NAME[name])
    decoded = case.sampler(case.noise, case.cond).clamp(0, 1)
    ref = case.tiny.run_stock(case.pipe, case.noise, STEPS, torch.float32, output_type="pt")
    assert decoded.shape == ref.shape and (decoded - ref).abs().max() < 1e-5
    if family_of(case.model).latent_layout != "CHW":  # videos leave the decoder as (B, 3, F, H, W)
        assert decoded.ndim == 5 and decoded.shape[1] == 3


def test_prompts_are_encoded_through_the_pipeline_with_the_negative_prompt():
    pipe, _ = sd_pipeline()
    sampler = ds.Sampler.from_pipeline(pipe, num_inference_steps=3, negative_prompt="blue sky")
    positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, ["blue sky"] * len(PROMPTS))
    assert torch.equal(sampler.encode_prompt(PROMPTS), positive)
    assert torch.equal(sampler.uncond, negative[:1])
    with pytest.raises(ValueError, match="encode_prompt needs a sampler made by Sampler.from_pipeline"):
        Case(MAIN["ddpm-unet"]).sampler.encode_prompt(["a cat"])


# ---- gradients ----------------------------------------------------------------------------------------

def float64_sampler(case: Case, steps: int = 3):
    """The case's sampler in float64 (its guidance as it is), on the tiny's one-step scheduler where it has one."""
    s = case.sampler

    def to64(c):
        return C.tree_map(lambda t: t.double() if t.is_floating_point() else t, c)

    scheduler = case.tiny.gradient_scheduler(case.pipe) if case.tiny.gradient_scheduler else s.scheduler
    sampler = ds.Sampler(s.model.double(), scheduler, steps, s.guidance_scale, uncond=to64(s.uncond),
                         sample_shape=s.sample_shape, true_cfg_scale=s.true_cfg_scale)
    return sampler, to64(case.cond), case.noise.double()


@pytest.mark.parametrize("name", FAMILY_TINIES)
def test_full_gradient_equals_finite_differences(name):
    case = Case(MAIN[name])
    sampler, cond, noise = float64_sampler(case)
    gen = torch.Generator().manual_seed(1)
    weights, direction = torch.randn(noise.shape, generator=gen, dtype=torch.float64), \
        torch.randn(noise.shape, generator=gen, dtype=torch.float64)
    x = noise.clone().requires_grad_(True)
    reward(sampler(x, cond, gradient=ds.gradients.Full()), weights).backward()
    h = case.tiny.fd_step
    with torch.no_grad():
        numeric = (reward(sampler(noise + h * direction, cond), weights)
                   - reward(sampler(noise - h * direction, cond), weights)) / (2 * h)
    analytic = (x.grad * direction).sum()
    assert abs(analytic - numeric) / abs(numeric) < case.tiny.tolerance


@pytest.mark.parametrize("name", FAMILY_TINIES)
def test_shortcut_gradient_equals_its_closed_form(name):
    """SDO's latent gradient: (prod_{i>0} a_i) * (a_0 g + b_0 J_0^T g), the first step's Jacobian and the
    rest of the chain's linear skip path; a_i measured as the scheduler's step with a zero model output."""
    case = Case(MAIN[name])
    sampler, cond, noise = float64_sampler(case)
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
    assert ((x.grad - closed).norm() / closed.norm()) < case.tiny.tolerance


# ---- blocks, MACs and schedules -----------------------------------------------------------------------

def alternating_schedule(case: Case) -> CacheSchedule:
    prof = profile(case.model, case.noise, C.first(case.cond) if case.cond is not None else None)
    timesteps = case.sampler.timesteps
    reuse = torch.zeros(len(timesteps), len(prof.blocks), dtype=torch.bool)
    for t in range(1, len(timesteps)):
        for b in range(len(prof.blocks)):
            reuse[t, b] = (t + b) % 2 == 1
    schedule = CacheSchedule.from_table(reuse, timesteps.tolist(), prof, method="test")
    if case.sampler.experts:  # the second denoiser's first step computes in full
        schedule = schedule.for_experts(case.sampler.expert_names, case.sampler.experts[0][1])
    return schedule


def expected_macs(case: Case, schedule: CacheSchedule) -> int:
    """What a generation of two samples costs by the table: both guidance branches (the unconditional one at its own
    token count where the family calls it separately: a negative prompt may be shorter than the prompt)."""
    sampler = case.sampler
    if not sampler._guided or sampler.family.cfg_calls != "separate":
        return schedule.macs(batch=2, guidance=sampler._guided)
    prof = profile(case.model, case.noise, C.first(sampler.uncond))
    uncond = CacheSchedule.from_table(schedule.reuse, schedule.timesteps, prof)
    return schedule.macs(batch=2) + uncond.macs(batch=2)


def computed_per_block(schedule: CacheSchedule, branches: int = 1) -> list[int]:
    return [branches * (schedule.num_steps - r) for r in schedule.reuse.sum(0).tolist()]


@pytest.mark.parametrize("name", FAMILY_TINIES + ["wan22"])
def test_blocks_macs_and_schedules_under_the_sampler_and_the_stock_call(name):
    case = Case(BY_NAME[name])
    model, tiny = case.model, case.tiny
    assert ds.prune.default_block_names(model) == tiny.blocks
    plain = case.ours()
    schedule = alternating_schedule(case)
    keep = CacheSchedule.keep_all(schedule.timesteps, profile(model, case.noise, C.first(case.cond)
                                                              if case.cond is not None else None))
    with ds.prune.apply(model, keep, case.sampler):
        assert torch.equal(case.ours(), plain)

    with ds.prune.apply(model, schedule, case.sampler) as net:
        ours = case.ours()
        computed = list(net.computed)
        measured, _ = count_macs(lambda: case.latent_sampler(case.noise, case.cond))
    assert (ours - plain).abs().max() > 1e-4  # the schedule reused something
    assert measured == expected_macs(case, schedule)
    assert computed == computed_per_block(schedule, tiny.branch_calls(case.sampler))

    net = ds.prune.enable_cache(case.pipe, schedule)
    try:
        stock = case.stock()
        again = case.stock()  # a fresh generation: no stale cache from the first call
    finally:
        net.detach()
    assert (stock - ours).abs().max() < 1e-5
    assert torch.equal(stock, again)


PRECISIONS = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", PRECISIONS, ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", FAMILY_TINIES)
def test_a_schedule_is_followed_in_every_precision_under_the_sampler_and_the_stock_call(name, dtype):
    """The denoiser (and text encoders, VAE) in ``dtype``: a schedule is followed, not refused, under the Sampler and
    the stock call (Flux's pipeline hands its model the timestep rounded to bfloat16), blocks are computed as the
    table says on every guidance branch, both paths agree within the precision, and SDO's gradient is finite, in
    float32 like the latents."""
    case = Case(MAIN[name], dtype=dtype)
    model, branches = case.model, case.tiny.branch_calls(case.sampler)
    assert model.dtype == dtype
    schedule = alternating_schedule(case)
    expected = computed_per_block(schedule, branches)
    with ds.prune.apply(model, schedule, case.sampler) as net:
        ours = case.ours()
        assert net.computed == expected and net.calls == STEPS * branches
        noise = case.noise.clone().requires_grad_(True)
        sampler = case.latent_sampler if case.video else case.sampler  # 3-D VAEs are slow on a CPU
        images = sampler(noise, case.cond, gradient=ds.gradients.Shortcut())
        (images.float() ** 2).mean().backward()
    assert images.dtype == torch.float32 and noise.grad.dtype == torch.float32
    assert torch.isfinite(noise.grad).all() and noise.grad.abs().sum() > 0
    net = ds.prune.enable(model, schedule)
    try:
        stock = case.stock()
        assert net.computed == expected and net.calls == STEPS * branches
        again = case.stock()  # a new generation of the stock call, found by the clock on every branch
        assert net.computed == [2 * c for c in expected] and net.calls == 2 * STEPS * branches
    finally:
        ds.prune.disable(model)
    assert torch.isfinite(ours).all() and torch.equal(stock, again)
    relative = ((stock - ours).norm() / ours.norm()).item()
    assert relative < (1e-5 if dtype == torch.float32 else 3e-2)


def test_both_experts_follow_their_rows_and_a_table_for_another_boundary_is_refused_naming_both():
    """Wan 2.2 A14B: ``transformer`` runs the steps at or above the boundary, ``transformer_2`` the rest; each follows
    the rows of its own steps, under the Sampler and the stock call; a schedule that hands over elsewhere is refused."""
    case = Case(BY_NAME["wan22"])
    sampler = case.sampler
    assert sampler.expert_names == ["transformer", "transformer_2"] and len(sampler.models) == 2
    schedule = alternating_schedule(case)
    first_steps = [i for i, t in enumerate(schedule.timesteps) if t >= sampler.experts[0][1]]
    assert 0 < len(first_steps) < STEPS  # both experts run
    with ds.prune.apply(case.model, schedule, sampler) as net:
        case.ours()
        per_expert = [list(n.computed) for n in net.nets]
    for rows, computed in zip((first_steps, [i for i in range(STEPS) if i not in first_steps]), per_expert):
        assert computed == [2 * (len(rows) - int(schedule.reuse[rows, b].sum())) for b in range(len(computed))]
    other = schedule.for_experts(["transformer", "transformer_2"], sampler.experts[0][1] - 100.0)
    with pytest.raises(ScheduleError, match="hands over from transformer to transformer_2 at timestep 775, the "
                                            "pipeline at 875: a table for one expert would run on the other"):
        ds.prune.enable_cache(case.pipe, other)
    with pytest.raises(ScheduleError, match="for the denoisers \\['high', 'low'\\], the pipeline's are"):
        ds.prune.apply(case.model, schedule.for_experts(["high", "low"], 875.0), sampler).__enter__()
    assert ds.prune.SuperNet.of(case.model) is None  # nothing was left attached by the refusals


def test_a_stock_call_with_other_steps_is_refused_not_run_on_stale_caches():
    case = Case(MAIN["sd-unet"])
    schedule = alternating_schedule(case)
    ds.prune.enable(case.model, schedule)
    try:
        first = case.stock(4)
        with pytest.raises(ScheduleError, match="generation began at timestep 501.*step 1 of 4"):
            case.stock(2)  # DDIM's 2-step timesteps (501, 1) are a subset of the 4-step ones (751, 501, 251, 1)
        with pytest.raises(ScheduleError, match="timestep 667 is not one of the schedule's 4 timesteps"):
            case.stock(3)
        assert torch.equal(case.stock(4), first)
        with pytest.raises(ScheduleError, match="from step 1 to step 3"):
            ds.Sampler(case.model, case.pipe.scheduler, 2, 3.0, uncond=case.sampler.uncond)(case.noise, case.cond)
    finally:
        ds.prune.disable(case.model)


# ---- the registry -------------------------------------------------------------------------------------

def test_subclasses_find_their_family_and_unknown_classes_get_one_clear_error():
    class MyUNet(UNet2DConditionModel):
        pass

    pipe, _ = sdxl_pipeline()
    assert family_of(MyUNet.from_config(pipe.unet.config)).name == "sdxl-unet"
    assert family_of(sd_pipeline()[0].unet).name == "sd-unet"
    with pytest.raises(UnknownModelError, match=r"no model family knows Linear; supported: .*flux "
                                                r"\(FluxTransformer2DModel\)"):
        ds.Sampler(torch.nn.Linear(2, 2), DDIMScheduler(), 3)


def test_a_variant_the_family_does_not_drive_is_refused_naming_what_is_supported():
    from diffusers import WanImageToVideoPipeline

    wan = BY_NAME["wan"].build()
    i2v = WanImageToVideoPipeline(tokenizer=wan.tokenizer, text_encoder=wan.text_encoder, vae=wan.vae,
                                  scheduler=wan.scheduler, transformer=wan.transformer)
    with pytest.raises(ValueError, match="WanImageToVideoPipeline is not supported for wan; supported: WanPipeline"):
        ds.Sampler.from_pipeline(i2v, num_inference_steps=2)
    with pytest.raises(ValueError, match="true_cfg_scale is for families with embedded guidance and a CFG of their "
                                         "own .*; wan takes guidance_scale"):
        ds.Sampler.from_pipeline(wan, num_inference_steps=2, true_cfg_scale=2.0, negative_prompt="x")
    with pytest.raises(ValueError, match="true_cfg_scale=2 needs a negative_prompt"):
        ds.Sampler.from_pipeline(BY_NAME["flux"].build(), num_inference_steps=2, true_cfg_scale=2.0)


# ---- the three jobs take prompts ------------------------------------------------------------------------

def brightness(images, conditions):
    return images.flatten(1).mean(1)


JOBS = [(name, torch.float32) for name in FAMILY_TINIES if MAIN[name].text] + \
    [("sd-unet", torch.bfloat16), ("flux", torch.bfloat16)]


@pytest.mark.parametrize("name,dtype", JOBS, ids=[f"{n}-{str(d)[6:]}" for n, d in JOBS])
def test_the_three_jobs_take_prompts_through_encode_prompt(name, dtype, tmp_path):
    case = Case(MAIN[name], steps=3, dtype=dtype)
    sampler = case.latent_sampler if case.video else case.sampler  # the reward on latents: 3-D VAEs are slow here
    before = brightness(sampler(case.noise, case.cond), None).mean()
    result = ds.optimize_latents(sampler, brightness, case.noise, case.cond, iterations=3, lr=0.1, progress=False)
    rewards = result.history["reward"]
    assert rewards[-1] > rewards[0] and abs(rewards[0] - before) < 1e-5

    schedule = ds.prune.search(sampler, case.cond, ratio=0.5, iterations=2, batch_size=1, target_batch=2,
                               pruner_kwargs={"dim": 8, "heads": 2}, progress=False)
    assert schedule.reuse.shape == (3, len(case.tiny.blocks)) and schedule.blocks == case.tiny.blocks

    ds.add_lora(sampler.model, rank=2)
    lora = {n: p.detach().clone() for n, p in sampler.model.named_parameters() if "lora_B" in n}
    assert lora, "the LoRA found no target modules"
    tuned = ds.finetune(sampler, brightness, PROMPTS, encode=sampler.encode_prompt, iterations=2, batch_size=1,
                        lr=1e-2, progress=False, checkpoint_dir=tmp_path)
    assert len(tuned.history["reward"]) == 2
    after = {n: p.detach() for n, p in sampler.model.named_parameters() if "lora_B" in n}
    assert any(not torch.equal(lora[n], after[n]) for n in lora)  # the LoRA weights moved
    assert all(p.dtype == torch.float32 for p in after.values())  # trained in float32 in a model of any dtype
    assert all(isinstance(r, float) and np.isfinite(r) for r in tuned.history["reward"] + result.history["reward"])


@pytest.mark.parametrize("name", ["sd-unet", "flux", "wan22"])
def test_enable_cache_finds_the_denoisers_and_resamples_for_the_stock_call(name):
    case = Case(BY_NAME[name])
    schedule = alternating_schedule(case)
    net = ds.prune.enable_cache(case.pipe, schedule)
    try:
        assert (case.stock() - case.ours()).abs().max() < 1e-5 and net.model is case.model
    finally:
        net.detach()
    size = {k: case.tiny.call[k] for k in ("height", "width") if k in case.tiny.call}
    net = ds.prune.enable_cache(case.pipe, schedule, num_inference_steps=3, **size)  # resampled
    try:
        three = case.stock(3)
        assert net.calls == 3 * case.tiny.branch_calls(case.sampler) and torch.isfinite(three).all()
        assert ds.prune.summary(net)["block_calls_reused"] > 0
    finally:
        net.detach()


@pytest.mark.parametrize("name", ["wan", "flux-true-cfg"])
def test_diffusers_own_caches_run_under_the_sampler_as_under_the_stock_call(name):
    """Every call of a CacheMixin model is named as its stock pipeline names it (cache_context "cond" / "uncond"):
    diffusers' FirstBlockCache, applied after a first generation, caches under our Sampler as under the stock call."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

    case = Case(BY_NAME[name])
    plain = case.ours()
    apply_first_block_cache(case.model, FirstBlockCacheConfig(threshold=0.3))
    cached = case.ours()
    # diffusers' own walk of the hooks is cached from the first call: the stock call needs it refreshed
    HookRegistry.check_if_exists_or_initialize(case.model).invalidate_child_registries_cache()
    assert (cached - plain).abs().max() > 1e-3  # the cache reused something
    assert (cached - case.stock()).abs().max() < 1e-5
