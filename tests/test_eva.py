"""EVA (calibrate.py): components, rank budget, removal, identity at init, save/load, parity with PEFT 0.21.2."""

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import EvaConfig, LoraConfig, get_eva_state_dict, get_peft_model, initialize_lora_eva_weights
from lorakit.layer import LoraLayer

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg).eval()


def batches(n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (4, 16), generator=g)
        labels = ids.clone()
        labels[:, :5] = -100
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def eva_config(**kw) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                      eva_config=EvaConfig(**kw))


@pytest.fixture(scope="module")
def calibrated():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), eva_config())
        state = get_eva_state_dict(model, batches())
        before = {n: m.lora_A["default"].weight.clone() for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        initialize_lora_eva_weights(model, eva_state_dict=state)
    return model, state, before


def masked_inputs(name: str, data: list[dict], every_row: bool = False) -> torch.Tensor:
    """The label- and attention-masked inputs of module ``name`` of the plain model, concatenated (with
    ``every_row``: all of them, padding and label positions included)."""
    model, rows = tiny_llama(), []

    def hook(module, args, output, keep=None):
        rows.append(args[0].flatten(0, 1) if every_row else args[0][hook.mask])

    handle = model.get_submodule(name).register_forward_hook(hook)
    with torch.no_grad():
        for b in data:
            hook.mask = b["attention_mask"].bool() & (b["labels"] != -100)
            model(**b)
    handle.remove()
    return torch.cat(rows).double()

def test_init_before_calibration_is_peft_eva():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), eva_config())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().max() == 0
    assert layer.lora_A["default"].weight.abs().max() > 0  # PEFT keeps nn.Linear's kaiming init in A


def test_components_are_svd_of_centred_masked_inputs(calibrated):
    model, state, _ = calibrated
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        x = masked_inputs(name, batches())
        _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        a = state["base_model.model." + name].double()
        k = min(3, a.shape[0])
        cos = (a[:k] * vh[:k]).sum(1).abs()
        torch.testing.assert_close(cos, torch.ones(k, dtype=torch.float64), atol=1e-5, rtol=0)
        layer = model.get_submodule("base_model.model." + name)
        torch.testing.assert_close(layer.lora_A["default"].weight, state["base_model.model." + name].float())


def test_layers_a_prepare_layer_inputs_mapping_leaves_out_take_every_row():
    """prepare_layer_inputs_fn as a dict: a layer it does not name gets PEFT's default, every row of its input
    flattened (padding and label positions included), not the language-modelling mask."""
    named, other = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), eva_config())
        fn = lorakit.calibrate.prepare_layer_inputs_fn_language_modeling
        state = get_eva_state_dict(model, batches(), prepare_layer_inputs_fn={"base_model.model." + named: fn})
    for name, every_row in ((named, False), (other, True)):
        x = masked_inputs(name, batches(), every_row)
        _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        a = state["base_model.model." + name].double()
        k = min(3, a.shape[0])
        torch.testing.assert_close((a[:k] * vh[:k]).sum(1).abs(), torch.ones(k, dtype=torch.float64), atol=1e-5,
                                   rtol=0)


def test_rank_budget_and_patterns(calibrated):
    model, state, _ = calibrated
    ranks = {n: v.shape[0] for n, v in state.items()}
    assert sum(ranks.values()) == 4 * len(ranks)  # PEFT's budget: Σ r over the calibrated layers
    assert max(ranks.values()) <= round(2.0 * 4)  # at most round(rho * r) per layer
    config = model.peft_config["default"]
    for name, k in ranks.items():
        path = name.removeprefix("base_model.model.")
        layer = model.get_submodule(name)
        if k == 0:
            assert not isinstance(layer, LoraLayer)
            continue
        assert layer.r["default"] == k and config.rank_pattern.get(path, 4) == k
        assert config.alpha_pattern.get(path, 8) == pytest.approx(8 * k / 4)  # adjust_scaling_factors keeps s
        assert layer.scaling["default"] == pytest.approx(2.0)


def test_rank_zero_removes_adapter():
    data = batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), eva_config(rho=4.0))
        state = get_eva_state_dict(model, data)
        names = list(state)
        state[names[0]] = state[names[0]][:0]  # force rank 0 on one layer, as EVA does for low-variance layers
        initialize_lora_eva_weights(model, eva_state_dict=state)
    assert not isinstance(model.get_submodule(names[0]), LoraLayer)
    assert names[0].removeprefix("base_model.model.") not in model.peft_config["default"].target_modules
    assert names[0].removeprefix("base_model.model.") not in model.base_model.targeted_module_names


def test_output_equals_base_and_round_trip(calibrated, tmp_path):
    model, _, _ = calibrated
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids).logits
        ref = tiny_llama()(input_ids=ids).logits
    torch.testing.assert_close(out, ref)
    with torch.no_grad():  # make the adapter non-trivial so the round trip tests something
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.lora_B["default"].weight.normal_()
        out = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, out)
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            assert loaded.get_submodule(name).r["default"] == m.r["default"]


def test_refusals():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        initialize_lora_eva_weights(model, batches(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), eva_config())
    with pytest.raises(ValueError, match="dataloader"):
        initialize_lora_eva_weights(model)
    with pytest.raises(ValueError, match="empty"):
        get_eva_state_dict(model, [])


def test_parity_with_peft(calibrated):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.eva import get_eva_state_dict as peft_eva

    _, state, _ = calibrated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                                 eva_config=peft.tuners.lora.config.EvaConfig())
        reference = peft_eva(peft.get_peft_model(tiny_llama(), config), batches(), show_progress_bar=False)
    assert set(reference) == set(state)
    assert sum(v.shape[0] for v in reference.values()) == sum(v.shape[0] for v in state.values())
    for name, ref in reference.items():
        ours = state[name]
        assert abs(ours.shape[0] - ref.shape[0]) <= 1, name  # ties at the budget's edge may fall either way
        # PEFT's IncrementalPCA uses a randomised SVD over repeated batches, lorakit exact moments, and some
        # eigenvalues lie close together (rotating a pair of components); so compare the spanned subspaces:
        # the cosines of the principal angles between PEFT's and lorakit's top-k rows.
        k = min(ours.shape[0], ref.shape[0])
        cosines = torch.linalg.svdvals(ours[:k].double() @ ref[:k].double().T)
        assert cosines.min() > 0.75 and cosines.mean() > 0.93, (name, cosines)
        assert (ours[0].double() @ ref[0].double()).abs() > 0.99 or cosines[:2].min() > 0.99, name  # the leading direction agrees


def test_layer_the_forward_never_reaches_is_refused():
    """A targeted layer that the calibration forward never calls has no statistics: a clear error naming it
    (it was an AttributeError on None; PEFT fails with an IndexError)."""

    class TwoBranches(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(TwoBranches(), LoraConfig(r=2, target_modules=["used", "unused"],
                                                         init_lora_weights="eva"))
    data = [torch.randn(16, 8) for _ in range(2)]
    with pytest.raises(ValueError, match=r"EVA saw no input.*base_model\.model\.unused"):
        get_eva_state_dict(model, data, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None)
