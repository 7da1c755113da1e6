"""Adapter folders move between lorakit and the real peft 0.21.2, in both directions (PEFT_CONTRACT.md sections 2, 6).

For every row of CASES the same tiny model is built twice from one seed and wrapped once by peft and once by
lorakit with equal LoraConfig arguments. Every adapter tensor (``lora_*``) is then set to seeded noise drawn
from its name, and every other trainable tensor (modules_to_save copies, biases under ``bias=``) gets such
noise added, so the two in-memory models hold the same non-zero adapter without copying state between them.
Each library saves its model; then

* lorakit loads peft's folder and peft loads lorakit's folder, each onto a fresh identical base, and the
  outputs (eval mode, full tensors) equal peft's in-memory outputs to 1e-5;
* the two ``adapter_model.safetensors`` hold the same keys, shapes, dtypes and values, with metadata
  ``{"format": "pt"}``;
* the two ``adapter_config.json`` have the same JSON keys and equal values for the fields that decide what is
  loaded (``peft_version`` differs on purpose: lorakit writes ``0.21.2+lorakit.<version>``).

Further tests cover several adapters in one folder (``<folder>/<name>/``), ``safe_serialization=False``
(``adapter_model.bin``) and ``is_trainable`` on load.
"""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path

import peft
import pytest
import torch
from models import build, example_inputs
from safetensors import safe_open

import lorakit

CAUSAL, SEQ_CLS = "CAUSAL_LM", "SEQ_CLS"
LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = dict(atol=1e-5, rtol=1e-5)

# (id, model factory name, task_type, LoraConfig kwargs); kwargs are deep-copied before use (PEFT appends the
# classifier to a user's modules_to_save list in place).
CASES = [
    ("llama-plain", "llama", CAUSAL, dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)),
    ("llama-rslora", "llama", CAUSAL, dict(target_modules=["q_proj", "k_proj", "o_proj"], use_rslora=True, r=8,
                                           lora_alpha=4)),
    ("llama-rank-alpha-pattern", "llama", CAUSAL, dict(
        target_modules=LLAMA_PROJ, r=4, lora_alpha=8,
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\..*proj": 16},  # no key overlap: see the pattern test below
    )),
    ("llama-modules-to-save", "llama", CAUSAL, dict(target_modules=["q_proj"], modules_to_save=["lm_head",
                                                                                               "input_layernorm"])),
    ("llama-lora-bias", "llama", CAUSAL, dict(target_modules=["q_proj", "down_proj"], lora_bias=True)),
    # Embedding targets: save_embedding_layers="auto" also writes the base embedding weight.
    ("llama-embed-tokens", "llama", CAUSAL, dict(target_modules=["embed_tokens", "q_proj"])),
    ("llama-embed-tokens-no-task", "llama", None, dict(target_modules=["embed_tokens", "v_proj"], r=2)),
    ("gpt2-wte", "gpt2", CAUSAL, dict(target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
    # GPT-2 Conv1D (weight stored (in, out)); fan_in_fan_out=False is forced to True, on disk too.
    ("gpt2-conv1d", "gpt2", CAUSAL, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, r=4,
                                         lora_alpha=16)),
    ("gpt2-conv1d-forced-fan-in-fan-out", "gpt2", CAUSAL, dict(target_modules=["c_fc"], fan_in_fan_out=False)),
    # bias="all" writes every bias; "lora_only" the biases of the LoRA layers.
    ("gpt2-bias-all", "gpt2", CAUSAL, dict(bias="all", fan_in_fan_out=True)),
    ("bert-bias-lora-only", "bert", None, dict(bias="lora_only", target_modules=["query", "value",
                                                                                 "intermediate.dense"])),
    ("mlp-bias-all-rslora", "mlp", None, dict(target_modules=["emb", "conv", "lin1"], use_rslora=True, r=4,
                                              bias="all")),
    # Task types: SEQ_CLS adds the classifier to modules_to_save (on disk as well).
    ("bert-seq-cls", "bert_seq_cls", SEQ_CLS, dict(target_modules=["query", "value"])),
    ("bert-seq-cls-modules-to-save", "bert_seq_cls", SEQ_CLS, dict(target_modules=["query", "value"],
                                                                   modules_to_save=["pooler.dense"])),
    # "all-linear" is saved as the expanded set of module names.
    ("llama-all-linear", "llama", CAUSAL, dict(target_modules="all-linear", r=2)),
    ("bert-seq-cls-all-linear", "bert_seq_cls", SEQ_CLS, dict(target_modules="all-linear")),
    ("llama-regex-no-task", "llama", None, dict(target_modules=r".*\.(q|v)_proj")),
    # A plain nn.Module: Embedding + Conv2d + Linear, auto_mapping names the class.
    ("mlp-emb-conv-linear", "mlp", None, dict(target_modules=["emb", "conv", "lin1"], r=2, lora_alpha=4,
                                              modules_to_save=["lin2"])),
]
CASE_IDS = [case[0] for case in CASES]
CASE_BY_ID = {case[0]: case[1:] for case in CASES}

# Config fields whose values must agree (target_modules as a set, modules_to_save as a set).
MATTERS = ["peft_type", "r", "lora_alpha", "target_modules", "modules_to_save", "bias", "use_rslora",
           "rank_pattern", "alpha_pattern", "task_type", "fan_in_fan_out", "inference_mode", "lora_bias",
           "use_dora", "init_lora_weights", "layers_to_transform", "layers_pattern", "exclude_modules",
           "lora_dropout", "base_model_name_or_path", "revision"]


# ---- helpers ----------------------------------------------------------------------------------------------------
def _name_noise(name: str, shape: torch.Size, scale: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return scale * torch.randn(shape, generator=gen)


def _perturb(model: torch.nn.Module) -> None:
    """Set every LoRA tensor (of any adapter) to noise seeded by its name; add such noise to every
    modules_to_save copy (of any adapter) and to the other trainable tensors (biases under ``bias=``).

    The result depends only on parameter names and the base weights, so two libraries with the same names
    end up with the same non-zero adapter whatever their init draws were.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(_name_noise(name, param.shape, 0.2))
            elif ".modules_to_save." in name or param.requires_grad:
                param.add_(_name_noise(name, param.shape, 0.1))


def _outputs(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    """Every tensor field of a model's output (a bare tensor for the plain MLP), without gradients."""
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return {"output": out}
    return {key: value for key, value in out.items() if isinstance(value, torch.Tensor)}


def _wrap(lib, model_name: str, task_type: str | None, kwargs: dict):
    torch.manual_seed(0)
    model = lib.get_peft_model(build(model_name, seed=0), lib.LoraConfig(task_type=task_type,
                                                                         **copy.deepcopy(kwargs)))
    _perturb(model)
    return model.eval()


def _tensor_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {key: f.get_tensor(key) for key in f.keys()}


def _config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _tree(folder: Path) -> list[str]:
    """Files under ``folder`` (relative paths), less the README.md model card PEFT also writes."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "README.md")


def _as_set(value):
    return set(value) if isinstance(value, list) else value


def _assert_same_tensor_files(ours: Path, ref: Path) -> None:
    """Same keys, shapes, dtypes, values and metadata ({"format": "pt"}) in two safetensors files."""
    ours_meta, ours_tensors = _tensor_file(ours)
    ref_meta, ref_tensors = _tensor_file(ref)
    assert ref_meta == {"format": "pt"}
    assert ours_meta == ref_meta
    assert sorted(ours_tensors) == sorted(ref_tensors)
    assert {k: (tuple(v.shape), v.dtype) for k, v in ours_tensors.items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in ref_tensors.items()}
    torch.testing.assert_close(ours_tensors, ref_tensors, atol=0, rtol=0)


def _assert_same_config(ours: dict, ref: dict) -> None:
    """lorakit's adapter_config.json against PEFT's: exactly PEFT's keys, equal values where it matters."""
    assert sorted(ours) == sorted(ref)
    for field in MATTERS:
        normalise = _as_set if field in ("target_modules", "modules_to_save") else (lambda v: v)
        assert normalise(ours[field]) == normalise(ref[field]), field
    assert ours["inference_mode"] is True
    if ref["task_type"] is None:
        assert ours["auto_mapping"] == ref["auto_mapping"]
    assert ref["peft_version"] == peft.__version__
    assert ours["peft_version"] == f"{peft.__version__}+lorakit.{lorakit.__version__}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per case id (built on first use): peft's and lorakit's folders for the same adapter, and peft's outputs."""
    cache: dict[str, dict] = {}

    def get(case_id: str) -> dict:
        if case_id not in cache:
            model_name, task_type, kwargs = CASE_BY_ID[case_id]
            inputs = example_inputs(model_name)
            ref = _wrap(peft, model_name, task_type, kwargs)
            ours = _wrap(lorakit, model_name, task_type, kwargs)
            # Sanity: the setup gives both libraries the same weights, and the adapter changes the output.
            torch.testing.assert_close(ours.state_dict(), ref.state_dict(), atol=0, rtol=0)
            ref_out = _outputs(ref, inputs)
            with ref.disable_adapter():
                base_out = _outputs(ref, inputs)
            assert any(not torch.allclose(v, ref_out[k], **TOL) for k, v in base_out.items())
            root = tmp_path_factory.mktemp(case_id)
            ref.save_pretrained(root / "peft")
            ours.save_pretrained(root / "lorakit")
            cache[case_id] = dict(model_name=model_name, inputs=inputs, ref_out=ref_out, class_name=type(ref).__name__,
                                  peft_dir=root / "peft", lorakit_dir=root / "lorakit")
        return cache[case_id]

    return get


# ---- one adapter, per configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_peft_folder_loads_in_lorakit(case_id, saved):
    case = saved(case_id)
    loaded = lorakit.PeftModel.from_pretrained(build(case["model_name"], seed=0), case["peft_dir"])
    assert type(loaded).__name__ == case["class_name"]  # the task class named by the saved task_type
    torch.testing.assert_close(_outputs(loaded, case["inputs"]), case["ref_out"], **TOL)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_lorakit_folder_loads_in_peft(case_id, saved):
    case = saved(case_id)
    loaded = peft.PeftModel.from_pretrained(build(case["model_name"], seed=0), case["lorakit_dir"])
    torch.testing.assert_close(_outputs(loaded, case["inputs"]), case["ref_out"], **TOL)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_lorakit_folder_loads_in_lorakit(case_id, saved):
    case = saved(case_id)
    loaded = lorakit.PeftModel.from_pretrained(build(case["model_name"], seed=0), case["lorakit_dir"])
    torch.testing.assert_close(_outputs(loaded, case["inputs"]), case["ref_out"], **TOL)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_same_files_as_peft(case_id, saved):
    case = saved(case_id)
    ours, ref = case["lorakit_dir"], case["peft_dir"]
    assert _tree(ours) == _tree(ref) == ["adapter_config.json", "adapter_model.safetensors"]
    _assert_same_tensor_files(ours / "adapter_model.safetensors", ref / "adapter_model.safetensors")
    _assert_same_config(_config(ours), _config(ref))


def test_embedding_target_saves_base_embedding(saved):
    """save_embedding_layers="auto" with embed_tokens targeted: the base embedding weight is in both files."""
    case = saved("llama-embed-tokens")
    for folder in (case["peft_dir"], case["lorakit_dir"]):
        _, tensors = _tensor_file(folder / "adapter_model.safetensors")
        assert "base_model.model.model.embed_tokens.base_layer.weight" in tensors


def test_overlapping_patterns_load_as_peft_does(tmp_path):
    """JSON is written with sort_keys=True, so pattern dicts come back in sorted key order and, where two keys
    match one module, the first *sorted* key wins after a round trip (a PEFT quirk: its own reload differs
    from the in-memory model; with overlapping rank_pattern keys PEFT cannot even reload its own folder).
    lorakit must resolve a saved folder exactly as PEFT does."""
    kwargs = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                  alpha_pattern={"v_proj": 3, r"layers\.0\..*": 16})
    inputs = example_inputs("llama")
    for writer in (peft, lorakit):
        _wrap(writer, "llama", CAUSAL, kwargs).save_pretrained(tmp_path / writer.__name__)
        saved = _config(tmp_path / writer.__name__)
        assert list(saved["alpha_pattern"]) == [r"layers\.0\..*", "v_proj"]
        ref = peft.PeftModel.from_pretrained(build("llama", seed=0), tmp_path / writer.__name__)
        ours = lorakit.PeftModel.from_pretrained(build("llama", seed=0), tmp_path / writer.__name__)
        v_proj = "base_model.model.model.layers.0.self_attn.v_proj"
        assert ours.get_submodule(v_proj).scaling["default"] == ref.get_submodule(v_proj).scaling["default"] == 4.0
        torch.testing.assert_close(_outputs(ours, inputs), _outputs(ref, inputs), **TOL)


# ---- several adapters in one folder ----------------------------------------------------------------------------
# (id, model, task_type, default adapter kwargs, "other" adapter kwargs)
MULTI_CASES = [
    ("llama", "llama", CAUSAL, dict(target_modules=["q_proj", "v_proj"], r=4),
     dict(target_modules=["o_proj", "up_proj"], r=2, lora_alpha=5, modules_to_save=["lm_head"])),
    ("mlp", "mlp", None, dict(target_modules=["emb", "lin1"], r=2),
     dict(target_modules=["conv", "lin1"], r=3, use_rslora=True, lora_bias=True)),
]


def _wrap_two(lib, model_name, task_type, first, second):
    torch.manual_seed(0)
    model = lib.get_peft_model(build(model_name, seed=0), lib.LoraConfig(task_type=task_type, **copy.deepcopy(first)))
    model.add_adapter("other", lib.LoraConfig(task_type=task_type, **copy.deepcopy(second)))
    _perturb(model)  # both adapters, although the inactive "other" is frozen
    return model.eval()


@pytest.fixture(scope="module")
def multi_saved(tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(case_id: str) -> dict:
        if case_id not in cache:
            _, model_name, task_type, first, second = next(c for c in MULTI_CASES if c[0] == case_id)
            inputs = example_inputs(model_name)
            ref = _wrap_two(peft, model_name, task_type, first, second)
            ours = _wrap_two(lorakit, model_name, task_type, first, second)
            torch.testing.assert_close(ours.state_dict(), ref.state_dict(), atol=0, rtol=0)
            outputs = {"default": _outputs(ref, inputs)}
            ref.set_adapter("other")
            outputs["other"] = _outputs(ref, inputs)
            root = tmp_path_factory.mktemp(f"multi-{case_id}")
            ref.save_pretrained(root / "peft")
            ours.save_pretrained(root / "lorakit")
            cache[case_id] = dict(model_name=model_name, inputs=inputs, outputs=outputs,
                                  peft_dir=root / "peft", lorakit_dir=root / "lorakit")
        return cache[case_id]

    return get


@pytest.mark.parametrize("case_id", [c[0] for c in MULTI_CASES])
def test_multi_adapter_in_memory_like_peft(case_id):
    """Before any file: after add_adapter the second adapter is inactive and frozen, its modules_to_save
    copy included, and the outputs of each adapter match PEFT's (what the folder tests compare against)."""
    _, model_name, task_type, first, second = next(c for c in MULTI_CASES if c[0] == case_id)
    inputs = example_inputs(model_name)
    ref = _wrap_two(peft, model_name, task_type, first, second)
    ours = _wrap_two(lorakit, model_name, task_type, first, second)
    for adapter in (None, "default", "other"):  # None: right after add_adapter, "default" still active
        if adapter is not None:
            ref.set_adapter(adapter)
            ours.set_adapter(adapter)
        when = f"after set_adapter({adapter!r})" if adapter else "right after add_adapter('other')"
        assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
            {n for n, p in ref.named_parameters() if p.requires_grad}, when
        torch.testing.assert_close(_outputs(ours, inputs), _outputs(ref, inputs), **TOL, msg=lambda m: f"{when}: {m}")


@pytest.mark.parametrize("case_id", [c[0] for c in MULTI_CASES])
def test_multi_adapter_folder_same_files(case_id, multi_saved):
    case = multi_saved(case_id)
    ours, ref = case["lorakit_dir"], case["peft_dir"]
    assert _tree(ours) == _tree(ref) == ["adapter_config.json", "adapter_model.safetensors",
                                         "other/adapter_config.json", "other/adapter_model.safetensors"]
    for sub in (".", "other"):
        _assert_same_tensor_files(ours / sub / "adapter_model.safetensors", ref / sub / "adapter_model.safetensors")
        _assert_same_config(_config(ours / sub), _config(ref / sub))


def _load_two(lib, case: dict, folder: Path, how: str):
    """'default' from the folder itself, 'other' from <folder>/other: by load_adapter(path) or subfolder=."""
    model = lib.PeftModel.from_pretrained(build(case["model_name"], seed=0), folder)
    if how == "path":
        model.load_adapter(folder / "other", "other")
    else:
        model.load_adapter(folder, "other", subfolder="other")
    return model


@pytest.mark.parametrize("how", ["path", "subfolder"])
@pytest.mark.parametrize("case_id", [c[0] for c in MULTI_CASES])
@pytest.mark.parametrize("writer, reader", [("peft", lorakit), ("lorakit", peft), ("lorakit", lorakit)],
                         ids=["peft-to-lorakit", "lorakit-to-peft", "lorakit-to-lorakit"])
def test_multi_adapter_folder_loads(writer, reader, case_id, how, multi_saved):
    case = multi_saved(case_id)
    model = _load_two(reader, case, case[f"{writer}_dir"], how)
    assert sorted(model.peft_config) == ["default", "other"]
    torch.testing.assert_close(_outputs(model, case["inputs"]), case["outputs"]["default"], **TOL)
    model.set_adapter("other")
    torch.testing.assert_close(_outputs(model, case["inputs"]), case["outputs"]["other"], **TOL)


@pytest.mark.parametrize("case_id", [c[0] for c in MULTI_CASES])
@pytest.mark.parametrize("writer, reader", [("peft", lorakit), ("lorakit", peft)],
                         ids=["peft-to-lorakit", "lorakit-to-peft"])
def test_from_pretrained_subfolder(writer, reader, case_id, multi_saved):
    """The second adapter alone: from_pretrained(base, folder, subfolder="other", adapter_name="other")."""
    case = multi_saved(case_id)
    model = reader.PeftModel.from_pretrained(build(case["model_name"], seed=0), case[f"{writer}_dir"],
                                             subfolder="other", adapter_name="other")
    assert list(model.peft_config) == ["other"]
    torch.testing.assert_close(_outputs(model, case["inputs"]), case["outputs"]["other"], **TOL)


# ---- adapter_model.bin -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", ["gpt2-wte", "mlp-emb-conv-linear"])
def test_bin_format_both_ways(case_id, tmp_path):
    model_name, task_type, kwargs = CASE_BY_ID[case_id]
    inputs = example_inputs(model_name)
    ref = _wrap(peft, model_name, task_type, kwargs)
    ours = _wrap(lorakit, model_name, task_type, kwargs)
    ref_out = _outputs(ref, inputs)
    ref.save_pretrained(tmp_path / "peft", safe_serialization=False)
    ours.save_pretrained(tmp_path / "lorakit", safe_serialization=False)
    for folder in ("peft", "lorakit"):
        assert _tree(tmp_path / folder) == ["adapter_config.json", "adapter_model.bin"]
    ours_bin = torch.load(tmp_path / "lorakit" / "adapter_model.bin", weights_only=True)
    ref_bin = torch.load(tmp_path / "peft" / "adapter_model.bin", weights_only=True)
    torch.testing.assert_close(ours_bin, ref_bin, atol=0, rtol=0)  # same keys, shapes, dtypes, values

    for writer in ("peft", "lorakit"):
        for reader in (peft, lorakit):
            loaded = reader.PeftModel.from_pretrained(build(model_name, seed=0), tmp_path / writer)
            torch.testing.assert_close(_outputs(loaded, inputs), ref_out, **TOL,
                                       msg=lambda m: f"{writer} .bin read by {reader.__name__}: {m}")


# ---- is_trainable -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", ["llama-modules-to-save", "gpt2-bias-all", "bert-seq-cls", "mlp-emb-conv-linear"])
def test_load_frozen_by_default(case_id, saved):
    case = saved(case_id)
    for folder in (case["lorakit_dir"], case["peft_dir"]):
        model = lorakit.PeftModel.from_pretrained(build(case["model_name"], seed=0), folder)
        assert not any(p.requires_grad for p in model.parameters())
        assert not any(m.training for m in model.modules())
        assert model.peft_config["default"].inference_mode is True


@pytest.mark.parametrize("case_id", ["llama-modules-to-save", "gpt2-bias-all", "bert-seq-cls", "mlp-emb-conv-linear"])
def test_load_trainable_like_peft(case_id, saved):
    """is_trainable=True: the same parameters train as in PEFT, the same modules are in train mode, and
    a backward pass reaches every trainable parameter."""
    case = saved(case_id)
    ours = lorakit.PeftModel.from_pretrained(build(case["model_name"], seed=0), case["lorakit_dir"],
                                             is_trainable=True)
    ref = peft.PeftModel.from_pretrained(build(case["model_name"], seed=0), case["lorakit_dir"], is_trainable=True)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ref.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save." in n or "bias" in n for n in trainable)
    assert {n: m.training for n, m in ours.named_modules()} == {n: m.training for n, m in ref.named_modules()}
    assert ours.peft_config["default"].inference_mode is False

    result = ours(**case["inputs"])
    (result if isinstance(result, torch.Tensor) else result[0]).square().mean().backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if n in trainable)
