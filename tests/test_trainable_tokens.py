"""``trainable_token_indices`` against the real peft 0.21.2, on tiny Llama models with tied and untied embeddings.

Each row of CASES builds the same seeded model twice, wraps one copy with peft and one with lorakit (equal
LoraConfig arguments), and loads the same seeded noise into both adapters (through each library's
``set_peft_model_state_dict``), so the rows D differ from E[I] and the LoRA factors are non-zero. Then:

* forward outputs (train mode) and every trainable tensor's gradient agree to 1e-5 (fp32), with the same
  parameter names and the same module names/types around the embedding and the head;
* the adapter files hold the same keys and values (only the rows D, under PEFT's keys), and each library loads
  the other's folder with identical outputs;
* merge_adapter / merge_and_unload give peft's outputs (a plain nn.Embedding is left), unmerge restores E
  exactly, disable_adapter gives the base model;
* two adapters on one embedding switch, refuse to be active together (PEFT's error), route a mixed batch and
  delete as in peft; configurations peft refuses are refused with peft's sentence first.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper
from variant_parity import assert_gradients_match

ATOL = 1e-5  # fp32; both libraries run the same index_copy / embedding / matmul sequence
INPUT_IDS = torch.tensor([[1, 2, 3, 5, 7, 0], [3, 4, 1, 9, 5, 6]])


def tiny_llama(tie: bool, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


# id, tie_word_embeddings, LoraConfig arguments (with init_lora_weights=False for non-zero B)
CASES = [
    ("list-tied", True, dict(target_modules=["q_proj"], trainable_token_indices=[1, 3, 5])),
    ("list-untied", False, dict(target_modules=["q_proj"], trainable_token_indices=[1, 3, 5])),
    ("dict-embedding-tied", True, dict(target_modules=["q_proj", "v_proj"], trainable_token_indices={"embed_tokens": [0, 9]})),
    ("dict-both-same-tied", True, dict(target_modules=["q_proj"],
                                       trainable_token_indices={"embed_tokens": [1, 3], "lm_head": [1, 3]})),
    ("dict-both-different-untied", False, dict(target_modules=["q_proj"],
                                               trainable_token_indices={"embed_tokens": [1, 3], "lm_head": [2, 5]})),
    ("dict-head-only-untied", False, dict(target_modules=["q_proj"], trainable_token_indices={"lm_head": [4]})),
    # tied, but each side its own rows (PEFT: no tie then); merging writes both into the one shared matrix
    ("dict-head-only-tied", True, dict(target_modules=["q_proj"], trainable_token_indices={"lm_head": [4]})),
    ("dict-both-different-tied", True, dict(target_modules=["q_proj"],
                                            trainable_token_indices={"embed_tokens": [1, 3], "lm_head": [2, 5]})),
    ("lora-on-head-untied", False, dict(target_modules=["q_proj", "lm_head"], trainable_token_indices=[1, 3])),
    ("lora-on-head-tied", True, dict(target_modules=["q_proj", "lm_head"], trainable_token_indices=[1, 3])),
]
IDS = [case[0] for case in CASES]
# rows where merging is well defined: one matrix per side, or both sides trained as one (PEFT's tie)
MERGEABLE = {"list-tied", "list-untied", "dict-embedding-tied", "dict-both-same-tied",
             "dict-both-different-untied", "dict-head-only-untied", "lora-on-head-untied"}


def _noise(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {key: torch.randn(value.shape, generator=generator) for key, value in sorted(reference.items())}


def pair(tie: bool, kwargs: dict) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    """(peft model, lorakit model, the adapter file tensors both hold)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(tie), peft.LoraConfig(init_lora_weights=False, **kwargs))
        ours = lorakit.get_peft_model(tiny_llama(tie), lorakit.LoraConfig(init_lora_weights=False, **kwargs))
    tensors = _noise(peft.get_peft_model_state_dict(theirs))
    peft.set_peft_model_state_dict(theirs, tensors)
    lorakit.set_peft_model_state_dict(ours, tensors)
    return theirs, ours, tensors


def logits(model: nn.Module, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS, **kwargs).logits


@pytest.mark.parametrize("name, tie, kwargs", CASES, ids=IDS)
def test_forward_and_gradients_match_peft(name: str, tie: bool, kwargs: dict) -> None:
    theirs, ours, _ = pair(tie, kwargs)
    theirs.train(), ours.train()
    out_theirs, out_ours = theirs(INPUT_IDS).logits, ours(INPUT_IDS).logits
    torch.testing.assert_close(out_ours, out_theirs, atol=ATOL, rtol=0)
    assert (out_ours - logits(tiny_llama(tie))).abs().max() > 1e-3  # the adapter changes the output
    (out_theirs ** 2).sum().backward()
    (out_ours ** 2).sum().backward()
    grads_ours = assert_gradients_match(theirs, ours, atol=ATOL, rtol=0)
    deltas = [n for n in grads_ours if "trainable_tokens_delta" in n]
    assert deltas and all(grads_ours[n].abs().sum() > 0 for n in deltas)


@pytest.mark.parametrize("name, tie, kwargs", CASES, ids=IDS)
def test_module_names_and_attributes_match_peft(name: str, tie: bool, kwargs: dict) -> None:
    theirs, ours, _ = pair(tie, kwargs)

    def around_embeddings(model: nn.Module) -> dict[str, str]:
        return {path: type(module).__name__.replace("Linear", "Lin").replace("LoraLayer", "Lin")
                for path, module in model.named_modules()
                if ("embed_tokens" in path or "lm_head" in path) and "lora_" not in path}

    assert around_embeddings(ours) == around_embeddings(theirs)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    for path, module in theirs.named_modules():
        if type(module).__name__ == "TrainableTokensLayer":
            mine = ours.get_submodule(path)
            assert isinstance(mine, TrainableTokensLayer)
            assert mine.token_indices == module.token_indices
            assert set(mine.trainable_tokens_original) == set(module.trainable_tokens_original)
            assert (mine.tied_adapter is None) == (module.tied_adapter is None)
            assert (mine.in_features, mine.out_features) == (module.in_features, module.out_features)


@pytest.mark.parametrize("name, tie, kwargs", CASES, ids=IDS)
def test_adapter_files_both_ways(name: str, tie: bool, kwargs: dict, tmp_path: Path) -> None:
    theirs, ours, tensors = pair(tie, kwargs)
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "lorakit")
    file_theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    file_ours = load_file(tmp_path / "lorakit" / "adapter_model.safetensors")
    assert sorted(file_ours) == sorted(file_theirs) == sorted(tensors)
    for key, value in file_theirs.items():
        assert torch.equal(file_ours[key], value), key
    rows = {k: v for k, v in file_ours.items() if "trainable_tokens_delta" in k}
    assert rows and all(v.shape[0] < 32 for v in rows.values())  # only the chosen rows, never E
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_ours = lorakit.PeftModel.from_pretrained(tiny_llama(tie), tmp_path / "peft")
        loaded_theirs = peft.PeftModel.from_pretrained(tiny_llama(tie), tmp_path / "lorakit")
    torch.testing.assert_close(logits(loaded_ours), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(loaded_theirs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, tie, kwargs", CASES, ids=IDS)
def test_merge_unmerge_unload_disable(name: str, tie: bool, kwargs: dict) -> None:
    theirs, ours, _ = pair(tie, kwargs)
    unmerged = logits(ours)
    embedding = ours.get_base_model().model.embed_tokens
    before = copy.deepcopy(getattr(embedding, "original_module", embedding).weight.detach())
    peft_merged = copy.deepcopy(theirs)
    peft_merged.merge_adapter()
    ours.merge_adapter()
    if name in MERGEABLE:  # (LoRA on a tied head folds ΔW into the shared E too: lorakit warns at creation)
        torch.testing.assert_close(logits(ours), logits(peft_merged), atol=ATOL, rtol=0)
        torch.testing.assert_close(logits(ours), unmerged, atol=ATOL, rtol=0)
    ours.unmerge_adapter()
    weight = getattr(embedding, "original_module", embedding).weight
    if name in MERGEABLE:
        assert torch.equal(weight, before)
    torch.testing.assert_close(weight, before, atol=ATOL, rtol=0)  # E + ΔW - ΔW: rounding only
    # (with ΔW folded into the shared E and taken out again, that rounding reaches logits of size ~50: 1e-3 there)
    torch.testing.assert_close(logits(ours), unmerged, atol=ATOL if name in MERGEABLE else 1e-3, rtol=0)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours), logits(tiny_llama(tie)), atol=ATOL, rtol=0)
    ours, theirs = pair(tie, kwargs)[1], pair(tie, kwargs)[0]
    plain_ours, plain_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(plain_ours.model.embed_tokens) is nn.Embedding
    assert not any(isinstance(m, (TrainableTokensWrapper, TrainableTokensLayer)) for m in plain_ours.modules())
    if name in MERGEABLE:  # (LoRA on a tied head folds ΔW into the shared E: neither library can unload that)
        torch.testing.assert_close(logits(plain_ours), logits(plain_theirs), atol=ATOL, rtol=0)
        torch.testing.assert_close(logits(plain_ours), unmerged, atol=ATOL, rtol=0)


def test_untouched_adapter_is_the_base_model() -> None:
    """D starts as E[I]: with LoRA's zero B the adapted model is the base model, and D equals those rows."""
    model = tiny_llama(True)
    base = logits(model)
    ours = lorakit.get_peft_model(tiny_llama(True), lorakit.LoraConfig(target_modules=["q_proj"],
                                                                       trainable_token_indices=[2, 4]))
    torch.testing.assert_close(logits(ours), base, atol=0, rtol=0)
    layer = ours.get_base_model().model.embed_tokens.token_adapter
    assert torch.equal(layer.trainable_tokens_delta["default"], model.model.embed_tokens.weight[[2, 4]])
    head = ours.get_base_model().lm_head.token_adapter
    assert head.tied_adapter is layer and head.trainable_tokens_delta is layer.trainable_tokens_delta


def _two_adapters(library: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = library.get_peft_model(tiny_llama(True), library.LoraConfig(
            target_modules=["q_proj"], trainable_token_indices=[1, 3]), adapter_name="a")
        model.add_adapter("b", library.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[2, 5]))
        model.add_adapter("c", library.LoraConfig(target_modules=["q_proj"]))
    deltas = model.get_base_model().model.embed_tokens.token_adapter.trainable_tokens_delta
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("a", "b"):
            deltas[name].copy_(torch.randn(deltas[name].shape, generator=generator))
    return model.eval()


def test_several_adapters_match_peft() -> None:
    theirs, ours = _two_adapters(peft), _two_adapters(lorakit)
    for name in ("a", "b", "c"):
        theirs.set_adapter(name), ours.set_adapter(name)
        torch.testing.assert_close(logits(ours), logits(theirs), atol=ATOL, rtol=0)
        deltas = ours.get_base_model().model.embed_tokens.token_adapter.trainable_tokens_delta
        assert {n: p.requires_grad for n, p in deltas.items()} == {"a": name == "a", "b": name == "b"}
    for model in (theirs, ours):
        with pytest.raises(ValueError, match="Only one adapter can be set at a time for TrainableTokensWrapper"):
            model.base_model.set_adapter(["a", "b"])
    for names in (["a", "b"], ["__base__", "a"]):  # mixed batches: one adapter per row
        torch.testing.assert_close(logits(ours, adapter_names=names), logits(theirs, adapter_names=names),
                                   atol=ATOL, rtol=0)
    # an adapter without tokens in a mixed batch: peft raises KeyError there, lorakit uses E for its rows
    mixed = logits(ours, adapter_names=["c", "b"])
    for row, name in enumerate(["c", "b"]):
        ours.set_adapter(name)
        torch.testing.assert_close(mixed[row], logits(ours)[row], atol=ATOL, rtol=0)
    ours.set_adapter("a"), theirs.set_adapter("a")
    theirs.delete_adapter("a"), ours.delete_adapter("a")
    assert ours.active_adapters == theirs.active_adapters
    torch.testing.assert_close(logits(ours), logits(theirs), atol=ATOL, rtol=0)
    ours.delete_adapter("b")
    assert isinstance(ours.get_base_model().model.embed_tokens, nn.Embedding)  # no adapter left with tokens


# LoraConfig arguments peft refuses (tied model), the exception type and the start of peft's message
REFUSED = [
    (dict(target_modules=["embed_tokens"], trainable_token_indices=[1]), TypeError,
     "trainable_token_indices cannot be applied to modules of type"),
    (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices={"embed_tokens": [1]}),
     ValueError, "The embedding layer is already marked to be trained fully"),
    (dict(target_modules=["q_proj"], trainable_token_indices={"nothere": [1]}), ValueError,
     "Target modules {'nothere'} not found in the base model"),
    (dict(target_modules=["q_proj"], ensure_weight_tying=True,
          trainable_token_indices={"embed_tokens": [1], "lm_head": [2]}), ValueError,
     "Cannot ensure weight tying when different token indices are specified for tied layers"),
    (dict(target_modules=["q_proj"], trainable_token_indices=[40]), IndexError, "out of bounds"),
]


@pytest.mark.parametrize("kwargs, error, message", REFUSED, ids=[str(r[0]) for r in REFUSED])
def test_refused_as_peft_refuses(kwargs: dict, error: type, message: str) -> None:
    for library in (peft, lorakit):
        model = tiny_llama(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(error, match=message.replace("{", r"\{").replace("}", r"\}")):
                library.get_peft_model(model, library.LoraConfig(**kwargs))
        if library is lorakit:  # nothing was changed
            assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("indices, error, message", [
    ({"embed_tokens": "1"}, ValueError, "invalid trainable_token_indices"),
    ([3, 1, 3], ValueError, r"lists \[3\] more than once"),
    ([-1], IndexError, "out of bounds"),
])
def test_invalid_indices_are_refused(indices: object, error: type, message: str) -> None:
    model = tiny_llama(True)
    with pytest.raises(error, match=message):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=indices))
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear  # unchanged


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_ensure_weight_tying_with_tokens(tie: bool) -> None:
    """Tied: the head shares the embedding's D, silently. Untied: PEFT's warning, and each side has its own D."""
    for library in (peft, lorakit):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = library.get_peft_model(tiny_llama(tie), library.LoraConfig(
                target_modules=["q_proj"], ensure_weight_tying=True,
                trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [1, 2]}))
        messages = [str(w.message) for w in caught]
        assert any("ensure_weight_tying=True but the model does not have tied weights" in m for m in messages) == (
            not tie), (library.__name__, messages)
        assert not any("nothing to tie" in m for m in messages)
        head = model.get_base_model().lm_head.token_adapter
        embedding = model.get_base_model().model.embed_tokens.token_adapter
        assert (head.trainable_tokens_delta is embedding.trainable_tokens_delta) == tie


def test_delete_adapters_one_by_one_as_peft() -> None:
    """PEFT's own test of this (test_custom_models.py) needs a hub model; the same steps on the tiny tied Llama."""
    models = {}
    for library in (peft, lorakit):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = library.get_peft_model(tiny_llama(True), library.LoraConfig(
                target_modules=["q_proj"], trainable_token_indices=[0, 1]), adapter_name="adapter0")
            model.add_adapter("adapter1", library.LoraConfig(target_modules=["q_proj"]))
            model.add_adapter("adapter2", library.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 3]))
        models[library.__name__] = model
    layers = {name: (m.get_base_model().model.embed_tokens.token_adapter, m.get_base_model().lm_head.token_adapter)
              for name, m in models.items()}
    for deleted in (None, "adapter0", "adapter1", "adapter2"):
        state = {}
        for name, model in models.items():
            if deleted is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.delete_adapter(deleted)
            state[name] = (model.active_adapters,
                           [(set(layer.trainable_tokens_delta), set(layer.trainable_tokens_original))
                            for layer in layers[name]])
            if model.active_adapters:
                logits(model)  # runs
        assert state["lorakit"] == state["peft"], deleted
    torch.testing.assert_close(logits(models["lorakit"]), logits(tiny_llama(True)), atol=0, rtol=0)


def test_second_adapter_with_lora_on_the_tied_head() -> None:
    """A second adapter with tokens, on a model whose tied head already holds LoRA around its tied wrapper.

    peft 0.21.2 refuses this (its wrapper check sees the LoRA layer of the head: TypeError); lorakit extends the
    tied wrapper inside that LoRA layer. Reference: the same adapter alone on a fresh model, same tensors.
    """
    config = dict(target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_llama(True), peft.LoraConfig(**config, trainable_token_indices=[1, 3]))
        with pytest.raises(TypeError, match="trainable_token_indices cannot be applied to modules of type"):
            theirs.add_adapter("b", peft.LoraConfig(**config, trainable_token_indices=[2, 4]))
        ours = lorakit.get_peft_model(tiny_llama(True), lorakit.LoraConfig(**config, trainable_token_indices=[1, 3]))
        ours.add_adapter("b", lorakit.LoraConfig(**config, trainable_token_indices=[2, 4]))
        alone = lorakit.get_peft_model(tiny_llama(True), lorakit.LoraConfig(**config, trainable_token_indices=[2, 4]))
    tensors = _noise(lorakit.get_peft_model_state_dict(alone))
    lorakit.set_peft_model_state_dict(alone, tensors)
    lorakit.set_peft_model_state_dict(ours, tensors, adapter_name="b")
    ours.set_adapter("b")
    head = ours.get_base_model().lm_head.base_layer
    assert isinstance(head, TrainableTokensWrapper) and head.token_adapter.tied_adapter is not None
    assert head.active_adapters == ["b"] and set(head.token_adapter.token_indices) == {"default", "b"}
    torch.testing.assert_close(logits(ours), logits(alone), atol=ATOL, rtol=0)


class ScaledEmbedding(nn.Embedding):
    """Gemma's kind of embedding: the forward multiplies by ``embed_scale`` (a tensor or a Python number)."""

    def __init__(self, scale: float | torch.Tensor) -> None:
        super().__init__(12, 6)
        self.embed_scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.embed_scale


class ScaledNet(nn.Module):
    def __init__(self, scale: float | torch.Tensor) -> None:
        super().__init__()
        self.emb = ScaledEmbedding(scale)
        self.lin = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(x))


@pytest.mark.parametrize("scale", [torch.tensor(3.0), 0.5], ids=["tensor", "float"])
def test_scaled_embedding_matches_peft(scale: float | torch.Tensor) -> None:
    outputs = []
    for library in (peft, lorakit):
        torch.manual_seed(0)
        model = library.get_peft_model(ScaledNet(scale), library.LoraConfig(
            target_modules=["lin"], trainable_token_indices={"emb": [1, 2]}))
        with torch.no_grad():
            model.base_model.model.emb.token_adapter.trainable_tokens_delta["default"].add_(1.0)
            outputs.append(model(torch.tensor([[1, 2, 3, 4]])))
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=0)
    torch.manual_seed(0)
    assert (outputs[1] - ScaledNet(scale)(torch.tensor([[1, 2, 3, 4]]))).abs().max() > 1e-3


@pytest.mark.parametrize("name, tie, kwargs", [c for c in CASES if c[0] != "lora-on-head-tied"],
                         ids=[i for i in IDS if i != "lora-on-head-tied"])
def test_save_embedding_layers_true_matches_peft(name: str, tie: bool, kwargs: dict, tmp_path: Path) -> None:
    """With save_embedding_layers=True the files also hold E (and, tied, the head's copy of D), as peft's do.

    (LoRA on a tied head is left out: there peft writes neither the head's E nor its D, lorakit writes both.)
    """
    theirs, ours, _ = pair(tie, kwargs)
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    ours.save_pretrained(tmp_path / "lorakit", save_embedding_layers=True)
    file_theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    file_ours = load_file(tmp_path / "lorakit" / "adapter_model.safetensors")
    assert sorted(file_ours) == sorted(file_theirs)
    assert any(tuple(value.shape) == (32, 16) for value in file_ours.values())  # a whole embedding matrix
    for key, value in file_theirs.items():
        assert torch.equal(file_ours[key], value), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = lorakit.PeftModel.from_pretrained(tiny_llama(tie), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), logits(theirs), atol=ATOL, rtol=0)
