"""Quick start: LoRA on a small Llama-style model, a few training steps, PEFT's trainable-parameter line.

The model is built from a transformers config with random weights (no download). LoRA adapts the
attention projections; the base stays frozen. Training on one repeated token pattern makes the loss
fall within a few dozen steps, which shows gradients reach the adapters and only the adapters.

This is the main job until `lorakit train` (issue 4) replaces it.
"""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, TaskType, get_peft_model


def main(steps: int = 40) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.05,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    pattern = torch.tensor([5, 17, 42, 99, 7, 3, 128, 64])
    batch = pattern.repeat(4, 8)  # (4, 64): four copies of the pattern repeated 8 times
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s")

    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=batch, labels=batch).loss.item()
        with model.disable_adapter():
            base = model(input_ids=batch, labels=batch).loss.item()
    print(f"loss with the adapter {tuned:.4f}, base model alone {base:.4f}")


if __name__ == "__main__":
    main()
