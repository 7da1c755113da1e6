"""LoraConfig: PEFT's defaults field by field, dict/JSON round trips, TaskType, and loud errors."""

import dataclasses
import enum
import json
import re
import warnings

import peft
import pytest
import torch
import torch.nn as nn

import lorakit
from lorakit import LoraConfig, TaskType, get_peft_model

# ------------------------------------------------------------------ defaults --------------------------------

PEFT_DEFAULTS = peft.LoraConfig().to_dict()  # the 41 serialised fields of peft 0.21.2


def norm(v):
    """Comparable plain form: enums -> value, dataclasses -> dict, sets -> sorted lists."""
    if isinstance(v, enum.Enum):
        return v.value
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return norm(dataclasses.asdict(v))
    if isinstance(v, (set, frozenset)):
        return sorted(norm(x) for x in v)
    if isinstance(v, dict):
        return {k: norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    return v


def norm_config(d):
    d = norm(dict(d))
    for key in ("target_modules", "exclude_modules"):  # order of a list target is irrelevant (PEFT makes it a set)
        if isinstance(d.get(key), list):
            d[key] = sorted(d[key])
    return d


@pytest.mark.parametrize("field", sorted(PEFT_DEFAULTS))
def test_default_equals_peft(field):
    ours = LoraConfig()
    assert hasattr(ours, field), f"LoraConfig has no field {field!r}"
    if field == "peft_version":
        assert isinstance(ours.peft_version, str) and ours.peft_version
        return
    assert norm(getattr(ours, field)) == norm(PEFT_DEFAULTS[field])


def test_to_dict_keys_equal_peft():
    assert set(LoraConfig().to_dict()) == set(PEFT_DEFAULTS)


# --------------------------------------------------------------- round trips --------------------------------

CONFIGS = {
    "default": dict(),
    "causal": dict(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
    "patterns": dict(
        target_modules=["q_proj", "k_proj"],
        rank_pattern={"q_proj": 2, r"layers\.0\..*": 4},
        alpha_pattern={"k_proj": 3.5},
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        exclude_modules=["lm_head"],
    ),
    "regex": dict(target_modules=r".*\.(q|v)_proj", exclude_modules=r".*layers\.0\..*", use_rslora=True, bias="all"),
    "all_linear": dict(target_modules="all-linear", modules_to_save=["classifier"], task_type=TaskType.SEQ_CLS),
    "inits": dict(init_lora_weights="gaussian", lora_bias=False, bias="lora_only", fan_in_fan_out=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_dict_round_trip(name):
    cfg = LoraConfig(**CONFIGS[name])
    d = cfg.to_dict()
    assert norm_config(LoraConfig(**d).to_dict()) == norm_config(d)


@pytest.mark.parametrize("name", CONFIGS)
def test_json_round_trip(name):
    cfg = LoraConfig(**CONFIGS[name])
    text = json.dumps(cfg.to_dict(), default=sorted)  # like save_pretrained: a set target_modules becomes a list
    assert norm_config(LoraConfig(**json.loads(text)).to_dict()) == norm_config(cfg.to_dict())


@pytest.mark.parametrize("name", CONFIGS)
def test_to_dict_equals_peft(name):
    ours = LoraConfig(**CONFIGS[name]).to_dict()
    theirs = peft.LoraConfig(**CONFIGS[name]).to_dict()
    ours.pop("peft_version"), theirs.pop("peft_version")
    assert norm_config(ours) == norm_config(theirs)


@pytest.mark.parametrize("name", CONFIGS)
def test_from_dict_and_json_string_round_trip(name):
    cfg = LoraConfig(**CONFIGS[name])
    expected = norm_config(cfg.to_dict())
    assert norm_config(LoraConfig.from_dict(cfg.to_dict()).to_dict()) == expected
    text = cfg.to_json_string()
    assert json.loads(text) == json.loads(json.dumps(json.loads(text), sort_keys=True))
    assert norm_config(LoraConfig.from_json_string(text).to_dict()) == expected


@pytest.mark.parametrize("name", CONFIGS)
def test_config_json_moves_between_lorakit_and_peft(name):
    ours = LoraConfig(**CONFIGS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_peft = peft.LoraConfig(**json.loads(ours.to_json_string()))
    expected = norm_config(ours.to_dict())
    got = norm_config(by_peft.to_dict())
    expected.pop("peft_version"), got.pop("peft_version")
    assert got == expected
    # and the other way round: a config dict written by peft loads into lorakit unchanged
    theirs = json.loads(json.dumps(peft.LoraConfig(**CONFIGS[name]).to_dict(), default=sorted))
    back = norm_config(LoraConfig.from_dict(theirs).to_dict())
    back.pop("peft_version")
    assert back == expected


@pytest.mark.parametrize("name", CONFIGS)
def test_config_save_pretrained_from_pretrained(name, tmp_path):
    # PEFT's public PeftConfig API: adapter_config.json in a folder, read back by lorakit and by peft
    cfg = LoraConfig(**CONFIGS[name])
    cfg.save_pretrained(str(tmp_path))
    expected = norm_config(cfg.to_dict())
    assert norm_config(LoraConfig.from_pretrained(str(tmp_path)).to_dict()) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = norm_config(peft.LoraConfig.from_pretrained(str(tmp_path)).to_dict())
    expected.pop("peft_version"), got.pop("peft_version")
    assert got == expected


# ------------------------------------------------------------------ TaskType --------------------------------


def test_task_type_values_equal_peft():
    assert {t.value for t in TaskType} == {t.value for t in peft.TaskType}
    for t in TaskType:
        assert t == t.value and isinstance(t, str)
        assert TaskType(t.value) is t


@pytest.mark.parametrize("value", [t.value for t in peft.TaskType])
def test_task_type_string_and_enum(value):
    from_str, from_enum = LoraConfig(task_type=value), LoraConfig(task_type=TaskType(value))
    assert from_str.task_type == TaskType(value) == value
    assert from_enum.task_type == from_str.task_type
    assert json.loads(json.dumps(from_enum.to_dict()))["task_type"] == value


def _tiny(kind):
    import transformers as tf

    torch.manual_seed(0)
    bert = dict(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        return tf.LlamaForCausalLM(cfg)
    if kind == "t5":
        cfg = tf.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
        return tf.T5ForConditionalGeneration(cfg)
    cls = {"bert_seq": tf.BertForSequenceClassification, "bert_tok": tf.BertForTokenClassification,
           "bert_qa": tf.BertForQuestionAnswering, "bert": tf.BertModel}[kind]
    return cls(tf.BertConfig(**bert))


TASK_CLASSES = [  # task_type, tiny model, expected class name
    ("CAUSAL_LM", "llama", "PeftModelForCausalLM"),
    ("SEQ_CLS", "bert_seq", "PeftModelForSequenceClassification"),
    ("TOKEN_CLS", "bert_tok", "PeftModelForTokenClassification"),
    ("QUESTION_ANS", "bert_qa", "PeftModelForQuestionAnswering"),
    ("SEQ_2_SEQ_LM", "t5", "PeftModelForSeq2SeqLM"),
    ("FEATURE_EXTRACTION", "bert", "PeftModelForFeatureExtraction"),
    (None, "llama", "PeftModel"),
]


@pytest.mark.parametrize("as_enum", [False, True])
@pytest.mark.parametrize("task, model_kind, cls_name", TASK_CLASSES)
def test_task_type_picks_peft_model_class(task, model_kind, cls_name, as_enum):
    task_type = TaskType(task) if (as_enum and task) else task
    model = get_peft_model(_tiny(model_kind), LoraConfig(task_type=task_type))
    assert type(model) is getattr(lorakit, cls_name)
    assert isinstance(model, lorakit.PeftModel)


# -------------------------------------------------------------------- errors --------------------------------


def names_field(msg, field):
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(field)}(?![A-Za-z0-9_])", msg) is not None


INVALID = [  # kwargs, field the message must name, text of the bad value the message must show (or None)
    (dict(r=0), "r", None),
    (dict(r=-2), "r", "-2"),
    (dict(r=2.5), "r", "2.5"),
    (dict(lora_dropout=-0.1), "lora_dropout", "-0.1"),
    (dict(lora_dropout=1.0), "lora_dropout", None),
    (dict(lora_dropout=1.5), "lora_dropout", "1.5"),
    (dict(bias="some"), "bias", "some"),
    (dict(init_lora_weights="bogus"), "init_lora_weights", "bogus"),
    (dict(layers_pattern="layers"), "layers_pattern", None),
    (dict(target_modules=r".*q_proj", layers_to_transform=[0]), "layers_to_transform", None),
    (dict(task_type="NOT_A_TASK"), "task_type", "NOT_A_TASK"),
    (dict(lora_bias=True, use_dora=True), "lora_bias", None),
    (dict(lora_bias=True, init_lora_weights="gaussian"), "lora_bias", None),
    (dict(target_modules=[]), "target_modules", None),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern", None),
    (dict(rank_pattern={"q_proj": -1}), "rank_pattern", None),
    (dict(rank_pattern={"q_proj": 2.5}), "rank_pattern", None),
    (dict(rank_pattern={"q_proj": "4"}), "rank_pattern", None),
    (dict(lora_alpha=0), "lora_alpha", None),
    (dict(lora_alpha=float("nan")), "lora_alpha", None),
    (dict(alpha_pattern={"q_proj": 0}), "alpha_pattern", None),
    (dict(alpha_pattern={"q_proj": -3.0}), "alpha_pattern", None),
    (dict(alpha_pattern={"q_proj": "16"}), "alpha_pattern", None),
]


@pytest.mark.parametrize("kwargs, field, got", INVALID, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(INVALID)])
def test_invalid_value_raises_naming_field(kwargs, field, got):
    with pytest.raises(ValueError) as info:
        LoraConfig(**kwargs)
    msg = str(info.value)
    assert names_field(msg, field), msg
    if got is not None:
        assert got in msg, msg


VALID = [
    dict(r=1),
    dict(lora_dropout=0.0),
    dict(lora_dropout=0.999),
    dict(bias="none"),
    dict(bias="all"),
    dict(bias="lora_only"),
    dict(init_lora_weights=True),
    dict(init_lora_weights=False),
    dict(init_lora_weights="gaussian"),
    dict(init_lora_weights="pissa"),
    dict(init_lora_weights="pissa_niter_4"),
    dict(init_lora_weights="olora"),
    dict(init_lora_weights="orthogonal"),
    dict(lora_bias=True),
    dict(lora_bias=True, init_lora_weights=False),
    dict(rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 0.5, "v_proj": 32}),
    dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[0, 2]),
    dict(target_modules="all-linear"),
    dict(target_modules="ALL-LINEAR"),
    dict(task_type=None),
]


@pytest.mark.parametrize("kwargs", VALID, ids=[str(i) for i in range(len(VALID))])
def test_valid_borderline_values_accepted(kwargs):
    cfg = LoraConfig(**kwargs)
    for k, v in kwargs.items():
        assert norm(getattr(cfg, k)) == norm(v) or k == "target_modules"


MISSPELT = [("rank", 8, "r"), ("lora_dropot", 0.1, "lora_dropout"), ("target_module", ["q_proj"], "target_modules"),
            ("lora_aplha", 16, "lora_alpha"), ("use_rs_lora", True, "use_rslora")]


@pytest.mark.parametrize("bad, value, good", MISSPELT)
def test_misspelt_argument(bad, value, good):
    with pytest.raises(ValueError) as info:
        LoraConfig(**{bad: value})
    assert isinstance(info.value, TypeError)
    msg = str(info.value)
    assert f"unknown argument '{bad}'" in msg, msg
    assert f"did you mean '{good}'?" in msg, msg


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 8)

    def forward(self, x):
        return self.layer(x)


LATER = [  # accepted and stored by LoraConfig, NotImplementedError at get_peft_model naming the field
    (dict(megatron_config={"tensor_model_parallel_size": 2}), "megatron_config"),
]


@pytest.mark.parametrize("kwargs, field", LATER, ids=[f"{f}-{i}" for i, (_, f) in enumerate(LATER)])
def test_later_milestone_features_not_implemented(kwargs, field):
    cfg = LoraConfig(target_modules=["layer"], **kwargs)
    assert getattr(cfg, field) is not None and getattr(cfg, field) is not False
    with pytest.raises(NotImplementedError) as info:
        get_peft_model(Net(), cfg)
    assert names_field(str(info.value), field), str(info.value)
