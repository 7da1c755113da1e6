"""lorakit/save_checks.py: the written file is checked against what was meant to be written, and a resized
vocabulary saves its embeddings (errors.GUARDS: saved_file_incomplete, new_tokens_not_saved)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from checks_support import LLAMA, lora_warnings, randomize, saved, tree_bytes  # noqa: F401  (saved: a fixture)
from models import build
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from lorakit import AdapterSaveError, LoraConfig, PeftModel, get_peft_model
from lorakit import io, save_checks


# ---- save checks what it wrote ------------------------------------------------------------------------------
def _truncating(real):
    def write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        size = os.path.getsize(filename)
        os.truncate(filename, size - 4)
    return write


def _dropping(real):
    def write(tensors, filename, metadata=None):
        real(dict(list(tensors.items())[1:]), filename, metadata=metadata)
    return write


def _emptying(real):
    def write(tensors, filename, metadata=None):
        first = next(iter(tensors))
        real({**tensors, first: tensors[first][:0]}, filename, metadata=metadata)
    return write


@pytest.mark.parametrize("fault, expected", [(_truncating, "data section"), (_dropping, "missing"),
                                             (_emptying, "shape")])
def test_save_detects_a_bad_write_and_keeps_the_old_folder(saved, monkeypatch, fault, expected):
    before = tree_bytes(saved)
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    randomize(model, seed=9)
    monkeypatch.setattr(io, "save_file", fault(io.save_file))
    with pytest.raises(AdapterSaveError, match=expected):
        model.save_pretrained(saved)
    assert tree_bytes(saved) == before
    assert not [p for p in saved.parent.iterdir() if "lorakit-tmp" in p.name]


@pytest.mark.parametrize("change, expected", [
    (lambda t: {k: v.double() for k, v in t.items()}, "dtype"),
    (lambda t: {k: v.reshape(-1) for k, v in t.items()}, "shape"),
    (lambda t: {**t, "extra": torch.ones(1)}, "unexpected extra"),
])
def test_verify_saved_compares_the_header(tmp_path, change, expected):
    tensors = {"a": torch.ones(2, 3), "b": torch.zeros(4, 1)}
    save_file(change(tensors), str(tmp_path / "w.safetensors"))
    with pytest.raises(AdapterSaveError, match=expected):
        save_checks.verify_saved(tmp_path / "w.safetensors", tensors)
    save_file(tensors, str(tmp_path / "ok.safetensors"))
    save_checks.verify_saved(tmp_path / "ok.safetensors", tensors)


def test_verify_saved_reads_the_header_only(tmp_path, monkeypatch):
    tensors = {"a": torch.ones(256, 1024)}  # 1 MiB of data
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    reads: list[int] = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda file, mode="r", *a, **k: _Wrap(real_open(file, mode, *a, **k), reads))
    save_checks.verify_saved(path, tensors)
    monkeypatch.undo()
    assert 0 < sum(reads) < 1024  # 8 bytes + the JSON header, never the 1 MiB of data


class _Wrap:
    def __init__(self, handle, reads):
        self.handle, self.reads = handle, reads

    def read(self, n=-1):
        data = self.handle.read(n)
        self.reads.append(len(data))
        return data

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.handle.close()


def test_bin_save_is_checked_too(saved, monkeypatch):
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    real = torch.save
    monkeypatch.setattr(io.torch, "save", lambda obj, path: real(dict(list(obj.items())[1:]), path))
    with pytest.raises(AdapterSaveError, match="missing"):
        model.save_pretrained(saved, safe_serialization=False)


# ---- new tokens not saved -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "tiny-base"
    build("llama").save_pretrained(folder)
    return folder


def resized(base_folder: Path) -> PeftModel:
    model = LlamaForCausalLM.from_pretrained(base_folder)
    model.resize_token_embeddings(model.config.vocab_size + 4)
    return get_peft_model(model, LoraConfig(**LLAMA))


def test_resized_vocab_saves_embeddings_like_peft(base_folder, tmp_path):
    peft = pytest.importorskip("peft")
    model = resized(base_folder)
    found = lora_warnings(lambda: model.save_pretrained(tmp_path / "ours"))
    assert any("resized (128 -> 132 rows)" in m for m in found), found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM.from_pretrained(base_folder)
        base.resize_token_embeddings(132)
        theirs = peft.get_peft_model(base, peft.LoraConfig(**LLAMA))
        theirs.save_pretrained(tmp_path / "theirs")
    ours_keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_keys = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(ours_keys) == sorted(theirs_keys)
    assert ours_keys["base_model.model.model.embed_tokens.weight"].shape == (132, 32)


def test_resized_vocab_not_saved_warns(base_folder, tmp_path):
    model = resized(base_folder)
    found = lora_warnings(lambda: model.save_pretrained(tmp_path / "a", save_embedding_layers=False))
    assert any("new tokens' embeddings are not saved" in m for m in found), found
    plain = get_peft_model(LlamaForCausalLM.from_pretrained(base_folder), LoraConfig(**LLAMA))
    assert not any("resized" in m for m in lora_warnings(lambda: plain.save_pretrained(tmp_path / "b")))
