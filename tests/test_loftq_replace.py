"""replace_lora_weights_loftq (issue 15, item 4) on a bitsandbytes CPU 4-bit tiny Llama, against peft 0.21.2.

peft 0.21.2 moves each weight to "cuda" (or "xpu") before its SVD, so on a CPU-only machine its
``_loftq_init_new`` is replaced here by the same steps on CPU: bnb's ``dequantize_4bit`` and peft's own
``_low_rank_decomposition``. Everything else (which layers, how the checkpoint is read, the callback and its
rollback) is peft's code. The two libraries load the same checkpoint with the same BitsAndBytesConfig, so the
4-bit codes are equal.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

import peft
import peft.utils.loftq_utils as peft_loftq
from test_qlora import checkpoint, load  # noqa: F401 - checkpoint is a fixture

import lorakit
from lorakit.loftq import replace_lora_weights_loftq
from lorakit.quant import dense_weight

IDS = torch.tensor([[1, 5, 9, 33, 2, 70, 11, 4]])


def cpu_loftq_init_new(qweight, weight, num_bits: int, reduced_rank: int):
    """peft's _loftq_init_new with its device move ("cuda") left out."""
    dequantized = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)
    output = peft_loftq._low_rank_decomposition(weight.float() - dequantized, reduced_rank=reduced_rank)
    return output["R"], output["L"]


def adapted(lib, folder, **config):
    torch.manual_seed(0)
    model = load(folder, "nf4-double")
    return lib.get_peft_model(model, lib.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **config))


def factors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("r, lora_alpha", [(4, 4), (2, 8)])
def test_factors_equal_peft(checkpoint, monkeypatch, r, lora_alpha):  # noqa: F811
    monkeypatch.setattr(peft_loftq, "_loftq_init_new", cpu_loftq_init_new)
    theirs, ours = adapted(peft, checkpoint, r=r, lora_alpha=lora_alpha), \
        adapted(lorakit, checkpoint, r=r, lora_alpha=lora_alpha)
    peft.replace_lora_weights_loftq(theirs, model_path=str(checkpoint))
    before = factors(ours)
    replace_lora_weights_loftq(ours, model_path=str(checkpoint))
    got, want = factors(ours), factors(theirs)
    assert got.keys() == want.keys() and len(got) == 12
    for key in want:
        assert not torch.equal(got[key], before[key]), key
        # the same SVD of the same residual; B A is sign-free, the factors themselves too on the same LAPACK
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-4, atol=1e-4)


def test_error_goes_down_at_unit_scaling(checkpoint):  # noqa: F811
    """‖W − (deq(Q) + B A)‖ < ‖W − deq(Q)‖ on every layer (s = 1), and B A is the rank-r truncation of W − deq(Q)."""
    from safetensors.torch import load_file

    original = load_file(checkpoint / "model.safetensors")
    model = adapted(lorakit, checkpoint, r=4, lora_alpha=4)
    replace_lora_weights_loftq(model, model_path=str(checkpoint / "model.safetensors"))
    layers = [(n, m) for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")]
    assert len(layers) == 6
    for name, layer in layers:
        W, Q = original[name + ".weight"].float(), dense_weight(layer.base_layer)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        truncation = (U[:, :4] * S[:4]) @ Vh[:4]
        torch.testing.assert_close(layer.get_delta_weight("default"), truncation, rtol=1e-4, atol=1e-5)
        assert torch.linalg.norm(W - Q - truncation) < torch.linalg.norm(W - Q)


def test_callback_rolls_back(checkpoint):  # noqa: F811
    model = adapted(lorakit, checkpoint, r=4, lora_alpha=4)
    before = factors(model)
    seen = []

    def keep_v_only(peft_model, name):
        assert peft_model is model
        seen.append(name)
        return name.endswith("v_proj")

    replace_lora_weights_loftq(model, model_path=str(checkpoint), callback=keep_v_only)
    assert seen == [f"model.layers.{i}.{p}" for i in range(2)
                    for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    after = factors(model)
    for key in before:
        assert torch.equal(after[key], before[key]) != ("v_proj" in key), key


def test_refusals(checkpoint, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    dense = lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint),
                                   lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="No bnb LoRA module found on the model"):
        replace_lora_weights_loftq(dense, model_path=str(checkpoint))
    with pytest.raises(FileNotFoundError, match="Could not find file"):
        replace_lora_weights_loftq(adapted(lorakit, checkpoint, r=4), model_path=str(tmp_path))
