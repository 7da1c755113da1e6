"""Guards (lorakit/guards.py): each test fails without its guard; PEFT parity for ensure_weight_tying."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from models import build, example_inputs
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import AdapterLoadError, AdapterSaveError, LoraConfig, LoraWarning, PeftModel, check_training, get_peft_model
from lorakit import guards, io
from lorakit.layer import LoraLayer

LLAMA = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8}


def randomize(model: torch.nn.Module, seed: int = 3, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=gen))


def messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, LoraWarning)]


def lora_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    return messages(record)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_guard_table_lists_every_guard():
    assert set(guards.GUARDS) == {"no_trainable_parameters", "frozen_adapter_trained", "adapter_not_learning",
                                  "saved_file_incomplete", "merge_changed_outputs", "tied_embedding_trained",
                                  "new_tokens_not_saved", "different_base_model"}


# ---- zero trainable parameters ------------------------------------------------------------------------------
def test_inference_mode_config_warns_nothing_trains():
    found = lora_warnings(lambda: get_peft_model(build("llama"), LoraConfig(inference_mode=True, **LLAMA)))
    assert any("0 trainable parameters" in m and "inference_mode=True" in m for m in found), found


def test_normal_config_does_not_warn_about_trainable():
    found = lora_warnings(lambda: get_peft_model(build("llama"), LoraConfig(**LLAMA)))
    assert not any("trainable parameters" in m for m in found), found


@pytest.fixture
def saved(tmp_path) -> Path:
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    randomize(model)
    model.save_pretrained(tmp_path / "a")
    return tmp_path / "a"


@pytest.mark.parametrize("is_trainable, train_mode, grad, warned", [
    (False, True, True, True),      # the silent failure: a training step on a frozen adapter
    (True, True, True, False),
    (False, False, True, False),    # evaluation
    (False, True, False, False),    # train mode under no_grad (e.g. MC dropout)
])
def test_training_step_on_frozen_load(saved, is_trainable, train_mode, grad, warned):
    model = PeftModel.from_pretrained(build("llama"), saved, is_trainable=is_trainable)
    model.train(train_mode)
    inputs = example_inputs("llama")

    def step():
        with torch.set_grad_enabled(grad):
            model(**inputs)
            model(**inputs)

    found = [m for m in lora_warnings(step) if "is_trainable=True" in m]
    assert len(found) == (1 if warned else 0), found  # once, not per forward


# ---- an adapter that does not learn -------------------------------------------------------------------------
def _loss(model) -> torch.Tensor:
    inputs = example_inputs("llama")
    return model(**inputs, labels=inputs["input_ids"]).loss


@pytest.mark.parametrize("optimizer_after_peft, lr, stuck", [(True, 0.1, 0), (False, 0.1, 4), (True, 0.0, 4)])
def test_check_training_finds_layers_that_did_not_move(optimizer_after_peft, lr, stuck):
    base = build("llama")
    early = torch.optim.SGD(base.parameters(), lr=lr)  # the classic bug: built before get_peft_model
    model = get_peft_model(base, LoraConfig(**LLAMA))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr) if optimizer_after_peft else early
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        _loss(model).backward()
        optimizer.step()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        found = check_training(model, steps=2)
    layers = [p for p, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 4 and len(found) == stuck
    assert all(f.split(" ")[0] in layers for f in found)
    assert bool(stuck) == any("after 2 optimizer step(s)" in m for m in messages(record))


def test_trainer_callback_checks_once_after_n_steps():
    from lorakit.app.hf_trainer import LoraTrainer, LoraTrainingCheckCallback

    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    callback = LoraTrainingCheckCallback(after_steps=3)
    callback.on_step_end(None, SimpleNamespace(global_step=2), None, model=model)
    assert callback.found is None
    with pytest.warns(LoraWarning, match="after 3 optimizer step"):
        callback.on_step_end(None, SimpleNamespace(global_step=3), None, model=SimpleNamespace(module=model))
    assert len(callback.found) == 4
    callback.on_train_end(None, SimpleNamespace(global_step=9), None, model=model)  # no second report
    assert len(callback.found) == 4
    assert "LoraTrainingCheckCallback" in LoraTrainer.__doc__


# ---- save checks what it wrote ------------------------------------------------------------------------------
def _truncating(real):
    def write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        size = os.path.getsize(filename)
        os.truncate(filename, size - 4)
    return write


def _dropping(real):
    def write(tensors, filename, metadata=None):
        real(dict(list(tensors.items())[1:]), filename, metadata=metadata)
    return write


def _emptying(real):
    def write(tensors, filename, metadata=None):
        first = next(iter(tensors))
        real({**tensors, first: tensors[first][:0]}, filename, metadata=metadata)
    return write


@pytest.mark.parametrize("fault, expected", [(_truncating, "data section"), (_dropping, "missing"),
                                             (_emptying, "shape")])
def test_save_detects_a_bad_write_and_keeps_the_old_folder(saved, monkeypatch, fault, expected):
    before = tree_bytes(saved)
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    randomize(model, seed=9)
    monkeypatch.setattr(io, "save_file", fault(io.save_file))
    with pytest.raises(AdapterSaveError, match=expected):
        model.save_pretrained(saved)
    assert tree_bytes(saved) == before
    assert not [p for p in saved.parent.iterdir() if "lorakit-tmp" in p.name]


@pytest.mark.parametrize("change, expected", [
    (lambda t: {k: v.double() for k, v in t.items()}, "dtype"),
    (lambda t: {k: v.reshape(-1) for k, v in t.items()}, "shape"),
    (lambda t: {**t, "extra": torch.ones(1)}, "unexpected extra"),
])
def test_verify_saved_compares_the_header(tmp_path, change, expected):
    tensors = {"a": torch.ones(2, 3), "b": torch.zeros(4, 1)}
    save_file(change(tensors), str(tmp_path / "w.safetensors"))
    with pytest.raises(AdapterSaveError, match=expected):
        guards.verify_saved(tmp_path / "w.safetensors", tensors)
    save_file(tensors, str(tmp_path / "ok.safetensors"))
    guards.verify_saved(tmp_path / "ok.safetensors", tensors)


def test_verify_saved_reads_the_header_only(tmp_path, monkeypatch):
    tensors = {"a": torch.ones(256, 1024)}  # 1 MiB of data
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    reads: list[int] = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda file, mode="r", *a, **k: _Wrap(real_open(file, mode, *a, **k), reads))
    guards.verify_saved(path, tensors)
    monkeypatch.undo()
    assert 0 < sum(reads) < 1024  # 8 bytes + the JSON header, never the 1 MiB of data


class _Wrap:
    def __init__(self, handle, reads):
        self.handle, self.reads = handle, reads

    def read(self, n=-1):
        data = self.handle.read(n)
        self.reads.append(len(data))
        return data

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.handle.close()


def test_bin_save_is_checked_too(saved, monkeypatch):
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    real = torch.save
    monkeypatch.setattr(io.torch, "save", lambda obj, path: real(dict(list(obj.items())[1:]), path))
    with pytest.raises(AdapterSaveError, match="missing"):
        model.save_pretrained(saved, safe_serialization=False)


# ---- merge that changes outputs -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_check_measures_the_change(dtype):
    model = get_peft_model(build("llama").to(dtype), LoraConfig(**LLAMA))
    randomize(model, scale=0.3)
    probe = example_inputs("llama")
    with torch.no_grad():
        expected = model(**probe).logits.double()
    merged = model.merge_and_unload(check=True, probe=probe)
    check = merged.lorakit_merge_check
    with torch.no_grad():
        actual = merged(**probe).logits.double()
    assert check.max_abs_change == pytest.approx((actual - expected).abs().max().item(), rel=1e-6, abs=1e-12)
    assert check.ok and check.dtype == str(dtype)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())


def test_merge_check_warns_when_a_merge_is_wrong(monkeypatch):
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    randomize(model, scale=0.3)
    real = LoraLayer.merge

    def broken(self, *args, **kwargs):  # a variant that merges twice its delta
        real(self, *args, **kwargs)
        self.merged_adapters.clear()
        real(self, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "merge", broken)
    with pytest.warns(LoraWarning, match="changed the model's outputs"):
        merged = model.merge_and_unload(check=True)  # the model's own dummy_inputs
    assert not merged.lorakit_merge_check.ok and merged.lorakit_merge_check.max_abs_change > 1e-3


def test_merge_check_needs_a_probe_without_dummy_inputs():
    model = get_peft_model(build("mlp"), LoraConfig(target_modules=["lin1", "lin2"], r=2))
    with pytest.raises(ValueError, match="probe="):
        model.merge_and_unload(check=True)
    assert any(isinstance(m, LoraLayer) for m in model.modules())  # nothing merged
    merged = model.merge_and_unload(check=True, probe=example_inputs("mlp")["x"])
    assert merged.lorakit_merge_check.max_abs_change < 1e-5


# ---- tied embeddings ----------------------------------------------------------------------------------------
def tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))


TIE_CASES = {
    "modules_to_save lm_head": dict(modules_to_save=["lm_head"], target_modules=["q_proj"]),
    "modules_to_save embed_tokens": dict(modules_to_save=["embed_tokens"], target_modules=["q_proj"]),
    "target lm_head": dict(target_modules=["q_proj", "lm_head"]),
    "target embed_tokens": dict(target_modules=["q_proj", "embed_tokens"]),
}


@pytest.mark.parametrize("case", TIE_CASES)
def test_training_one_side_of_tied_embeddings_warns(case):
    found = lora_warnings(lambda: get_peft_model(tied_llama(), LoraConfig(r=2, **TIE_CASES[case])))
    assert any("ensure_weight_tying=True" in m for m in found), found
    found = lora_warnings(lambda: get_peft_model(tied_llama(), LoraConfig(r=2, target_modules=["q_proj"])))
    assert not any("ties its input and output" in m for m in found)


def _trained(lib, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(tied_llama(), lib.LoraConfig(r=2, ensure_weight_tying=True, **TIE_CASES[case]))
    return model


@pytest.mark.parametrize("case", TIE_CASES)
def test_ensure_weight_tying_matches_peft(case, tmp_path):
    peft = pytest.importorskip("peft")
    ours, theirs = _trained(lorakit, case), _trained(peft, case)
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    # one SGD step: the two sides stay one matrix
    ours.train()
    x = torch.randint(0, 64, (2, 6))
    ours(input_ids=x, labels=x).loss.backward()
    with torch.no_grad():
        for p in ours.parameters():
            if p.grad is not None:
                p.sub_(0.5 * p.grad)
    ours.eval()
    embed, head = ours.get_base_model().get_input_embeddings(), ours.get_base_model().get_output_embeddings()
    if "modules_to_save" in case:
        assert embed.modules_to_save["default"].weight is head.modules_to_save["default"].weight
    else:
        delta_embed = (embed.lora_embedding_B["default"] @ embed.lora_embedding_A["default"]).T
        delta_head = head.lora_B["default"].weight @ head.lora_A["default"].weight
        torch.testing.assert_close(delta_head, delta_embed, rtol=0, atol=0)
        assert delta_head.abs().max() > 0
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    configs = [json.loads((tmp_path / n / "adapter_config.json").read_text()) for n in ("ours", "theirs")]
    for field in ("target_modules", "modules_to_save", "ensure_weight_tying"):
        left, right = configs[0][field], configs[1][field]
        assert (sorted(left) if isinstance(left, list) else left) == (sorted(right) if isinstance(right, list) else right)
    keys = [sorted(load_file(tmp_path / n / "adapter_model.safetensors")) for n in ("ours", "theirs")]
    assert keys[0] == keys[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "ours").eval()
        back = lorakit.PeftModel.from_pretrained(tied_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        want = ours(input_ids=x).logits
        torch.testing.assert_close(loaded(input_ids=x).logits, want)
        torch.testing.assert_close(back(input_ids=x).logits, want)


def test_ensure_weight_tying_without_tied_embeddings_warns():
    found = lora_warnings(lambda: get_peft_model(build("llama"), LoraConfig(ensure_weight_tying=True, **LLAMA)))
    assert any("no tied embeddings" in m for m in found), found


# ---- new tokens not saved -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "tiny-base"
    build("llama").save_pretrained(folder)
    return folder


def resized(base_folder: Path) -> PeftModel:
    model = LlamaForCausalLM.from_pretrained(base_folder)
    model.resize_token_embeddings(model.config.vocab_size + 4)
    return get_peft_model(model, LoraConfig(**LLAMA))


def test_resized_vocab_saves_embeddings_like_peft(base_folder, tmp_path):
    peft = pytest.importorskip("peft")
    model = resized(base_folder)
    found = lora_warnings(lambda: model.save_pretrained(tmp_path / "ours"))
    assert any("resized (128 -> 132 rows)" in m for m in found), found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM.from_pretrained(base_folder)
        base.resize_token_embeddings(132)
        theirs = peft.get_peft_model(base, peft.LoraConfig(**LLAMA))
        theirs.save_pretrained(tmp_path / "theirs")
    ours_keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_keys = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(ours_keys) == sorted(theirs_keys)
    assert ours_keys["base_model.model.model.embed_tokens.weight"].shape == (132, 32)


def test_resized_vocab_not_saved_warns(base_folder, tmp_path):
    model = resized(base_folder)
    found = lora_warnings(lambda: model.save_pretrained(tmp_path / "a", save_embedding_layers=False))
    assert any("new tokens' embeddings are not saved" in m for m in found), found
    plain = get_peft_model(LlamaForCausalLM.from_pretrained(base_folder), LoraConfig(**LLAMA))
    assert not any("resized" in m for m in lora_warnings(lambda: plain.save_pretrained(tmp_path / "b")))


# ---- a different base model ---------------------------------------------------------------------------------
def named(model: torch.nn.Module, name: str) -> torch.nn.Module:
    model.config._name_or_path = name
    return model


def test_other_base_name_with_fitting_shapes_warns(tmp_path):
    model = get_peft_model(named(build("llama"), "org/model-a"), LoraConfig(**LLAMA))
    model.save_pretrained(tmp_path / "a")
    found = lora_warnings(lambda: PeftModel.from_pretrained(named(build("llama"), "org/model-b"), tmp_path / "a"))
    assert any("'org/model-a'" in m and "'org/model-b'" in m for m in found), found
    same = lora_warnings(lambda: PeftModel.from_pretrained(named(build("llama"), "/local/copy/model-a"), tmp_path / "a"))
    assert not any("trained on base model" in m for m in same), same


def test_other_base_name_joins_the_shape_error(tmp_path):
    model = get_peft_model(named(build("llama"), "org/model-a"), LoraConfig(**LLAMA))
    model.save_pretrained(tmp_path / "a")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterLoadError) as error:
        PeftModel.from_pretrained(named(other, "org/model-b"), tmp_path / "a")
    text = str(error.value)
    assert "8 problem(s)" in text and "trained on base model 'org/model-a'" in text and "'org/model-b'" in text
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


# ---- a failed injection changes nothing ---------------------------------------------------------------------
def test_failed_second_adapter_is_rolled_back():
    """PiSSA with r=20 fits q_proj (32x32) but not k_proj (16x32, after q_proj): the layers injected before the
    failure lose the half-made adapter and get their rewritten weights back; the first adapter is untouched."""
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    config = LoraConfig(r=20, target_modules=["q_proj", "k_proj"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="r=20 is too large"):
        model.add_adapter("second", config)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(**LLAMA))  # refused up front: 'default' must survive
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert list(model.peft_config) == ["default"]
