"""Arrow routing (create_arrow_model + ArrowConfig) against the real peft 0.21.2, plus invariants and refusals.

A library of LoRA experts is saved once (by peft, with random non-zero factors); both libraries build the routed
model from the same folders with the same ArrowConfig. Logits, state-dict keys, gradients through the experts,
GenKnowSub and experts added after the router must agree with peft to 1e-5.
"""

from __future__ import annotations

import peft
import pytest
import torch
from models import build

import lorakit
from lorakit.variants.arrow import top_right_singular_vector

TOL = dict(atol=1e-5, rtol=1e-5)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _save_expert(folder, seed: int, r: int = 4, targets=TARGETS, model: str = "llama") -> str:
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(build(model, seed=0), peft.LoraConfig(r=r, target_modules=targets,
                                                                       init_lora_weights=False))
    wrapped.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("arrow")
    return [_save_expert(root / f"expert{i}", seed=i) for i in range(5)]


def _ids(rows: int = 3, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (rows, 7), generator=torch.Generator().manual_seed(seed))


def _routed(lib, experts, *, general=None, **arrow):
    config = lib.ArrowConfig(**{"top_k": 2, "rng_seed": 5, **arrow})
    return lib.create_arrow_model(build("llama", seed=0), experts, config, general_adapter_paths=general).eval()


CASES = [
    ("top2", dict(), False),
    ("top1-temperature", dict(top_k=1, router_temperature=0.3), False),
    ("top3-all", dict(top_k=3), False),
    ("gks", dict(use_gks=True), True),
    ("unseeded", dict(rng_seed=None), False),
]


@pytest.mark.parametrize("arrow, gks", [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_outputs_keys_and_gradients_match_peft(experts, arrow, gks):
    models = []
    for lib in (peft, lorakit):
        torch.manual_seed(0)  # the unseeded power iteration draws from the global RNG at the first forward
        model = _routed(lib, experts[:3], general=experts[3:] if gks else None, **arrow)
        torch.manual_seed(1)
        models.append((model, model(input_ids=_ids()).logits))
    (ref, ref_out), (ours, out) = models
    torch.testing.assert_close(out, ref_out, **TOL)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    # GenKnowSub rewrote the experts alike; the router's own A is a random init no forward reads (lorakit's default
    # init skips nn.Linear's throw-away draws, so the same seed gives another A), its B is 0 in both
    experts_only = [{k: v for k, v in model.state_dict().items() if ".arrow_router." not in k} for model in (ours, ref)]
    torch.testing.assert_close(*experts_only, **TOL)
    with ours.disable_adapter():
        assert (ours(input_ids=_ids()).logits - out).abs().max() > 1e-3  # the router does change the output
    grads = []
    for model, _ in ((ref, None), (ours, None)):  # gradients reach the experts through the mixture
        for name, param in model.named_parameters():
            param.requires_grad_(".task_" in name)
        model(input_ids=_ids()).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[1] and all(g is not None for g in grads[1].values())
    torch.testing.assert_close(grads[1], grads[0], **TOL)


def test_routing_formula_on_one_layer(experts):
    """y = base(x) + Σ_e softmax(top_k(|x·p_e|)/T)_e s_e B_e A_e x, written out densely for one layer."""
    model = _routed(lorakit, experts[:3], top_k=2, router_temperature=0.5)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    names = ["task_0", "task_1", "task_2"]
    deltas = [layer.scaling[n] * layer.lora_B[n].weight @ layer.lora_A[n].weight for n in names]
    prototypes = torch.stack([top_right_singular_vector(layer.lora_A[n].weight, layer.lora_B[n].weight, 5)
                              for n in names])  # (E, in)
    similarity = (x @ prototypes.T).abs()
    top, index = similarity.topk(2, dim=1)
    c = torch.zeros_like(similarity).scatter(1, index, torch.softmax(top / 0.5, dim=1))
    expected = layer.base_layer(x) + sum(c[:, e:e + 1] * (x @ deltas[e].T) for e in range(3))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [None, 0, 7])
def test_power_iteration_finds_the_top_right_singular_vector(seed):
    generator = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(12, 4, generator=generator))[0]
    V = torch.linalg.qr(torch.randn(10, 4, generator=generator))[0]
    B, A = U * torch.tensor([3.0, 1.0, 0.5, 0.2]), V.T  # ΔW = B A with a clear spectral gap
    p = top_right_singular_vector(A, B, seed)
    assert abs(float(p @ V[:, 0])) > 1 - 1e-6


@pytest.mark.parametrize("forward_first", [True, False])
def test_expert_added_later_equals_all_at_once(experts, forward_first):
    for lib in (peft, lorakit):
        all_at_once = _routed(lib, experts[:3], general=experts[3:], use_gks=True)
        later = _routed(lib, experts[:2], general=experts[3:], use_gks=True)
        if forward_first:
            later(input_ids=_ids())
        later.load_adapter(experts[2], adapter_name="new_added_ts_expert")
        later.eval()
        torch.testing.assert_close(later(input_ids=_ids()).logits, all_at_once(input_ids=_ids()).logits, **TOL)


def test_saved_router_config_loads_in_both(experts, tmp_path):
    ours = _routed(lorakit, experts[:2], top_k=1, router_temperature=0.5)
    ours.save_pretrained(tmp_path / "ours")
    ref = _routed(peft, experts[:2], top_k=1, router_temperature=0.5)
    ref.save_pretrained(tmp_path / "ref")
    for folder, lib in ((tmp_path / "ours", peft), (tmp_path / "ref", lorakit)):
        config = lib.LoraConfig.from_pretrained(str(folder / "arrow_router"))
        arrow = config.arrow_config
        assert (arrow.top_k, arrow.router_temperature, arrow.rng_seed) == (1, 0.5, 5)
        assert arrow.task_adapter_names is None  # init=False: written to the file, not read back (as PEFT)


def test_refusals_keep_peft_sentences(experts, tmp_path):
    model = _routed(lorakit, experts[:2])
    with pytest.raises(RuntimeError, match="Cannot merge an active Arrow router adapter"):
        model.merge_and_unload()
    other_rank = _save_expert(tmp_path / "r8", seed=9, r=8)
    with pytest.raises(ValueError, match="rank mismatch"):
        _routed(lorakit, [experts[0], other_rank])
    other_targets = _save_expert(tmp_path / "k_not_v", seed=9, targets=["q_proj", "k_proj", "down_proj"])
    with pytest.raises(ValueError, match="target_modules mismatch"):
        _routed(lorakit, [experts[0], other_targets])
    embedding = _save_expert(tmp_path / "embedding", seed=9, targets=["embed_tokens"])
    with pytest.raises(TypeError, match="LoRA adapters must only target Linear"):
        _routed(lorakit, [embedding])
    with pytest.raises(ValueError, match="should contain at least one adapter path"):
        lorakit.create_arrow_model(build("llama", seed=0), [], lorakit.ArrowConfig())
    with pytest.raises(ValueError, match="You should provide general LoRA paths"):
        _routed(lorakit, experts[:2], use_gks=True)
    with pytest.raises(ValueError, match="top_k cannot be negative"):
        lorakit.ArrowConfig(top_k=0)
    with pytest.raises(ValueError, match="router_temperature must be greater than 0"):
        lorakit.ArrowConfig(router_temperature=0)
    with pytest.raises(ValueError, match="does not contain 'adapter_config.json'"):
        _routed(lorakit, [str(tmp_path)])


def test_prototypes_are_built_once_and_rebuilt_for_a_new_expert(experts):
    from unittest.mock import patch

    model = _routed(lorakit, experts[:2])
    state = model.base_model.model.model.layers[0].self_attn.q_proj.lora_arrow["arrow_router"]
    with patch.object(state, "top_right_singular_vec_from_BA", wraps=state.top_right_singular_vec_from_BA) as spy:
        model(input_ids=_ids())
        model(input_ids=_ids())
        assert spy.call_count == 2 == len(state.task_adapter_names)
        model.load_adapter(experts[2], adapter_name="late")
        model(input_ids=_ids())
        assert spy.call_count == 5 and state.task_adapter_names == ["task_0", "task_1", "late"]
