"""DeepSpeed ZeRO-3: make the parameters that SAT blocks read of their children gathered for the blocks' passes.

ZeRO-3 partitions every parameter (``param.data`` is an empty shard on each rank, ``param.ds_id`` marks it) and
gathers a module's own parameters in a pre-forward / pre-backward hook of that module. A SAT block never calls its
projections' forward on the sparse path: it slices ``self.gate_proj.weight`` (and LoRA's ``lora_B.weight``, ...)
itself (``peft_sat.sliced``). DeepSpeed discovers such reads during the engine's forward only when the parameter is
still partitioned at the read; a parameter that its prefetcher already gathered (after a dense step the recorded
trace holds the projections) is used without being registered, is released after the forward, and the block's
backward then reads an empty shard: ``RuntimeError: The size of tensor a (0) must match the size of tensor b (128)``
(measured with deepspeed 0.19.8, 2 CPU processes, one dense step then sparse steps; ``tests/test_deepspeed.py``).

The documented fix is ``deepspeed.zero.register_external_parameter(block, param)``: the block's own hooks then gather
``param`` before its forward and its backward. ``register_if_partitioned`` does that for every parameter below each
SAT block, when SAT is applied and again at the first forward after ``deepspeed.initialize`` partitioned the model
(SAT is usually applied before). Nothing here imports deepspeed unless a parameter is already partitioned.
"""

from __future__ import annotations

from torch import nn

from .sliced import _is_bnb_4bit

Registration = tuple[nn.Module, nn.Parameter]


def is_partitioned(param: object) -> bool:
    """True for a parameter managed by DeepSpeed ZeRO-3 (``deepspeed.zero.Init`` or ``deepspeed.initialize``)."""
    return hasattr(param, "ds_id")


def register_if_partitioned(model: nn.Module, state: object) -> list[Registration]:
    """Register, as ZeRO-3 external parameters of each SAT block of ``state`` in ``model``, every parameter of the
    block's sub-modules (projections, LoRA layers, norms); the block's own hooks then gather them for its forward
    and backward.

    Args:
        model: a module holding SAT blocks (the transformers model).
        state: the ``SATState`` whose blocks to register (blocks of another SAT state are left alone).

    Returns:
        The (block, parameter) pairs registered; empty (and nothing imported) when ``model`` is not partitioned.

    Raises:
        NotImplementedError: a SAT block holds a bitsandbytes 4-bit projection under ZeRO-3 (its packed weight and
            quantization state are not gathered as one parameter; this combination is untested).
    """
    first = next(model.parameters(), None)
    if first is None or not is_partitioned(first):  # ZeRO-3 partitions every parameter of the model it wraps
        return []
    import deepspeed  # already imported: it partitioned `model`

    registered: list[Registration] = []
    for block in model.modules():
        if getattr(block, "sat_state", None) is not state:
            continue
        _refuse_unsupported(block)
        own = {id(param) for param in block.parameters(recurse=False)}
        for param in block.parameters():  # unique parameters of all sub-modules
            if id(param) not in own and is_partitioned(param):
                deepspeed.zero.register_external_parameter(block, param)
                registered.append((block, param))
    return registered


def unregister(registrations: list[Registration]) -> None:
    """Undo ``register_if_partitioned`` (``remove_sat``): blocks fetch only their own parameters again."""
    if not registrations:
        return
    import deepspeed

    for block, param in registrations:
        if id(param) in getattr(block, "_external_params", {}):
            deepspeed.zero.unregister_external_parameter(block, param)


def _refuse_unsupported(block: nn.Module) -> None:
    for name, module in block.named_modules():
        if _is_bnb_4bit(module):
            raise NotImplementedError(
                f"peft_sat does not support bitsandbytes 4-bit projections (`{name}` of {type(block).__name__}) under "
                "DeepSpeed ZeRO-3: SAT slices the packed 4-bit weight and its quantization state directly, which "
                "ZeRO-3 partitions. Use QLoRA + SAT with DDP or ZeRO-2, or full-precision LoRA under ZeRO-3."
            )
