"""``layer_replication`` (replication.py) against the real peft 0.21.2 on tiny Llama and BERT models.

    ranges [(s_1, e_1), …] -> layers L_{s_1} … L_{e_1 − 1}, L_{s_2} … : copies sharing W, each with its own A, B

Each case wraps one seeded model with peft and with lorakit, checks the state-dict keys (model and file) are
the same, copies peft's non-zero adapter into lorakit and compares outputs, gradients, generation (the
attention caches index layers by their new ``layer_idx``), merges and files both ways (fp32, 1e-5).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import peft
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import lorakit
from lorakit.layer import LoraLayer

TOL = dict(atol=1e-5, rtol=1e-5)


def llama(layers: int = 4) -> nn.Module:
    config = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=50)
    return AutoModelForCausalLM.from_config(config)


def bert() -> nn.Module:
    config = AutoConfig.for_model("bert", hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                  num_attention_heads=2, vocab_size=50)
    return AutoModel.from_config(config)


# name -> (model factory, path of the layer stack, LoraConfig arguments)
CASES: dict[str, tuple[Callable[[], nn.Module], str, dict]] = {
    "llama-overlap": (llama, "model.layers", dict(target_modules=["q_proj", "v_proj"],
                                                  layer_replication=[[0, 2], [1, 4]])),
    "llama-all-linear": (llama, "model.layers", dict(target_modules="all-linear", layer_replication=[[0, 4], [2, 4]])),
    "llama-shrink": (llama, "model.layers", dict(target_modules=["o_proj"], layer_replication=[[1, 3]])),
    "llama-layers-to-transform": (llama, "model.layers", dict(target_modules=["q_proj"], layers_to_transform=[0, 4],
                                                              layer_replication=[[0, 3], [0, 3]])),
    "bert": (bert, "encoder.layer", dict(target_modules=["query", "value"], layer_replication=[[0, 3], [1, 2]])),
}
INPUT = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))


def _output(model: nn.Module) -> torch.Tensor:
    out = model(input_ids=INPUT)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _pair(case: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, peft model, lorakit model with peft's adapter copied in), both in eval mode."""
    make, _, arguments = CASES[case]
    torch.manual_seed(0)
    base = make().eval()
    arguments = {"r": 2, "init_lora_weights": False, **arguments}
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**arguments)).eval()
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**arguments)).eval()
    assert sorted(ref.state_dict()) == sorted(ours.state_dict())
    assert sorted(peft.get_peft_model_state_dict(ref)) == sorted(lorakit.get_peft_model_state_dict(ours))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return base, ref, ours


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_match_peft(case: str) -> None:
    _, ref, ours = _pair(case)
    y_ref, y_ours = _output(ref), _output(ours)
    torch.testing.assert_close(y_ours, y_ref, **TOL)
    y_ref.square().sum().backward()
    y_ours.square().sum().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(ref_grads) == sorted(our_grads) and ref_grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(our_grads[name], grad, **TOL, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_copies_share_base_weights_and_are_renumbered(case: str) -> None:
    base, ref, ours = _pair(case)
    _, stack, arguments = CASES[case]
    ranges = arguments["layer_replication"]
    sources = [index for start, end in ranges for index in range(start, end)]
    originals = base.get_submodule(stack)
    for model in (ref, ours):
        layers = model.base_model.model.get_submodule(stack)
        assert len(layers) == len(sources) == model.base_model.model.config.num_hidden_layers
        for position, (layer, source) in enumerate(zip(layers, sources, strict=True)):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    assert module.layer_idx == position
            base_params = {n.replace("base_layer.", ""): p for n, p in layer.named_parameters() if "lora_" not in n}
            assert sorted(base_params) == sorted(n for n, _ in originals[source].named_parameters())
            assert all(torch.equal(p, originals[source].get_parameter(n)) for n, p in base_params.items())
        for position, source in enumerate(sources):  # copies of one source: the same tensors, their own adapters
            for other in range(position + 1, len(sources)):
                if sources[other] == source:
                    first, second = _base_parameters(layers[position]), _base_parameters(layers[other])
                    assert first.keys() == second.keys() and all(first[n] is second[n] for n in first)
                    first_lora = [p for n, p in layers[position].named_parameters() if "lora_" in n]
                    assert not any(p is q for p in first_lora for n, q in layers[other].named_parameters())


def _base_parameters(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The layer's base parameters by their name without LoRA wrappers (shared ones included)."""
    return {n.replace("base_layer.", ""): p for n, p in layer.named_parameters(remove_duplicate=False)
            if "lora_" not in n}


def test_generation_matches_peft() -> None:
    """Greedy generation with the key/value cache: each copy needs its own cache slot (layer_idx)."""
    _, ref, ours = _pair("llama-overlap")
    arguments = dict(input_ids=INPUT, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(**arguments), ref.generate(**arguments))
    uncached = ours.generate(**arguments, use_cache=False)
    assert torch.equal(ours.generate(**arguments), uncached)


@pytest.mark.parametrize("case", ["llama-overlap", "bert"])
def test_merge_and_unload_matches_peft(case: str) -> None:
    """Merging folds every copy's update into the one shared weight, in PEFT and lorakit alike."""
    _, ref, ours = _pair(case)
    with torch.no_grad():
        merged_ref, merged_ours = ref.merge_and_unload(), ours.merge_and_unload()
        assert not any(isinstance(m, LoraLayer) for m in merged_ours.modules())
        torch.testing.assert_close(_output(merged_ours), _output(merged_ref), **TOL)


@pytest.mark.parametrize("case", ["llama-overlap", "bert"])
@pytest.mark.parametrize("writer", ["peft", "lorakit"])
def test_files_both_ways(case: str, writer: str, tmp_path) -> None:
    base, ref, ours = _pair(case)
    saver, library = (ref, lorakit) if writer == "peft" else (ours, peft)
    saver.save_pretrained(tmp_path)
    loaded = library.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_output(loaded), _output(saver), **TOL)
    assert loaded.peft_config["default"].layer_replication == CASES[case][2]["layer_replication"]


def test_second_adapter_does_not_replicate_again() -> None:
    """The same ranges on a second adapter leave the stack as it is (the load path depends on it)."""
    _, _, ours = _pair("llama-overlap")
    before = len(ours.base_model.model.model.layers)
    ours.add_adapter("other", lorakit.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 4]]))
    assert len(ours.base_model.model.model.layers) == before


def test_model_without_layer_stack_is_refused_as_peft() -> None:
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=16, n_head=2, vocab_size=50)
    model = AutoModelForCausalLM.from_config(config)
    for library in (peft, lorakit):
        with pytest.raises(ValueError, match="Could not locate the layers attribute in the model"):
            library.get_peft_model(copy.deepcopy(model), library.LoraConfig(target_modules=["c_attn"],
                                                                            layer_replication=[[0, 2]]))


@pytest.mark.parametrize("ranges", [[[0, 5]], [[2, 1]], [[0, 1, 2]], [[-1, 2]]])
def test_bad_ranges_are_refused_before_any_change(ranges: list) -> None:
    model = llama()
    with pytest.raises(ValueError, match="invalid layer_replication range"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["q_proj"], layer_replication=ranges))
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4


def test_failed_injection_puts_the_stack_back() -> None:
    """An injection that fails after replicating leaves the model as it was, and a later one replicates anew."""
    model = llama()
    originals = list(model.model.layers)
    with pytest.raises(ValueError, match="not found"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["nothing"], layer_replication=[[0, 2]]))
    assert list(model.model.layers) == originals and model.config.num_hidden_layers == 4
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["q_proj"],
                                                                  layer_replication=[[0, 2], [1, 4]]))
    assert len(peft_model.base_model.model.model.layers) == 5 == model.config.num_hidden_layers
