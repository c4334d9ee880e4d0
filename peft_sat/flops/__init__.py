"""Matmul FLOPs of a training step, dense or with SAT: one model for the callback's estimate and the benchmarks.

Per token, a projection ``(in -> out)`` costs::

    forward               2 in out
    backward, input grad  2 in out     (when its input needs a gradient)
    backward, weight grad 2 in out     (when its weight trains)
    LoRA rank r           A (in -> r) and B (r -> out) like projections of their own, both trained

SAT scales a projection of a block with n units by the kept fraction ``k / n`` (``k = num_kept(n, r)``) in the parts
of its work and on the tokens it slices (``SATConfig.sparse_pass``; with ``dense_tokens`` splitting a batch the
dense tokens, a share f, run everything, the others a share 1 - f)::

    sparse_pass        forward    input grad    weight grad     sliced on the share
    forward_backward   sliced     sliced        sliced          1 - f  (every token without a split)
    backward           dense      sliced        sliced          1 - f
    weight_grad        dense      dense         sliced          1 - f

With ``context_tokens="forward_only"`` a split batch's context tokens run every unit forward and no backward: the
MLP, the query / output projections and the LM head save their whole backward on the share 1 - f, key / value
projections their input gradient (their weights still learn from the dense tokens' attention). The LM head saves
only in the forwards that call it. The positions after each sequence's last dense one (a share 1 - l of a split
batch, ``tokens.LiveRows``) skip the MLP blocks: their forward is saved too. A loss that reads the head's weight
itself (TRL's fused LM head in ``SFTTrainer``) runs the head on every row or, where TRL scores the labelled
positions only (on CUDA; on a CPU with the recipes' patch), on the loss positions alone: then the dense step's head
costs that share of its FLOPs, and so does the estimate's.

Not counted: embeddings (a gather), norms, activations, 4-bit dequantization, the optimizer, the importance scores.
``training_flops`` also counts the attention core (Q K^T and A V, causal: T / 2 keys per query on average, backward
twice the forward) and the LM head, for Llama-shaped stacks given by their shape (``StackShape``);
``SATFlopsEstimator`` reads the projections of a real model.

Modules: ``projection`` (one projection's FLOPs and the shares a mode slices), ``stack`` (Llama-shaped stacks,
the benchmarks' ideal ratios), ``estimate`` (the callback's estimate for a real model).
"""

from .estimate import BlockCosts, SATFlopsEstimator
from .projection import NOTHING_SLICED, SlicedShare, projection_flops
from .stack import OMIT_ALL, StackShape, ideal_speedup, training_flops

__all__ = [
    "NOTHING_SLICED",
    "OMIT_ALL",
    "BlockCosts",
    "SATFlopsEstimator",
    "SlicedShare",
    "StackShape",
    "ideal_speedup",
    "projection_flops",
    "training_flops",
]
