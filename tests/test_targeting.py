"""Which modules get LoRA (PEFT_CONTRACT section 4): hand-written expected name sets, checked against both
lorakit and peft 0.21.2 on small models; per-module r / alpha from rank_pattern / alpha_pattern; loud errors."""

import math
import warnings

import peft
import pytest
import torch
import torch.nn as nn
import transformers as tf

from lorakit import LoraConfig, get_peft_model
from lorakit.errors import LoraWarning
from lorakit.layer import LoraLayer

# ------------------------------------------------------------------ models ----------------------------------


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, h):
        return self.o_proj(self.q_proj(h) + self.k_proj(h) + self.v_proj(h))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.proj = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 8)

    def forward(self, h):
        return self.proj(self.fc2(torch.relu(self.fc1(h))))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp, self.norm = Attn(), MLP(), nn.LayerNorm(8)

    def forward(self, h):
        return self.norm(h + self.mlp(h + self.self_attn(h)))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 8)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.norm = nn.LayerNorm(8)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for block in self.layers:
            h = block(h)
        return self.norm(h)


class Toy(nn.Module):
    """A plain nn.Module shaped like a decoder: model.layers.{0,1,2}.{self_attn.[qkvo]_proj, mlp.{fc1,fc2,proj}, norm}."""

    def __init__(self):
        super().__init__()
        self.model, self.lm_head = Inner(), nn.Linear(8, 32)

    def forward(self, ids):
        return self.lm_head(self.model(ids))


def make(kind):
    torch.manual_seed(0)
    if kind == "toy":
        return Toy()
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                                  num_attention_heads=2, num_key_value_heads=1))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=32, n_embd=8, n_layer=2, n_head=2, n_positions=16,
                                                bos_token_id=0, eos_token_id=0))
    if kind == "bert_seq":
        return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2,
                                                              num_attention_heads=2, intermediate_size=16))
    if kind == "distilbert":  # a model_type with no default target_modules
        return tf.DistilBertModel(tf.DistilBertConfig(vocab_size=32, dim=8, n_layers=1, n_heads=2, hidden_dim=16))
    raise KeyError(kind)


def T(i, leaf):
    return f"model.layers.{i}.{leaf}"


ATTN = [f"self_attn.{n}_proj" for n in "qkvo"]
MLP_ = ["mlp.fc1", "mlp.fc2", "mlp.proj"]
LLAMA = [f"self_attn.{n}_proj" for n in "qkvo"] + [f"mlp.{n}_proj" for n in ("gate", "up", "down")]
GPT2 = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
BERT = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense"]


def each(layers, leaves, fmt=T):
    return {fmt(i, leaf) for i in layers for leaf in leaves}


def gpt2(i, leaf):
    return f"transformer.h.{i}.{leaf}"


def bert(i, leaf):
    return f"bert.encoder.layer.{i}.{leaf}"


# id -> (model kind, LoraConfig kwargs, expected targeted module names, written by hand)
CASES = {
    "suffix_is_dot_bounded": ("toy", dict(target_modules=["proj"]), each(range(3), ["mlp.proj"])),
    "suffix_list": ("toy", dict(target_modules=["q_proj", "v_proj"]), each(range(3), ["self_attn.q_proj", "self_attn.v_proj"])),
    "suffix_partly_missing": ("toy", dict(target_modules=["q_proj", "nothere"]), each(range(3), ["self_attn.q_proj"])),
    "exact_full_name": ("toy", dict(target_modules=[T(1, "self_attn.q_proj")]), {T(1, "self_attn.q_proj")}),
    "exact_top_level": ("toy", dict(target_modules=["lm_head"]), {"lm_head"}),
    "embedding_and_linear": ("toy", dict(target_modules=["embed_tokens", "q_proj"]),
                             {"model.embed_tokens"} | each(range(3), ["self_attn.q_proj"])),
    "regex_full_match": ("toy", dict(target_modules=r"model\.layers\.[01]\.self_attn\.(q|v)_proj"),
                         each(range(2), ["self_attn.q_proj", "self_attn.v_proj"])),
    "regex_suffix": ("toy", dict(target_modules=r".*\.fc1"), each(range(3), ["mlp.fc1"])),
    "exclude_list_suffix": ("toy", dict(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]),
                            each(range(3), ["self_attn.q_proj"])),
    "exclude_list_exact": ("toy", dict(target_modules=["q_proj"], exclude_modules=[T(0, "self_attn.q_proj")]),
                           each([1, 2], ["self_attn.q_proj"])),
    "exclude_is_dot_bounded": ("toy", dict(target_modules=["q_proj", "proj"], exclude_modules=["proj"]),
                               each(range(3), ["self_attn.q_proj"])),
    "exclude_regex": ("toy", dict(target_modules=["q_proj"], exclude_modules=r".*layers\.1\..*"),
                      each([0, 2], ["self_attn.q_proj"])),
    "exclude_regex_is_full_match": ("toy", dict(target_modules=["q_proj"], exclude_modules=r"layers\.1"),
                                    each(range(3), ["self_attn.q_proj"])),
    "exclude_wins_over_exact": ("toy", dict(target_modules=[T(0, "self_attn.q_proj"), "v_proj"], exclude_modules=["q_proj"]),
                                each(range(3), ["self_attn.v_proj"])),
    "all_linear_plain_module": ("toy", dict(target_modules="all-linear"), each(range(3), ATTN + MLP_) | {"lm_head"}),
    "all_linear_any_case": ("toy", dict(target_modules="All-Linear", exclude_modules=["lm_head"]), each(range(3), ATTN + MLP_)),
    "layers_int": ("toy", dict(target_modules=["q_proj"], layers_to_transform=1), {T(1, "self_attn.q_proj")}),
    "layers_list": ("toy", dict(target_modules=["q_proj", "fc1"], layers_to_transform=[0, 2]),
                    each([0, 2], ["self_attn.q_proj", "mlp.fc1"])),
    "layers_pattern": ("toy", dict(target_modules=["q_proj"], layers_to_transform=[0, 2], layers_pattern="layers"),
                       each([0, 2], ["self_attn.q_proj"])),
    "layers_pattern_list": ("toy", dict(target_modules=["v_proj"], layers_to_transform=2, layers_pattern=["blocks", "layers"]),
                            {T(2, "self_attn.v_proj")}),
    "exact_name_bypasses_layer_filter": ("toy", dict(target_modules=[T(1, "self_attn.q_proj"), "v_proj"], layers_to_transform=[0]),
                                         {T(1, "self_attn.q_proj"), T(0, "self_attn.v_proj")}),
    "modules_to_save_not_targeted": ("toy", dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]),
                                     each(range(3), ["self_attn.q_proj"])),
    "llama_default": ("llama", dict(), each(range(2), ["self_attn.q_proj", "self_attn.v_proj"])),
    "llama_all_linear_skips_lm_head": ("llama", dict(target_modules="all-linear"), each(range(2), LLAMA)),
    "llama_default_layer_1": ("llama", dict(layers_to_transform=[1]), each([1], ["self_attn.q_proj", "self_attn.v_proj"])),
    "gpt2_default": ("gpt2", dict(), each(range(2), ["attn.c_attn"], gpt2)),
    "gpt2_all_linear_skips_lm_head": ("gpt2", dict(target_modules="all-linear"), each(range(2), GPT2, gpt2)),
    "gpt2_layers_pattern_h": ("gpt2", dict(target_modules=["c_proj"], layers_to_transform=0, layers_pattern="h"),
                              each([0], ["attn.c_proj", "mlp.c_proj"], gpt2)),
    "bert_default": ("bert_seq", dict(task_type="SEQ_CLS"), each(range(2), BERT[0:3:2], bert)),
    "bert_all_linear_skips_classifier": ("bert_seq", dict(task_type="SEQ_CLS", target_modules="all-linear"),
                                         each(range(2), BERT, bert) | {"bert.pooler.dense"}),
    "bert_classifier_is_saved_not_targeted": ("bert_seq", dict(task_type="SEQ_CLS", target_modules=["query", "classifier"]),
                                              each(range(2), ["attention.self.query"], bert)),
}


def lora_layer_names(model, layer_cls):
    return {n[len("base_model.model."):] for n, m in model.named_modules() if isinstance(m, layer_cls)}


def targeted(lib, kind, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. GPT-2 Conv1D with fan_in_fan_out=False
        if lib == "peft":
            model = peft.get_peft_model(make(kind), peft.LoraConfig(**kwargs))
            layer_cls = peft.tuners.lora.LoraLayer
        else:
            model = get_peft_model(make(kind), LoraConfig(**kwargs))
            layer_cls = LoraLayer
    names = set(model.base_model.targeted_module_names)
    assert lora_layer_names(model, layer_cls) == names
    return model, names


@pytest.mark.parametrize("lib", ["lorakit", "peft"])
@pytest.mark.parametrize("case", CASES)
def test_targeted_names(case, lib):
    kind, kwargs, expected = CASES[case]
    _, names = targeted(lib, kind, kwargs)
    assert names == expected


@pytest.mark.parametrize("kind, kwargs, path", [
    ("toy", dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]), "lm_head"),
    ("bert_seq", dict(task_type="SEQ_CLS", target_modules="all-linear"), "classifier"),
])
def test_modules_to_save_wrapped_without_lora(kind, kwargs, path):
    model, _ = targeted("lorakit", kind, kwargs)
    wrapper = model.base_model.model.get_submodule(path)
    assert hasattr(wrapper, "original_module") and "default" in wrapper.modules_to_save
    assert not any(isinstance(m, LoraLayer) for m in wrapper.modules())
    assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())


# ------------------------------------------------------- rank_pattern / alpha_pattern -----------------------

QV = each(range(3), ["self_attn.q_proj", "self_attn.v_proj"])


def per_module(default, **overrides):
    """{name: (r, alpha)} for q/v in all 3 layers: default (r, alpha) unless overridden by name."""
    out = {n: default for n in QV}
    out.update({T(*k.split(":")): v for k, v in overrides.items()})
    return out


# id -> (rank_pattern, alpha_pattern, expected {module: (r, alpha)}), base r=8, lora_alpha=16
PATTERNS = {
    "first_key_wins": ({"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 4}, {},
                       per_module((8, 16), **{f"{i}:self_attn.q_proj": (2, 16) for i in range(3)})),
    "first_key_wins_reversed": ({r"layers\.0\.self_attn\.q_proj": 4, "q_proj": 2}, {},
                                per_module((8, 16), **{"0:self_attn.q_proj": (4, 16), "1:self_attn.q_proj": (2, 16),
                                                       "2:self_attn.q_proj": (2, 16)})),
    "alpha_regex_and_suffix": ({}, {r"layers\.1\..*": 4, "v_proj": 32},
                               per_module((8, 16), **{"1:self_attn.q_proj": (8, 4), "1:self_attn.v_proj": (8, 4),
                                                      "0:self_attn.v_proj": (8, 32), "2:self_attn.v_proj": (8, 32)})),
    "full_name_key": ({T(2, "self_attn.v_proj"): 3}, {T(2, "self_attn.v_proj"): 5},
                      per_module((8, 16), **{"2:self_attn.v_proj": (3, 5)})),
    "both": ({"v_proj": 4}, {"v_proj": 2.5, "q_proj": 1},
             per_module((8, 1), **{f"{i}:self_attn.v_proj": (4, 2.5) for i in range(3)})),
}


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("lib", ["lorakit", "peft"])
@pytest.mark.parametrize("case", PATTERNS)
def test_rank_alpha_pattern(case, lib, rslora):
    rank_pattern, alpha_pattern, expected = PATTERNS[case]
    kwargs = dict(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, use_rslora=rslora,
                  rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    model, names = targeted(lib, "toy", kwargs)
    assert names == set(expected)
    for name, (r, alpha) in expected.items():
        layer = model.base_model.model.get_submodule(name)
        assert layer.r["default"] == r, name
        assert layer.lora_alpha["default"] == alpha, name
        assert layer.scaling["default"] == pytest.approx(alpha / math.sqrt(r) if rslora else alpha / r), name
        assert tuple(layer.lora_A["default"].weight.shape) == (r, 8), name
        assert tuple(layer.lora_B["default"].weight.shape) == (8, r), name


@pytest.mark.parametrize("field, key", [("rank_pattern", "nomatch"), ("rank_pattern", "proj"), ("alpha_pattern", "nomatch")])
def test_pattern_key_matching_nothing_warns(field, key):
    with pytest.warns(LoraWarning, match=key):
        model = get_peft_model(Toy(), LoraConfig(target_modules=["q_proj"], **{field: {key: 2}}))
    for name in each(range(3), ["self_attn.q_proj"]):
        layer = model.base_model.model.get_submodule(name)
        assert (layer.r["default"], layer.lora_alpha["default"]) == (8, 8)


# -------------------------------------------------------------------- errors --------------------------------

LEAF_LINEARS = ["q_proj", "v_proj", "fc1", "lm_head"]


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["nothere"]),
    dict(target_modules="q_proj"),  # a string is a full-name regex: matches nothing here
    dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"),
    dict(target_modules=["q_proj"], layers_to_transform=[7]),
], ids=["list", "regex", "layers_pattern", "layers_to_transform"])
def test_not_found_lists_usable_names(kwargs):
    with pytest.raises(ValueError) as info:
        get_peft_model(Toy(), LoraConfig(**kwargs))
    msg = str(info.value)
    assert "not found" in msg, msg
    for leaf in LEAF_LINEARS:
        assert leaf in msg, f"{leaf!r} not suggested in: {msg}"


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["q_proj"], exclude_modules=["q_proj"]),
    dict(target_modules=[T(0, "self_attn.q_proj")], exclude_modules=r".*"),
    dict(target_modules="all-linear", exclude_modules=r".*(proj|fc\d|lm_head)"),
], ids=["list", "regex", "all_linear"])
def test_all_excluded_mentions_exclude_modules(kwargs):
    with pytest.raises(ValueError, match="exclude_modules"):
        get_peft_model(Toy(), LoraConfig(**kwargs))


@pytest.mark.parametrize("target, paths", [
    (["norm"], ["model.layers.0.norm", "model.layers.1.norm", "model.layers.2.norm", "model.norm"]),
    ([T(1, "mlp")], [T(1, "mlp")]),
], ids=["layernorm", "container"])
def test_unsupported_type_names_module_and_supported_types(target, paths):
    with pytest.raises(ValueError) as info:
        get_peft_model(Toy(), LoraConfig(target_modules=target))
    msg = str(info.value)
    assert any(p in msg for p in paths), msg
    for kind in ("Linear", "Embedding", "Conv2d"):
        assert kind in msg, msg


@pytest.mark.parametrize("kind", ["toy", "distilbert"])
def test_no_default_targets_for_unknown_architecture(kind):
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(make(kind), LoraConfig())
