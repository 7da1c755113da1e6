"""lorakit models under transformers.Trainer: LoraTrainer writes adapter-only checkpoints and resumes them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import save_tiny_llm
from transformers import AutoModelForCausalLM, TrainingArguments

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.hf_trainer import LoraTrainer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llm(tmp_path_factory.mktemp("trainer") / "model")


def dataset():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(12, 50, (24, 12), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def trainer(model_dir, output, max_steps):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
    args = TrainingArguments(output_dir=str(output), max_steps=max_steps, per_device_train_batch_size=4,
                             save_steps=2, save_strategy="steps", report_to=[], use_cpu=True, seed=0,
                             data_seed=0, learning_rate=1e-2, logging_steps=1, dataloader_drop_last=True)
    return LoraTrainer(model=model, args=args, train_dataset=dataset())


def test_adapter_only_checkpoints_and_exact_resume(model_dir, tmp_path):
    straight = trainer(model_dir, tmp_path / "straight", 4)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert "model.safetensors" not in files  # adapter-only: no copy of the frozen base
    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert saved and all(".lora_" in key for key in saved)
    # the checkpoint is a PEFT adapter folder lorakit (and peft) load directly
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), checkpoint)

    resumed = trainer(model_dir, tmp_path / "resumed", 4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final = {n: p.detach() for n, p in straight.model.named_parameters() if p.requires_grad}
    again = {n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert final.keys() == again.keys()
    for name in final:
        torch.testing.assert_close(again[name], final[name], atol=1e-6, rtol=1e-5)
