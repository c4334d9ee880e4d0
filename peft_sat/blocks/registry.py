"""Which transformers blocks SAT can slice, and the in-place re-classing that turns them into SAT blocks.

Why re-classing and not a wrapper: PEFT skips every module nested under a tuner-layer wrapper, so LoRA applied
after SAT would find no targets, and LoRA applied before it would get ``.base_layer.`` in its checkpoint keys
(PEFT 0.21; docs/architecture.md, "Traps of the stack"). Changing ``__class__`` keeps module paths, state-dict keys, ``isinstance`` checks and LoRA
injection untouched, in either order. ``SATLlamaMLP`` is ``(SATMLPMixin, LlamaMLP)``: eval mode, rate 0 or a
disabled SAT call the original ``forward`` unchanged.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..state import SATState
from .attention import SATAttentionMixin
from .attention_fused import SATFusedAttentionMixin
from .mlp import SATFusedMLPMixin, SATMLPMixin


@dataclass(frozen=True)
class Architecture:
    """The SAT mixins of one model family (``<Family>MLP`` / ``<Family>Attention`` in transformers)."""

    model_types: tuple[str, ...]
    mlp: type = SATMLPMixin
    attention: type | None = SATAttentionMixin
    attention_unsliceable: str = ""  # why the heads cannot be sliced exactly (attention is then left dense)


ARCHITECTURES: dict[str, Architecture] = {
    "Llama": Architecture(("llama",)),
    "Mistral": Architecture(("mistral",)),
    "Qwen2": Architecture(("qwen2",)),
    "Qwen3": Architecture(("qwen3",)),  # per-head q/k norms
    "Gemma": Architecture(("gemma",)),
    "Gemma2": Architecture(("gemma2",)),  # logit softcapping, sliding windows
    "Gemma3": Architecture(("gemma3_text",)),  # per-head q/k norms, sliding windows
    "Granite": Architecture(("granite",)),
    "Phi3": Architecture(("phi3",), mlp=SATFusedMLPMixin, attention=SATFusedAttentionMixin),  # fused projections
    "Olmo2": Architecture(("olmo2",), attention=None, attention_unsliceable="its q/k RMSNorm spans all heads at once"),
}
DEFAULT_TARGET_MODULES = {t: ["mlp", "self_attn"] for arch in ARCHITECTURES.values() for t in arch.model_types}
SUPPORTED_BLOCKS = tuple(f"{family}{kind}" for family in ARCHITECTURES for kind in ("MLP", "Attention"))

_SAT_CLASSES: dict[type, type] = {}
_SAT_ATTRIBUTES = (
    "sat_state",
    "sat_block_id",
    "sat_last_kept",
    "_sat_cache",
    "sat_num_units",
    "sat_head_granularity",
    "sat_omits_units",
)


def original_class(module: nn.Module) -> type:
    return getattr(type(module), "_sat_original_class", type(module))


def _lookup(cls: type) -> tuple[Architecture, str] | None:
    name = cls.__name__
    for family, architecture in ARCHITECTURES.items():
        if name == f"{family}MLP":
            return architecture, "mlp"
        if name == f"{family}Attention":
            return architecture, "attention"
    return None


def block_kind(module: nn.Module) -> str | None:
    """``"mlp"`` / ``"attention"`` for a block of a supported family (converted or not), else None."""
    found = _lookup(original_class(module))
    return None if found is None else found[1]


def unsliceable_reason(module: nn.Module) -> str:
    """Why a supported family's attention cannot be sliced exactly ("" when it can, or for MLPs)."""
    found = _lookup(original_class(module))
    return found[0].attention_unsliceable if found is not None and found[1] == "attention" else ""


def unsupported_block_error(module: nn.Module, name: str) -> TypeError:
    return TypeError(
        f"peft_sat cannot sparsify `{name}` of type {type(module).__name__}. Supported blocks: "
        f"{', '.join(SUPPORTED_BLOCKS)} (model types: {', '.join(sorted(DEFAULT_TARGET_MODULES))})."
    )


def sat_class(original: type) -> type:
    """The cached subclass ``SAT<Original>`` of a supported block class."""
    if original not in _SAT_CLASSES:
        found = _lookup(original)
        assert found is not None and (found[1] == "mlp" or found[0].attention is not None), original
        architecture, kind = found
        namespace: dict[str, Any] = {"_sat_original_class": original, "__module__": __name__}
        if kind == "attention":
            source = sys.modules[original.__module__]  # the model file's own kernels
            namespace["_sat_eager_attention"] = staticmethod(source.eager_attention_forward)
            namespace["_sat_apply_rotary"] = staticmethod(source.apply_rotary_pos_emb)
        mixin = architecture.mlp if kind == "mlp" else architecture.attention
        cls = type(f"SAT{original.__name__}", (mixin, original), namespace)
        globals()[cls.__name__] = cls  # importable by name, so pickling a converted model works
        _SAT_CLASSES[original] = cls
    return _SAT_CLASSES[original]


def convert_block(
    module: nn.Module, state: SATState, block_id: int, head_granularity: str, omits_units: bool = True
) -> None:
    """Turn a supported block into its SAT subclass in place (idempotent: re-binds state of a converted one).

    ``omits_units`` False: the block keeps every unit and only cuts the gradient of context tokens
    (``SATConfig.context_tokens="forward_only"``).
    """
    module.__class__ = sat_class(original_class(module))
    module._sat_init(state, block_id)
    module.sat_omits_units = omits_units
    if block_kind(module) == "mlp":
        module.sat_num_units = module.sat_num_channels(module)
    else:
        module.sat_head_granularity = head_granularity
        num_heads, num_kv_heads, _ = module._sat_shape
        module.sat_num_units = num_heads if head_granularity == "q_head" else num_kv_heads


def restore_block(module: nn.Module) -> None:
    """Undo ``convert_block``: the original class, no SAT attributes."""
    original = getattr(type(module), "_sat_original_class", None)
    if original is None:
        return
    module.__class__ = original
    for name in _SAT_ATTRIBUTES:
        module.__dict__.pop(name, None)
