"""DoRA (use_dora=True, arXiv:2402.09353) against the real peft 0.21.2, plus its invariants.

Every kind PEFT runs DoRA on is covered (Linear, GPT-2 Conv1D, Embedding, Conv1d/2d/3d): the same seeded
model is wrapped by peft and by lorakit, PEFT's adapter is made non-zero (factors and magnitudes), its state
dict is copied into lorakit with ``load_state_dict(strict=True)``, and outputs, gradients, merges and saved
folders must agree to 1e-5. The rest checks lorakit's own parts: the low-rank norm against a dense float64
reference, the eval-mode norm cache (hit, and invalidated by an optimizer step), mixed-adapter batches.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from models import build, example_inputs
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.layer import LoraLayer
from lorakit.variants.dora import row_norm, weight_norm

TOL = dict(atol=1e-5, rtol=1e-5)
LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TinyConvs(nn.Module):
    """Conv1d and Conv3d, the conv kinds tests/models.py lacks: x (B, 3, 6) -> (B, 4, 4) -> (B, 2, 2, 2, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 4, kernel_size=3)
        self.conv3 = nn.Conv3d(1, 2, kernel_size=(1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv1(x).reshape(x.shape[0], 1, 2, 2, 4))


class GroupedConvs(nn.Module):
    """Grouped Conv2d layers as in PEFT's tests (groups = 8 and 2): x (B, 16, 5, 5) -> (B, 16, 5, 5) -> (B, 32, 3, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv8 = nn.Conv2d(16, 16, 3, padding=1, groups=8)
        self.conv2 = nn.Conv2d(16, 32, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv8(x)))


LOCAL_MODELS = {"convs": (TinyConvs, (2, 3, 6)), "grouped": (GroupedConvs, (2, 16, 5, 5))}


def _model(name: str) -> nn.Module:
    if name in LOCAL_MODELS:
        torch.manual_seed(0)
        return LOCAL_MODELS[name][0]().eval()
    return build(name, seed=0)


def _inputs(name: str) -> dict:
    if name in LOCAL_MODELS:
        return {"x": torch.randn(LOCAL_MODELS[name][1], generator=torch.Generator().manual_seed(1))}
    return example_inputs(name)


# (id, model, LoraConfig kwargs)
CASES = [
    ("llama-all-linear", "llama", dict(target_modules="all-linear")),
    ("llama-dropout", "llama", dict(target_modules=LLAMA_PROJ, lora_dropout=0.2)),
    ("gpt2-conv1d", "gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    ("mlp-emb-conv2d-linear", "mlp", dict(target_modules=["emb", "conv", "lin1", "lin2"])),
    ("conv1d-conv3d", "convs", dict(target_modules=["conv1", "conv3"], lora_dropout=0.2)),
]
CASE_PARAMS = [pytest.param(*case[1:], id=case[0]) for case in CASES]
# grouped convs: r must be a multiple of groups (8); they cannot merge (PEFT raises the same)
GROUPED = [
    ("grouped-conv2d", "grouped", dict(target_modules=["conv8", "conv2"], r=8)),
    ("grouped-conv2d-dropout-rslora", "grouped", dict(target_modules=["conv8", "conv2"], r=16, lora_dropout=0.3,
                                                      use_rslora=True)),
]
GROUPED_PARAMS = [pytest.param(*case[1:], id=case[0]) for case in GROUPED]


def _pair(model_name: str, kwargs: dict, **extra):
    """The same seeded model wrapped by peft and by lorakit with DoRA; PEFT's non-zero adapter copied in."""
    wrapped = []
    for lib in (peft, lorakit):
        torch.manual_seed(0)
        config = lib.LoraConfig(**{"r": 4, "lora_alpha": 8, "use_dora": True, **copy.deepcopy(kwargs), **extra})
        wrapped.append(lib.get_peft_model(_model(model_name), config))
    ref, ours = wrapped
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero B, and m away from n so that the DoRA rescaling shows in the output
        for name, param in sorted(ref.named_parameters()):
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator)
                param.mul_(1 + 0.2 * noise) if "magnitude" in name else param.add_(0.1 * noise)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _out(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("model_name, kwargs", CASE_PARAMS + GROUPED_PARAMS)
def test_outputs_and_gradients_match_peft(model_name, kwargs):
    ref, ours = _pair(model_name, kwargs)
    inputs = _inputs(model_name)
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == \
        {n: tuple(p.shape) for n, p in ref.named_parameters()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in ref.named_parameters() if p.requires_grad}
    ref.eval(), ours.eval()
    torch.testing.assert_close(_out(ours, inputs), _out(ref, inputs), **TOL)
    torch.testing.assert_close(_out(ours, inputs), _out(ref, inputs), **TOL)  # the cached norm
    ref.train(), ours.train()
    outputs = []
    for model in (ref, ours):  # with dropout: same seed, same masks; the base term runs on dropout(x)
        torch.manual_seed(3)
        outputs.append(_out(model, inputs))
        outputs[-1].square().mean().backward()
    torch.testing.assert_close(outputs[1], outputs[0], **TOL)
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    torch.testing.assert_close({n: p.grad for n, p in ours.named_parameters() if p.requires_grad}, grads, **TOL)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "magnitude" in n)


@pytest.mark.parametrize("model_name, kwargs", CASE_PARAMS)
def test_merge_matches_peft_and_unmerge_restores(model_name, kwargs):
    ref, ours = _pair(model_name, kwargs)
    inputs = _inputs(model_name)
    ref.eval(), ours.eval()
    unmerged = _out(ours, inputs)
    before = {k: v.clone() for k, v in ours.state_dict().items() if "base_layer" in k}
    ref.merge_adapter(), ours.merge_adapter()
    merged = {k: v for k, v in ours.state_dict().items() if "base_layer" in k}
    torch.testing.assert_close(merged, {k: v for k, v in ref.state_dict().items() if "base_layer" in k}, **TOL)
    torch.testing.assert_close(_out(ours, inputs), unmerged, **TOL)
    ours.unmerge_adapter()
    torch.testing.assert_close({k: v for k, v in ours.state_dict().items() if "base_layer" in k}, before, **TOL)
    torch.testing.assert_close(_out(ours, inputs), unmerged, **TOL)
    plain = ours.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    torch.testing.assert_close(_out(plain, inputs), unmerged, **TOL)


def test_plain_then_dora_adapter_active_together_match_peft():
    """PEFT hands a variant the running output: DoRA also rescales the adapters added before it (and merges so)."""
    ref, ours = _pair("llama", dict(target_modules=["q_proj", "v_proj"]))
    inputs = example_inputs("llama")
    for lib, model in ((peft, ref), (lorakit, ours)):
        torch.manual_seed(1)
        model.add_adapter("plain", lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.base_model.set_adapter(["plain", "default"])
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval(), ours.eval()
    expected = _out(ref, inputs)
    torch.testing.assert_close(_out(ours, inputs), expected, **TOL)
    ref.merge_adapter(), ours.merge_adapter()  # "plain" first: the DoRA norm comes from the unmerged weight
    torch.testing.assert_close(ours.state_dict(), ref.state_dict(), **TOL)
    torch.testing.assert_close(_out(ours, inputs), expected, **TOL)


@pytest.mark.parametrize("model_name, kwargs",
                         [CASE_PARAMS[0], CASE_PARAMS[2], CASE_PARAMS[3], CASE_PARAMS[4], GROUPED_PARAMS[0]])
def test_save_load_both_ways_with_peft(model_name, kwargs, tmp_path):
    ref, ours = _pair(model_name, kwargs)
    inputs = _inputs(model_name)
    ref.eval()
    expected = _out(ref, inputs)
    ref.save_pretrained(tmp_path / "peft"), ours.save_pretrained(tmp_path / "ours")
    ref_file, ours_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert sorted(ours_file) == sorted(ref_file)
    assert any(k.endswith(".lora_magnitude_vector") for k in ours_file)
    assert not any("magnitude_vector.weight" in k for k in ours_file)
    torch.testing.assert_close(ours_file, ref_file, atol=0, rtol=0)
    loaded = [lorakit.PeftModel.from_pretrained(_model(model_name), tmp_path / "peft"),
              peft.PeftModel.from_pretrained(_model(model_name), tmp_path / "ours")]
    for model in loaded:
        torch.testing.assert_close(_out(model.eval(), inputs), expected, **TOL)


@pytest.mark.parametrize("out_features, K, r, s", [(7, 5, 2, 2.0), (64, 300, 8, 0.5), (3, 40, 16, 4.0)])
def test_low_rank_norm_equals_dense_norm(out_features, K, r, s):
    generator = torch.Generator().manual_seed(out_features)
    W, A, B = (torch.randn(shape, generator=generator) for shape in ((out_features, K), (r, K), (out_features, r)))
    dense = torch.linalg.vector_norm(W.double() + s * B.double() @ A.double(), dim=1)  # (out,), float64
    torch.testing.assert_close(row_norm(W, A, B, s).double(), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(row_norm(W.double(), A.double(), B.double(), s), dense, atol=1e-12, rtol=1e-12)


def test_eval_cache_hits_and_is_invalidated_by_optimizer_step(monkeypatch):
    ref, ours = _pair("llama", dict(target_modules=LLAMA_PROJ))
    inputs = example_inputs("llama")
    ours.eval()
    first = _out(ours, inputs)
    calls = []
    monkeypatch.setattr("lorakit.variants.dora.row_norm", lambda *a, **k: calls.append(1) or row_norm(*a, **k))
    torch.testing.assert_close(_out(ours, inputs), first, atol=0, rtol=0)
    assert not calls  # every layer's n came from the cache
    ours.train()
    torch.testing.assert_close(_out(ours, inputs), first, **TOL)  # training mode: n recomputed, same value
    assert calls
    ours.eval()
    _out(ours, inputs)
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0)
    _out(ours, inputs).square().mean().backward()  # gradients in eval mode, then one in-place step
    optimizer.step()
    ref.load_state_dict(ours.state_dict(), strict=True)  # PEFT recomputes n on every call
    torch.testing.assert_close(_out(ours, inputs), _out(ref.eval(), inputs), **TOL)


def test_lora_bias_with_dora_is_refused():
    with pytest.raises(ValueError, match="lora_bias"):
        lorakit.LoraConfig(use_dora=True, lora_bias=True)


@pytest.mark.parametrize("model_name, kwargs", GROUPED_PARAMS)
def test_grouped_conv_merge_is_refused_as_in_peft(model_name, kwargs):
    ref, ours = _pair(model_name, kwargs)
    before = copy.deepcopy(ours.state_dict())
    for model in (ref, ours):
        with pytest.raises(NotImplementedError, match="Merging is not supported for _ConvNd layers with groups > 1!"):
            model.merge_adapter()
    torch.testing.assert_close(ours.state_dict(), before, atol=0, rtol=0)
    assert not any(isinstance(m, LoraLayer) and m.merged for m in ours.modules())


@pytest.mark.parametrize("r, groups", [(4, 8), (6, 4)])
def test_grouped_conv_rank_not_divisible_by_groups_is_refused_as_in_peft(r, groups):
    match = f"Targeting a Conv2d with groups={groups} and rank {r}"
    for lib in (peft, lorakit):
        model = nn.Sequential(nn.Conv2d(16, 16, 3, groups=groups))
        with pytest.raises(ValueError, match=match):
            lib.get_peft_model(model, lib.LoraConfig(target_modules=["0"], r=r, use_dora=True))


@pytest.mark.parametrize("out_channels, in_per_group, groups, r, k", [(16, 2, 8, 8, 3), (32, 8, 2, 4, 1), (6, 1, 3, 6, 2)])
def test_grouped_norm_is_peft_lora_weight_read_in_the_grouped_layout(out_channels, in_per_group, groups, r, k):
    """n_o = ‖W_o + s·L_o‖ with L_o = (B' A')[o // g] chunk o mod g, B' = B.reshape(out/g, r), A' = A.reshape(r, -1):
    checked against that row-by-row definition in float64 (the code reshapes once)."""
    generator = torch.Generator().manual_seed(r)
    W = torch.randn(out_channels, in_per_group, k, k, generator=generator)
    A = torch.randn(r, in_per_group * groups, k, k, generator=generator)
    B = torch.randn(out_channels, r // groups, 1, 1, generator=generator)
    s = 1.5
    B_rows, A_rows = B.double().reshape(-1, r), A.double().reshape(r, -1)
    chunk = in_per_group * k * k
    expected = torch.stack([
        torch.linalg.vector_norm(W[o].double().flatten()
                                 + s * (B_rows[o // groups] @ A_rows)[(o % groups) * chunk:(o % groups + 1) * chunk])
        for o in range(out_channels)])
    torch.testing.assert_close(weight_norm(W.flatten(1), A, B, s).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_name, kwargs", [CASE_PARAMS[1], CASE_PARAMS[3]])
def test_mixed_batch_with_dora_equals_per_row_runs(model_name, kwargs):
    _, model = _pair(model_name, kwargs)
    torch.manual_seed(2)
    model.add_adapter("plain", lorakit.LoraConfig(r=2, init_lora_weights=False, **copy.deepcopy(kwargs)))
    model.eval()
    inputs = _inputs(model_name)
    names = ["default", "plain", "__base__", "default"][: next(iter(inputs.values())).shape[0]]
    mixed = _out(model, {**inputs, "adapter_names": names})
    for row, name in enumerate(names):
        single = {k: v[row: row + 1] for k, v in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                expected = _out(model, single)
        else:
            model.set_adapter(name)
            expected = _out(model, single)
        torch.testing.assert_close(mixed[row: row + 1], expected, **TOL)
