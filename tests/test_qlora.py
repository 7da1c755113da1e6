"""QLoRA: LoRA over bitsandbytes 4-bit (nf4 / fp4, double quant) and 8-bit bases, against real PEFT.

Both libraries get the same quantized weights (the same checkpoint loaded by transformers with the same
BitsAndBytesConfig) and the same adapter weights (PEFT's state dict copied into lorakit's model).
bnb's CPU forward in eval mode repacks 4-bit weights for its AVX512-BF16 kernel (bf16 absmax, and it fails for
layers narrower than 64); the models here keep the fp32 path, which is what training runs.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from models import tiny_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lorakit
from lorakit.errors import LoraWarning
from lorakit.nf4 import fake_quantize
from lorakit.quant import PROBE_ROWS, dense_weight, find_backend

TOL = dict(atol=1e-5, rtol=1e-5)
QUANT = {
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
FOUR_BIT = ["nf4-double", "fp4"]
VARIANTS = {
    "plain": dict(),
    "rslora-bias": dict(use_rslora=True, lora_bias=True),
    "dora": dict(use_dora=True),
}
IDS = torch.tensor([[1, 5, 9, 33, 2, 70, 11, 4], [3, 3, 100, 17, 8, 6, 42, 120]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama of width 64 (bitsandbytes 0.50.2's CPU quantize_4bit mis-quantizes matrices whose rows are
    shorter than its block size, 64; both libraries would see the same wrong codes, but the tests want real NF4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(folder, quant: str):
    """The checkpoint loaded by transformers in 4/8 bits on CPU, fp32 bnb path (module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**QUANT[quant]),
                                                     device_map="cpu")
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def config_kwargs(variant: str) -> dict:
    return dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **VARIANTS[variant])


def pair(folder, quant: str, variant: str = "plain"):
    """(PEFT model, lorakit model) on equal quantized bases with PEFT's adapter weights in both."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load(folder, quant), peft.LoraConfig(**config_kwargs(variant)))
    ours = lorakit.get_peft_model(load(folder, quant), lorakit.LoraConfig(**config_kwargs(variant)))
    lora = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    missing = set(lora) - set(ours.state_dict())
    assert not missing, missing
    ours.load_state_dict(lora, strict=False)
    return theirs, ours


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: param.grad for name, param in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("quant", QUANT)
def test_outputs_and_gradients_equal_peft(checkpoint, quant, variant):
    theirs, ours = pair(checkpoint, quant, variant)
    heads = [repr(m.base_model.model.model.layers[0].self_attn.q_proj).split("(")[0] for m in (theirs, ours)]
    assert heads[0] == heads[1] == ("lora.Linear8bitLt" if quant == "int8" else "lora.Linear4bit")
    outputs = []
    for model in (theirs, ours):
        model.train()
        logits = model(input_ids=IDS).logits
        logits.square().mean().backward()
        outputs.append(logits)
    torch.testing.assert_close(outputs[1], outputs[0], **TOL)
    grads_theirs, grads_ours = lora_grads(theirs), lora_grads(ours)
    assert grads_theirs.keys() == grads_ours.keys() and len(grads_ours) > 0
    for name, grad in grads_theirs.items():
        torch.testing.assert_close(grads_ours[name], grad, **TOL, msg=name)


@pytest.mark.parametrize("quant", QUANT)
def test_trainable_parameter_counts_equal_peft(checkpoint, quant):
    theirs, ours = pair(checkpoint, quant)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    packed = sum(p.numel() for p in ours.parameters() if p.__class__.__name__ == "Params4bit")
    assert (packed > 0) == quant.startswith(("nf4", "fp4"))


@pytest.mark.parametrize("quant", QUANT)
def test_adapter_files_equal_full_precision_base_and_load_in_peft(checkpoint, quant, tmp_path):
    theirs, ours = pair(checkpoint, quant)
    ours.save_pretrained(tmp_path / "qlora")
    dense = lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint),
                                   lorakit.LoraConfig(**config_kwargs("plain")))
    dense.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    dense.save_pretrained(tmp_path / "dense")
    saved, reference = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("qlora", "dense"))
    assert saved.keys() == reference.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], reference[key], atol=0, rtol=0)
    assert (json.loads((tmp_path / "qlora" / "adapter_config.json").read_text())
            == json.loads((tmp_path / "dense" / "adapter_config.json").read_text()))
    theirs.save_pretrained(tmp_path / "peft")
    expected = ours.eval()(input_ids=IDS).logits.detach()
    loaded = {  # PEFT on its own QLoRA model loads ours; lorakit loads PEFT's; lorakit reloads its own
        "peft<-lorakit": peft.PeftModel.from_pretrained(
            peft.prepare_model_for_kbit_training(load(checkpoint, quant), use_gradient_checkpointing=False),
            tmp_path / "qlora"),
        "lorakit<-peft": lorakit.PeftModel.from_pretrained(load(checkpoint, quant), tmp_path / "peft"),
        "lorakit<-lorakit": lorakit.PeftModel.from_pretrained(load(checkpoint, quant), tmp_path / "qlora"),
    }
    for name, model in loaded.items():
        torch.testing.assert_close(model.eval()(input_ids=IDS).logits.detach(), expected, **TOL, msg=name)


def _targets(model) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """{path: (base layer, W + s·ΔW in float32)}: what a merge should write into each quantized layer."""
    return {path: (layer.base_layer, dense_weight(layer.base_layer) + layer.get_delta_weight("default"))
            for path, layer in model.named_modules() if isinstance(layer, lorakit.LoraLayer)}


@pytest.mark.parametrize("quant", QUANT)
def test_merge_requantizes_equals_peft_and_warns_with_the_measured_rounding(checkpoint, quant):
    theirs, ours = pair(checkpoint, quant)
    targets = _targets(ours)
    with pytest.warns(LoraWarning, match="requantizing") as record:
        merged = ours.merge_and_unload()
    assert not any(isinstance(module, lorakit.LoraLayer) for module in merged.modules())
    number = float(re.search(r"outputs on N\(0, 1\) probe inputs is ([0-9.e+-]+)", str(record[0].message)).group(1))
    measured = max((torch.randn(PROBE_ROWS, base.in_features, generator=torch.Generator().manual_seed(0))
                    @ (dense_weight(base) - W).T).abs().max().item() for base, W in targets.values())
    assert number == pytest.approx(measured, rel=1e-3) and number > 0
    expected = theirs.merge_and_unload().eval()(input_ids=IDS).logits
    torch.testing.assert_close(merged.eval()(input_ids=IDS).logits, expected, **TOL)


@pytest.mark.parametrize("variant", ["plain", "dora"])
@pytest.mark.parametrize("quant", QUANT)
def test_merge_and_unload_dequantize_is_exact_full_precision(checkpoint, quant, variant):
    _, ours = pair(checkpoint, quant, variant)
    reference = copy.deepcopy(ours)  # the unmerged model over deq(Q) in fp32: no rounding anywhere
    lorakit.quant.dequantize_model(reference.base_model.model)
    with torch.no_grad():
        expected = reference.eval()(input_ids=IDS).logits
        if quant in FOUR_BIT:  # bnb's fp32 4-bit path computes x deq(Q)ᵀ: the same as the dequantized model
            torch.testing.assert_close(ours.eval()(input_ids=IDS).logits, expected, **TOL)
        with warnings.catch_warnings():
            warnings.simplefilter("error", LoraWarning)  # an exact merge has nothing to warn about
            merged = ours.merge_and_unload(dequantize=True)
        assert not any(find_backend(module) for module in merged.modules())
        assert all(p.dtype == torch.float32 for p in merged.parameters()) and not merged.is_quantized
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, **TOL)


def _flagged_bf16(quantize: bool):
    model = tiny_llama(0).to(torch.bfloat16)  # width 32: quantization quality does not matter here
    return lorakit.quantize_model(model, compute_dtype=torch.bfloat16) if quantize else model


@pytest.mark.parametrize("quantize, gc, kwargs", [
    (False, True, None), (True, False, None), (True, True, None), (True, True, {"use_reentrant": False}),
])
def test_prepare_model_for_kbit_training_matches_peft(quantize, gc, kwargs):
    ours, theirs = _flagged_bf16(quantize), _flagged_bf16(quantize)  # seeded: equal models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert lorakit.prepare_model_for_kbit_training(ours, gc, kwargs) is ours
        peft.prepare_model_for_kbit_training(theirs, gc, kwargs)
        facts = [({n: (p.dtype, p.requires_grad) for n, p in m.named_parameters()}, m.is_gradient_checkpointing,
                  m.model.embed_tokens(IDS).requires_grad, m.training) for m in (ours, theirs)]
    assert facts[0] == facts[1]
    assert facts[0][1] == (quantize and gc)


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_quantize_model_equals_transformers_4bit_load(checkpoint, quant_type, double_quant):
    ours = lorakit.quantize_model(AutoModelForCausalLM.from_pretrained(checkpoint), quant_type=quant_type,
                                  double_quant=double_quant)
    theirs = load(checkpoint, "nf4-double" if quant_type == "nf4" else "fp4")
    quantized = {n for n, m in ours.named_modules() if find_backend(m)}
    assert quantized == {n for n, m in theirs.named_modules() if find_backend(m)} and "lm_head" not in quantized
    assert len(quantized) == 14
    for name in quantized:
        torch.testing.assert_close(dense_weight(ours.get_submodule(name)), dense_weight(theirs.get_submodule(name)),
                                   atol=0, rtol=0)
    torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, **TOL)


def test_dense_weight_reads_through_bnbs_cpu_repacked_layout():
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    layer.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4", module=layer)
    layer = layer.to("cpu").eval()
    before = dense_weight(layer)
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bnb never repacks here")
    with torch.no_grad():
        layer(torch.randn(2, 128))  # repacks the weight in place (absmax -> bf16)
    assert layer.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(dense_weight(layer), before, atol=0, rtol=1e-2)  # bf16 absmax: 3 significant digits


# ---- weight-reading inits on quantized bases -------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
@pytest.mark.parametrize("quant", ["nf4-double", "int8"])
def test_residual_inits_requantize_a_residual_that_keeps_w(checkpoint, quant, init):
    """deq(Q(W_res)) + s·B A reproduces the original deq(Q(W)) up to one requantization of W_res.

    LoftQ here starts from W = deq(Q) (the original weights are gone), so its adapter only fits the rounding of
    the re-quantization; for its real use see the LoftQ-then-quantize_model test below.
    """
    plain = load(checkpoint, quant)
    originals = {n: dense_weight(m) for n, m in plain.named_modules() if find_backend(m)}
    bits = 8 if quant == "int8" else 4
    options = dict(loftq_config={"loftq_bits": bits, "loftq_iter": 1}) if init == "loftq" else {}
    model = lorakit.get_peft_model(load(checkpoint, quant), lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init, **options))
    for path, layer in model.base_model.model.named_modules():
        if isinstance(layer, lorakit.LoraLayer):
            W, delta = originals[path], layer.get_delta_weight("default")
            rebuilt = dense_weight(layer.base_layer) + delta  # = deq(Q(W_res)) + s·B A
            residual = W - delta
            requantize_error = (fake_quantize(residual, bits) - residual).abs().max()
            slack = 1e-4 if init == "loftq" else 1e-6  # LoftQ's Q is on nf4.py's grid; bnb stores absmax in 8 bits
            assert (rebuilt - W).abs().max() <= 2 * requantize_error + slack, path
            if init != "loftq":  # the adapter holds a real part of W, not rounding
                assert delta.abs().max() > 2 * requantize_error


def test_olora_on_4bit_equals_peft(checkpoint):
    outputs = []
    for library in (peft, lorakit):
        torch.manual_seed(0)
        model = library.get_peft_model(load(checkpoint, "nf4-double"), library.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="olora"))
        outputs.append(model.eval()(input_ids=IDS).logits.detach())
    torch.testing.assert_close(outputs[1], outputs[0], **TOL)


def test_loftq_then_quantize_model_stores_exactly_loftqs_quantized_base(checkpoint):
    """LoftQ's NF4 (nf4.py) is bnb's: quantize_model (no double quant) stores Q itself, and Q + s·B A beats Q(W)."""
    fp32 = AutoModelForCausalLM.from_pretrained(checkpoint)
    originals = {n: m.weight.detach().clone() for n, m in fp32.named_modules() if isinstance(m, torch.nn.Linear)}
    model = lorakit.get_peft_model(fp32, lorakit.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                                           init_lora_weights="loftq",
                                                           loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    fake = {path: layer.base_layer.weight.detach().clone() for path, layer in model.base_model.model.named_modules()
            if isinstance(layer, lorakit.LoraLayer)}
    lorakit.quantize_model(model.base_model.model, double_quant=False)
    for path, Q in fake.items():
        layer = model.base_model.model.get_submodule(path)
        assert find_backend(layer.base_layer) is not None
        torch.testing.assert_close(dense_weight(layer.base_layer), Q, atol=1e-6, rtol=0)
        W = originals[path]
        fitted = (W - Q - layer.get_delta_weight("default")).norm()
        assert fitted < 0.97 * (W - fake_quantize(W, 4)).norm(), path


# ---- the command line ------------------------------------------------------------------------------------------
def test_cli_train_load_in_4bit_adapter_loads_in_peft(tmp_path):
    from tiny_lm import save_tiny_llm, write_chat_jsonl

    from lorakit.app.cli import main

    model_dir, data = save_tiny_llm(tmp_path / "model"), write_chat_jsonl(tmp_path / "chat.jsonl")
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "out"),
                 "--samples", "0", "--r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--batch-size", "4",
                 "--lr", "1e-2", "--time-limit", "0", "--max-steps", "10", "--load-in-4bit"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["held_out_loss_after"] < metrics["held_out_loss_before"]
    ids = torch.tensor([[2, 5, 7, 12, 11, 13, 3, 7, 2, 6, 7]])
    theirs = peft.PeftModel.from_pretrained(load(model_dir, "nf4-double"), tmp_path / "out" / "adapter")
    ours = lorakit.PeftModel.from_pretrained(
        lorakit.quantize_model(AutoModelForCausalLM.from_pretrained(model_dir)), tmp_path / "out" / "adapter")
    with torch.no_grad():
        expected = theirs.eval()(input_ids=ids).logits
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits, expected, **TOL)
        plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-2  # the adapter is trained, not zero
