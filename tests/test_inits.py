"""Weight-reading inits (PiSSA, OLoRA, LoftQ), orthogonal, NF4, and the residual -> plain LoRA conversion.

Three layers of checks:

* the pure functions of ``lorakit.inits`` on plain tensors: each method's invariant (PiSSA/OLoRA:
  W_res + s·B A == W; orthogonal: B A == 0; LoftQ: Q + s·B A is closer to W than deq(quantize(W))) and
  the structure its formula promises (singular vectors, orthonormal Q, the NF4 grid);
* models: the output at init equals the base output, and against the real peft 0.21.2 with the same seed
  the whole state dict (factors and rewritten base weights) and the outputs agree (PiSSA, PiSSA with
  niter, OLoRA, orthogonal on a tiny Llama and on GPT-2 Conv1D);
* ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``: a trained PiSSA / OLoRA adapter
  written as plain LoRA of rank 2r, loaded by real peft on the untouched base, gives the trained outputs.
"""

from __future__ import annotations

import json
import math
import warnings

import peft
import pytest
import torch
from models import build, example_inputs

import lorakit
from lorakit.config import LoftQConfig
from lorakit.convert import residual_to_plain_lora
from lorakit.errors import LoraWarning
from lorakit.inits import INITS, InitRequest
from lorakit.layer import LoraLayer
from lorakit.nf4 import (
    NF4_LEVELS,
    dequantize_nf4,
    fake_quantize,
    quantize_int8_rows,
    quantize_nf4,
)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5)}
F32 = TOL[torch.float32]
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _request(W, r, scaling=2.0, **extra):
    out, features = W.shape
    return InitRequest(A_shape=(r, features), B_shape=(out, r), r=r, scaling=scaling, weight=W, **extra)


def _logits(model, name):
    out = model(**example_inputs(name))
    return out.logits if hasattr(out, "logits") else out


# ---- NF4 / int8 -----------------------------------------------------------------------------------------------
def test_nf4_levels_round_trip_exactly():
    block = torch.cat([NF4_LEVELS, NF4_LEVELS.flip(0), NF4_LEVELS, NF4_LEVELS]) * 3.5  # one block of 64
    codes, absmax = quantize_nf4(block)
    assert codes.dtype == torch.uint8 and absmax.tolist() == [3.5]
    assert codes[:16].tolist() == list(range(16))
    torch.testing.assert_close(dequantize_nf4(codes, absmax, block.shape), block, atol=0, rtol=0)


def test_nf4_round_trip_error_is_bounded_by_half_the_widest_level_gap():
    W = _randn(37, 29)  # 1073 values: 16 full blocks and a short last one
    codes, absmax = quantize_nf4(W)
    assert codes.shape == (W.numel(),) and absmax.shape == (math.ceil(W.numel() / 64),)
    assert int(codes.max()) <= 15
    torch.testing.assert_close(absmax, torch.nn.functional.pad(W.flatten(), (0, 64 - W.numel() % 64)).view(-1, 64)
                               .abs().amax(1), atol=0, rtol=0)
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    bound = (absmax.repeat_interleave(64)[: W.numel()] * half_gap).view(W.shape)
    error = (dequantize_nf4(codes, absmax, W.shape) - W).abs()
    assert (error <= bound + 1e-7).all()
    assert 0 < error.mean() < 0.1 * W.abs().mean()


def test_nf4_of_zeros_is_zeros_and_fake_quantize_is_idempotent():
    assert fake_quantize(torch.zeros(3, 70), 4).eq(0).all()
    W = _randn(16, 24)
    for bits in (4, 8):
        once = fake_quantize(W, bits)
        torch.testing.assert_close(fake_quantize(once, bits), once, **F32)


def test_int8_rows_error_bound():
    W = _randn(8, 50)
    codes, absmax = quantize_int8_rows(W)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    assert ((fake_quantize(W, 8) - W).abs() <= absmax[:, None] / 254 + 1e-7).all()


def test_fake_quantize_other_bits_raise():
    with pytest.raises(ValueError, match="loftq_bits"):
        fake_quantize(_randn(4, 4), 3)


# ---- the pure init functions ----------------------------------------------------------------------------------
SHAPES = [((24, 16), 4), ((16, 24), 1), ((20, 20), 8)]


@pytest.mark.parametrize("method", ["pissa", "olora"])
@pytest.mark.parametrize("scaling", [0.5, 2.0])
@pytest.mark.parametrize("shape, r", SHAPES)
def test_residual_inits_preserve_weight(method, scaling, shape, r):
    W = _randn(*shape)
    out = INITS[method](_request(W, r, scaling))
    assert out.A.shape == (r, shape[1]) and out.B.shape == (shape[0], r)
    torch.testing.assert_close(out.base_weight + scaling * out.B @ out.A, W, **F32)


@pytest.mark.parametrize("shape, r", SHAPES)
def test_pissa_takes_the_principal_triplets(shape, r):
    W, s = _randn(*shape), 2.0
    out = INITS["pissa"](_request(W, r, s))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(s * out.B @ out.A, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], **F32)
    # B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ: per component, up to the sign of the singular vectors
    torch.testing.assert_close(out.B.abs(), (U[:, :r] * (S[:r] / s).sqrt()).abs(), **F32)
    torch.testing.assert_close(out.A.abs(), ((S[:r] / s).sqrt()[:, None] * Vh[:r]).abs(), **F32)
    torch.testing.assert_close(torch.linalg.svdvals(out.base_weight)[: min(shape) - r], S[r:], **F32)


def test_pissa_niter_matches_full_svd_on_a_low_rank_weight():
    r, s = 4, 2.0
    W = _randn(48, r, seed=1) @ _randn(r, 40, seed=2)  # rank exactly r
    full = INITS["pissa"](_request(W, r, s))
    torch.manual_seed(0)
    fast = INITS["pissa"](_request(W, r, s, options={"niter": 2}))
    torch.testing.assert_close(fast.B @ fast.A, full.B @ full.A, atol=1e-4, rtol=1e-4)
    assert fast.base_weight.abs().max() < 1e-4 * W.abs().max()


def test_olora_structure():
    W = _randn(24, 16)
    out = INITS["olora"](_request(W, 6))
    torch.testing.assert_close(out.B.T @ out.B, torch.eye(6), **F32)  # orthonormal columns
    assert torch.equal(out.A, out.A.triu())  # the first r rows of R
    Q, _ = torch.linalg.qr(W)
    torch.testing.assert_close(out.B, Q[:, :6], atol=0, rtol=0)


@pytest.mark.parametrize("shape, r", [((24, 16), 4), ((16, 40), 8)])
def test_orthogonal_gives_zero_product_from_nonzero_factors(shape, r):
    out = INITS["orthogonal"](InitRequest(A_shape=(r, shape[1]), B_shape=(shape[0], r), r=r, scaling=2.0))
    assert out.base_weight is None and out.A.shape == (r, shape[1]) and out.B.shape == (shape[0], r)
    assert out.B.abs().mean() > 1e-3 and out.A.abs().mean() > 1e-3
    torch.testing.assert_close(out.B @ out.A, torch.zeros(shape), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("scaling", [1.0, 2.0])
def test_loftq_beats_plain_quantization(bits, iters, scaling):
    W, r = _randn(64, 48), 8
    out = INITS["loftq"](_request(W, r, scaling, options={"bits": bits, "iters": iters}))
    Q = out.base_weight
    torch.testing.assert_close(fake_quantize(Q, bits), Q, **F32)  # the base holds a quantised weight
    loftq_error = torch.linalg.norm(W - (Q + scaling * out.B @ out.A))
    assert loftq_error < 0.9 * torch.linalg.norm(W - fake_quantize(W, bits))
    if iters == 1:  # s·B A is the best rank-r fit of W − deq(quantize(W))
        U, S, Vh = torch.linalg.svd(W - fake_quantize(W, bits))
        torch.testing.assert_close(scaling * out.B @ out.A, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], **F32)


def test_loftq_iterations_do_not_increase_the_error():
    W, r = _randn(64, 48, seed=3), 4
    errors = [torch.linalg.norm(W - (out.base_weight + out.B @ out.A)).item() for out in
              (INITS["loftq"](_request(W, r, 1.0, options={"bits": 4, "iters": n})) for n in (1, 2, 4))]
    assert errors[1] <= errors[0] * 1.001 and errors[2] <= errors[0] * 1.001, errors


CONV = dict(A_shape=(4, 3, 3, 3), B_shape=(5, 4, 1, 1), r=4, scaling=1.0, weight=_randn(5, 27))


@pytest.mark.parametrize("method", ["pissa", "olora", "orthogonal", "loftq"])
def test_conv_targets_are_refused_like_peft(method):
    options = {"bits": 4, "iters": 1} if method == "loftq" else {}
    with pytest.raises(ValueError, match=rf"init_lora_weights='{method}'.*Conv2d"):
        INITS[method](InitRequest(**CONV, options=options))


@pytest.mark.parametrize("method", ["pissa", "olora", "orthogonal"])
def test_embedding_targets_get_the_embedding_init_with_a_warning(method):
    request = InitRequest(A_shape=(4, 20), B_shape=(8, 4), r=4, scaling=1.0, embedding=True, weight=_randn(8, 20))
    with pytest.warns(LoraWarning, match=rf"init_lora_weights='{method}'.*Embedding"):
        out = INITS[method](request)
    assert out.base_weight is None and out.A.eq(0).all() and out.B.std() > 0.5


def test_loftq_embedding_and_too_large_rank_and_odd_orthogonal_rank_raise():
    with pytest.raises(ValueError, match="loftq.*Embedding"):
        INITS["loftq"](InitRequest(A_shape=(4, 20), B_shape=(8, 4), r=4, scaling=1.0, embedding=True,
                                   weight=_randn(8, 20), options={"bits": 4, "iters": 1}))
    for method in ("pissa", "olora", "loftq"):
        with pytest.raises(ValueError, match=rf"r=9 .*init_lora_weights='{method}'.*min\(out, in\) = 8"):
            INITS[method](_request(_randn(8, 12), 9, options={"bits": 4, "iters": 1}))
    with pytest.raises(ValueError, match="init_lora_weights='orthogonal' needs an even rank"):
        INITS["orthogonal"](InitRequest(A_shape=(3, 8), B_shape=(8, 3), r=3, scaling=1.0))


# ---- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loftq_config", [LoftQConfig(loftq_bits=8, loftq_iter=3), {"loftq_bits": 8, "loftq_iter": 3}])
def test_loftq_options_come_from_loftq_config(loftq_config):
    config = lorakit.LoraConfig(init_lora_weights="loftq", loftq_config=loftq_config)
    assert config.init_method.name == "loftq" and config.init_method.options == {"bits": 8, "iters": 3}
    assert lorakit.LoraConfig(init_lora_weights="pissa_niter_16").init_method.options == {"niter": 16}


@pytest.mark.parametrize("loftq_config", [{}, {"loftq_bits": 3, "loftq_iter": 1}, {"loftq_bits": 4, "loftq_iter": 0}])
def test_invalid_loftq_config_raises(loftq_config):
    with pytest.raises(ValueError, match="loftq_config"):
        lorakit.LoraConfig(init_lora_weights="loftq", loftq_config=loftq_config)


# ---- models: invariants and agreement with peft ---------------------------------------------------------------
def _both(name, seed=7, **kwargs):
    """(peft model, lorakit model), each from the same base weights and the same RNG state."""
    models = []
    for library in (peft, lorakit):
        torch.manual_seed(seed)
        models.append(library.get_peft_model(build(name), library.LoraConfig(**kwargs)))
    return models


MODELS = {"llama": dict(target_modules="all-linear"), "gpt2": dict(target_modules="all-linear", fan_in_fan_out=True)}
PEFT_AGREES = [(m, i) for m in MODELS for i in ("pissa", "pissa_niter_2", "olora", "orthogonal")
               if (m, i) != ("gpt2", "olora")]  # peft 0.21.2's OLoRA fails on GPT-2 Conv1D (see inits.olora)


@pytest.mark.parametrize("name, init", PEFT_AGREES, ids=[f"{m}-{i}" for m, i in PEFT_AGREES])
def test_inits_agree_with_peft(name, init):
    ours_base = _logits(build(name), name)
    theirs, ours = _both(name, init_lora_weights=init, r=4, lora_alpha=16, **MODELS[name])
    state = theirs.state_dict()
    assert state.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():  # factors and the rewritten base weights
        torch.testing.assert_close(value, state[key], **F32, msg=key)
    torch.testing.assert_close(_logits(ours, name), _logits(theirs, name), **F32)
    torch.testing.assert_close(_logits(ours, name), ours_base, **F32)  # the adapted model starts as the base


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_merges_back_to_the_original_weights(name, init):
    original = build(name)
    model = lorakit.get_peft_model(build(name), lorakit.LoraConfig(init_lora_weights=init, r=4, lora_alpha=8,
                                                                   use_rslora=True, **MODELS[name]))
    torch.testing.assert_close(_logits(model, name), _logits(original, name), **F32)
    merged = model.merge_and_unload()
    for key, value in original.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, **F32, msg=key)


def test_loftq_on_a_model_beats_plain_quantization_per_layer():
    original = build("llama")
    config = lorakit.LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2),
                                r=4, lora_alpha=8, target_modules=LLAMA_LINEAR)
    model = lorakit.get_peft_model(build("llama"), config)
    layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == 14
    for path, layer in layers.items():
        W = original.get_submodule(path).weight
        adapted = layer.base_layer.weight + layer.get_delta_weight("default")
        assert torch.linalg.norm(W - adapted) < torch.linalg.norm(W - fake_quantize(W, 4)), path


def test_mlp_embedding_warns_and_conv_raises_through_get_peft_model():
    base = _logits(build("mlp"), "mlp")
    with pytest.warns(LoraWarning, match="Embedding"):
        model = lorakit.get_peft_model(build("mlp"), lorakit.LoraConfig(init_lora_weights="pissa",
                                                                        target_modules=["emb", "lin1"]))
    torch.testing.assert_close(_logits(model, "mlp"), base, **F32)
    with pytest.raises(ValueError, match="init_lora_weights='olora'.*Conv2d"):
        lorakit.get_peft_model(build("mlp"), lorakit.LoraConfig(init_lora_weights="olora", target_modules=["conv"]))


# ---- residual -> plain LoRA conversion ------------------------------------------------------------------------
def _train(model, steps=3):
    inputs = example_inputs("llama")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(steps):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


CONVERSIONS = {
    "pissa-lm_head": dict(init_lora_weights="pissa", r=4, lora_alpha=8, target_modules=LLAMA_LINEAR + ["lm_head"],
                          rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}),  # lm_head's W_res is saved too
    "olora-embed-modules_to_save": dict(init_lora_weights="olora", r=4, lora_alpha=8,
                                        target_modules=["q_proj", "v_proj", "embed_tokens"],
                                        modules_to_save=["lm_head"]),
    "pissa_niter-rslora-rank_pattern": dict(init_lora_weights="pissa_niter_4", r=4, lora_alpha=8, use_rslora=True,
                                            target_modules=["k_proj", "down_proj"], rank_pattern={"down_proj": 2}),
}


@pytest.mark.parametrize("case", list(CONVERSIONS))
def test_conversion_round_trip_loads_in_peft(case, tmp_path):
    kwargs = CONVERSIONS[case]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraWarning)  # the embedding's init note
        model = lorakit.get_peft_model(build("llama"), lorakit.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    model.save_pretrained(tmp_path / "init")
    trained = _logits(_train(model), "llama")
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init"))

    written = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    factor = math.sqrt(2) if kwargs.get("use_rslora") else 2
    assert written["init_lora_weights"] is True and written["r"] == 8
    assert written["lora_alpha"] == pytest.approx(8 * factor)
    assert written["rank_pattern"] == {k: 2 * v for k, v in kwargs.get("rank_pattern", {}).items()}
    assert written["alpha_pattern"] == {k: v * factor for k, v in kwargs.get("alpha_pattern", {}).items()}
    assert json.loads((tmp_path / "init" / "adapter_config.json").read_text())["init_lora_weights"] is True  # as PEFT
    for library in (peft, lorakit):
        loaded = library.PeftModel.from_pretrained(build("llama"), str(tmp_path / "plain"))
        torch.testing.assert_close(_logits(loaded, "llama"), trained, atol=1e-4, rtol=1e-4)


def test_conversion_matches_peft_file_for_file(tmp_path):
    kwargs = dict(init_lora_weights="pissa", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"])
    files = {}
    for library in (peft, lorakit):
        torch.manual_seed(0)
        model = library.get_peft_model(build("llama"), library.LoraConfig(task_type="CAUSAL_LM", **kwargs))
        folder = tmp_path / library.__name__
        model.save_pretrained(str(folder / "init"))
        _train(model).save_pretrained(str(folder / "plain"),
                                      path_initial_model_for_weight_conversion=str(folder / "init"))
        files[library.__name__] = lorakit.io.read_weights(folder / "plain")
    assert files["peft"].keys() == files["lorakit"].keys()
    for key, value in files["lorakit"].items():
        assert value.shape[0 if "lora_A" in key else 1] == 8
        torch.testing.assert_close(value, files["peft"][key], atol=1e-4, rtol=1e-4, msg=key)


def test_conversion_errors_list_every_problem():
    config = lorakit.LoraConfig(init_lora_weights="pissa", r=4, target_modules=["q"])
    A, B = "base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight"
    tensors = {A: torch.ones(4, 6), B: torch.ones(5, 4)}
    with pytest.raises(ValueError) as info:
        residual_to_plain_lora(tensors, config, {A: torch.ones(2, 6)}, lorakit.LoraConfig(r=2, target_modules=["q"]))
    message = str(info.value)
    assert "3 problem(s)" in message and "r: initial 2, trained 4" in message
    assert f"{A}: trained (4, 6), initial (2, 6)" in message and f"{B}: trained (5, 4), initial missing" in message
    converted, plain = residual_to_plain_lora(tensors, config, {A: 2 * torch.ones(4, 6), B: torch.ones(5, 4)}, config)
    assert plain.r == 8 and plain.lora_alpha == 16 and plain.init_lora_weights is True
    torch.testing.assert_close(converted[B] @ converted[A], tensors[B] @ tensors[A] - torch.ones(5, 4) @ (2 * torch.ones(4, 6)))
