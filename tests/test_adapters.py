"""Several adapters in one model: activation, combination by addition, deletion, mixed-adapter batches."""

from __future__ import annotations

import pytest
import torch
from models import build, example_inputs

from lorakit import LoraConfig, LoraLayer, get_peft_model
from lorakit.saved_modules import ModulesToSaveWrapper

ATOL = dict(atol=1e-5, rtol=1e-5)

# model name, config of adapter "a", config of adapter "b" (different targets and ranks on purpose)
SETUPS = [
    ("llama", dict(target_modules=["q_proj", "v_proj"], r=4), dict(target_modules=["v_proj", "down_proj"], r=2)),
    ("llama", dict(target_modules=["embed_tokens", "o_proj"], r=3), dict(target_modules="all-linear", r=5,
                                                                         use_rslora=True)),
    ("gpt2", dict(target_modules=["c_attn"], r=4), dict(target_modules=["c_fc", "wte"], r=2)),
    ("bert_seq_cls", dict(task_type="SEQ_CLS", r=4), dict(task_type="SEQ_CLS", target_modules=["key"], r=2)),
]


def two_adapters(name: str, config_a: dict, config_b: dict):
    """A PeftModel with adapters "a" and "b", both with random non-zero weights, in eval mode."""
    model = get_peft_model(build(name, seed=0), LoraConfig(init_lora_weights=False, **config_a), adapter_name="a")
    model.add_adapter("b", LoraConfig(init_lora_weights=False, **config_b))
    torch.manual_seed(1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if ".lora_" in param_name or ".modules_to_save." in param_name:
                param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


def run(model, inputs: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def base_output(name: str, inputs: dict) -> torch.Tensor:
    return run(build(name, seed=0).eval(), inputs)


@pytest.mark.parametrize("name, config_a, config_b", SETUPS)
def test_adapters_switch_and_add(name, config_a, config_b):
    model = two_adapters(name, config_a, config_b)
    inputs = example_inputs(name)
    assert model.active_adapter == "a"
    only_a = run(model, inputs)
    model.set_adapter("b")
    only_b = run(model, inputs)
    assert not torch.allclose(only_a, only_b)
    with model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), base_output(name, inputs), **ATOL)
    if any({"a", "b"} <= set(m.modules_to_save) for m in model.modules() if isinstance(m, ModulesToSaveWrapper)):
        # PEFT's rule: full copies of one module cannot add up, so both adapters cannot be active; nothing changes
        with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
            model.set_adapter(["a", "b"])
        assert model.active_adapters == ["b"]
        return
    # Both active: every LoRA layer adds both deltas. Check it per layer against the formula.
    model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a", "b"]
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        weight = layer.base_layer.weight.detach().float()
        expected = weight + sum(layer.get_delta_weight(n) for n in ("a", "b") if n in layer.r)
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight.float(), expected, **ATOL)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight.float(), weight, **ATOL)


@pytest.mark.parametrize("name, config_a, config_b", SETUPS)
def test_mixed_batch_equals_each_row_alone(name, config_a, config_b):
    model = two_adapters(name, config_a, config_b)
    inputs = example_inputs(name)
    batch = next(iter(inputs.values())).shape[0]
    names = (["a", "b", "__base__"] * batch)[:batch]
    mixed = run(model, inputs, adapter_names=names)
    for row, adapter in enumerate(names):
        single = {k: v[row : row + 1] for k, v in inputs.items()}
        if adapter == "__base__":
            with model.disable_adapter():
                expected = run(model, single)
        else:
            model.set_adapter(adapter)
            expected = run(model, single)
        torch.testing.assert_close(mixed[row : row + 1], expected, **ATOL)


def test_mixed_batch_generate_matches_single_adapter_generate():
    model = two_adapters("llama", *SETUPS[0][1:])
    prompt = torch.tensor([[3, 8, 1, 9], [3, 8, 1, 9]])
    mixed = model.generate(input_ids=prompt, adapter_names=["a", "b"], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for row, adapter in enumerate(["a", "b"]):
        model.set_adapter(adapter)
        alone = model.generate(input_ids=prompt[row : row + 1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert torch.equal(mixed[row : row + 1], alone)
    beams = model.generate(input_ids=prompt, adapter_names=["a", "b"], max_new_tokens=3, num_beams=2,
                           do_sample=False)
    assert beams.shape == (2, prompt.shape[1] + 3)


@pytest.mark.parametrize(
    "names, setup, match",
    [
        (["a", "nope"], lambda m: None, "unknown adapter"),
        (["a"], lambda m: None, "one name per row"),
        (["a", "b"], lambda m: m.train(), "inference only"),
        (["a", "b"], lambda m: m.merge_adapter(), "merged"),
    ],
)
def test_mixed_batch_errors(names, setup, match):
    model = two_adapters("llama", *SETUPS[0][1:])
    setup(model)
    with pytest.raises(ValueError, match=match):
        model(**example_inputs("llama"), adapter_names=names)


def test_delete_adapter_restores_untouched_layers():
    model = two_adapters("llama", *SETUPS[0][1:])
    inputs = example_inputs("llama")
    only_a = run(model, inputs)
    model.delete_adapter("b")
    assert set(model.peft_config) == {"a"}
    assert not any("down_proj" in n for n in model.base_model.targeted_module_names)
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert not isinstance(down, LoraLayer)  # no adapter left there: back to the plain module
    assert not any(".b." in k or k.endswith(".b") for k in model.state_dict())
    torch.testing.assert_close(run(model, inputs), only_a, **ATOL)
    with pytest.raises(ValueError, match="Adapter b does not exist"):
        model.delete_adapter("b")
    model.delete_adapter("a")  # the last one too, as PEFT: no adapter left, the base model runs
    assert model.peft_config == {} and model.active_adapters == []
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    torch.testing.assert_close(run(model, inputs), base_output("llama", inputs), **ATOL)


def test_new_adapter_is_inactive_and_frozen_until_set():
    model = get_peft_model(build("llama", seed=0), LoraConfig(), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=["k_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)
    model.set_adapter("b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("b", LoraConfig())


def test_save_load_round_trip_keeps_every_adapter(tmp_path):
    model = two_adapters("llama", *SETUPS[1][1:])
    inputs = example_inputs("llama")
    expected = {n: (model.set_adapter(n), run(model, inputs))[1] for n in ("a", "b")}
    model.save_pretrained(tmp_path)
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()  # no adapter named "default" here
    from lorakit import PeftModel

    loaded = PeftModel.from_pretrained(build("llama", seed=0), tmp_path, subfolder="a", adapter_name="a")
    loaded.load_adapter(tmp_path / "b", "b")
    assert loaded.active_adapter == "a"
    for name, output in expected.items():
        loaded.set_adapter(name)
        torch.testing.assert_close(run(loaded, inputs), output, **ATOL)
    # set_adapter makes the active adapter trainable, as PEFT's does, even for an adapter loaded for inference
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all(".b." in n for n in trainable) and not loaded.training


def test_second_all_linear_adapter_sees_through_existing_lora_layers():
    model = get_peft_model(build("llama", seed=0), LoraConfig(target_modules="all-linear"), adapter_name="a")
    first = set(model.base_model.targeted_module_names)
    model.add_adapter("b", LoraConfig(target_modules="all-linear", r=2))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == len(first) and all("b" in layer.r for layer in layers)
    assert model.peft_config["b"].target_modules == first
