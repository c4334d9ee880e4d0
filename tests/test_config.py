"""SATConfig: registration with PEFT, documented fields, and errors that name the field, rule and value."""

from __future__ import annotations

import dataclasses
import pickle
import warnings
from copy import deepcopy

import pytest
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from sat_testing import sat_blocks, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

import peft_sat
from peft_sat import SATConfig, SATModel


def test_import_registers_the_peft_method():
    assert PeftType.SAT.value == "SAT" and PeftType("SAT") is PeftType.SAT
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SAT] is SATConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SAT] is SATModel
    assert SATConfig().peft_type is PeftType.SAT
    peft_sat.register()  # idempotent
    assert isinstance(get_peft_model(tiny_model(), SATConfig()).base_model, SATModel)


def test_every_field_has_help():
    own = {f.name for f in dataclasses.fields(SATConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    assert {
        "omission_rate",
        "target_modules",
        "omit",
        "importance",
        "selection",
        "head_granularity",
        "train_base",
        "seed",
    } <= own
    for field in dataclasses.fields(SATConfig):
        if field.name in own:
            assert len(field.metadata.get("help", "")) > 20, f"`{field.name}` needs a help string"


def test_config_round_trips_through_json(tmp_path):
    config = SATConfig(omission_rate=0.3, importance="wanda", selection="sampling", omit=["mlp"], seed=7)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SATConfig) and loaded.to_dict() == config.to_dict()


INVALID_VALUES = [
    ("omission_rate", 1.0, "in [0, 1)"),
    ("omission_rate", -0.1, "in [0, 1)"),
    ("omission_rate", "0.5", "in [0, 1)"),
    ("omit", [], "non-empty list"),
    ("omit", ["mlp", "embeddings"], "non-empty list"),
    ("importance", "random", "must be one of"),
    ("selection", "greedy", "must be one of"),
    ("head_granularity", "head", "must be one of"),
    ("score_tokens", 0, ">= 1"),
    ("train_base", "yes", "True, False or None"),
    ("seed", 1.5, "must be an int"),
    ("target_modules", 3, "list of names"),
    ("dense_tokens", "prompt", "must be one of"),
    ("sparse_pass", "forward", "must be one of"),
    ("dense_layers", [0, 0], "distinct layer indices"),
    ("dense_layers", 0, "distinct layer indices"),
]


@pytest.mark.parametrize("field,value,rule", INVALID_VALUES)
def test_invalid_values_raise_naming_field_rule_and_value(field, value, rule):
    with pytest.raises(ValueError) as error:
        SATConfig(**{field: value})
    message = str(error.value)
    assert f"`{field}`" in message and rule in message and repr(value) in message


@pytest.mark.parametrize("field,value,rule", [*INVALID_VALUES, ("omission_rate", float("nan"), "in [0, 1)")])
def test_invalid_assignment_raises_the_constructors_error_and_is_undone(field, value, rule):
    config = SATConfig()
    before = getattr(config, field)
    with pytest.raises(ValueError) as assigned:
        setattr(config, field, value)
    with pytest.raises(ValueError) as constructed:
        SATConfig(**{field: value})
    assert str(assigned.value) == str(constructed.value) and f"`{field}`" in str(assigned.value)
    assert getattr(config, field) == before
    config.validate()  # still a valid config


def test_valid_assignments_and_fields_tied_by_a_rule():
    config = SATConfig()
    config.omission_rate = 0.25
    config.omit = ("mlp",)  # normalized like the constructor's argument
    assert config.omission_rate == 0.25 and config.omit == ["mlp"]
    with pytest.raises(ValueError, match="`warmup_ratio` \\+ `ladder_full_rate_ratio` must be < 1"):
        config.warmup_ratio = 0.6  # with the default ladder_full_rate_ratio=0.5
    assert config.warmup_ratio == 0.0
    changed = dataclasses.replace(config, warmup_ratio=0.6, ladder_full_rate_ratio=0.3)  # both at once
    assert (changed.warmup_ratio, changed.ladder_full_rate_ratio, changed.omit) == (0.6, 0.3, ["mlp"])
    with pytest.raises(ValueError, match="`omission_rate`"):
        changed.omission_rate = 1.0  # the copy validates its assignments too


def test_copies_keep_validating_and_peft_machinery_still_assigns(tmp_path):
    config = SATConfig(omission_rate=0.3, ladder_stairs=[(0.0, 0.3), (0.5, 0.0)])
    for copy in (deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert copy == config
        with pytest.raises(ValueError, match="`ladder_stairs`"):
            copy.ladder_stairs = [(0.5, 0.3)]
    config.inference_mode = True  # PEFT's own fields (save_pretrained / from_pretrained set this one)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    loaded.inference_mode = False
    with pytest.raises(ValueError, match="`seed`"):
        loaded.seed = "0"


def test_get_peft_model_and_apply_sat_validate_again():
    """A list field changed in place assigns nothing; get_peft_model and apply_sat check the config again."""
    config = SATConfig()
    config.omit.append("embeddings")
    with pytest.raises(ValueError, match=r"`omit` must be a non-empty list of \['mlp', 'attention'\]"):
        get_peft_model(tiny_model(), config)
    with pytest.raises(ValueError, match="`omit` must be a non-empty list"):
        peft_sat.apply_sat(tiny_model(), config)


def test_unsupported_model_type_raises_type_error_naming_supported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(TypeError, match="supported model types: .*llama"):
        get_peft_model(model, SATConfig())
    with pytest.raises(TypeError, match="supported model types"):
        peft_sat.apply_sat(model, SATConfig())


def test_target_that_cannot_be_sliced_raises_type_error():
    with pytest.raises(TypeError, match=r"cannot sparsify `.*q_proj`.*Supported blocks: LlamaMLP"):
        peft_sat.apply_sat(tiny_model(), SATConfig(target_modules=["q_proj"]))


def test_targets_matching_nothing_raise():
    with pytest.raises(ValueError, match="matched no block"):
        peft_sat.apply_sat(tiny_model(), SATConfig(target_modules=["mlp"], omit=["attention"]))


def test_omit_restricts_the_converted_blocks():
    model = peft_sat.apply_sat(tiny_model(), SATConfig(omit=["mlp"], context_tokens="sparse"))
    assert type(model.model.layers[0].mlp).__name__ == "SATLlamaMLP"
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"
    # context_tokens="forward_only" (the default) converts attention too, to cut the context tokens' gradient
    attention = peft_sat.apply_sat(tiny_model(), SATConfig(omit=["mlp"])).model.layers[0].self_attn
    assert type(attention).__name__ == "SATLlamaAttention" and not attention.sat_omits_units


def test_olmo2_heads_cannot_be_sliced_so_only_its_mlp_is_sparsified():
    with pytest.warns(UserWarning, match="q/k RMSNorm spans all heads.*MLP blocks only"):
        model = peft_sat.apply_sat(tiny_model("olmo2"), SATConfig(omit=["mlp", "attention"]))
    assert [type(block).__name__ for _, block in sat_blocks(model)] == ["SATOlmo2MLP", "SATOlmo2MLP"]
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="matched no block"):
        peft_sat.apply_sat(tiny_model("olmo2"), SATConfig(omit=["attention"]))
    # The defaults cut the context tokens' gradient in attention: Olmo2's cannot, so its context tokens train sparse.
    with pytest.warns(UserWarning, match="q/k RMSNorm spans all heads.*train as with `context_tokens`='sparse'"):
        model = peft_sat.apply_sat(tiny_model("olmo2"), SATConfig())
    assert not peft_sat.get_sat_state(model).context_forward_only


@pytest.mark.parametrize("convert", ["apply_sat", "get_peft_model"])
def test_multi_query_attention_with_kv_group_units_warns_once_naming_q_head(convert):
    def sat(granularity):
        config = SATConfig(head_granularity=granularity)
        model = tiny_model(num_key_value_heads=1)  # 8 query heads sharing one KV head
        return peft_sat.apply_sat(model, config) if convert == "apply_sat" else get_peft_model(model, config)

    with pytest.warns(UserWarning) as warned:
        sat("kv_group")
    messages = [str(w.message) for w in warned if "single KV group" in str(w.message)]
    assert len(messages) == 1 and "2 attention block(s)" in messages[0] and "head_granularity='q_head'" in messages[0]

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*single KV group")
        sat("q_head")  # query heads are units of their own: attention is sparsified, nothing to warn about
        peft_sat.apply_sat(tiny_model(), SATConfig(head_granularity="kv_group"))  # 4 KV groups


def test_layers_to_transform_restricts_the_layers():
    paper = dict(omit=["mlp", "attention"], context_tokens="sparse", dense_tokens="none")  # no block converted to cut
    model = peft_sat.apply_sat(tiny_model(), SATConfig(layers_to_transform=[1], **paper))
    assert [name for name, _ in sat_blocks(model)] == ["model.layers.1.self_attn", "model.layers.1.mlp"]
    full = get_peft_model(tiny_model(), SATConfig(layers_to_transform=0, layers_pattern="layers", **paper))
    assert [name for name, _ in sat_blocks(full)] == ["model.layers.0.self_attn", "model.layers.0.mlp"]


def test_dense_layers_keep_layers_dense_and_combine_with_layers_to_transform(caplog):
    from sat_testing import sat_blocks

    four = dict(num_hidden_layers=4)
    paper = dict(omit=["mlp"], context_tokens="sparse")  # "forward_only" converts every block (next test)
    model = peft_sat.apply_sat(tiny_model(**four), SATConfig(dense_layers=[0, -1], **paper))
    assert [name for name, _ in sat_blocks(model)] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert peft_sat.get_sat_state(model).sparse_layers == [1, 2]
    full = get_peft_model(tiny_model(**four), SATConfig(dense_layers=[-1], layers_to_transform=[0, 2], **paper))
    assert [name for name, _ in sat_blocks(full)] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert peft_sat.get_sat_state(full).sparse_layers == [0, 2]
    assert full.peft_config["default"].layers_to_transform == [0, 2], "the user's config must stay as given"


@pytest.mark.parametrize("convert", ["apply_sat", "get_peft_model"])
def test_context_forward_only_cuts_in_the_layers_that_omit_nothing(convert):
    """Every attention block must cut the context tokens' gradient, or it would leak down context rows whose other
    blocks run without a graph: the layers outside `dense_layers` / `layers_to_transform` convert too, omitting none."""
    from sat_testing import sat_blocks

    config = SATConfig(dense_layers=[0], layers_to_transform=[1, 2], omit=["mlp"])
    base = tiny_model(num_hidden_layers=4)
    model = peft_sat.apply_sat(base, config) if convert == "apply_sat" else get_peft_model(base, config)
    blocks = dict(sat_blocks(model))
    assert len(blocks) == 8  # every attention and MLP block of the 4 layers
    omitting = sorted(name for name, block in blocks.items() if block.sat_omits_units)
    assert omitting == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert peft_sat.get_sat_state(model).sparse_layers == [1, 2]


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(dense_layers=[4]), "outside the 4 layers"),
        (dict(dense_layers=[-5]), "outside the 4 layers"),
        (dict(dense_layers=[1], layers_to_transform=[1, 2]), r"Layers \[1\] are both"),
        (dict(dense_layers=[-1], layers_to_transform=3), r"Layers \[3\] are both"),
        (dict(dense_layers=[0, 1, 2, 3]), "leaves no sparse layer"),
    ],
)
def test_contradicting_dense_layers_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        peft_sat.apply_sat(tiny_model(num_hidden_layers=4), SATConfig(**overrides))
    with pytest.raises(ValueError, match=match):
        get_peft_model(tiny_model(num_hidden_layers=4), SATConfig(**overrides))


@pytest.mark.parametrize(
    "text,key",
    [
        ("omision_rate: 0.5\n", "omision_rate"),
        ("omission_rate: '0.5'\n", "omission_rate"),
        ("omission_rate: 0.5\nscore_tokens: 3.5\n", "score_tokens"),
        ("omit: mlp\n", "omit"),
        ("importance: Wanda\n", "importance"),
        ("sat:\n  selection: [topk]\n", "selection"),
    ],
)
def test_yaml_with_unknown_keys_or_wrong_types_is_rejected_naming_the_key(tmp_path, text, key):
    path = tmp_path / "sat.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"`{key}`"):
        SATConfig.from_yaml(path)


def test_apply_sat_reads_a_dict_like_from_dict():
    model = peft_sat.apply_sat(tiny_model(), {"omission_rate": 0.25, "omit": ["mlp"]})
    assert peft_sat.get_sat_state(model).config.omit == ["mlp"]
    with pytest.raises(ValueError, match="did you mean `omission_rate`"):
        peft_sat.apply_sat(tiny_model(), {"omision_rate": 0.25})


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "sat.yaml"
    path.write_text("sat:\n  omission_rate: 0.4\n  omit: [mlp]\n  ladder_rungs: 2\n")
    config = SATConfig.from_yaml(path)
    assert (config.omission_rate, config.omit, config.ladder_rungs) == (0.4, ["mlp"], 2)
    with pytest.raises(ValueError, match=r"did you mean `omission_rate`"):
        SATConfig.from_dict({"omission_rte": 0.4})
