"""add_weighted_adapter: the merging rules against textbook formulas, the whole method against peft 0.21.2.

(a) The pure functions of ``lorakit.combine`` on plain tensors: task arithmetic, magnitude pruning, TIES,
    DARE (masks recomputed from the same seed), concatenation (exact: B A = Σ w_i s_i B_i A_i) and truncated
    SVD (Eckart–Young error, clamping).
(b) Differential: a tiny Llama (Linear), GPT-2 (Conv1D, weight stored (in, out)) and an MLP with Embedding,
    Conv2d 3x3 and Linear targets, each built twice from one seed with two non-zero adapters; PEFT's adapter
    weights are copied into lorakit, both call add_weighted_adapter with the same arguments, and the new
    adapter's s·ΔW per layer and the model outputs with it active must agree. SVD factors are compared only
    through ΔW (their signs are arbitrary). DARE is random: it is compared after seeding both calls alike.
(c) Errors, and the places where lorakit deliberately differs from PEFT.
"""

from __future__ import annotations

import math
import warnings

import peft
import pytest
import torch
from models import build, example_inputs
from torch import nn

import lorakit
from lorakit.combine import (
    COMBINATION_TYPES,
    COMBINERS,
    CombineOptions,
    Source,
    combine_factors,
    combine_svd,
    concat_factors,
    equal_rank,
    majority_sign_mask,
    prune_magnitude,
    prune_random,
)
from lorakit.errors import LoraWarning
from lorakit.layer import LoraLayer

TOL = dict(atol=1e-5, rtol=1e-5)  # float32 throughout
DETERMINISTIC = ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]
DARE = ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---- (a) textbook formulas ------------------------------------------------------------------------------------
def reference_magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the entries whose |t| is at least the k-th largest |t| (continuous data: no ties)."""
    k = int(density * t.numel())
    threshold = t.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def reference_ties(tasks: list[torch.Tensor], weights: list[float], method: str) -> torch.Tensor:
    """TIES on already pruned tasks: elect σ (ties go to +), average the weighted entries that agree with σ."""
    stacked = torch.stack(tasks)
    score = stacked.sum(0) if method == "total" else stacked.sign().sum(0)
    sigma = torch.where(score >= 0, 1.0, -1.0)
    agree = (stacked.sign() == sigma) & (stacked != 0)
    total = sum(w * t * a for w, t, a in zip(weights, tasks, agree))
    return total / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize("shape", [(64, 48), (6, 4, 3, 3), (500,)])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.73, 1.0])
def test_prune_magnitude_keeps_the_largest_entries(shape, density):
    t = randn(*shape)
    expected = t if density == 1.0 else reference_magnitude_prune(t, density)
    torch.testing.assert_close(prune_magnitude(t, density), expected, **TOL)


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_prune_random_keeps_a_density_fraction_rescaled(density):
    t = randn(400, 500) + 3.0  # no zeros, so kept entries are recognisable
    torch.manual_seed(1234)  # the mask comes from the global generator: seed it so the statistics are fixed
    pruned = prune_random(t, density)
    kept = pruned != 0
    torch.testing.assert_close(pruned[kept], t[kept] / density, **TOL)  # a kept entry is t / ρ, exactly
    assert abs(kept.float().mean().item() - density) < 0.01  # 200k Bernoulli(ρ) draws: sd < 0.0012
    assert abs(pruned.mean().item() - t.mean().item()) < 0.05  # unbiased: E[D(t)] = t
    assert prune_random(t, 1.0) is t


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_majority_sign_mask_hand_example(method):
    # one big positive entry against two small negative ones: mass says +, head count says -
    tasks = torch.tensor([[3.0, 0.0], [-1.0, 2.0], [-1.0, 0.0]])
    expected = {"total": [[True, False], [False, True], [False, False]],
                "frequency": [[False, False], [True, True], [True, False]]}[method]
    assert majority_sign_mask(tasks, method).tolist() == expected


WEIGHTS = [0.7, -1.3, 0.4]


@pytest.mark.parametrize("name", ["linear", "magnitude_prune", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_combiners_match_textbook(name, method):
    tasks = [randn(16, 12, seed=i) for i in range(3)]
    density = 0.4
    torch.manual_seed(3)
    got = COMBINERS[name](tasks, WEIGHTS, density, method)
    torch.manual_seed(3)  # DARE: the same seed redraws the same masks, one tensor after the other
    prune = {
        "linear": lambda t: t,
        "magnitude_prune": lambda t: reference_magnitude_prune(t, density),
        "ties": lambda t: reference_magnitude_prune(t, density),
        "dare_linear": lambda t: t * torch.bernoulli(torch.full_like(t, density)) / density,
        "dare_ties": lambda t: t * torch.bernoulli(torch.full_like(t, density)) / density,
    }[name]
    pruned = [prune(t) for t in tasks]
    if name in ("ties", "dare_ties"):
        expected = reference_ties(pruned, WEIGHTS, method)
    else:
        expected = sum(w * t for w, t in zip(WEIGHTS, pruned))
    torch.testing.assert_close(got, expected, **TOL)


# Factor shapes as PEFT stores them: (A shape without r, B shape without r).
FACTOR_SHAPES = {
    "linear": ((12,), (10,)),
    "conv3x3": ((5, 3, 3), (7, 1, 1)),
    "embedding": ((20,), (8,)),
}


def sources(kind: str, ranks: list[int], weights: list[float], scalings: list[float]) -> list[Source]:
    A_tail, B_tail = FACTOR_SHAPES[kind]
    return [
        Source(A=randn(r, *A_tail, seed=2 * i), B=randn(B_tail[0], r, *B_tail[1:], seed=2 * i + 1), scaling=s, weight=w)
        for i, (r, w, s) in enumerate(zip(ranks, weights, scalings))
    ]


def matrix(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """B̄ Ā: the update as an (out, in·k) matrix."""
    return B.flatten(1) @ A.flatten(1)


def exact_sum(srcs: list[Source]) -> torch.Tensor:
    return sum(s.weight * s.scaling * matrix(s.A, s.B) for s in srcs)


@pytest.mark.parametrize("kind", FACTOR_SHAPES)
def test_cat_is_exact(kind):
    srcs = sources(kind, [2, 3, 1], WEIGHTS, [2.0, 0.5, 1.5])
    A, B = concat_factors(srcs, CombineOptions("linear", rank=6))
    assert A.shape[0] == B.shape[1] == 6
    torch.testing.assert_close(matrix(A, B), exact_sum(srcs), **TOL)


@pytest.mark.parametrize("kind", FACTOR_SHAPES)
@pytest.mark.parametrize("weight", [0.8, -2.5])
def test_factor_wise_linear_of_one_adapter_is_exact(kind, weight):
    srcs = sources(kind, [3], [weight], [2.0])
    A, B = combine_factors(srcs, CombineOptions("linear", rank=3))
    torch.testing.assert_close(matrix(A, B), exact_sum(srcs), **TOL)


def test_factor_wise_linear_weights_are_signed_square_roots():
    srcs = sources("linear", [3, 3], [0.5, -2.0], [4.0, 1.5])
    A, B = combine_factors(srcs, CombineOptions("linear", rank=3))
    root = [math.sqrt(2.0), math.sqrt(3.0)]  # √|w s|
    torch.testing.assert_close(A, root[0] * srcs[0].A - root[1] * srcs[1].A, **TOL)
    torch.testing.assert_close(B, root[0] * srcs[0].B + root[1] * srcs[1].B, **TOL)


@pytest.mark.parametrize("kind", FACTOR_SHAPES)
def test_svd_at_full_rank_is_exact_and_shaped_like_the_factors(kind):
    srcs = sources(kind, [2, 3], WEIGHTS[:2], [2.0, 0.5])
    A, B = combine_svd(srcs, CombineOptions("linear", rank=5))
    assert A.shape == (5, *srcs[0].A.shape[1:]) and B.shape == (srcs[0].B.shape[0], 5, *srcs[0].B.shape[2:])
    torch.testing.assert_close(matrix(A, B), exact_sum(srcs), **TOL)


@pytest.mark.parametrize("rank", [1, 3])
def test_svd_truncation_is_the_best_rank_r_approximation(rank):
    srcs = sources("conv3x3", [4, 4], WEIGHTS[:2], [1.0, 2.0])
    A, B = combine_svd(srcs, CombineOptions("linear", rank=rank))
    delta = exact_sum(srcs)
    S = torch.linalg.svdvals(delta)
    error = torch.linalg.matrix_norm(delta - matrix(A, B))  # Eckart–Young: √(Σ_{j>r} S_j²)
    torch.testing.assert_close(error, S[rank:].square().sum().sqrt(), **TOL)


def test_svd_rank_is_capped_by_the_matrix_size():
    srcs = sources("linear", [4, 4], WEIGHTS[:2], [1.0, 1.0])  # ΔW is (10, 12): at most rank 10
    A, B = combine_svd(srcs, CombineOptions("linear", rank=40))
    assert A.shape == (10, 12) and B.shape == (10, 10)
    torch.testing.assert_close(matrix(A, B), exact_sum(srcs), **TOL)


@pytest.mark.parametrize("q", [0.5, 0.9])
def test_svd_clamp_bounds_both_factors_by_the_quantile(q):
    srcs = sources("linear", [4, 4], WEIGHTS[:2], [1.0, 1.0])
    A, B = combine_svd(srcs, CombineOptions("linear", rank=4))
    h = torch.quantile(torch.cat([B.flatten(), A.flatten()]), q)
    A_clamped, B_clamped = combine_svd(srcs, CombineOptions("linear", rank=4, svd_clamp=q))
    torch.testing.assert_close(A_clamped, A.clamp(-h, h), **TOL)
    torch.testing.assert_close(B_clamped, B.clamp(-h, h), **TOL)


@pytest.mark.parametrize("combiner", ["linear", "ties", "magnitude_prune"])
def test_svd_layout_does_not_change_deterministic_results(combiner):
    srcs = sources("embedding", [3, 3], WEIGHTS[:2], [1.0, 2.0])
    transposed = [Source(s.A, s.B, s.scaling, s.weight, stored_in_out=True) for s in srcs]
    options = CombineOptions(combiner, rank=3, density=0.5)
    torch.testing.assert_close(matrix(*combine_svd(srcs, options)), matrix(*combine_svd(transposed, options)), **TOL)


@pytest.mark.parametrize(
    "combination_type, ranks, svd_rank, expected",
    [("linear", {"a": 4, "b": 4}, None, 4), ("cat", {"a": 4, "b": 8}, None, 12), ("svd", {"a": 4, "b": 8}, None, 8),
     ("ties_svd", {"a": 4, "b": 8}, 3, 3), ("dare_ties", {"a": 2, "b": 2}, 9, 2)],
)
def test_rank_rules(combination_type, ranks, svd_rank, expected):
    assert COMBINATION_TYPES[combination_type].rank(ranks, svd_rank) == expected


def test_equal_rank_refuses_different_ranks():
    with pytest.raises(ValueError, match="same r"):
        equal_rank({"a": 4, "b": 8}, None)


# ---- (b) differential against peft ------------------------------------------------------------------------------
# model -> (first adapter's LoraConfig kwargs, second adapter's); all factors random (init_lora_weights=False).
MODELS = {
    "llama": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
              dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"], alpha_pattern={"k_proj": 2})),
    "gpt2": (dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
             dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "mlp": (dict(r=4, lora_alpha=8, target_modules=["emb", "conv", "lin1"]),
            dict(r=4, lora_alpha=16, target_modules=["emb", "conv", "lin2"])),
}
# Different ranks, a rank_pattern and a regex target: for the types that allow unequal ranks.
UNEQUAL = (dict(r=4, lora_alpha=8, target_modules=r".*\.(q|v)_proj"),
           dict(r=6, lora_alpha=4, target_modules=r".*\.(q|k)_proj", rank_pattern={"k_proj": 8},
                alpha_pattern={"q_proj": 32}))


def make_pair(model_name: str, first: dict, second: dict) -> tuple[nn.Module, nn.Module]:
    """(peft model, lorakit model) with adapters "default" and "b", lorakit's weights copied from peft's."""
    models = []
    for library in (peft, lorakit):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = library.get_peft_model(build(model_name), library.LoraConfig(init_lora_weights=False, **first))
            model.add_adapter("b", library.LoraConfig(init_lora_weights=False, **second))
        models.append(model)
    models[1].load_state_dict(models[0].state_dict(), strict=True)
    return models[0], models[1]


def combine_both(pair: tuple[nn.Module, nn.Module], adapters: list[str], weights: list[float], **kwargs) -> None:
    """Run add_weighted_adapter(..., "mix") on both models from the same RNG state, then activate "mix"."""
    for model in pair:
        torch.manual_seed(11)  # DARE's masks; the deterministic types draw nothing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(adapters, weights, "mix", **kwargs)
        model.set_adapter("mix")


def assert_same_mix(pair: tuple[nn.Module, nn.Module], model_name: str) -> None:
    """Same layers carry "mix", with the same s·ΔW, and the models give the same outputs with it active."""
    reference, ours = pair
    expected = {path: m for path, m in reference.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer) and "mix" in m.r}
    got = {path: m for path, m in ours.named_modules() if isinstance(m, LoraLayer) and "mix" in m.r}
    assert sorted(got) == sorted(expected)
    for path, layer in expected.items():
        torch.testing.assert_close(got[path].get_delta_weight("mix"), layer.get_delta_weight("mix"), **TOL,
                                   msg=lambda message, path=path: f"{path}: {message}")
    inputs = example_inputs(model_name)
    with torch.no_grad():
        out_reference, out_ours = reference(**inputs), ours(**inputs)
    torch.testing.assert_close(getattr(out_ours, "logits", out_ours), getattr(out_reference, "logits", out_reference),
                               **TOL)
    for field in ("r", "lora_alpha", "target_modules"):
        assert getattr(ours.peft_config["mix"], field) == getattr(reference.peft_config["mix"], field), field


OPTIONS = {  # the extra arguments each deterministic type is tested with
    "linear": {}, "cat": {}, "svd": {}, "ties": dict(density=0.5),
    "ties_svd": dict(density=0.3, majority_sign_method="frequency"),
    "magnitude_prune": dict(density=0.4), "magnitude_prune_svd": dict(density=0.6, svd_rank=3, svd_clamp=0.9),
}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("combination_type", DETERMINISTIC)
def test_matches_peft(model_name, combination_type):
    pair = make_pair(model_name, *MODELS[model_name])
    combine_both(pair, ["default", "b"], [0.7, -1.3], combination_type=combination_type, **OPTIONS[combination_type])
    assert_same_mix(pair, model_name)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("combination_type", DARE)
def test_dare_matches_peft_from_the_same_seed(model_name, combination_type):
    """DARE draws its masks from the global RNG in PEFT's order and layout, so one seed gives PEFT's result."""
    pair = make_pair(model_name, *MODELS[model_name])
    combine_both(pair, ["b", "default"], [1.5, 0.5], combination_type=combination_type, density=0.5)
    assert_same_mix(pair, model_name)


@pytest.mark.parametrize(
    "combination_type, options",
    [("cat", {}), ("svd", {}), ("svd", dict(svd_rank=12, svd_full_matrices=False)), ("ties_svd", dict(density=0.5)),
     ("magnitude_prune_svd", dict(density=0.7, majority_sign_method="frequency"))],
)
def test_unequal_ranks_match_peft(combination_type, options):
    pair = make_pair("llama", *UNEQUAL)
    combine_both(pair, ["default", "b"], [1.0, 0.3], combination_type=combination_type, **options)
    assert_same_mix(pair, "llama")


@pytest.mark.parametrize("combination_type", ["svd", "ties", "cat"])
def test_single_adapter_is_merged_linearly_as_in_peft(combination_type):
    pair = make_pair("mlp", *MODELS["mlp"])
    combine_both(pair, ["b"], [-0.6], combination_type=combination_type)  # no density needed: it is "linear"
    assert_same_mix(pair, "mlp")
    layer = pair[1].base_model.model.lin2
    torch.testing.assert_close(layer.get_delta_weight("mix"), -0.6 * layer.get_delta_weight("b"), **TOL)


# ---- behaviour of the new adapter ------------------------------------------------------------------------------
def lorakit_pair(model_name: str = "llama", first: dict | None = None, second: dict | None = None) -> nn.Module:
    first, second = (first, second) if first else MODELS[model_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lorakit.get_peft_model(build(model_name), lorakit.LoraConfig(init_lora_weights=False, **first))
        model.add_adapter("b", lorakit.LoraConfig(init_lora_weights=False, **second))
    return model


def test_new_adapter_is_frozen_inactive_with_scaling_one():
    model = lorakit_pair()
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert model.active_adapter == "default"
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and "mix" in m.r]
    assert layers and all(m.scaling["mix"] == 1.0 and m.r["mix"] == 8 for m in layers)
    assert not any(p.requires_grad for m in layers for p in m.adapter_parameters("mix"))
    assert model.peft_config["mix"].target_modules == {"q_proj", "k_proj", "v_proj"}


def test_rslora_sources_combine_exactly():
    """Deliberate difference: PEFT keeps use_rslora, so its combined update is scaled by √rank."""
    model = lorakit_pair("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True),
                         dict(r=4, lora_alpha=3, target_modules=["q_proj"], use_rslora=True))
    model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "mix", combination_type="cat")
    assert model.peft_config["mix"].use_rslora is False
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    expected = 0.5 * layer.get_delta_weight("default") + 2.0 * layer.get_delta_weight("b")
    torch.testing.assert_close(layer.get_delta_weight("mix"), expected, **TOL)


def test_svd_rank_above_the_matrix_size_is_zero_padded():
    """Deliberate difference: PEFT builds mismatched factors here (k_proj is 16 x 32) and then fails."""
    model = lorakit_pair()
    model.add_weighted_adapter(["default", "b"], [1.0, -1.0], "mix", combination_type="svd", svd_rank=24)
    layer = model.base_model.model.model.layers[0].self_attn.k_proj
    assert layer.lora_A["mix"].weight.shape == (24, 32) and layer.lora_B["mix"].weight.shape == (16, 24)
    torch.testing.assert_close(layer.get_delta_weight("mix"), -layer.get_delta_weight("b"), **TOL)


def test_lora_bias_is_combined():
    """Deliberate difference: PEFT leaves the new lora_B bias as initialised (random with init False)."""
    config = dict(r=2, lora_alpha=4, target_modules=["lin1"], lora_bias=True)
    model = lorakit_pair("mlp", config, dict(config, lora_alpha=2))
    model.add_weighted_adapter(["default", "b"], [0.5, 3.0], "mix", combination_type="linear")
    lin1 = model.base_model.model.lin1
    expected = 0.5 * 2.0 * lin1.lora_B["default"].bias + 3.0 * 1.0 * lin1.lora_B["b"].bias
    torch.testing.assert_close(lin1.lora_B["mix"].bias, expected, **TOL)


def test_layers_outside_the_new_adapter_warn_and_uncovered_layers_are_zero():
    """PEFT fails on a layer with no source ("No matching LoRAs") and says nothing about dropped layers."""
    model = lorakit_pair("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[0]),
                         dict(r=4, lora_alpha=8, target_modules=["k_proj"], layers_to_transform=[1]))
    with pytest.warns(LoraWarning, match="layers.1.self_attn.k_proj"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj  # targeted by "mix", adapted by neither
    assert torch.count_nonzero(k_proj.get_delta_weight("mix")) == 0


# ---- (c) errors ------------------------------------------------------------------------------------------------
ERRORS = [  # (add_weighted_adapter arguments, words the message must contain)
    (dict(adapters=["default", "nope"], weights=[1, 1]), "unknown adapter"),
    (dict(adapters=[], weights=[]), "no adapters"),
    (dict(adapters=["default", "b"], weights=[1.0]), "differ in length"),
    (dict(adapters=["default", "b"], weights=[1, 1], adapter_name="b"), "already exists"),
    (dict(adapters=["default", "b"], weights=[1, 1], combination_type="mean"), "'svd', 'linear', 'cat'"),
    (dict(adapters=["default", "b"], weights=[1, 1], majority_sign_method="median"), "majority_sign_method"),
    (dict(adapters=["default", "b"], weights=[1, 1], svd_rank=0), "svd_rank"),
    (dict(adapters=["default", "b"], weights=[1, 1], svd_clamp=1.5), "svd_clamp"),
    *[(dict(adapters=["default", "b"], weights=[1, 1], combination_type=t), "needs a density")
      for t in ["ties", "ties_svd", "dare_linear", "dare_ties_svd", "magnitude_prune"]],
    *[(dict(adapters=["default", "b"], weights=[1, 1], combination_type="dare_ties", density=d), "density")
      for d in [0.0, -0.1, 1.5]],
]


@pytest.mark.parametrize("arguments, words", ERRORS)
def test_errors(arguments, words):
    model = lorakit_pair()
    before = dict(model.peft_config)
    with pytest.raises(ValueError, match=words):
        model.add_weighted_adapter(**{"adapter_name": "mix", **arguments})
    assert model.peft_config == before


@pytest.mark.parametrize("combination_type", ["linear", "ties", "dare_linear", "magnitude_prune"])
def test_unequal_ranks_are_refused_for_factor_wise_types(combination_type):
    model = lorakit_pair("llama", *UNEQUAL)
    with pytest.raises(ValueError, match="same r.*'cat'"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type=combination_type, density=0.5)


def test_unequal_layer_ranks_are_refused_for_factor_wise_types():
    """Equal r, but rank_pattern gives v_proj r=2 in one adapter: PEFT fails inside torch.stack."""
    model = lorakit_pair("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
                         dict(r=4, lora_alpha=8, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="layers.0.self_attn.v_proj"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="linear")
    assert "mix" not in model.peft_config


def test_regex_and_list_targets_are_refused_as_in_peft():
    model = lorakit_pair("llama", UNEQUAL[0], MODELS["llama"][1])
    with pytest.raises(ValueError, match="target_modules of different types"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="svd")


def test_shared_modules_to_save_are_refused_as_in_peft():
    config = dict(r=2, lora_alpha=4, target_modules=["lin1"], modules_to_save=["lin2"])
    model = lorakit_pair("mlp", config, config)
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="svd")


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, kernel_size=3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_grouped_conv_is_refused_where_B_A_is_not_a_matrix_product(combination_type):
    model = lorakit.get_peft_model(GroupedConv(), lorakit.LoraConfig(r=4, target_modules=["conv"]))
    model.add_adapter("b", lorakit.LoraConfig(r=4, target_modules=["conv"]))
    with pytest.raises(ValueError, match="grouped conv"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type=combination_type)
    assert "mix" not in model.peft_config
    model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="linear")  # factor-wise is fine


@pytest.mark.parametrize("variant, match", [(dict(use_dora=True), "DoRA"),
                                            (dict(use_bdlora={"target_modules_bd_a": ["o_proj"],
                                                              "target_modules_bd_b": ["q_proj"], "nblocks": 2}),
                                             "BD-LoRA")])
def test_variant_adapters_are_refused(variant, match):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["q_proj", "o_proj"], r=4, **variant))
    model.add_adapter("b", lorakit.LoraConfig(target_modules=["q_proj", "o_proj"], r=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="linear")
    assert set(model.peft_config) == {"default", "b"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
