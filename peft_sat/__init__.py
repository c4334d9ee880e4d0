"""peft_sat: Sparsity-Accelerated Training (SAT, arXiv 2406.01392) as a PEFT method.

``import peft_sat`` registers the PEFT method ``"sat"``, so that ``get_peft_model(model, SATConfig(...))`` works.
Layout: ``config`` (SATConfig) | ``importance`` / ``selection`` / ``ops`` / ``sliced`` / ``bnb`` (tensor math) |
``modules`` (SAT blocks) | ``state`` (run-time state) | ``model`` (the PEFT tuner, apply/remove) |
``schedules`` (omission rate per step) | ``callback`` (``SATCallback`` for Trainer / TRL trainers).
"""

from .callback import SATCallback
from .config import SATConfig
from .model import SATModel, apply_sat, get_sat_state, remove_sat, sat_disabled
from .registration import register
from .schedules import omission_rate_at, schedule_rates, validate_schedule
from .state import SATState

register()

__version__ = "0.1.0"
__all__ = [
    "SATCallback",
    "SATConfig",
    "SATModel",
    "SATState",
    "apply_sat",
    "get_sat_state",
    "omission_rate_at",
    "remove_sat",
    "sat_disabled",
    "schedule_rates",
    "validate_schedule",
]
