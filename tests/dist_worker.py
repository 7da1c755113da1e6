"""Worker for test_distributed.py: DDP then FSDP2 LoRA training of a tiny Llama, results written as files.

Run as ``torchrun --nproc-per-node=2 dist_worker.py OUT``. Each rank trains on its half of one fixed global
batch; ``train_single`` (imported by the test) trains the same model on the whole batch in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit.distributed import shard

GLOBAL_BATCH, SEQ, VOCAB, STEPS = 4, 8, 64, 3


def build() -> nn.Module:
    """The same tiny Llama with a LoRA (r=4, dropout 0) on every rank: seeded init."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights="gaussian")  # B != 0, so A's gradient is non-zero from step 1
    return get_peft_model(LlamaForCausalLM(config), lora)


def global_batch() -> Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))  # (batch, seq)


def train(model: nn.Module, trainable: list[nn.Parameter], input_ids: Tensor) -> None:
    """STEPS AdamW steps; equal-length rows, so the mean of per-rank mean losses is the global mean."""
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, foreach=False)
    for _ in range(STEPS):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def train_single(out: Path) -> None:
    peft_model = build()
    train(peft_model, [p for p in peft_model.parameters() if p.requires_grad], global_batch())
    peft_model.save_pretrained(out / "single")


def full_trainable(peft_model: nn.Module) -> dict[str, Tensor]:
    """Every trainable parameter, whole (FSDP2 DTensors gathered), on this rank."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in peft_model.named_parameters() if p.requires_grad}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = global_batch().chunk(world)[rank]

    peft_model = build()
    ddp = nn.parallel.DistributedDataParallel(peft_model)
    train(ddp, [p for p in peft_model.parameters() if p.requires_grad], rows)
    torch.save(full_trainable(peft_model), out / f"ddp_rank{rank}.pt")
    peft_model.save_pretrained(out / "ddp", is_main_process=rank == 0)

    peft_model = shard(build())
    train(peft_model, [p for p in peft_model.parameters() if p.requires_grad], rows)
    torch.save(full_trainable(peft_model), out / f"fsdp2_rank{rank}.pt")
    peft_model.save_pretrained(out / "fsdp2", is_main_process=rank == 0)

    try:
        peft_model.add_adapter("late", LoraConfig(r=4, target_modules=["q_proj"]))
        message = "no error"
    except ValueError as error:
        message = str(error)
    (out / f"inject_after_shard_rank{rank}.txt").write_text(message)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
