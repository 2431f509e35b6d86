"""The benchmark scripts that no CI machine runs at full size keep working: their tiny modes, in process."""

import importlib
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_the_gpu_benchmark_runs_its_tiny_mode_and_judges_every_target():
    gpu = load("gpu")
    out = gpu.main(tiny=True)
    sampling = out["sd"]["sampling_seconds"]
    assert {"stock call, full", "ours, full", "our loop, rule 0.2", "stock loop, rule 0.2"} <= set(sampling)
    assert all(seconds > 0 for seconds in sampling.values())
    assert set(out["sd"]["sdo_latents"]) == {"full", "checkpointed", "shortcut", "shortcut on the rule 0.2 rollout"}
    assert all(row["seconds_per_iteration"] > 0 for row in out["sd"]["sdo_latents"].values())
    search = out["sd"]["search"]
    assert all(row["seconds_per_iteration"] > 0 for name, row in search.items() if name != "calibration"), search
    assert len(search) == 5 and search["calibration"]["generations"] > 0 and len(out["sd"]["finetune"]) == 2
    assert {"stock call, full", "stock call, our rule table"} <= set(out["flux"]["flux_seconds"])
    assert any("TaylorSeer" in name for name in out["flux"]["flux_seconds"])
    assert len(out["targets"]) == 11 and all(isinstance(v, bool) for k, v in out["targets"].items()
                                                 if "peak memory" not in k)  # peak memory: a GPU's only
    wan = out["wan"]
    assert {"stock call, full", "stock call, our rule table"} <= set(wan["wan_seconds"]) and \
        sum("diffusers" in name for name in wan["wan_seconds"]) == 3
    assert wan["wan_sdo"]["shortcut"]["noise_gradient"] > 0 and wan["wan_sdo"]["truncated:1"]["noise_gradient"] == 0
    assert len(wan["wan_finetune"]) == 2 and wan["wan_search"]["search (latent objective, batch 1)"][
        "seconds_per_iteration"] > 0
    assert set(out["sd"]["compile"]["loop_seconds"]) == {"eager, full", "compiled, full", "eager, rule 0.2",
                                                          "compiled, rule 0.2"}
    assert out["sd"]["rule_macs_ratio"] < 1 and out["flux"]["flux_rule_macs_ratio"] < 1
    assert "targets" in gpu.table(out)
