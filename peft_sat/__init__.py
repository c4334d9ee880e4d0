"""peft_sat: Sparsity-Accelerated Training (SAT, arXiv 2406.01392) as a PEFT method.

``import peft_sat`` registers the PEFT method ``"sat"``, so that ``get_peft_model(model, SATConfig(...))`` works.
Layout: ``config`` (SATConfig) | ``importance`` / ``selection`` / ``ops`` / ``sliced`` / ``bnb`` (tensor math) |
``blocks`` (SAT blocks) | ``state`` (run-time state) | ``model`` (the PEFT tuner, apply/remove) |
``schedules`` (omission rate per step) | ``callback`` (``SATCallback`` for Trainer / TRL trainers) |
``registration`` (the PEFT type ``SAT``).
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .callback import SATCallback
from .config import SATConfig
from .model import SATModel, apply_sat, get_sat_state, remove_sat, sat_disabled
from .registration import SAT_PEFT_TYPE
from .schedules import omission_rate_at, schedule_rates, validate_schedule
from .state import SATState


def register() -> None:
    """Register ``SATConfig`` / ``SATModel`` with PEFT as the method ``"sat"``; done on import, safe to repeat."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(SAT_PEFT_TYPE) is not SATModel:
        register_peft_method(name="sat", config_cls=SATConfig, model_cls=SATModel, prefix="sat_")


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
    "register",
    "remove_sat",
    "sat_disabled",
    "schedule_rates",
    "validate_schedule",
]
