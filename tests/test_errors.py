"""errors.GUARDS, the table of PEFT's silent failures lorakit reports: every entry is triggered here and must
produce its documented outcome (a LoraWarning or an error), so a guard that stops firing fails this test, and
a table entry without a trigger (or a trigger without an entry) fails it too."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checks_support import LLAMA, lora_warnings, randomize
from models import build, example_inputs
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, PeftModel, check_training, get_peft_model, io
from lorakit.errors import GUARDS
from lorakit.layer import LoraLayer


def _saved(folder: Path, name: str = "") -> Path:
    base = build("llama")
    base.config._name_or_path = name
    model = get_peft_model(base, LoraConfig(**LLAMA))
    randomize(model)
    model.save_pretrained(folder)
    return folder


def _frozen_trained(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = PeftModel.from_pretrained(build("llama"), _saved(tmp / "a"))  # is_trainable=False: PEFT's default
    model.train()
    model(**example_inputs("llama"))


def _broken_write(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = io.save_file
    monkeypatch.setattr(io, "save_file", lambda tensors, filename, metadata=None:
                        real(dict(list(tensors.items())[1:]), filename, metadata=metadata))  # one tensor lost
    _saved(tmp / "a")


def _broken_merge(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = LoraLayer.merge

    def twice(self: LoraLayer, *args: object, **kwargs: object) -> None:
        real(self, *args, **kwargs)
        self.merged_adapters.clear()
        real(self, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "merge", twice)
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    randomize(model, scale=0.3)
    model.merge_and_unload(check=True)


def _tied(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))


def _resized_not_saved(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build("llama").save_pretrained(tmp / "base")
    base = LlamaForCausalLM.from_pretrained(tmp / "base")
    base.resize_token_embeddings(base.config.vocab_size + 4)
    get_peft_model(base, LoraConfig(**LLAMA)).save_pretrained(tmp / "a", save_embedding_layers=False)


def _other_base(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = build("llama")
    other.config._name_or_path = "org/model-b"
    PeftModel.from_pretrained(other, _saved(tmp / "a", "org/model-a"))


# guard -> (what triggers it, a regex its outcome must match)
TRIGGERS: dict[str, tuple[Callable[[Path, pytest.MonkeyPatch], object], str]] = {
    "no_trainable_parameters": (lambda tmp, mp: get_peft_model(build("llama"), LoraConfig(inference_mode=True,
                                                                                          **LLAMA)),
                                "0 trainable parameters: .*inference_mode=True"),
    "frozen_adapter_trained": (_frozen_trained, "is_trainable=False.*0 trainable parameters"),
    "adapter_not_learning": (lambda tmp, mp: check_training(get_peft_model(build("llama"), LoraConfig(**LLAMA)), 2),
                             "4 LoRA layer.* all-zero factor after 2 optimizer step"),
    "saved_file_incomplete": (_broken_write, "AdapterSaveError: save check failed: .*missing"),
    "merge_changed_outputs": (_broken_merge, "changed the model's outputs"),
    "tied_embedding_trained": (_tied, "ties its input and output embeddings.*ensure_weight_tying=True"),
    "new_tokens_not_saved": (_resized_not_saved, "new tokens' embeddings are not saved"),
    "different_base_model": (_other_base, "trained on base model 'org/model-a', this model is 'org/model-b'"),
}


def outcome(call: Callable[[], object]) -> list[str]:
    """The LoraWarnings ``call`` emits, or the error it raises, as text."""
    try:
        return lora_warnings(call)
    except Exception as error:  # noqa: BLE001  (an error is the outcome of some guards)
        return [f"{type(error).__name__}: {error}"]


def test_every_guard_has_a_trigger():
    assert set(TRIGGERS) == set(GUARDS)


@pytest.mark.parametrize("guard", GUARDS)
def test_guard_fires(guard, tmp_path, monkeypatch):
    trigger, expected = TRIGGERS[guard]
    found = outcome(lambda: trigger(tmp_path, monkeypatch))
    assert any(re.search(expected, text, re.DOTALL) for text in found), found
