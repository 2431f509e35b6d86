"""No reads from tensors back to Python in the sampling loop beyond what the diffusers scheduler's own step does.

On a GPU each such read (``item``, ``tolist``, ``bool(tensor)``, ``float(tensor)``, ``nonzero``, ...) waits for
every kernel launched before it: at batch 1 a UNet call is launch-bound, so a read per step shows directly in
the wall-clock. Counted here on the CPU through a ``TorchFunctionMode``: a scheduled generation under our
Sampler reads exactly as often as an unscheduled one, and the stock pipeline call with ``enable_cache`` adds at
most one read per denoiser call (the timestep it checks against the schedule), on every guidance branch.
"""

from collections import Counter

import pytest
import torch
from test_families import FAMILY_TINIES, MAIN, STEPS, Case, alternating_schedule
from torch.overrides import TorchFunctionMode

import diffusion_shortcuts as ds

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "numpy", "__array__"}


class CountReads(TorchFunctionMode):
    """Counts the tensor-to-Python reads made while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.reads = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.reads.values())


def reads_of(run) -> CountReads:
    run()  # a first generation computes what later ones reuse (the sampler's timesteps as Python floats)
    with CountReads() as counter:
        run()
    return counter


def test_the_counter_sees_reads():
    with CountReads() as counter:
        x = torch.ones(3)
        float(x[0]), bool(x[1] > 0), x.tolist(), x.nonzero()
    assert counter.reads == {"__float__": 1, "__bool__": 1, "tolist": 1, "nonzero": 1}


@pytest.mark.parametrize("name", FAMILY_TINIES)
def test_a_scheduled_generation_reads_no_more_than_an_unscheduled_one(name):
    case = Case(MAIN[name])
    schedule = alternating_schedule(case)
    plain = reads_of(case.ours)
    with ds.prune.apply(case.sampler.model, schedule, case.sampler) as net:
        scheduled = reads_of(case.ours)
        assert ds.prune.summary(net)["block_calls_reused"] > 0
    assert scheduled.reads == plain.reads

    stock_plain = reads_of(case.stock)
    ds.prune.enable(case.sampler.model, schedule)
    try:
        stock_scheduled = reads_of(case.stock)
    finally:
        ds.prune.disable(case.sampler.model)
    assert stock_scheduled.total <= stock_plain.total + STEPS * case.tiny.branch_calls(case.sampler)  # one a call


def test_whole_skipped_steps_read_nothing_either():
    case = Case(MAIN["sd-unet"], steps=8)
    prof = ds.prune.profile(case.sampler.model, case.noise, case.cond[:1])
    rule = ds.prune.CacheSchedule.every(case.sampler.timesteps, prof, interval=3)
    plain = reads_of(case.ours)
    with ds.prune.apply(case.sampler.model, rule, case.sampler) as net:
        scheduled = reads_of(case.ours)
        assert net.skipped_calls > 0
    assert scheduled.reads == plain.reads
