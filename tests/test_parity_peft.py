"""Differential tests: lorakit against the real peft 0.21.2 (the source of truth, see PEFT_CONTRACT.md).

For every row of CASES the same tiny model is built twice from one seed; one copy goes through
``peft.get_peft_model`` and the other through ``lorakit.get_peft_model`` with equal LoraConfig arguments.
The two results must agree on:

* structure: wrapper class name, module tree and train/eval flags, targeted module names, trainable/total
  parameter counts and the printed line, state-dict keys and shapes, and which parameters are trainable;
* numbers: the forward outputs at init (B = 0), then, after PEFT's adapter is made non-zero and its full
  state dict is loaded into lorakit with ``strict=True``, the outputs (eval, and train when there is no
  dropout), the gradients of every trainable parameter, and outputs on fp16/bf16 bases.

A zero adapter (B = 0 at init) would make any LoRA forward equal the base forward and hide bugs, hence
``_perturb_trainable`` on the PEFT side before the state dict is copied over.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import build, example_inputs

import lorakit

CAUSAL, SEQ_CLS, FEATURES = "CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION"
LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (id, model factory name, task_type, LoraConfig kwargs). The kwargs are deep-copied before each use:
# PEFT appends the classifier to a user's modules_to_save list in place.
CASES = [
    # target_modules=None: the per-architecture default (llama q/v, gpt2 c_attn Conv1D, bert query/value).
    ("llama-default", "llama", CAUSAL, {}),
    ("gpt2-default", "gpt2", CAUSAL, {}),  # Conv1D with fan_in_fan_out=False: forced to True
    ("bert-default", "bert", None, {}),
    ("bert-seq-cls-default", "bert_seq_cls", SEQ_CLS, {}),  # classifier joins modules_to_save
    # Explicit lists, matched as a leaf name or dot-bounded suffix.
    ("llama-all-proj-r4", "llama", CAUSAL, dict(target_modules=LLAMA_PROJ, r=4, lora_alpha=8)),
    ("llama-dot-suffix", "llama", CAUSAL, dict(target_modules=["self_attn.q_proj", "mlp.down_proj"], r=2, lora_alpha=5)),
    ("bert-features-dense", "bert", FEATURES, dict(target_modules=["query", "key", "value", "dense"])),
    # Exact full names; an exact name bypasses layers_to_transform, a leaf name does not.
    ("llama-exact-names", "llama", CAUSAL, dict(target_modules=["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"])),
    ("llama-exact-bypasses-layers", "llama", CAUSAL, dict(target_modules=["model.layers.0.self_attn.k_proj", "v_proj"], layers_to_transform=[1])),
    # A string is re.fullmatch on the full name.
    ("llama-regex", "llama", CAUSAL, dict(target_modules=r".*\.(q|v)_proj")),
    ("llama-regex-layer1-mlp-no-task", "llama", None, dict(target_modules=r"model\.layers\.1\.mlp\..*_proj")),
    # "all-linear" (any case): every Linear/Conv1D except the output embedding / classifier head.
    ("llama-all-linear", "llama", CAUSAL, dict(target_modules="all-linear")),
    ("llama-ALL-LINEAR-upper", "llama", CAUSAL, dict(target_modules="ALL-Linear", r=2)),
    ("gpt2-all-linear", "gpt2", CAUSAL, dict(target_modules="all-linear", fan_in_fan_out=True)),
    ("bert-seq-cls-all-linear", "bert_seq_cls", SEQ_CLS, dict(target_modules="all-linear")),
    ("mlp-all-linear", "mlp", None, dict(target_modules="all-linear")),
    # exclude_modules: a list matches exactly or as a suffix, a string is a fullmatch regex; excluded wins.
    ("llama-exclude-list", "llama", CAUSAL, dict(target_modules="all-linear", exclude_modules=["o_proj", "model.layers.0.mlp.down_proj"])),
    ("llama-exclude-regex", "llama", CAUSAL, dict(target_modules=["q_proj", "v_proj", "up_proj"], exclude_modules=r".*layers\.1\.self_attn\..*")),
    # layers_to_transform (int or list), with and without layers_pattern (str or list).
    ("llama-layers-int", "llama", CAUSAL, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1)),
    ("llama-layers-pattern", "llama", CAUSAL, dict(target_modules=LLAMA_PROJ[:4], layers_to_transform=[0], layers_pattern="layers")),
    ("gpt2-layers-pattern", "gpt2", CAUSAL, dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern="h", fan_in_fan_out=True)),
    ("llama-layers-pattern-list", "llama", FEATURES, dict(target_modules=["q_proj"], layers_to_transform=[0, 1], layers_pattern=["h", "layers"])),
    # pooler.dense has no layer index, so it is not targeted.
    ("bert-layers-pattern-list", "bert", None, dict(target_modules=["query", "value", "dense"], layers_to_transform=[0], layers_pattern=["layer"])),
    # rank_pattern / alpha_pattern: first matching key (dict order) wins; regex keys.
    ("llama-rank-alpha-pattern", "llama", CAUSAL, dict(
        target_modules=LLAMA_PROJ, r=4, lora_alpha=8,
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3, r"layers\.0\..*proj": 16},
    )),
    ("mlp-rank-alpha-pattern", "mlp", None, dict(
        target_modules=["emb", "conv", "lin1", "lin2"], rank_pattern={"conv": 1, "emb": 5}, alpha_pattern={"lin2": 1},
    )),
    ("llama-rslora", "llama", CAUSAL, dict(use_rslora=True, r=16, lora_alpha=8)),
    ("mlp-rslora-bias-all", "mlp", None, dict(target_modules=["emb", "conv", "lin1"], use_rslora=True, r=4, bias="all")),
    # lora_bias: lora_B gets a bias (llama Linear has none: PEFT warns, still adds it).
    ("llama-lora-bias", "llama", CAUSAL, dict(target_modules=["q_proj", "down_proj"], lora_bias=True)),
    ("mlp-lora-bias-conv-linear", "mlp", None, dict(target_modules=["conv", "lin1"], lora_bias=True, r=3)),
    # bias="all" / "lora_only": which base biases become trainable.
    ("gpt2-bias-all", "gpt2", CAUSAL, dict(bias="all", fan_in_fan_out=True)),
    ("bert-bias-lora-only", "bert", None, dict(bias="lora_only", target_modules=["query", "value", "intermediate.dense"])),
    # modules_to_save: a trainable copy; also with SEQ_CLS, which adds its classifier to the user's list.
    ("llama-modules-to-save", "llama", CAUSAL, dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "input_layernorm"])),
    ("bert-seq-cls-modules-to-save", "bert_seq_cls", SEQ_CLS, dict(target_modules=["query", "value"], modules_to_save=["pooler.dense"])),
    ("bert-seq-cls-classifier-not-lora", "bert_seq_cls", SEQ_CLS, dict(target_modules=["query", "classifier"])),  # saved wins
    ("bert-seq-cls-no-task", "bert_seq_cls", None, dict(target_modules=["query", "value"])),  # no classifier copy
    ("gpt2-modules-to-save-tied-wte", "gpt2", CAUSAL, dict(modules_to_save=["wte"], fan_in_fan_out=True)),
    ("llama-embedding-and-saved-lm-head", "llama", CAUSAL, dict(
        target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"], init_lora_weights="gaussian",
    )),
    # init_lora_weights variants and dropout.
    ("llama-init-false", "llama", CAUSAL, dict(init_lora_weights=False, r=3, lora_alpha=7)),
    ("llama-init-gaussian", "llama", CAUSAL, dict(init_lora_weights="gaussian", target_modules=["k_proj", "gate_proj"])),
    ("llama-dropout", "llama", CAUSAL, dict(lora_dropout=0.1, target_modules=["q_proj", "up_proj"])),
    ("mlp-dropout-conv", "mlp", None, dict(lora_dropout=0.25, target_modules=["conv", "lin2"])),
    # GPT-2 Conv1D (weight stored (in, out)).
    ("gpt2-conv1d-fan-in-fan-out", "gpt2", CAUSAL, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, r=4, lora_alpha=16)),
    ("gpt2-conv1d-fan-in-fan-out-false", "gpt2", CAUSAL, dict(target_modules=["c_fc"], fan_in_fan_out=False)),
    # Embedding targets (incl. GPT-2's wte, tied with lm_head) and the plain MLP's Embedding + Conv2d + Linear.
    ("gpt2-embedding-wte", "gpt2", CAUSAL, dict(target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
    ("bert-embedding", "bert", None, dict(target_modules=["word_embeddings", "query"], r=4)),
    ("mlp-emb-conv-linear", "mlp", None, dict(target_modules=["emb", "conv", "lin1"], r=2, lora_alpha=4)),
    # r / alpha variety: r=1, r larger than the layer's width.
    ("llama-r1-alpha1", "llama", CAUSAL, dict(target_modules=["o_proj"], r=1, lora_alpha=1)),
    ("llama-r40-alpha3", "llama", CAUSAL, dict(target_modules=["q_proj", "down_proj"], r=40, lora_alpha=3)),
]

CASE_PARAMS = [pytest.param(model, task, kwargs, id=case_id) for case_id, model, task, kwargs in CASES]

# Low-precision bases: (id, model, task_type, LoraConfig kwargs, base dtype).
DTYPE_CASES = [
    ("llama-bf16", "llama", CAUSAL, dict(target_modules="all-linear"), torch.bfloat16),
    ("llama-fp16-modules-to-save", "llama", CAUSAL, dict(modules_to_save=["lm_head"]), torch.float16),
    ("gpt2-fp16", "gpt2", CAUSAL, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), torch.float16),
    ("bert-features-bf16", "bert", FEATURES, dict(target_modules=["query", "value", "word_embeddings"]), torch.bfloat16),
    ("bert-seq-cls-fp16", "bert_seq_cls", SEQ_CLS, dict(target_modules="all-linear", lora_alpha=32), torch.float16),
    ("mlp-bf16", "mlp", None, dict(target_modules=["emb", "conv", "lin1"], lora_alpha=32), torch.bfloat16),
]

# Tolerances by dtype. A correct but differently ordered fp16/bf16 computation is off by ~3e-3 at most on
# these tiny models (measured against fp32), while a 2% error in the LoRA scaling fails every output case
# here, fp32 and low precision alike (checked by scaling lorakit's `scaling` dicts by 1.02).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}


def _make_pair(model_name: str, task_type: str | None, kwargs: dict, dtype: torch.dtype = torch.float32):
    """The same seeded model wrapped once by peft and once by lorakit, with equal configs."""
    wrapped = []
    for lib in (peft, lorakit):
        torch.manual_seed(0)  # LoRA init draws from the global RNG: make each case independent of test order
        base = build(model_name, seed=0).to(dtype)
        config = lib.LoraConfig(task_type=task_type, **copy.deepcopy(kwargs))
        wrapped.append(lib.get_peft_model(base, config))
    return wrapped


def _perturb_trainable(model: torch.nn.Module, seed: int = 7) -> None:
    """Add seeded noise to every trainable parameter (LoRA A/B, lora_bias, modules_to_save copies, biases).

    Makes the adapter non-zero and the trainable copies differ from their originals, so a forward that
    ignores any of them disagrees with PEFT.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen).to(param.dtype))


def _outputs(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    """Every tensor field of a model's output (a bare tensor for the plain MLP)."""
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return {"output": out}
    return {key: value for key, value in out.items() if isinstance(value, torch.Tensor)}


def _load_peft_adapter_into_lorakit(ref, ours) -> None:
    """Make PEFT's adapter non-zero, then copy PEFT's full state dict into lorakit (strict)."""
    _perturb_trainable(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    torch.testing.assert_close(ours.state_dict(), ref.state_dict(), atol=0, rtol=0)  # the copy really landed


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("model_name, task_type, kwargs", CASE_PARAMS)
def test_structure_matches_peft(model_name, task_type, kwargs, capsys):
    ref, ours = _make_pair(model_name, task_type, kwargs)

    assert type(ours).__name__ == type(ref).__name__
    # Same module tree (names) and train/eval flags: new LoRA submodules start in train mode in PEFT.
    assert {n: m.training for n, m in ours.named_modules()} == {n: m.training for n, m in ref.named_modules()}
    assert sorted(ours.base_model.targeted_module_names) == sorted(ref.base_model.targeted_module_names)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()

    capsys.readouterr()
    ref.print_trainable_parameters()
    ref_line = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == ref_line

    ref_state, ours_state = ref.state_dict(), ours.state_dict()
    assert sorted(ours_state) == sorted(ref_state)
    assert {k: tuple(v.shape) for k, v in ours_state.items()} == {k: tuple(v.shape) for k, v in ref_state.items()}
    assert _trainable_names(ours) == _trainable_names(ref)


@pytest.mark.parametrize("model_name, task_type, kwargs", CASE_PARAMS)
def test_outputs_match_peft(model_name, task_type, kwargs):
    ref, ours = _make_pair(model_name, task_type, kwargs)
    inputs = example_inputs(model_name)
    tol = TOL[torch.float32]

    # Freshly initialised with B = 0 (True, "gaussian"; A = 0 for Embedding), both give the base output.
    ref.eval()
    ours.eval()
    if kwargs.get("init_lora_weights", True) is not False:
        with torch.no_grad():
            torch.testing.assert_close(_outputs(ours, inputs), _outputs(ref, inputs), **tol)

    _load_peft_adapter_into_lorakit(ref, ours)

    # Eval mode (dropout off), with gradients.
    ref_out, ours_out = _outputs(ref, inputs), _outputs(ours, inputs)
    with ref.disable_adapter(), torch.no_grad():  # guard on the case itself: void if the adapter changes nothing
        assert any(not torch.allclose(v, ref_out[k], **tol) for k, v in _outputs(ref, inputs).items())
    torch.testing.assert_close(ours_out, ref_out, **tol)

    # Every trainable parameter gets the same gradient from a fixed random projection of the outputs.
    weights = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) for k, v in ref_out.items()}
    for out in (ref_out, ours_out):
        sum((out[k].float() * weights[k]).sum() for k in out).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    torch.testing.assert_close(ours_grads, ref_grads, **tol)

    # Train mode must agree too when no dropout makes it random (the tiny bases have all dropouts at 0).
    if kwargs.get("lora_dropout", 0.0) == 0.0:
        ref.train()
        ours.train()
        with torch.no_grad():
            torch.testing.assert_close(_outputs(ours, inputs), _outputs(ref, inputs), **tol)


@pytest.mark.parametrize(
    "model_name, task_type, kwargs, dtype",
    [pytest.param(model, task, kwargs, dtype, id=case_id) for case_id, model, task, kwargs, dtype in DTYPE_CASES],
)
def test_low_precision_base_matches_peft(model_name, task_type, kwargs, dtype):
    ref, ours = _make_pair(model_name, task_type, kwargs, dtype)

    # Adapter weights are upcast to float32 (autocast_adapter_dtype); everything else keeps PEFT's dtype.
    ref_state, ours_state = ref.state_dict(), ours.state_dict()
    assert {k: v.dtype for k, v in ours_state.items()} == {k: v.dtype for k, v in ref_state.items()}
    lora_keys = [k for k in ours_state if ".lora_" in k]
    assert lora_keys, "the case must create LoRA weights"
    assert {ours_state[k].dtype for k in lora_keys} == {torch.float32}

    _load_peft_adapter_into_lorakit(ref, ours)
    inputs = example_inputs(model_name)
    with torch.no_grad():
        ref_out, ours_out = _outputs(ref, inputs), _outputs(ours, inputs)
    assert {k: v.dtype for k, v in ours_out.items()} == {k: v.dtype for k, v in ref_out.items()}
    torch.testing.assert_close(ours_out, ref_out, **TOL[dtype])
