"""DiP-GO: learn which blocks may reuse their previous output at which step, and sample with it.

``search`` trains the gate network (:class:`Pruner`) and freezes it into a :class:`CacheSchedule`; ``calibrate``
builds one from a few full generations, with no search; ``apply`` makes a model follow a schedule, really skipping
the reused blocks.
"""

from .apply import apply, disable, enable, enable_cache, summary
from .blocks import BlockProfile, deepcache_blocks, default_block_names, profile, supported
from .calibrate import CalibrationError, calibrate
from .pruner import Pruner
from .schedule import CacheSchedule, ScheduleError
from .supernet import SuperNet
from .objective import Objective, parse_objective
from .train import SearchError, SearchResult, refit, search, train_pruner

__all__ = ["apply", "enable", "disable", "enable_cache", "summary", "supported", "BlockProfile", "deepcache_blocks",
           "default_block_names", "profile", "Pruner", "CacheSchedule", "ScheduleError", "SuperNet", "SearchError",
           "SearchResult", "search", "train_pruner", "refit", "Objective", "parse_objective", "calibrate",
           "CalibrationError"]
