"""`SATModel` (the PEFT tuner) and `apply_sat` / `remove_sat` (the same conversion on any model, in place).

SAT owns no weights: it re-classes the targeted MLP / attention blocks (``peft_sat.blocks``) and, for
full-parameter SAT, trains the base weights themselves. Hence the tuner overrides what PEFT assumes of adapter
weights: which parameters train (``train_base``), what ``save_pretrained`` writes (the full weights when the base
trains, nothing otherwise) and what unloading means (restoring the original classes; nothing to merge).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from . import norm_input
from .blocks import (
    DEFAULT_TARGET_MODULES,
    SATBlockMixin,
    block_kind,
    convert_block,
    restore_block,
    unsliceable_reason,
    unsupported_block_error,
)
from .blocks.lm_head import convert_lm_head
from .config import SATConfig
from .sliced import _is_bnb_4bit
from .state import SATState

logger = logging.get_logger(__name__)


class SATSwitch(nn.Module, BaseTunerLayer):
    """SAT's on / off switch as PEFT's one tuner layer of a ``SATModel``: no weights, no forward.

    ``PeftModel.disable_adapter()`` reads the state of the model's tuner layers and raises ``No adapter layers
    found`` without any; SAT re-classes blocks instead of wrapping layers. Held by the ``SATModel``, outside the
    transformers model (LoRA injection and checkpoint keys never see it), this layer reports and sets
    ``SATState.enabled`` for all SAT blocks: disabled, they run the original dense forward.
    """

    def __init__(self, state: SATState, adapter_name: str) -> None:
        super().__init__()
        self.state = state
        self._active_adapter = adapter_name

    @property
    def disable_adapters(self) -> bool:
        return not self.state.enabled

    def enable_adapters(self, enabled: bool) -> None:
        self.state.enabled = enabled


class SATModel(BaseTuner):
    """PEFT tuner for Sparsity-Accelerated Training; created by ``get_peft_model(model, SATConfig(...))``.

    Example:
        >>> import peft_sat
        >>> from peft import get_peft_model
        >>> model = get_peft_model(model, peft_sat.SATConfig(omission_rate=0.5))  # doctest: +SKIP
        >>> model.print_trainable_parameters()  # doctest: +SKIP  (all base weights: full-parameter SAT)
    """

    prefix: str = "sat_"
    tuner_layer_cls = BaseTunerLayer  # SAT wraps no layer (its one tuner layer, SATSwitch, holds no weights)
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _check_new_adapter_config(self, config: SATConfig) -> None:
        config.validate()  # a list field changed in place since construction assigned nothing
        super()._check_new_adapter_config(config)

    def _prepare_adapter_config(self, peft_config: SATConfig, model_config: dict) -> SATConfig:
        # A copy, also where PEFT keeps the model's config: the caller's object stays as given, so a config reused
        # for `apply_sat` under LoRA does not carry `train_base=True` over and train the frozen base weights.
        prepared = copy.deepcopy(peft_config)
        if prepared.target_modules is None:
            prepared.target_modules = default_target_modules(model_config.get("model_type"))
        if prepared.train_base is None:
            prepared.train_base = True  # SAT alone is full-parameter SAT (the paper's setting)
        for name, config in self.peft_config.items():
            if config is peft_config:
                self.peft_config[name] = prepared
        return prepared

    def _pre_injection_hook(self, model: nn.Module, config: SATConfig, adapter_name: str) -> None:
        if len(self.peft_config) > 1:
            raise ValueError("A model holds one SAT configuration; call `remove_sat` before adding another.")
        self._sat_blocks: list[nn.Module] = []
        self._sat_matching: SATConfig | None = None  # built from the prepared config, at the first target
        self.sat_state = _new_state(model, config)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if self._sat_matching is None:
            self._sat_matching = layer_matching_config(config, self.model)
        if not check_target_module_exists(self._sat_matching, current_key):
            return  # a layer of `dense_layers`
        if _convert_if_omitted(target, current_key, config, self.sat_state, len(self._sat_blocks)):
            self._sat_blocks.append(target)

    def _post_injection_hook(self, model: nn.Module, config: SATConfig, adapter_name: str) -> None:
        if not any(block.sat_omits_units for block in self._sat_blocks):
            raise ValueError(f"`target_modules` {config.target_modules!r} matched no block that `omit` selects.")
        _log_sparse_layers(self.sat_state, self._sat_matching)
        _convert_for_the_cut(model, config, self.sat_state, self._sat_blocks)
        _convert_lm_head_if_cut(model, config, self.sat_state)
        _warn_if_attention_keeps_everything(self._sat_blocks, config)
        self.sat_state.hooks.extend(norm_input.attach_norm_hooks(model, self._sat_blocks, self.sat_state))
        self.sat_state.register_zero3_parameters(model)  # already partitioned (deepspeed.zero.Init)
        self.sat_switch = SATSwitch(self.sat_state, adapter_name)  # for PeftModel.disable_adapter()

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        config = self.peft_config[self.active_adapter]
        # Inference mode (`PeftModel.from_pretrained(..., is_trainable=False)`) freezes what SAT trains, as it freezes
        # adapters; PEFT itself only freezes parameters whose name holds the adapter name.
        _set_base_trainable(model, bool(config.train_base) and not config.inference_mode)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        # `with peft_model.disable_adapter():` trains / runs the dense model (PEFT finds `self.sat_switch`).
        self.sat_switch.enable_adapters(enabled)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if any(name not in self.peft_config for name in names):
            raise ValueError(f"Adapter {adapter_name!r} not found; SAT holds {list(self.peft_config)}.")

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge=False, adapter_names=None
    ) -> nn.Module:
        # Full-parameter SAT trains the base weights in place: there is nothing to merge, only classes to restore.
        remove_sat(self.model)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # With a trained base, the "adapter" is the whole model (PEFT would otherwise save nothing of it).
        return dict(state_dict) if config.train_base else {}


def default_target_modules(model_type: str | None) -> list[str]:
    """The default blocks per model type; TypeError naming the supported types otherwise."""
    if model_type not in DEFAULT_TARGET_MODULES:
        raise TypeError(
            f"peft_sat has no default `target_modules` for model type {model_type!r}; supported model types: "
            f"{sorted(DEFAULT_TARGET_MODULES)}."
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def apply_sat(model: nn.Module, config: SATConfig | Mapping[str, Any]) -> nn.Module:
    """Convert the targeted blocks of ``model`` to SAT blocks, in place, and return ``model``.

    ``model`` may be a transformers model, a LoRA ``PeftModel`` (full precision or bitsandbytes 4-bit) or a model
    already carrying SAT (its SAT is replaced by this config). Adapters keep training as before; base weights are
    made trainable / frozen only when ``config.train_base`` is True / False.

    Raises:
        TypeError: the model has no supported block among its targets (the message lists what is supported).
        ValueError: ``target_modules`` matched nothing.

    Example:
        >>> lora_model = apply_sat(get_peft_model(model, LoraConfig(...)), SATConfig(omission_rate=0.5))  # doctest: +SKIP
    """
    # A copy, as `get_peft_model` prepares one: the caller's object stays as given (its `target_modules` unfilled).
    config = SATConfig.from_dict(config) if isinstance(config, Mapping) else copy.deepcopy(config)
    config.validate()
    remove_sat(model)
    base = _transformers_model(model)
    if config.target_modules is None:
        config.target_modules = default_target_modules(getattr(getattr(base, "config", None), "model_type", None))
    matching = layer_matching_config(config, base)
    state = _new_state(base, config)
    blocks: list[nn.Module] = []
    for name, module in base.named_modules():
        if check_target_module_exists(matching, name) and _convert_if_omitted(
            module, name, config, state, len(blocks)
        ):
            blocks.append(module)
    if not any(block.sat_omits_units for block in blocks):
        raise ValueError(f"`target_modules` {config.target_modules!r} matched no block that `omit` selects.")
    _log_sparse_layers(state, matching)
    _convert_for_the_cut(base, config, state, blocks)
    _convert_lm_head_if_cut(base, config, state)
    _warn_if_attention_keeps_everything(blocks, config)
    state.hooks.extend(norm_input.attach_norm_hooks(base, blocks, state))
    state.register_zero3_parameters(base)  # already partitioned (deepspeed.zero.Init, or after deepspeed.initialize)
    if config.train_base is not None:
        _set_base_trainable(base, config.train_base)
    return model


def remove_sat(model: nn.Module) -> nn.Module:
    """Undo ``apply_sat`` (or the SAT of a ``SATModel``) in place: original classes, no hooks. Returns ``model``."""
    base = _transformers_model(model)
    state = getattr(base, "sat_state", None)
    if state is not None:
        state.detach()
        del base.sat_state
    for module in base.modules():
        restore_block(module)
    return model


@contextlib.contextmanager
def sat_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` dense inside the block (e.g. to time or evaluate dense steps), then restore SAT.

    Works on any model carrying SAT. On a ``get_peft_model(model, SATConfig(...))`` model,
    ``peft_model.disable_adapter()`` does the same; under LoRA (``apply_sat``) that one turns off LoRA only.
    """
    state = get_sat_state(model)
    if state is None:
        raise ValueError("`model` carries no SAT; nothing to disable.")
    was_enabled, state.enabled = state.enabled, False
    try:
        yield
    finally:
        state.enabled = was_enabled


def get_sat_state(model: nn.Module) -> SATState | None:
    """The ``SATState`` of a model carrying SAT (through any PEFT / DDP wrapping), or None."""
    return getattr(_transformers_model(model), "sat_state", None)


def layer_matching_config(config: SATConfig, model: nn.Module) -> SATConfig:
    """``config`` with ``dense_layers`` folded into ``layers_to_transform``: a copy that selects the sparse layers.

    ``layers_to_transform`` (all layers when None) minus ``dense_layers`` (negatives count from the last layer of
    ``model.config.num_hidden_layers``). Returns ``config`` itself when ``dense_layers`` is None.

    Raises:
        ValueError: a dense layer out of range, a layer in both ``layers_to_transform`` and ``dense_layers``, or no
            sparse layer left.
    """
    if config.dense_layers is None:
        return config
    num_layers = getattr(getattr(_transformers_model(model), "config", None), "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise ValueError(
            "`dense_layers` needs the model's `config.num_hidden_layers`, which this model does not have."
        )
    if bad := [i for i in config.dense_layers if not -num_layers <= i < num_layers]:
        raise ValueError(
            f"`dense_layers` {config.dense_layers} holds {bad}, outside the {num_layers} layers of the model "
            f"(indices -{num_layers}..{num_layers - 1})."
        )
    dense = {i % num_layers for i in config.dense_layers}
    chosen = config.layers_to_transform
    if chosen is not None:
        chosen = {chosen} if isinstance(chosen, int) else set(chosen)
        if both := sorted(chosen & dense):
            raise ValueError(
                f"Layers {both} are both in `layers_to_transform` {config.layers_to_transform} (sparse) and in "
                f"`dense_layers` {config.dense_layers} (dense); list each layer in one of them."
            )
    sparse = sorted((chosen if chosen is not None else set(range(num_layers))) - dense)
    if not sparse:
        raise ValueError(f"`dense_layers` {config.dense_layers} leaves no sparse layer; use `dense_layers=None`.")
    matching = copy.deepcopy(config)
    matching.layers_to_transform = sparse
    matching.dense_layers = None
    return matching


def _convert_for_the_cut(model: nn.Module, config: SATConfig, state: SATState, blocks: list[nn.Module]) -> None:
    """With context tokens training forward only, every targeted block cuts their gradient, also in the layers that
    omit no unit (``dense_layers``, ``layers_to_transform``): one attention block that let it through would send the
    gradient down context rows whose other blocks run without a graph."""
    if not state.context_forward_only:
        return
    every_layer = copy.deepcopy(config)
    every_layer.layers_to_transform, every_layer.dense_layers = None, None
    for name, module in model.named_modules():
        if isinstance(module, SATBlockMixin) or block_kind(module) is None:
            continue
        if check_target_module_exists(every_layer, name) and _convert_if_omitted(
            module, name, config, state, len(blocks), omits_units=False
        ):
            blocks.append(module)


def _convert_lm_head_if_cut(model: nn.Module, config: SATConfig, state: SATState) -> None:
    """With context tokens training forward only, their logits need no graph either (``blocks/lm_head.py``)."""
    if not state.context_forward_only:
        return
    head = lm_head(model)
    if head is not None:
        convert_lm_head(head, state)


def lm_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head (the output embeddings of its first transformers model), if it is a plain linear."""
    heads = [m.get_output_embeddings() for m in model.modules() if isinstance(m, PreTrainedModel)]
    return next((h for h in heads if isinstance(h, nn.Linear)), None)


def _log_sparse_layers(state: SATState, matching: SATConfig) -> None:
    state.sparse_layers = matching.layers_to_transform  # None: every layer that `target_modules` matched
    if matching.layers_to_transform is not None:
        logger.info(
            f"SAT sparsifies layers {matching.layers_to_transform}; dense layers: {state.config.dense_layers}."
        )


# ---- helpers -------------------------------------------------------------------------------------------------


def _transformers_model(model: nn.Module) -> nn.Module:
    """Unwrap DDP / PeftModel / BaseTuner down to the model that holds the blocks."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / accelerate wrappers
            model = model.module
        elif hasattr(model, "get_base_model") and not isinstance(model, PreTrainedModel):  # PeftModel
            model = model.get_base_model()
        elif isinstance(model, BaseTuner):
            model = model.model
        else:
            return model


def _new_state(base: nn.Module, config: SATConfig) -> SATState:
    if any(_is_bnb_4bit(module) for module in base.modules()):
        from .bnb import disable_cpu_inference_repack  # the optional backend, imported for 4-bit models only

        disable_cpu_inference_repack(base)  # dense evaluations between sparse steps must not repack the weights
    state = SATState(config=config, omission_rate=config.omission_rate)
    state.context_forward_only = config.context_tokens == "forward_only" and config.dense_tokens != "none"
    state.causal_attention = all(getattr(m, "is_causal", True) for m in base.modules() if block_kind(m) == "attention")
    models = [m for m in base.modules() if isinstance(m, PreTrainedModel)] or [base]
    state.attach(models)
    base.sat_state = state
    return state


def _convert_if_omitted(
    module: nn.Module, name: str, config: SATConfig, state: SATState, block_id: int, omits_units: bool | None = None
) -> bool:
    """Convert a targeted block when its kind is in ``config.omit`` (or, with ``context_tokens="forward_only"`` in
    force, to cut the context tokens' gradient); TypeError for a target SAT cannot slice."""
    kind = block_kind(module)
    if kind is None:
        raise unsupported_block_error(module, name)
    omits_units = kind in config.omit if omits_units is None else omits_units
    if not omits_units and not state.context_forward_only:
        return False
    if reason := unsliceable_reason(module):
        if state.context_forward_only:
            state.context_forward_only = False
            warnings.warn(
                f"peft_sat: `context_tokens`='forward_only' needs every attention block to cut the context tokens' "
                f"gradient, and `{name}` ({type(module).__name__}) cannot be converted: {reason}. The context tokens "
                "of a split batch train as with `context_tokens`='sparse'.",
                stacklevel=3,
            )
        if omits_units:
            warnings.warn(
                f"peft_sat: the heads of `{name}` ({type(module).__name__}) cannot be sliced exactly: {reason}. Its "
                "attention trains dense; SAT sparsifies the MLP blocks only.",
                stacklevel=3,
            )
        return False
    convert_block(module, state, block_id, config.head_granularity, omits_units=omits_units)
    return True


def _warn_if_attention_keeps_everything(blocks: list[nn.Module], config: SATConfig) -> None:
    """Warn once when ``kv_group`` units meet multi-query attention: a block keeps at least one unit
    (``num_kept(1, r) == 1``), so attention with a single KV group would train dense at every rate, silently."""
    if config.head_granularity != "kv_group":
        return
    single = [block for block in blocks if block_kind(block) == "attention" and block.sat_num_units == 1]
    if single:
        warnings.warn(
            f"peft_sat: {len(single)} attention block(s) have a single KV group (multi-query attention), so "
            "`head_granularity='kv_group'` never omits their heads: their attention trains dense. Set "
            "`head_granularity='q_head'` to omit single query heads.",
            stacklevel=3,
        )


def _set_base_trainable(model: nn.Module, trainable: bool) -> None:
    """Set ``requires_grad`` of every base (non-adapter) parameter; adapter parameters are left as they are."""
    adapters = adapter_module_ids(model)
    adapter_params = {id(p) for m in model.modules() if id(m) in adapters for p in m.parameters(recurse=False)}
    for param in model.parameters():
        if id(param) not in adapter_params and _is_trainable_dtype(param):
            param.requires_grad_(trainable)


def adapter_module_ids(model: nn.Module) -> set[int]:
    """``id`` of every module that a PEFT tuner layer adds to ``model`` (the layer itself, ``lora_A``, ``lora_B``,
    dropout, ...), not of the base layer it wraps: what is the adapter's, as opposed to the base model's."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base = {id(m) for m in module.get_base_layer().modules()}
            ids.update(id(m) for m in module.modules() if id(m) not in base)
    return ids


def _is_trainable_dtype(param: torch.Tensor) -> bool:
    return param.dtype.is_floating_point or param.dtype.is_complex  # 4-bit packed weights (uint8) never train
