"""PEFT vs lorakit, side by side in one process: step time (interleaved medians) and peak memory (child processes).

    python -m benchmarks.compare [--rows dora_train,dora_infer] [--repeats 7] [--threads 1] [--out BENCHMARKS.md]

Each row builds the same model twice from one seed, applies PEFT 0.21.2 and lorakit with the same
config, and times them interleaved (A B A B ..., after warm-up), reporting the median of each and the
median of the per-pair ratios. Peak memory of a training step is measured in a fresh child process per
(row, library): resident memory sampled every 5 ms during the step, minus the memory before the model was
built. The numbers are appended to the results file with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Row:
    """One benchmark: a LoRA config (None = no adapters), a workload, and the shape of its batch."""

    label: str
    lora: dict | None
    train: bool
    batch: tuple[int, int]


ROWS: dict[str, Row] = {
    "floor_train": Row("frozen base, no adapters (floor: the same plain model measured twice)", None, True, (4, 256)),
    "dora_train": Row("DoRA r=16 all-linear, training step", dict(r=16, lora_alpha=16, use_dora=True,
                                                                 target_modules="all-linear"), True, (4, 256)),
    "dora_infer": Row("DoRA r=16 all-linear, unmerged inference", dict(r=16, lora_alpha=16, use_dora=True,
                                                                      target_modules="all-linear"), False, (1, 32)),
}


def build_base(seed: int = 0) -> torch.nn.Module:
    """The issue's Llama-style model: hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 8192 (33.7 M)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    return LlamaForCausalLM(config)


def build(row: Row, library: str) -> torch.nn.Module:
    base = build_base()
    base.requires_grad_(False)
    if row.lora is None:
        base.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        return base
    module = __import__(library)
    model = module.get_peft_model(base, module.LoraConfig(**row.lora))
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B, identical in both libraries (state dicts are key-for-key equal)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def workload(row: Row, model: torch.nn.Module) -> Callable[[], None]:
    ids = torch.randint(0, 8192, row.batch, generator=torch.Generator().manual_seed(0))
    if not row.train:
        model.eval()

        def infer() -> None:
            with torch.no_grad():
                model(input_ids=ids)

        return infer
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def time_row(row: Row, repeats: int, warmup: int = 2) -> dict:
    """Interleaved medians of peft and lorakit (and the per-pair ratio lorakit / peft)."""
    runs = {library: workload(row, build(row, library)) for library in ("peft", "lorakit")}
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {library: [] for library in runs}
    for _ in range(repeats):
        for library, run in runs.items():
            start = time.perf_counter()
            run()
            times[library].append(time.perf_counter() - start)
    ratios = [lk / pf for lk, pf in zip(times["lorakit"], times["peft"], strict=True)]
    return {"peft_s": statistics.median(times["peft"]), "lorakit_s": statistics.median(times["lorakit"]),
            "ratio": statistics.median(ratios)}


def child_peak(row_key: str, library: str, threads: int) -> float:
    """Peak resident MiB above the pre-build baseline over two steps, in a fresh interpreter."""
    code = (f"import torch, json; torch.set_num_threads({threads}); from benchmarks.compare import ROWS, build, "
            "workload; from lorakit.training import PeakMemory, rss_mb; base = rss_mb(); "
            f"run = workload(ROWS[{row_key!r}], build(ROWS[{row_key!r}], {library!r})); run(); "
            "m = PeakMemory(); m.__enter__(); run(); m.__exit__(); print(json.dumps(m.peak - base))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return float(out.stdout.strip().splitlines()[-1])


def base_infer_time(row: Row, repeats: int) -> float:
    run = workload(row, build(Row(row.label, None, False, row.batch), "peft"))
    run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    import lorakit

    lines = []
    for key in args.rows.split(","):
        row = ROWS[key]
        timing = time_row(row, args.repeats) if row.lora is not None else None
        memory = {lib: child_peak(key, lib, args.threads) for lib in ("peft", "lorakit")} if row.train else None
        extra = f"; base model alone {base_infer_time(row, args.repeats) * 1e3:.1f} ms" if not row.train else ""
        line = f"| {row.label} | {row.batch[0]}x{row.batch[1]} |"
        line += (f" {timing['peft_s'] * 1e3:.1f} ms | {timing['lorakit_s'] * 1e3:.1f} ms | {timing['ratio']:.3f}x{extra} |"
                 if timing else " - | - | - |")
        line += (f" {memory['peft']:.0f} MiB | {memory['lorakit']:.0f} MiB | {memory['lorakit'] / memory['peft']:.3f}x |"
                 if memory else " - | - | - |")
        print(line, flush=True)
        lines.append(line)
    header = (f"\n## {time.strftime('%Y-%m-%d')}: `python -m benchmarks.compare --rows {args.rows} --repeats "
              f"{args.repeats} --threads {args.threads}`\n\n{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, transformers {transformers.__version__}, "
              f"peft {peft.__version__}, lorakit {lorakit.__version__}; Llama-style model (hidden 512, 8 layers, "
              "vocab 8192), fp32, CPU.\n\n| row | batch | PEFT time | lorakit time | lorakit / PEFT (median of "
              "paired ratios) | PEFT peak | lorakit peak | lorakit / PEFT |\n|---|---|---|---|---|---|---|---|\n")
    with args.out.open("a", encoding="utf-8") as handle:
        handle.write(header + "\n".join(lines) + "\n")
    print(json.dumps({"written": str(args.out)}))


if __name__ == "__main__":
    main()
