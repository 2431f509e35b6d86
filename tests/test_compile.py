"""torch.compile with cache schedules: the schedule's decision stays outside the compiled regions.

Regional compilation (``apply(..., compile=True)``) compiles each gated block's own forward with ``fullgraph=True``:
no graph break inside a block, one graph per distinct block input shape whatever the step, and the same images
and gradients as eager. A model compiled whole (``torch.compile(model)``) runs a schedule too, its recompiles
bounded. Tiny models, CPU; about a minute together (inductor's first compilation dominates).
"""

import pytest
import torch
import torch._dynamo
import tiny_models
from torch._dynamo.utils import counters

import diffusion_shortcuts as ds
from diffusion_shortcuts.prune import CacheSchedule, ScheduleError, profile

pytestmark = pytest.mark.compile
STEPS = 5


def dit_case(steps=STEPS):
    return tiny_models.dit_case(steps=steps)


def unet_case(steps=STEPS):
    return tiny_models.unet_case(steps=steps)


def alternating(sampler, noise, cond) -> CacheSchedule:
    prof = profile(sampler.model, noise, cond[:1])
    reuse = torch.zeros(sampler.num_inference_steps, len(prof.blocks), dtype=torch.bool)
    for t in range(1, len(reuse)):
        reuse[t, t % len(prof.blocks)] = True
    return CacheSchedule.from_table(reuse, sampler.timesteps, prof)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference over the largest value: these tiny models' latents reach ~100, float32 keeps 7 digits."""
    return float((a - b).abs().max() / b.abs().max())


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


# the UNet's five distinct blocks compile through dynamo and AOTAutograd without inductor's code generation (the
# graphs, breaks and recompiles under test are dynamo's; inductor's numerics are tested on the DiT): a minute saved
@pytest.mark.parametrize("case,compile", [(dit_case, True), (unet_case, {"backend": "aot_eager"})],
                         ids=["dit", "unet"])
def test_regional_compilation_equals_eager_without_graph_breaks_and_compiles_once_per_shape(case, compile):
    sampler, noise, cond = case()
    schedule = alternating(sampler, noise, cond)
    layouts = set()  # what a compiled region specializes on: each block's tensor inputs' shapes and strides

    def record(module, args, kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        layouts.add((type(module).__name__, tuple((t.shape, t.stride()) for t in tensors)))

    modules = dict(sampler.model.named_modules())
    handles = [modules[name].register_forward_pre_hook(record, with_kwargs=True) for name in schedule.blocks]
    with ds.prune.apply(sampler.model, schedule, sampler) as net:
        eager = sampler(noise, cond)
        reused_eager = ds.prune.summary(net)["block_calls_reused"]
    for handle in handles:
        handle.remove()
    with ds.prune.apply(sampler.model, schedule, sampler, compile=compile) as net:
        compiled = sampler(noise, cond)
        first = graphs()
        again = sampler(noise, cond)  # a second generation: nothing new to compile
        assert ds.prune.summary(net)["block_calls_reused"] == 2 * reused_eager
    assert relative_error(compiled, eager) < 1e-5 and torch.equal(compiled, again)
    assert sum(counters["graph_break"].values()) == 0
    assert 1 <= first <= len(layouts) and graphs() == first  # bounded by the layouts, not by the steps

    resampled = ds.Sampler(sampler.model, sampler.scheduler, STEPS + 3, 2.0, uncond=sampler.uncond)
    with ds.prune.apply(sampler.model, schedule, resampled, strict=False, compile=compile):
        resampled(noise, cond)  # another step count: the same block shapes, no new graph
    assert graphs() == first


def test_gradients_through_compiled_blocks_equal_eager_under_every_policy():
    sampler, noise, cond = dit_case()
    schedule = alternating(sampler, noise, cond)
    weights = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0))

    def gradient(policy, compile, scheduled):
        x = noise.clone().requires_grad_(True)
        table = schedule if scheduled else CacheSchedule.keep_all(schedule.timesteps, profile(sampler.model, noise,
                                                                                              cond[:1]))
        with ds.prune.apply(sampler.model, table, sampler, compile=compile):
            (sampler(x, cond, gradient=policy) * weights).sum().backward()
        return x.grad

    for policy in (ds.gradients.Shortcut(), ds.gradients.Checkpointed()):
        for scheduled in (False, True):
            eager, compiled = gradient(policy, False, scheduled), gradient(policy, True, scheduled)
            assert compiled.abs().sum() > 0
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5, msg=f"{policy.spec}, {scheduled}")
    assert sum(counters["graph_break"].values()) == 0


def test_a_model_compiled_whole_runs_a_schedule_with_bounded_recompiles():
    sampler, noise, cond = dit_case()
    schedule = alternating(sampler, noise, cond)
    with ds.prune.apply(sampler.model, schedule, sampler) as net:
        eager = sampler(noise, cond)
        computed = list(net.computed)
    compiled_model = torch.compile(sampler.model)
    compiled_sampler = ds.Sampler(compiled_model, sampler.scheduler, STEPS, 2.0, uncond=sampler.uncond)
    assert compiled_sampler.family.name == "dit"  # found through _orig_mod
    with ds.prune.apply(compiled_model, schedule, compiled_sampler) as net:
        out = compiled_sampler(noise, cond)
        first = graphs()
        compiled_sampler(noise, cond)
        assert net.computed == [2 * c for c in computed]  # the table is followed, block by block
    assert relative_error(out, eager) < 1e-5
    rows = len({tuple(row) for row in schedule.reuse.tolist()})
    assert graphs() == first and counters["stats"]["unique_graphs"] <= 2 * rows + len(schedule.blocks)


def test_a_model_compiled_with_fullgraph_is_refused_naming_what_to_do():
    sampler, noise, cond = dit_case()
    schedule = alternating(sampler, noise, cond)
    with pytest.raises(ScheduleError, match="compiled with fullgraph=True.*pass compile=True to compile each block"):
        ds.prune.enable(torch.compile(sampler.model, fullgraph=True), schedule)


def test_compile_on_the_command_line_and_where_torch_cannot_compile(tmp_path, capsys, monkeypatch):
    from diffusion_shortcuts import cli
    from diffusion_shortcuts.prune import compiling

    argv = ["sample", "--model", "digits-dit", "--n", "2", "--steps", "3", "--schedule", "zoo:0.8", "--compile"]
    assert cli.main([*argv, "--out", str(tmp_path / "s")]) == 0
    metrics = capsys.readouterr().out
    assert '"compiled": true' in metrics and sum(counters["graph_break"].values()) == 0 and graphs() >= 1

    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)  # a machine without a C++ compiler
    monkeypatch.delenv("CXX", raising=False)
    for verb in (argv, ["prune", "--model", "digits-dit", "--iterations", "1", "--compile"]):
        assert cli.main([*verb, "--out", str(tmp_path / verb[0])]) == 2
        err = capsys.readouterr().err.strip().split("\n")
        assert len(err) == 1 and "torch cannot compile on cpu here: no C++ compiler" in err[0]
        assert "run without compiling (no --compile)" in err[0] and not (tmp_path / verb[0]).exists()
