"""README's Python snippets run as a user would paste them, in the order the README gives them, shrunk in size only
(steps and iterations) so that the suite stays quick: a README that drifts from the API fails here.

The zoo snippets continue one session (the first one's ``m``, ``sampler``, ``noise`` and ``cond``); the pipeline
snippets run in a folder that holds what they name (``./sd15``, a tiny Stable Diffusion pipeline; ``tuned/lora`` and
``pruned/schedule.json``, as ``finetune`` and ``prune`` would have left them).
"""

import re
import textwrap
from pathlib import Path

import pytest
import torch
from tiny.sd import sd_pipeline

import diffusion_shortcuts as ds
from diffusion_shortcuts.pipelines import save_lora

README = Path(__file__).resolve().parents[1] / "README.md"
SHRINK = [("num_inference_steps=50", "num_inference_steps=4"), ("m.sampler(50,", "m.sampler(4,"),
          ("ratio=0.8)", "ratio=0.8, iterations=2, batch_size=1, target_batch=2)"), ("iterations=100", "iterations=2"),
          ("iterations=50)", "iterations=2, batch_size=1, validation=2)")]
# which session each snippet continues, in README order; the last one (a family written from scratch) runs alone
SESSIONS = ["zoo", "zoo", "pipeline", "zoo", "zoo", "zoo", "pipeline", "family"]


def snippets() -> list[str]:
    return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)]


def shrunk(code: str) -> str:
    for old, new in SHRINK:
        code = code.replace(old, new)
    return code


@pytest.fixture
def folder(tmp_path, monkeypatch):
    pipe, _ = sd_pipeline()
    pipe.save_pretrained(tmp_path / "sd15")
    ds.add_lora(pipe.unet, rank=2)
    save_lora(pipe, tmp_path / "tuned" / "lora")
    prof = ds.prune.profile(pipe.unet, torch.zeros(1, 4, 8, 8), torch.zeros(1, 12, 32))
    timesteps = ds.Sampler(pipe.unet, pipe.scheduler, 4).timesteps
    ds.prune.CacheSchedule.every(timesteps, prof, 2, warmup=1).save(tmp_path / "pruned" / "schedule.json")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_snippets_run(folder):
    blocks = snippets()
    assert len(blocks) == len(SESSIONS), "a snippet was added or removed: say which session it continues"
    sessions = {"zoo": {}, "pipeline": {}}
    for code, session in zip(blocks, SESSIONS):
        if session == "family":
            continue  # test_the_readme_family_module_drives_wan_as_the_shipped_one
        namespace = sessions[session]
        if session == "pipeline" and not namespace:
            namespace.update(sessions["zoo"])  # the pipeline snippets use the first snippet's imports
        exec(compile(shrunk(code), "README.md", "exec"), namespace)
    zoo, pipeline = sessions["zoo"], sessions["pipeline"]
    assert zoo["noise"].grad is not None and torch.isfinite(zoo["noise"].grad).all()
    assert 0 < zoo["sched"].macs_ratio < 1 and (folder / "schedule.json").exists()
    assert zoo["refitted"].info["refit"]["kept"] in ("start", "searched")
    assert zoo["refitted"].mode == zoo["shipped"].mode
    assert len(zoo["result"].history["reward"]) == 2 and (folder / "adapter.safetensors").exists()
    assert pipeline["images"].shape == (2, 3, 16, 16) and pipeline["image"].size == (16, 16)
    assert ds.prune.summary(ds.prune.SuperNet.of(pipeline["pipe"].unet))["block_calls_reused"] > 0


def test_the_readme_family_module_drives_wan_as_the_shipped_one():
    """The README's Wan module, registered in place of the shipped one for the test: the Sampler equals the stock
    WanPipeline (Wan 2.1, and 2.2 A14B with its two experts), and a cache schedule is followed by both experts."""
    from diffusers import WanTransformer3DModel
    from tiny import TINIES

    from diffusion_shortcuts.families import FAMILIES, family_of
    from diffusion_shortcuts.families.wan import Wan as Shipped
    from diffusion_shortcuts.prune import CacheSchedule, profile

    code = snippets()[SESSIONS.index("family")]
    FAMILIES.remove(Shipped)
    namespace = {}
    try:
        exec(compile(code, "README.md", "exec"), namespace)
        for tiny in (t for t in TINIES if t.family == "wan"):
            pipe = tiny.pipeline()
            sampler = tiny.sampler(pipe, 3)
            assert isinstance(sampler.family, namespace["Wan"]) and family_of(pipe.transformer) is sampler.family
            cond, noise = tiny.encode(sampler), tiny.initial_noise()
            sampler.decode = None
            ours = sampler(noise, cond)
            assert (ours - tiny.run_stock(pipe, noise, 3, torch.float32)).abs().max() < 1e-5
            prof = profile(pipe.transformer, noise, ds.conditions.first(cond))
            reuse = torch.zeros(3, len(prof.blocks), dtype=torch.bool)
            reuse[1:, 0] = True
            schedule = CacheSchedule.from_table(reuse, sampler.timesteps.tolist(), prof)
            with ds.prune.apply(sampler.model, schedule, sampler) as net:
                assert not torch.equal(sampler(noise, cond), ours) and net.calls == 3 * 2  # both branches a step
    finally:
        FAMILIES.remove(namespace.get("Wan", Shipped))
        FAMILIES.register(WanTransformer3DModel, Shipped())
    wan = next(t for t in TINIES if t.family == "wan").build()
    assert type(family_of(wan.transformer)) is Shipped  # the shipped family is back for the tests after this one
