"""Registration of SAT as a PEFT method named ``"sat"``.

PEFT 0.21 keys its method registry by members of the closed enum ``peft.utils.PeftType``; the plain-string route
breaks code that calls ``peft_type.value``. So the enum gains a real ``SAT`` member at import time (idempotent),
after which ``peft.utils.register_peft_method`` works as for PEFT's own methods.
"""

from __future__ import annotations

from peft.utils import PeftType


def _extend_peft_type(name: str) -> PeftType:
    """Add ``name`` as a member of ``PeftType`` (a ``str`` enum) and return it; no-op when it exists."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses new members
    return member


SAT_PEFT_TYPE = _extend_peft_type("SAT")


def register() -> None:
    """Register ``SATConfig`` / ``SATModel`` with PEFT (safe to call more than once)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import SATConfig
    from .model import SATModel

    if PEFT_TYPE_TO_TUNER_MAPPING.get(SAT_PEFT_TYPE) is SATModel:
        return
    register_peft_method(name="sat", config_cls=SATConfig, model_cls=SATModel, prefix="sat_")
