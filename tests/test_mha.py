"""LoRA on nn.MultiheadAttention (kinds_mha.py) against the real peft 0.21.2 and against the formula.

    W_in' = W_in + s·B A (3E, E),  W_out' = W_out + s·B' A' (E, E),  y = MHA(q, k, v; W_in', b_in, W_out', b_out)

The same seeded model is wrapped by peft and by lorakit, the adapters are made non-zero and copied across
with ``load_state_dict(strict=True)``. Where PEFT is right, outputs and every gradient must agree to 1e-5;
PEFT 0.21.2 adds out_proj's update twice (huggingface/peft#3774), so those comparisons zero out_proj's B
(then the doubled term is zero in PEFT too), and the out_proj update is checked against ``mha_reference``, a
direct call of ``F.multi_head_attention_forward`` with the dense weights. ``test_peft_doubles_out_proj``
pins down the difference itself.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.layer import LoraLayer

TOL = dict(atol=1e-5, rtol=1e-5)
OUT_B = "base_model.model.mha.base_layer.out_proj.lora_B.default.weight"


class AttentionModel(nn.Module):
    """x (L, N, E) (or (N, L, E) with batch_first) -> self-attention -> Linear(E, 2); PEFT's ModelMha, extended."""

    def __init__(self, batch_first: bool = False, bias: bool = True, add_bias_kv: bool = False) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, bias=bias, add_bias_kv=add_bias_kv, batch_first=batch_first)
        self.lin0 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        source = x if memory is None else memory
        y, _ = self.mha(x, source, source, **kwargs)
        return self.lin0(y)


def _model(options: dict) -> AttentionModel:
    torch.manual_seed(0)
    return AttentionModel(**options)


def _inputs(options: dict, forward: dict) -> dict:
    generator = torch.Generator().manual_seed(1)
    shape = (2, 5, 8) if options.get("batch_first") else (5, 2, 8)
    inputs = {"x": torch.randn(shape, generator=generator)}
    if forward.get("memory"):  # cross-attention: keys and values from another sequence of the same size
        inputs["memory"] = torch.randn(shape, generator=generator)
    if forward.get("causal"):
        inputs["attn_mask"] = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    if forward.get("need_weights") is False:
        inputs["need_weights"] = False
    return inputs


# (id, AttentionModel options, LoraConfig kwargs, forward options)
CASES = [
    ("mha", {}, dict(target_modules=["mha"]), {}),
    ("mha-and-lin0", {}, dict(target_modules=["mha", "lin0"]), {}),
    ("batch-first-causal", dict(batch_first=True), dict(target_modules=["mha"]), dict(causal=True)),
    ("cross-attention-rslora", {}, dict(target_modules=["mha"], use_rslora=True), dict(memory=True)),
    ("no-bias-bias-kv", dict(bias=False, add_bias_kv=True), dict(target_modules=["mha"], r=2),
     dict(need_weights=False)),
    ("dropout-ignored", {}, dict(target_modules=["mha"], lora_dropout=0.5), {}),
]
PARAMS = [pytest.param(*case[1:], id=case[0]) for case in CASES]


def _pair(options: dict, kwargs: dict, zero_out_b: bool = True) -> tuple[nn.Module, nn.Module]:
    """(peft model, lorakit model) with the same non-zero adapter; out_proj's B zeroed unless told otherwise."""
    wrapped = []
    for lib in (peft, lorakit):
        config = lib.LoraConfig(**{"r": 4, "lora_alpha": 8, **kwargs})
        wrapped.append(lib.get_peft_model(_model(options), config))
    ref, ours = wrapped
    generator = torch.Generator().manual_seed(7)
    state = {k: (torch.randn(v.shape, generator=generator) * 0.3 if "lora_" in k else v)
             for k, v in ref.state_dict().items()}
    if zero_out_b:
        state[OUT_B] = torch.zeros_like(state[OUT_B])
    ref.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)
    return ref, ours


def mha_reference(model: nn.Module, adapters: list[str], inputs: dict) -> torch.Tensor:
    """lin0(MHA(x; W_in + Σ s·B A, W_out + Σ s·B' A')) by F.multi_head_attention_forward, from the dense factors."""
    layer = model.base_model.model.mha
    base, out_proj = layer.base_layer, layer.base_layer.out_proj
    W_in, W_out = base.in_proj_weight, out_proj.base_layer.weight
    for name in adapters:
        W_in = W_in + layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight
        W_out = W_out + out_proj.scaling[name] * out_proj.lora_B[name].weight @ out_proj.lora_A[name].weight
    x = inputs["x"]
    source = inputs.get("memory", x)
    q, k, v = (t.transpose(0, 1) if base.batch_first else t for t in (x, source, source))
    y, _ = F.multi_head_attention_forward(
        q, k, v, base.embed_dim, base.num_heads, W_in, base.in_proj_bias, base.bias_k, base.bias_v,
        base.add_zero_attn, 0.0, W_out, out_proj.base_layer.bias, training=False,
        need_weights=False, attn_mask=inputs.get("attn_mask"))
    y = y.transpose(0, 1) if base.batch_first else y
    lin0 = model.base_model.model.lin0
    return lin0(y) if isinstance(lin0, nn.Linear) else lin0.base_layer(y) + sum(
        lin0.scaling[n] * lin0.lora_B[n](lin0.lora_A[n](y)) for n in adapters)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("options, kwargs, forward", PARAMS)
def test_layout_matches_peft(options, kwargs, forward):
    ref, ours = _pair(options, kwargs)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {n for n, _ in ours.named_modules()} == {n for n, _ in ref.named_modules()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in ref.named_parameters() if p.requires_grad}
    assert ours.base_model.targeted_module_names == ref.base_model.targeted_module_names
    assert repr(ours.base_model.model) == repr(ref.base_model.model)
    ours_layer, ref_layer = ours.base_model.model.mha, ref.base_model.model.mha
    for name in ("embed_dim", "num_heads", "batch_first", "head_dim", "kdim", "vdim", "dropout", "add_zero_attn",
                 "in_features", "out_features", "_qkv_same_embed_dim"):
        assert getattr(ours_layer, name) == getattr(ref_layer, name), name
    assert ours_layer.in_proj_weight is ours_layer.base_layer.in_proj_weight
    assert ours_layer.out_proj is ours_layer.base_layer.out_proj.base_layer  # unwrapped, as PEFT shows it
    assert type(ours_layer.out_proj) is type(ref_layer.out_proj)


@pytest.mark.parametrize("options, kwargs, forward", PARAMS)
def test_outputs_and_gradients_match_peft(options, kwargs, forward):
    ref, ours = _pair(options, kwargs)
    inputs = _inputs(options, forward)
    outputs = []
    for model in (ref, ours):
        model.train()
        outputs.append(model(**inputs))
        outputs[-1].square().mean().backward()
    torch.testing.assert_close(outputs[1], outputs[0], **TOL)
    torch.testing.assert_close(_grads(ours), _grads(ref), **TOL)
    assert all(g.abs().sum() > 0 for n, g in _grads(ours).items() if "lora_B" in n)
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs), ref(**inputs), **TOL)


@pytest.mark.parametrize("options, kwargs, forward", PARAMS)
def test_outputs_and_gradients_match_the_formula(options, kwargs, forward):
    _, ours = _pair(options, kwargs, zero_out_b=False)
    inputs = _inputs(options, forward)
    ours.train()
    ours(**inputs).square().mean().backward()
    grads = _grads(ours)
    ours.zero_grad()
    expected = mha_reference(ours, ["default"], inputs)
    expected.square().mean().backward()
    torch.testing.assert_close(ours(**inputs), expected, **TOL)
    torch.testing.assert_close(grads, _grads(ours), **TOL)
    assert grads[OUT_B].abs().sum() > 0


def test_peft_doubles_out_proj():
    """PEFT 0.21.2 runs out_proj with W_out + 2·s·B'A' (huggingface/peft#3774): lorakit's B' is PEFT's 2·B'."""
    ref, ours = _pair({}, dict(target_modules=["mha"]), zero_out_b=False)
    inputs = _inputs({}, {})
    assert not torch.allclose(ours(**inputs), ref(**inputs), **TOL)
    state = ours.state_dict()
    ref.load_state_dict({**state, OUT_B: state[OUT_B] / 2}, strict=True)
    torch.testing.assert_close(ours(**inputs), ref(**inputs), **TOL)


@pytest.mark.parametrize("options, kwargs, forward", PARAMS)
def test_forward_leaves_base_parameters_untouched(options, kwargs, forward):
    _, ours = _pair(options, kwargs, zero_out_b=False)
    before = {n: (p, p.detach().clone()) for n, p in ours.named_parameters() if "lora_" not in n}
    ours.train()
    ours(**_inputs(options, forward)).sum().backward()
    after = dict(ours.named_parameters())
    for name, (param, value) in before.items():
        assert after[name] is param and isinstance(param, nn.Parameter) and not param.requires_grad
        assert torch.equal(param, value), name  # bit for bit: nothing is merged and unmerged around a forward
        assert param.grad is None


@pytest.mark.parametrize("options, kwargs, forward", PARAMS)
def test_merge_unmerge_unload(options, kwargs, forward):
    _, ours = _pair(options, kwargs, zero_out_b=False)
    inputs = _inputs(options, forward)
    ours.eval()
    unmerged = ours(**inputs)
    layer = ours.base_model.model.mha
    W_in, W_out = layer.base_layer.in_proj_weight, layer.base_layer.out_proj.base_layer.weight
    before = (W_in.detach().clone(), W_out.detach().clone())
    ours.merge_adapter()
    assert layer.merged_adapters == ["default"] and layer.base_layer.out_proj.merged_adapters == ["default"]
    torch.testing.assert_close(W_in, before[0] + layer.get_delta_weight("default"), **TOL)
    torch.testing.assert_close(W_out, before[1] + layer.base_layer.out_proj.get_delta_weight("default"), **TOL)
    torch.testing.assert_close(ours(**inputs), unmerged, **TOL)
    with ours.disable_adapter():  # unmerges both projections, then runs the base
        torch.testing.assert_close(ours(**inputs), _model(options)(**inputs), **TOL)
    assert not layer.merged and not layer.base_layer.out_proj.merged
    torch.testing.assert_close((W_in, W_out), before, **TOL)
    torch.testing.assert_close(ours(**inputs), unmerged, **TOL)
    plain = copy.deepcopy(ours).merge_and_unload()
    assert type(plain.mha) is nn.MultiheadAttention and type(plain.mha.out_proj) is type(_model(options).mha.out_proj)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert sorted(plain.state_dict()) == sorted(_model(options).state_dict())
    torch.testing.assert_close(plain(**inputs), unmerged, **TOL)
    base = ours.unload()
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
    torch.testing.assert_close(base.state_dict(), _model(options).state_dict(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("options, kwargs, forward", PARAMS[:3])
def test_save_load_both_ways_with_peft(options, kwargs, forward, tmp_path):
    ref, ours = _pair(options, kwargs)
    inputs = _inputs(options, forward)
    expected = ref.eval()(**inputs)
    ref.save_pretrained(tmp_path / "peft"), ours.save_pretrained(tmp_path / "ours")
    ref_file, ours_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert sorted(ours_file) == sorted(ref_file)
    assert "base_model.model.mha.base_layer.out_proj.lora_A.weight" in ours_file
    torch.testing.assert_close(ours_file, ref_file, atol=0, rtol=0)
    loaded = [lorakit.PeftModel.from_pretrained(_model(options), tmp_path / "peft"),
              peft.PeftModel.from_pretrained(_model(options), tmp_path / "ours")]
    for model in loaded:
        torch.testing.assert_close(model.eval()(**inputs), expected, **TOL)


def test_two_active_adapters_match_peft_and_the_formula():
    ref, ours = _pair({}, dict(target_modules=["mha"]))
    for lib, model in ((peft, ref), (lorakit, ours)):
        model.add_adapter("other", lib.LoraConfig(r=2, lora_alpha=3, target_modules=["mha"], init_lora_weights=False))
        model.base_model.set_adapter(["default", "other"])
    state = {k: (v if "other" not in k or "out_proj.lora_B" not in k else torch.zeros_like(v))
             for k, v in ref.state_dict().items()}
    ref.load_state_dict(state), ours.load_state_dict(state)
    inputs = _inputs({}, {})
    torch.testing.assert_close(ours(**inputs), ref(**inputs), **TOL)
    torch.testing.assert_close(ours(**inputs), mha_reference(ours, ["default", "other"], inputs), **TOL)
    assert ours.base_model.model.mha.base_layer.out_proj.active_adapters == ["default", "other"]
    ours.delete_adapter("other")
    assert set(ours.base_model.model.mha.base_layer.out_proj.r) == {"default"}
    torch.testing.assert_close(ours(**inputs), mha_reference(ours, ["default"], inputs), **TOL)


def test_mixed_adapter_batches_are_refused_with_peft_message():
    _, ours = _pair({}, dict(target_modules=["mha"]))
    ours.add_adapter("other", lorakit.LoraConfig(target_modules=["mha"]))
    ours.eval()
    x = torch.randn(5, 2, 8)  # lorakit reads the batch size off dim 0, as PEFT's hooks do
    with pytest.raises(TypeError, match="lora.MultiheadAttention does not support mixed adapter batches"):
        ours(x=x, adapter_names=["default", "other", "default", "__base__", "other"])


@pytest.mark.parametrize("build, kwargs, error, match", [
    (lambda: nn.MultiheadAttention(8, 2), dict(use_dora=True), ValueError,
     r"MultiheadAttention does not support DoRA \(yet\), please set use_dora to False"),
    (lambda: nn.MultiheadAttention(8, 2, kdim=4, vdim=4), {}, ValueError,
     "Only same embed for query/key/value is supported as of now for MultiheadAttention"),
])
def test_refusals_keep_peft_sentence_and_leave_the_model_unchanged(build, kwargs, error, match):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("mha", build())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["mha"], **kwargs))
    with pytest.raises(error, match=match):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["mha"], **kwargs))
    assert type(model.mha) is nn.MultiheadAttention and type(model.mha.out_proj) is not LoraLayer
    torch.testing.assert_close(model.state_dict(), before, atol=0, rtol=0)


def test_out_proj_is_not_targeted_twice():
    """target_modules naming both the attention and its out_proj: out_proj gets its LoRA once, through mha."""
    model = lorakit.get_peft_model(_model({}), lorakit.LoraConfig(target_modules=["mha", "out_proj"]))
    assert model.base_model.targeted_module_names == ["mha"]
    layers = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert layers == ["base_model.model.mha", "base_model.model.mha.base_layer.out_proj"]


@pytest.fixture
def process_group():
    """A one-process gloo group, as PEFT's FSDP tests use (destroyed after the test)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_wrapped_forward_and_state_dict(process_group):
    """FSDP(use_orig_params=True) turns parameters into plain attributes during its forward: W' must still apply."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    _, ours = _pair({}, dict(target_modules=["mha", "lin0"]), zero_out_b=False)
    inputs = _inputs({}, {})
    with torch.no_grad():
        expected = ours.eval()(**inputs)
    wrapped = FSDP(ours, use_orig_params=True, device_id=torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(**inputs), expected, **TOL)
    state = lorakit.get_peft_model_state_dict(wrapped)
    fresh = lorakit.get_peft_model(_model({}), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["mha", "lin0"]))
    lorakit.set_peft_model_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**inputs), expected, **TOL)


def test_parameter_count_includes_out_proj():
    from lorakit.app.memory import adapter_parameters

    config = dict(target_modules=["mha", "lin0"], r=4)
    expected = adapter_parameters(_model({}), lorakit.LoraConfig(**config))
    for lib in (lorakit, peft):
        model = lib.get_peft_model(_model({}), lib.LoraConfig(**config))
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert expected == 4 * (8 + 24) + 4 * (8 + 8) + 4 * (8 + 2)  # in_proj, out_proj, lin0


@pytest.mark.parametrize("target_modules, warns", [("all-linear", True), (["out_proj"], True), (["mha"], False)])
def test_out_proj_alone_warns_that_it_never_runs(target_modules, warns, recwarn):
    model = lorakit.get_peft_model(_model({}), lorakit.LoraConfig(target_modules=target_modules))
    messages = [str(w.message) for w in recwarn if issubclass(w.category, lorakit.LoraWarning)]
    assert any("'mha.out_proj' is the out_proj of a MultiheadAttention" in m for m in messages) == warns
    inputs = _inputs({}, {})
    if warns:  # indeed no effect: the out_proj LoRA never runs, whatever B holds
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name and "out_proj" in name:
                    param.fill_(1.0)
        with model.disable_adapter():
            base = model(**inputs)
        lin0 = model.base_model.model.lin0
        if not isinstance(lin0, LoraLayer):
            torch.testing.assert_close(model(**inputs), base, atol=0, rtol=0)


def test_deleting_the_last_mha_adapter_restores_both_base_modules():
    """delete_adapter walks innermost first: out_proj goes back to its Linear while mha's path still leads to it."""
    base = _model({})
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["mha"], init_lora_weights=False))
    model.add_adapter("lin_only", lorakit.LoraConfig(target_modules=["lin0"]))
    model.delete_adapter("default")
    inner = model.base_model.model
    assert type(inner.mha) is nn.MultiheadAttention and type(inner.mha.out_proj) is type(_model({}).mha.out_proj)
    assert isinstance(inner.lin0, LoraLayer)
    assert model.base_model.targeted_module_names == ["lin0"]
    inputs = _inputs({}, {})
    torch.testing.assert_close(model(**inputs), _model({})(**inputs), atol=0, rtol=0)  # lin_only's B is zero


def test_native_fast_path_sees_the_update(monkeypatch):
    """Eval + no grad + batch_first + need_weights=False: nn.MultiheadAttention calls its fused kernel with the
    weights it reads from itself, which are W' for the length of the call."""
    calls = []
    native = torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: calls.append(1) or native(*a, **k))
    options, forward = dict(batch_first=True), dict(need_weights=False)
    _, ours = _pair(options, dict(target_modules=["mha"]), zero_out_b=False)
    inputs = _inputs(options, forward)
    ours.eval()
    expected = ours(**inputs)  # grad enabled: the composite path
    assert not calls
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs), expected, **TOL)
    assert calls
    torch.testing.assert_close(expected, mha_reference(ours, ["default"], inputs), **TOL)
