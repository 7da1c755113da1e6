"""QLoRA on CPU with the embedded SmolLM2-135M: a training run, the weight footprint, and the step time vs fp32 LoRA.

    python -m benchmarks.qlora [--steps 30] [--repeats 7] [--threads 1] [--out BENCHMARKS.md]

1. Training: the fp32 checkpoint (``lorakit.app.embedded``) is quantized in place with ``lorakit.quantize_model``
   (NF4, double quant, fp32 compute; embeddings / tied lm_head and norms stay fp32), LoRA r=8 on the seven
   projections is trained for ``--steps`` steps on the chatterbot pairs (``lorakit.app.training.train_loop``), and
   the held-out loss per reply token is measured before and after.
2. Footprint: bytes of the weights held in memory (every parameter and buffer once; for 4-bit layers the
   packed codes plus their quantization state: absmax, nested absmax, code books), QLoRA vs fp32.
3. Step time: the same LoRA on the fp32 model and on the 4-bit model, one training step each on the same
   batch, interleaved (A B A B ..., after warm-up) in one process: medians and the median of per-pair ratios.

A section with the machine, versions, command and table is appended to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks import workloads

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=SEVEN, task_type="CAUSAL_LM")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (each tensor once) plus the quantization state of 4-bit weights."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if getattr(state, "state2", None) is not None:
                tensors += [state.state2.absmax, state.state2.code]
    for tensor in tensors:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def load(folder: Path, quantized: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    import lorakit

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if quantized:
        lorakit.quantize_model(model, quant_type="nf4", compute_dtype=torch.float32, double_quant=True)
    return model


def with_lora(model: nn.Module) -> nn.Module:
    import lorakit

    torch.manual_seed(0)
    return lorakit.get_peft_model(model, lorakit.LoraConfig(**LORA))


def train_run(folder: Path, tokenizer: object, steps: int) -> dict:
    """QLoRA training for ``steps`` steps; held-out and first/last training losses."""
    from lorakit.app.embedded import chatterbot_pairs
    from lorakit.app.sft import encode_all, split
    from lorakit.app.training import (
        TrainSettings,
        TrainState,
        evaluate,
        make_optimizer,
        train_loop,
    )

    train_rows, held_rows = split(chatterbot_pairs(), 64, seed=0)
    train_set, held_set = encode_all(tokenizer, train_rows, 256), encode_all(tokenizer, held_rows, 256)
    model = with_lora(load(folder, quantized=True))
    settings = TrainSettings(max_steps=steps, batch_size=8, lr=1e-3, warmup_steps=5)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    before = evaluate(model, held_set, 16, pad)
    optimizer, scheduler = make_optimizer(model, settings)
    state = train_loop(model, train_set, settings, pad, TrainState(), optimizer, scheduler)
    after = evaluate(model, held_set, 16, pad)
    losses = [loss for _, loss in state.losses]
    return {"held_before": before, "held_after": after, "first5": statistics.mean(losses[:5]),
            "last5": statistics.mean(losses[-5:]), "seconds": state.seconds, "steps": state.step}


def step_times(folder: Path, tokenizer: object, repeats: int, warmup: int = 2) -> dict:
    """Interleaved training-step times of LoRA on the fp32 model and on the NF4 model (same batch)."""
    from lorakit.app.embedded import chatterbot_pairs
    from lorakit.app.sft import collate, encode_all

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate(encode_all(tokenizer, chatterbot_pairs()[:8], 256), pad)
    runs = {}
    for name, quantized in (("fp32", False), ("qlora", True)):
        model = with_lora(load(folder, quantized)).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        runs[name] = workloads.timed(step)
    times = workloads.interleave(runs, repeats, warmup)
    return {"fp32_s": statistics.median(times["fp32"]), "qlora_s": statistics.median(times["qlora"]),
            "ratio": workloads.paired_ratio(times, "qlora", "fp32"), "batch": tuple(batch["input_ids"].shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import bitsandbytes
    import transformers
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    import lorakit
    from lorakit.app.embedded import default_model_folder

    transformers_logging.disable_progress_bar()
    folder = default_model_folder(verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    footprint = {name: weight_bytes(load(folder, quantized)) for name, quantized in (("fp32", False), ("qlora", True))}
    timing = step_times(folder, tokenizer, args.repeats)
    run = train_run(folder, tokenizer, args.steps)
    share = footprint["qlora"] / footprint["fp32"]
    rows = [
        f"| weights in memory | {footprint['fp32'] / 2**20:.1f} MiB | {footprint['qlora'] / 2**20:.1f} MiB | "
        f"{share:.3f}x (target <= 0.35) |",
        f"| training step, LoRA r=8 on 7 projections, batch {timing['batch'][0]}x{timing['batch'][1]} "
        f"(median of {args.repeats}, interleaved) | {timing['fp32_s'] * 1e3:.0f} ms | {timing['qlora_s'] * 1e3:.0f} ms "
        f"| {timing['ratio']:.3f}x (median of paired ratios) |",
        f"| QLoRA training run, {run['steps']} steps of 8 chatterbot pairs, lr 1e-3 | - | held-out loss "
        f"{run['held_before']:.3f} -> {run['held_after']:.3f}; train loss (mean of first / last 5 steps) "
        f"{run['first5']:.3f} -> {run['last5']:.3f}; {run['seconds']:.0f} s | - |",
    ]
    print("\n".join(rows), flush=True)
    header = (f"\n## {time.strftime('%Y-%m-%d')}: `python -m benchmarks.qlora --steps {args.steps} --repeats "
              f"{args.repeats} --threads {args.threads}`\n\nQLoRA on CPU: {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, transformers {transformers.__version__}, "
              f"bitsandbytes {bitsandbytes.__version__}, lorakit {lorakit.__version__}; embedded SmolLM2-135M-Instruct, "
              "NF4 + double quant with fp32 compute (lorakit.quantize_model) vs the fp32 checkpoint.\n\n"
              "| measure | fp32 + LoRA | NF4 + LoRA (QLoRA) | QLoRA / fp32 |\n|---|---|---|---|\n")
    with args.out.open("a", encoding="utf-8") as handle:
        handle.write(header + "\n".join(rows) + "\n")
    print(json.dumps({"written": str(args.out), "footprint_share": share, "step_ratio": timing["ratio"], **run}))


if __name__ == "__main__":
    main()
