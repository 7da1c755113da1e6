"""LoRA fine-tuning of a causal LM with lorakit under Hugging Face accelerate.

    accelerate launch --config_file examples/accelerate_config.yaml examples/accelerate_train.py \
        --model path/to/causal-lm --out out/accelerate --steps 20

Inject LoRA with ``lorakit.get_peft_model`` *before* ``accelerator.prepare``; save the unwrapped model from the
main process. The dataloader yields the global batch and ``split_batches=True`` gives each process its rows,
so N processes take the same optimizer steps as one process on the whole batch. Plain ``python`` runs it in
one process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraConfig, get_peft_model

TEXT = ("hello how are you ? i am fine thanks . what is python ? python is a program code . "
        "tell me a story about cats . cats like music and math . how is the weather today ? "
        "the weather is good today . do you like to read books ? yes i like to read books about science . ")


def blocks(tokenizer, seq_len: int, rows: int) -> torch.Tensor:
    """``rows`` equal-length token blocks cut from TEXT (no padding, so every row weighs the same)."""
    ids = tokenizer(TEXT * 8, add_special_tokens=False)["input_ids"]
    ids = (ids * (rows * seq_len // len(ids) + 1))[:rows * seq_len]
    return torch.tensor(ids).view(rows, seq_len)  # (rows, seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local transformers causal-LM folder or hub id")
    parser.add_argument("--out", type=Path, required=True, help="where the adapter folder is written")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4, help="global batch, split across processes")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    # split_batches: each process takes its rows of every global batch. cpu=True on a machine without CUDA:
    # under `accelerate launch` (torchrun) accelerate otherwise falls back to N independent 1-process runs.
    # (Accelerator's own split_batches= argument is silently ignored in accelerate 1.15: use the config.)
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True),
                              cpu=not torch.cuda.is_available())
    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        init_lora_weights="gaussian")  # B != 0: every factor moves from the first step
    model = get_peft_model(model, config)  # inject BEFORE prepare (DDP / FSDP wrap what exists then)

    data = blocks(tokenizer, args.seq_len, args.batch_size * args.steps)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, foreach=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    for step, input_ids in enumerate(loader, 1):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.print(f"step {step}: loss {accelerator.reduce(loss.detach(), 'mean').item():.4f}")
        if step >= args.steps:
            break

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{accelerator.process_index}.done").write_text(f"{accelerator.num_processes}\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.out / "adapter")
    accelerator.end_training()


if __name__ == "__main__":
    main()
