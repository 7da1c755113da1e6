"""Shared by the tests of lorakit's checks (test_training_checks, test_save_checks, test_merge_check,
test_io_checks, test_errors, test_guards): LoraWarning capture, a randomized adapter, a saved adapter."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from models import build

from lorakit import LoraConfig, LoraWarning, get_peft_model

LLAMA = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8}


def randomize(model: torch.nn.Module, seed: int = 3, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=gen))


def messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, LoraWarning)]


def lora_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    return messages(record)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def saved(tmp_path) -> Path:
    """A saved llama adapter with random factors."""
    model = get_peft_model(build("llama"), LoraConfig(**LLAMA))
    randomize(model)
    model.save_pretrained(tmp_path / "a")
    return tmp_path / "a"
