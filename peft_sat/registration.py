"""The PEFT type ``SAT``: a real member of PEFT's ``PeftType`` enum, added when ``peft_sat`` is imported.

PEFT 0.21 keys its method registry by members of the closed enum ``peft.utils.PeftType``: ``register_peft_method``
raises ``Unknown PEFT type`` for any other name, and a plain-string key breaks the code paths that call
``peft_type.value``. So the enum gains a ``SAT`` member here (idempotent); ``peft_sat/__init__.py`` then registers
``SATConfig`` / ``SATModel`` under it, as PEFT's own tuner packages do. This module imports nothing from
``peft_sat``, so ``config.py`` can import ``SAT_PEFT_TYPE`` at its top.
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
