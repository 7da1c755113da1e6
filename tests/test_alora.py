"""aLoRA (LoraConfig(alora_invocation_tokens=[...])) against the real peft 0.21.2, plus invariants and refusals.

The same seeded tiny Llama is wrapped by peft and by lorakit; PEFT's adapter is made non-zero and copied into
lorakit with ``load_state_dict(strict=True)``. Forward logits, gradients and ``generate`` (greedy, KV cache)
must agree: the adapter acts only from the last occurrence of the invocation tokens on, row by row.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from models import build
from variant_parity import perturb_trainable

import lorakit
from lorakit.variants.alora import invocation_offsets

TOL = dict(atol=1e-5, rtol=1e-5)
INVOKE = [5, 6, 7]
PROJ = ["q_proj", "v_proj", "down_proj"]


def _ids() -> torch.Tensor:
    """Row 0: invocation twice (the last counts); row 1: once, near the start; row 2: none; row 3: at the end."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 120, (4, 12), generator=generator)
    ids[0, 1:4] = torch.tensor(INVOKE)
    ids[0, 6:9] = torch.tensor(INVOKE)
    ids[1, 2:5] = torch.tensor(INVOKE)
    ids[3, 9:12] = torch.tensor(INVOKE)
    return ids


def _pair(**kwargs):
    wrapped = []
    for lib in (peft, lorakit):
        config = lib.LoraConfig(r=4, lora_alpha=8, target_modules=PROJ, task_type="CAUSAL_LM",
                                alora_invocation_tokens=list(INVOKE), **copy.deepcopy(kwargs))
        wrapped.append(lib.get_peft_model(build("llama", seed=0), config))
    ref, ours = wrapped
    perturb_trainable(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("ids, expected", [
    (_ids(), [6, 10, None, 3]),
    (torch.tensor([[5, 6]]), [None]),  # shorter than the invocation
    (torch.tensor([[5, 6, 7]]), [3]),
])
def test_invocation_offsets_are_counted_from_the_end_of_the_last_occurrence(ids, expected):
    assert invocation_offsets(ids, INVOKE) == expected


def test_forward_and_gradients_match_peft():
    ref, ours = _pair(lora_dropout=0.0)
    ids = _ids()
    torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, **TOL)
    ref.train(), ours.train()
    grads = []
    for model in (ref, ours):
        model(input_ids=ids).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(grads[1], grads[0], **TOL)


def test_positions_before_the_invocation_use_the_base_weights():
    _, ours = _pair()
    ids = _ids()
    with ours.disable_adapter():
        base = ours(input_ids=ids).logits
    adapted = ours(input_ids=ids).logits
    T = ids.shape[1]
    for row, offset in enumerate(invocation_offsets(ids, INVOKE)):
        start = T if offset is None else T - offset
        torch.testing.assert_close(adapted[row, :start], base[row, :start], atol=1e-6, rtol=0)
        if start < T:
            assert (adapted[row, start:] - base[row, start:]).abs().max() > 1e-3
    # the base model called directly (no PeftModel call, so no offsets): the adapter stays off, as in PEFT
    torch.testing.assert_close(ours.base_model(input_ids=ids).logits, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_matches_peft(use_cache):
    ref, ours = _pair()
    ids = _ids()
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    expected = ref.generate(input_ids=ids, **kwargs, output_scores=True, return_dict_in_generate=True)
    got = ours.generate(input_ids=ids, **kwargs, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), **TOL)


def test_mixed_batch_and_explicit_offsets_match_peft():
    ref, ours = _pair()
    ids = _ids()
    names = ["default", "__base__", "default", "default"]
    torch.testing.assert_close(ours(input_ids=ids, adapter_names=names).logits,
                               ref(input_ids=ids, adapter_names=names).logits, **TOL)
    offsets = [2, None, 12, 1]
    torch.testing.assert_close(ours(input_ids=ids, alora_offsets=offsets).logits,
                               ref(input_ids=ids, alora_offsets=offsets).logits, **TOL)


def test_save_and_load_round_trip_both_ways(tmp_path):
    ref, ours = _pair()
    ids = _ids()
    expected = ref(input_ids=ids).logits
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    loaded_by_peft = peft.PeftModel.from_pretrained(build("llama", seed=0), tmp_path / "ours").eval()
    loaded_by_us = lorakit.PeftModel.from_pretrained(build("llama", seed=0), tmp_path / "ref").eval()
    assert loaded_by_peft.peft_config["default"].alora_invocation_tokens == INVOKE
    assert loaded_by_us.peft_config["default"].alora_invocation_tokens == INVOKE
    torch.testing.assert_close(loaded_by_peft(input_ids=ids).logits, expected, **TOL)
    torch.testing.assert_close(loaded_by_us(input_ids=ids).logits, expected, **TOL)


def test_refusals_keep_peft_sentences():
    _, ours = _pair()
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        ours.merge_and_unload()
    with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA"):
        ours.generate(input_ids=_ids(), num_beams=2, max_new_tokens=2)
    embedding = lorakit.LoraConfig(target_modules=["embed_tokens"], alora_invocation_tokens=INVOKE,
                                   task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"Invalid or unsupported variant combination"):
        lorakit.get_peft_model(build("llama", seed=0), embedding)


def test_warnings_as_peft():
    with pytest.warns(UserWarning, match="aLoRA is currently only supported for CAUSAL_LM task"):
        lorakit.LoraConfig(alora_invocation_tokens=INVOKE)
    _, ours = _pair()
    embeds = ours.get_input_embeddings()(_ids())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ours(inputs_embeds=embeds).logits
    assert any("only inputs_embeds are provided" in str(w.message) for w in caught)
    with ours.disable_adapter():
        torch.testing.assert_close(out, ours(inputs_embeds=embeds).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_recomputes_with_the_same_offsets(use_reentrant):
    """Checkpointed blocks recompute in backward, after the call returned: the gradients must not change."""
    ref, ours = _pair()
    ids = _ids()
    grads = []
    for model, checkpointing in ((ref, False), (ours, True)):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model(input_ids=ids).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert all(g is not None for g in grads[1].values())
    torch.testing.assert_close(grads[1], grads[0], **TOL)


def test_peft_offset_helpers():
    from lorakit.variants.alora import (calculate_alora_offsets, get_alora_offsets_for_forward,
                                        get_alora_offsets_for_generate)

    configs = {"a": lorakit.LoraConfig(alora_invocation_tokens=[1, 2], task_type="CAUSAL_LM"),
               "b": lorakit.LoraConfig(alora_invocation_tokens=[4], task_type="CAUSAL_LM"),
               "plain": lorakit.LoraConfig()}
    ids = torch.tensor([[1, 2, 3, 1, 2], [0, 4, 5, 6, 7], [1, 2, 0, 0, 0], [4, 4, 4, 4, 4]])
    assert calculate_alora_offsets(configs, "a", ids) == [2, None, 5, None]
    assert calculate_alora_offsets(configs, "a", ids, adapter_names=["a", "b", "plain", "__base__"]) == \
        [2, 4, None, None]
    _, ours = _pair()
    assert get_alora_offsets_for_forward(ours, _ids())["alora_offsets"] == [6, 10, None, 3]
    assert get_alora_offsets_for_generate(ours, _ids()[0])["alora_offsets"] == [6]
    with pytest.warns(UserWarning, match="Cannot calculate aLoRA offsets during generate"):
        assert get_alora_offsets_for_generate(ours, inputs_embeds=torch.zeros(1, 2, 32))["alora_offsets"] is None


def test_prepare_model_for_gradient_checkpointing_as_peft():
    """PEFT's aLoRA checkpointing recipe: prepare_model_for_gradient_checkpointing, then checkpointed training."""
    ref, ours = _pair()
    grads = []
    for model in (ref, ours):
        model.train()
        model.prepare_model_for_gradient_checkpointing(model)
        model.gradient_checkpointing_enable()
        model(input_ids=_ids()).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(grads[1], grads[0], **TOL)
