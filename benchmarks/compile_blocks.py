"""Eager vs regionally compiled training (lorakit.compiling.compile_blocks), interleaved in one process.

    python -m benchmarks.compile_blocks [--layers 30] [--steps 4] [--threads 1] [--backend inductor] [--autocast]

The model is SmolLM2-135M's shape with random weights (hidden 576, intermediate 1536, 30 layers, 9 heads,
3 kv heads, vocab 49152), LoRA r=64 α=16 on all seven projections with dropout 0.1, a batch of 8x128
token ids, AdamW. Both models start from the same weights; the compiled one runs its first step alone
(compile time = that step minus the median compiled step), then one step of each in turn, ``--steps``
rounds. The job estimate for n steps is compile + n·(median step): the row says which mode wins at 80.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch


def build(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    base = LlamaForCausalLM(config)
    base.config.use_cache = False  # as `lorakit train`: a KV cache would hand each block its layer index
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return lorakit.get_peft_model(base, lorakit.LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1,
                                                           target_modules=seven))


def stepper(model: torch.nn.Module, ids: torch.Tensor, autocast: bool):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    precision = (lambda: torch.autocast("cpu", torch.bfloat16)) if autocast else contextlib.nullcontext

    def step() -> float:
        start = time.perf_counter()
        with precision():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--autocast", action="store_true", help="torch.autocast(cpu, bfloat16) around forward")
    parser.add_argument("--job", type=int, default=80)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torch._dynamo.utils import counters

    from lorakit.compiling import compile_blocks

    eager_model = build(args.layers)
    compiled_model = copy.deepcopy(eager_model)
    blocks = compile_blocks(compiled_model, backend=args.backend)
    ids = torch.randint(0, 49152, (8, 128), generator=torch.Generator().manual_seed(0))
    eager, compiled = stepper(eager_model, ids, args.autocast), stepper(compiled_model, ids, args.autocast)
    first = compiled()
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    eager()  # warm-up
    for _ in range(args.steps):
        times["eager"].append(eager())
        times["compiled"].append(compiled())
    median = {name: statistics.median(values) for name, values in times.items()}
    compile_s = first - median["compiled"]
    job = {"eager": args.job * median["eager"], "compiled": compile_s + args.job * median["compiled"]}
    print(f"{args.layers} layers, {len(blocks)} compiled blocks, backend {args.backend}, autocast bf16 "
          f"{args.autocast}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print(f"graphs compiled: {counters['stats']['unique_graphs']}, recompiles: "
          f"{sum(counters['recompiles'].values()) if counters['recompiles'] else 0}")
    print(f"first compiled step {first:.1f} s (compile ≈ {compile_s:.1f} s)")
    for name in times:
        print(f"{name}: median {median[name]:.3f} s/step  all {[round(t, 3) for t in times[name]]}")
    print(f"paired compiled/eager: {statistics.median(c / e for c, e in zip(times['compiled'], times['eager'])):.3f}")
    print(f"{args.job}-step job: eager {job['eager']:.0f} s, compiled {job['compiled']:.0f} s")


if __name__ == "__main__":
    main()
