"""PeftModel-level behaviour: wrapper classes, forwarding, invariants, merge, checkpointing, guards."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, LoraLayer, LoraWarning, TaskType, get_peft_model

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype)


IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4], [8, 6, 2, 9, 1, 1, 3, 5]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def nonzero_adapter(model: nn.Module) -> None:
    """Give every lora_B a random value so the adapter changes the output (zero B hides bugs)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)


@pytest.mark.parametrize(
    "task_type, cls",
    [
        (None, lorakit.PeftModel),
        (TaskType.CAUSAL_LM, lorakit.PeftModelForCausalLM),
        ("CAUSAL_LM", lorakit.PeftModelForCausalLM),
        ("SEQ_2_SEQ_LM", lorakit.PeftModelForSeq2SeqLM),
        ("FEATURE_EXTRACTION", lorakit.PeftModelForFeatureExtraction),
    ],
)
def test_task_type_picks_the_wrapper_class(task_type, cls):
    model = get_peft_model(tiny_llama(), LoraConfig(task_type=task_type))
    assert type(model) is cls and isinstance(model, lorakit.PeftModel)
    assert isinstance(model.base_model, lorakit.LoraModel)


def test_forwarding_and_views():
    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM"))
    assert model.get_base_model() is base and model.base_model.model is base
    assert model.config is base.config  # forwarded to the user's model
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert set(model.peft_config) == {"default"}
    out = model.generate(IDS[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 3)


def test_zero_init_equals_base_and_disable_adapter():
    reference = logits(tiny_llama())
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear")).eval()
    torch.testing.assert_close(logits(model), reference, **TOL[torch.float32])
    nonzero_adapter(model)
    adapted = logits(model)
    assert (adapted - reference).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), reference, **TOL[torch.float32])
    torch.testing.assert_close(logits(model), adapted)
    with pytest.raises(RuntimeError), model.disable_adapter():
        raise RuntimeError("inside")
    torch.testing.assert_close(logits(model), adapted)  # re-enabled even after an exception


@pytest.mark.parametrize("dtype", TOL)
def test_merge_unmerge_and_unload(dtype):
    model = get_peft_model(tiny_llama(dtype=dtype), LoraConfig(target_modules="all-linear", use_rslora=True)).eval()
    nonzero_adapter(model)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.dtype == torch.float32  # adapters upcast on half bases
    weight_before = q_proj.base_layer.weight.detach().clone()
    unmerged = logits(model)
    model.merge_adapter()
    expected_weight = (weight_before.float() + q_proj.get_delta_weight("default")).to(dtype)
    torch.testing.assert_close(q_proj.base_layer.weight, expected_weight, atol=0, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, **TOL[dtype])
    model.unmerge_adapter()
    torch.testing.assert_close(q_proj.base_layer.weight, weight_before, **TOL[dtype])
    plain = model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain), unmerged, **TOL[dtype])


def test_unload_returns_the_base_model():
    reference = logits(tiny_llama())
    model = get_peft_model(tiny_llama(), LoraConfig()).eval()
    nonzero_adapter(model)
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain), reference, **TOL[torch.float32])


def test_gradient_checkpointing_trains_the_adapters():
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_training_step_moves_only_the_adapter():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_user_config_is_never_mutated():
    config = LoraConfig(target_modules="all-linear", task_type="SEQ_CLS")
    before = copy.deepcopy(config)
    model = get_peft_model(tiny_llama(), config)
    assert dataclasses.asdict(config) == dataclasses.asdict(before)
    recorded = model.peft_config["default"]
    assert isinstance(recorded.target_modules, set) and "model.layers.0.self_attn.q_proj" in recorded.target_modules
    assert "lm_head" not in recorded.target_modules
    assert recorded.modules_to_save == ["classifier", "score"]


def test_print_trainable_parameters_line(capsys):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())  # tied weights appear once in parameters()
    model.print_trainable_parameters()
    expected = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    assert capsys.readouterr().out.strip() == expected
    assert model.get_nb_trainable_parameters() == (trainable, total)
    assert trainable == 2 * 4 * (32 + 32)  # two layers of q_proj, A (4, 32) + B (32, 4)


@pytest.mark.parametrize("bad_name", ["", "a.b", "../x", "/abs", "__base__", 3, "training", "q_proj", "layers"])
def test_invalid_adapter_names(bad_name):
    with pytest.raises(ValueError, match="adapter_name"):
        get_peft_model(tiny_llama(), LoraConfig(), adapter_name=bad_name)


def test_guards():
    model = get_peft_model(tiny_llama(), LoraConfig())
    with pytest.raises(ValueError, match="already a PeftModel"):
        get_peft_model(model, LoraConfig())
    with pytest.raises(ValueError, match="LoRA only"):
        get_peft_model(tiny_llama(), {"r": 8})


def test_gpt2_conv1d_warns_and_records_fan_in_fan_out():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
    config = LoraConfig()
    with pytest.warns(LoraWarning, match="fan_in_fan_out"):
        model = get_peft_model(base, config)
    assert config.fan_in_fan_out is False and model.peft_config["default"].fan_in_fan_out is True
