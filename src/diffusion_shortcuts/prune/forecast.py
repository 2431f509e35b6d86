"""What a reused block returns: its cached work as it was, or a forecast of it from its latest computed steps.

A forecaster is a strategy with two methods, as diffusers' ``TaylorSeerState`` has: :meth:`Forecaster.update`
stores what a block computed at a step (keeping as many steps as the forecast needs when no backward pass can
ask for older ones) and :meth:`Forecaster.predict` gives its work at a later step. Adding one (FoCa, say) is
one subclass registered in :data:`FORECASTERS`.

Forecasts extrapolate in step units from the steps at which the block was really computed (TaylorSeer's rule,
Liu et al. 2025), with a bounded horizon ``h = min(step - s2, s2 - s1)``: at most as far past the latest
computed step s2 as the two latest are apart, and held there. TaylorSeer never extrapolates farther than its
interval (it recomputes every N steps); a learned table may reuse a block for 20 steps after two adjacent
computations, where an unbounded line runs away (digits-unet's SSIM fell from 0.956 to 0.513 that way).
"""

from __future__ import annotations

import torch

from .state import BlockState, map_streams


class Forecaster:
    """Copy: the latest computed work as it was (DiP-GO, DeepCache)."""

    name = "copy"
    order = 0  # how many earlier computed steps beyond the latest the forecast reads

    def update(self, state: BlockState, step: int, work) -> None:
        """Store ``work`` computed at ``step``; under no_grad keep only the steps a forecast can still read."""
        state.store(step, work, keep=None if torch.is_grad_enabled() else self.order + 1)

    def predict(self, state: BlockState, step: int):
        """The block's work at ``step`` from its latest computed steps before it (None if it has none)."""
        earlier = state.computed_before(step)
        if not earlier:
            return None
        order = min(self.order, len(earlier) - 1)  # with fewer computed steps, the highest order they allow
        return _BY_ORDER[order].extrapolate(state, earlier[-order - 1:], step)

    @staticmethod
    def extrapolate(state: BlockState, steps: list[int], step: int):
        """The work at ``step`` from the works at ``steps`` (the ``order + 1`` latest computed, in order)."""
        return state.works[steps[-1]]


class Taylor1(Forecaster):
    """From the two latest computed steps s1 < s2 (works w1, w2): ``w2 + (w2 - w1) * h / (s2 - s1)``."""

    name = "taylor1"
    order = 1

    @staticmethod
    def extrapolate(state, steps, step):
        s1, s2 = steps
        h = min(step - s2, s2 - s1)
        return map_streams(lambda w2, w1: torch.add(w2, w2 - w1, alpha=h / (s2 - s1)),
                           state.works[s2], state.works[s1])


class Taylor2(Forecaster):
    """The parabola through the three latest computed steps s0 < s1 < s2 (Newton's divided differences):
    ``w2 + D1 * h + D2 * h * (h + s2 - s1)`` with ``D1 = (w2 - w1) / (s2 - s1)`` and
    ``D2 = (D1 - (w1 - w0) / (s1 - s0)) / (s2 - s0)``."""

    name = "taylor2"
    order = 2

    @staticmethod
    def extrapolate(state, steps, step):
        s0, s1, s2 = steps
        h = min(step - s2, s2 - s1)
        curve = h * (h + s2 - s1) / (s2 - s0)  # the D2 term's factor
        a1 = (h + curve) / (s2 - s1)  # on w2 - w1 (from D1 * h and D2's first part)
        a0 = curve / (s1 - s0)  # on w1 - w0
        return map_streams(lambda w2, w1, w0: w2 + a1 * (w2 - w1) - a0 * (w1 - w0),
                           state.works[s2], state.works[s1], state.works[s0])


FORECASTERS: dict[str, type[Forecaster]] = {cls.name: cls for cls in (Forecaster, Taylor1, Taylor2)}
_BY_ORDER = {cls.order: cls for cls in FORECASTERS.values()}
# what a reused block returns, by the order of its forecast from the latest computed steps
REUSE_MODES = {name: cls.order for name, cls in FORECASTERS.items()}
