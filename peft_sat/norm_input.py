"""A sparse block saves the norm's input it reads, not its own input: ``x = norm(h)`` is recomputed in backward.

In a pre-norm decoder layer a block reads ``x = norm(h)``. Dense backward keeps both: the norm's backward keeps
its float32 input ``h``, and the projections reading ``x`` keep ``x`` for their weight gradients. A sparse block
still needs all of ``x`` (the kept units' gradient ``dL/dW_K = g_K^T x`` reads every input column), so at any rate
``x`` is a fixed part of what the block saves: the part of activation memory that does not fall with the rate.

Here the projections of a sparse block save ``h`` instead (the norm's graph already holds it: no new bytes) and
recompute ``x = norm(h)`` once per block in backward, the norm's own forward under the forward's autocast
state (the same operations on the same input: the same bits). That is an elementwise pass over the block's input,
small against the block's products, for one input-sized tensor less per block.

Applies where it is free and safe:

- ``x`` is the output of the latest call of a norm of the block's decoder layer (``attach_norm_hooks``) and the
  very tensor the projection receives, unchanged in place since the norm (a view or a slice of it, or a changed
  ``x``, is saved as it is);
- ``h`` is float32 and requires a gradient: a norm keeps its float32 input (a 16-bit input is upcast first, and the
  norm keeps the upcast copy, which the block cannot reach: holding ``h`` would cost what ``x`` costs);
- not while ``torch.compile`` traces, nor under DeepSpeed ZeRO-3 (the norm's weight is gathered only inside the
  norm's own hooks).

Projections opt in through ``save_input`` / ``load_input`` (``peft_sat.ops`` and ``peft_sat.ops_backward``) and
``linear`` (LoRA's ``A``, whose graph would otherwise save ``x``). ``rows_of`` extends this to a copy of some rows of
``x`` (a split batch's dense rows, where only they need a projection): saved as ``h`` too, its rows taken from the
recomputed ``x`` in backward. ``rows_of_kept`` does the same for rows of a tensor that autograd keeps anyway (an
attention kernel's output): the projection saves that tensor instead of the copy.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class NormCall:
    """The latest norm call of a training forward: its output and input (weak: recording keeps nothing alive)."""

    norm: nn.Module
    output: weakref.ref
    input: weakref.ref
    version: int  # the output's version counter: an in-place change after the norm makes norm(h) differ from it
    input_version: int  # the input's: changed in place since, norm(h) is no longer the output


class NormInput:
    """A block input ``x = norm(h)`` to save as ``h``; recomputed once in backward for every projection saving it."""

    def __init__(self, call: NormCall, x: torch.Tensor, h: torch.Tensor) -> None:
        self.norm = call.norm
        self.x = weakref.ref(x)
        self.h = h  # dropped when the block's forward ends: from then on only the projections' graphs hold it
        self.layout = (x.shape, x.stride(), x.dtype)
        self.version = call.version  # x as the norm returned it; changed in place since, norm(h) no longer gives it
        device = h.device.type
        self.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        self.users = 0  # projections that saved h and have not run their backward yet
        self._value: torch.Tensor | None = None
        self.row_views: list[tuple[weakref.ref, int, torch.Tensor]] = []  # (x[rows], its version, rows): `rows_of`

    def recompute(self, h: torch.Tensor) -> torch.Tensor:
        """``norm(h)``, computed by the first projection's backward and released after the last one's."""
        value = self._value
        if value is None:
            device, dtype, enabled = self.autocast
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                value = self.norm(h)
            if (value.shape, value.stride(), value.dtype) != self.layout:
                raise RuntimeError(
                    f"peft_sat: recomputing {type(self.norm).__name__} in backward gave {tuple(value.shape)} "
                    f"{value.dtype}, its forward gave {tuple(self.layout[0])} {self.layout[2]}: the norm changed "
                    "between forward and backward."
                )
            self._value = value
        self.users -= 1
        if self.users <= 0:
            self._value = None
        return value


class _Kept:
    """A tensor that autograd keeps for backward anyway, saved in place of copies of its rows (``rows_of_kept``)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.h = tensor
        self.users = 0

    def recompute(self, saved: torch.Tensor) -> torch.Tensor:
        return saved


class _Active(threading.local):
    source: NormInput | None = None
    kept_views: list | None = None  # (copy, its version, _Kept, rows) of `rows_of_kept`, during a block's forward


_ACTIVE = _Active()


def attach_norm_hooks(model: nn.Module, blocks: list[nn.Module], state: Any) -> list[Any]:
    """Record every call of the norms that sit next to a SAT block in its decoder layer (``RMSNorm`` /
    ``LayerNorm`` children of the block's parent); returns the hook handles."""
    blocks_by_id = {id(block) for block in blocks}
    handles, seen = [], set()
    for parent in model.modules():
        children = list(parent.children())
        if not any(id(child) in blocks_by_id for child in children):
            continue
        for child in children:
            if id(child) not in seen and type(child).__name__.endswith(("RMSNorm", "LayerNorm")):
                seen.add(id(child))
                handles.append(child.register_forward_hook(_NormRecorder(state)))
    return handles


class _NormRecorder:
    """Forward hook of a norm: remember its latest training call, for the block it feeds."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self.state
        if not (module.training and torch.is_grad_enabled() and state.enabled and state.omission_rate > 0.0):
            return
        if torch.compiler.is_compiling() or state.zero3_registrations:
            return
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            state.last_norm_call = NormCall(
                module, weakref.ref(output), weakref.ref(args[0]), output._version, args[0]._version
            )


@contextlib.contextmanager
def recomputable(x: torch.Tensor, state: Any) -> Iterator[None]:
    """While a sparse block's forward runs: projections reading ``x`` save the norm's input (see the module
    docstring) when ``x`` is the latest norm call's output and that norm keeps its input."""
    call = getattr(state, "last_norm_call", None)
    h = call.input() if call is not None and call.output() is x else None
    previous_views, _ACTIVE.kept_views = _ACTIVE.kept_views, []
    try:
        if h is None or h.dtype != torch.float32 or not h.requires_grad or torch.compiler.is_compiling():
            yield
            return
        previous, _ACTIVE.source = _ACTIVE.source, NormInput(call, x, h)
        try:
            yield
        finally:
            _ACTIVE.source.h = None
            _ACTIVE.source.row_views.clear()
            _ACTIVE.source = previous
    finally:
        _ACTIVE.kept_views = previous_views


def rows_input(x: torch.Tensor, rows: torch.Tensor, state: Any) -> torch.Tensor:
    """The flat dense rows ``x[rows]`` (n, H) of a split block's input ``x`` (..., H), with their graph.

    Where ``x = norm(h)`` is the latest norm call's output, unchanged since, they are ``norm(h[rows])``: the norm's
    own forward on those rows (row by row the same operations, the same values). Their gradient then reaches ``h``
    through a norm backward over n rows, where ``x[rows]`` would run it over all N (every row but the n with a zero
    gradient), and, since the block reads the rest of ``x`` without its graph, the norm's graph over all rows
    takes no gradient and is freed with ``x``: what it saved (``h`` in float32 and the normalized rows) is not kept
    for backward. Elsewhere (no norm recorded: compiled, ZeRO-3, another input) a copy of the rows.
    """
    flat = x.reshape(-1, x.shape[-1])
    call = getattr(state, "last_norm_call", None)
    h = _recorded_input(call, x)
    if h is None or not h.requires_grad or torch.compiler.is_compiling():
        return flat.index_select(0, rows)
    x_rows = call.norm(h.reshape(-1, h.shape[-1]).index_select(0, rows))
    state.last_norm_call = call  # the call above recorded itself: the block's input is still the latest output
    if x_rows.shape != (rows.numel(), x.shape[-1]) or x_rows.dtype != x.dtype:
        raise RuntimeError(
            f"peft_sat: {type(call.norm).__name__} on the dense rows gave {tuple(x_rows.shape)} {x_rows.dtype}, on "
            f"every row {tuple(x.shape)} {x.dtype}: the norm does not act row by row."
        )
    return x_rows


def _recorded_input(call: NormCall | None, x: torch.Tensor) -> torch.Tensor | None:
    """The input h of the norm ``call`` when ``x`` is its output, neither changed in place since; else None."""
    if call is None or call.output() is not x or x._version != call.version:
        return None
    h = call.input()
    return h if h is not None and h._version == call.input_version and h.shape[:-1] == x.shape[:-1] else None


def rows_of(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
    """The flat rows ``rows`` (n, H) of the active block's recomputable input ``x`` (..., H): a copy, with its graph,
    that the projections reading it save as the norm's input (no new bytes), taking these rows of ``norm(h)`` in
    backward. None where ``x`` is not recomputable: a projection would save the copy itself."""
    found = _source_of(x)
    if found is None or found[1] is not None:
        return None
    x_rows = x.reshape(-1, x.shape[-1]).index_select(0, rows)
    found[0].row_views.append((weakref.ref(x_rows), x_rows._version, rows))
    return x_rows


def rows_of_kept(kept: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The flat rows ``rows`` of ``kept`` (..., k), a tensor that autograd keeps for backward anyway (an attention
    kernel's output): a copy, with its graph, that the projections reading it save as ``kept`` itself (no new
    bytes), taking these rows of it in backward. Registered while a SAT block's forward runs (``recomputable``);
    elsewhere a plain copy."""
    copy = kept.reshape(-1, kept.shape[-1]).index_select(0, rows)
    if _ACTIVE.kept_views is not None and not torch.compiler.is_compiling():
        _ACTIVE.kept_views.append((weakref.ref(copy), copy._version, _Kept(kept), rows))
    return copy


def _source_of(x: torch.Tensor | None) -> tuple[NormInput | _Kept, torch.Tensor | None] | None:
    """What a projection saves for its input ``x`` and which of its rows ``x`` is (None: all): the active block's
    ``NormInput`` when ``x`` is its input, or rows of it (``rows_of``), unchanged since the norm and during its
    forward; a kept tensor when ``x`` is rows of it (``rows_of_kept``), unchanged since."""
    if x is None:
        return None
    for view, version, kept, rows in _ACTIVE.kept_views or ():
        if view() is x:
            return (kept, rows) if x._version == version else None
    source = _ACTIVE.source
    if source is None or source.h is None:
        return None
    if source.x() is x:
        return (source, None) if x._version == source.version else None
    for view, version, rows in source.row_views:
        if view() is x:
            return (source, rows) if x._version == version and source.x() is not None else None
    return None


def save_input(ctx: Any, x: torch.Tensor | None) -> torch.Tensor | None:
    """What a projection's ``forward`` passes to ``save_for_backward`` for its input ``x``: ``h`` when ``x`` is the
    active block's recomputable input or rows of it, else ``x``. Pair with ``load_input`` in backward."""
    ctx.norm_input = found = _source_of(x)
    if found is None:
        return x
    found[0].users += 1
    return found[0].h


def load_input(ctx: Any, saved: torch.Tensor | None) -> torch.Tensor | None:
    """The projection's input in backward, from what ``save_input`` saved."""
    found = getattr(ctx, "norm_input", None)
    if saved is None or found is None:
        return saved
    ctx.norm_input = None
    source, rows = found
    x = source.recompute(saved)
    return x if rows is None else x.reshape(-1, x.shape[-1]).index_select(0, rows)


class _Linear(torch.autograd.Function):
    """``F.linear(x, W)``, saving what ``save_input`` says; gradients as autograd's for ``F.linear``."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(save_input(ctx, x) if weight.requires_grad else None, weight)
        ctx.x_dtype = x.dtype
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        saved, weight = ctx.saved_tensors
        x = load_input(ctx, saved)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = grad_2d.t().mm(x.reshape(-1, x.shape[-1]).to(grad_2d.dtype)).to(weight.dtype)
        return grad_x, grad_w


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a bias-free ``nn.Linear`` (LoRA's ``A``), saving ``h`` instead of ``x`` where
    ``save_input`` would; anything else is called as it is."""
    plain = type(layer) is nn.Linear and layer.bias is None
    if not plain or not torch.is_grad_enabled() or _source_of(x) is None:
        return layer(x)
    return _Linear.apply(x, layer.weight)
