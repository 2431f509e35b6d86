"""Whether a gated block runs at a step: one interface, two implementations.

- :class:`TableDecision` (inference): a static ``reuse[t][b]`` table; a reused block is not called at all.
- :class:`GateDecision` (the search): every block runs, and its work is mixed with the forecast as
  ``g_reuse * forecast + g_keep * f(x)`` with hard 0/1 gates that carry straight-through gradients to the
  pruner (DiP-GO eq. 3).

Both read only Python data and the step index the clock gives them: no tensor is read back to the host while
sampling with a table (the gates' hard choices are read once, when they are set).
"""

from __future__ import annotations

import torch

from .schedule import ScheduleError
from .state import map_streams


class Decision:
    """The interface: ``skips(step, b)``: block b is not computed at ``step``; ``skips_all(step)``: no block is;
    ``mix(step, b, forecast, work)``: what a computed block's work becomes (and whether it counts as a forecast),
    asked only of decisions that ``mixes``."""

    mixes = False  # a computed block's work is mixed with its forecast (the search's gates)

    def skips(self, step: int, block: int) -> bool:
        raise NotImplementedError

    def skips_all(self, step: int) -> bool:
        raise NotImplementedError

    def mix(self, step: int, block: int, forecast, work, dtype: torch.dtype):
        """``(work, forecasted)``: the work a computed block passes on at ``step``, and whether it stands for a
        reuse (so that a forecast does not extrapolate from it)."""
        return work, False


class TableDecision(Decision):
    """A static table, ``reuse[t][b]`` True: block b returns its cached work at step t (row 0 is never reused)."""

    def __init__(self, reuse, num_steps: int, num_blocks: int):
        reuse = torch.as_tensor(reuse, dtype=torch.bool).cpu()
        if reuse.shape != (num_steps, num_blocks):
            raise ScheduleError(f"reuse table {tuple(reuse.shape)} does not match {num_steps} steps x "
                                f"{num_blocks} blocks")
        self.table: list[list[bool]] = reuse.tolist()  # read at every block call: Python lists
        self.all_reused = [bool(row) and all(row) for row in self.table]

    def skips(self, step, block):
        return self.table[step][block]

    def skips_all(self, step):
        return self.all_reused[step]


class GateDecision(Decision):
    """The search's gates ``[t, b] = (g_reuse, g_keep)``: hard one-hot values carrying gradients."""

    mixes = True

    def __init__(self, gates: torch.Tensor, num_steps: int, num_blocks: int):
        if gates.shape != (num_steps, num_blocks, 2):
            raise ScheduleError(f"gates {tuple(gates.shape)} do not match ({num_steps}, {num_blocks}, 2)")
        self.gates = gates
        hard = gates.detach()
        self.reused: list[list[bool]] = (hard[..., 0] > hard[..., 1]).tolist()  # one read per setting

    def skips(self, step, block):
        return False

    def skips_all(self, step):
        return False

    def mix(self, step, block, forecast, work, dtype):
        g_reuse, g_keep = self.gates[step, block].to(dtype)
        return map_streams(lambda c, w: g_reuse * c + g_keep * w, forecast, work), self.reused[step][block]
