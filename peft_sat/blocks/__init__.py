"""SAT blocks: a model's own MLP / attention instances, re-classed in place to subclasses with a sliced forward.

``base`` (selection), ``mlp`` and ``attention`` (sliced forwards; ``attention_fused``: Phi3's layout), ``heads``
(attention units as projection rows), ``registry`` (supported families, re-classing).
"""

from .attention import SATAttentionMixin
from .attention_fused import SATFusedAttentionMixin
from .base import SATBlockMixin
from .heads import HeadSelection
from .mlp import SATFusedMLPMixin, SATMLPMixin
from .registry import (
    ARCHITECTURES,
    DEFAULT_TARGET_MODULES,
    block_kind,
    convert_block,
    restore_block,
    unsliceable_reason,
    unsupported_block_error,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_TARGET_MODULES",
    "HeadSelection",
    "SATAttentionMixin",
    "SATBlockMixin",
    "SATFusedAttentionMixin",
    "SATFusedMLPMixin",
    "SATMLPMixin",
    "block_kind",
    "convert_block",
    "restore_block",
    "unsliceable_reason",
    "unsupported_block_error",
]
