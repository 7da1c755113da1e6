"""Scratch profile of the fused path (ops.py): PEFT, lorakit and the frozen floor, interleaved in one process.

    python -m benchmarks.profile_ops CONFIG [--repeats 7] [--memory]

CONFIG is a key of ``CONFIGS``. Training configs time one step (forward + backward + AdamW) on the
issue's Llama-style model (benchmarks.compare.build_base), fp32, batch 4x256, one thread, as A B C A B C
..., and print each median and the medians of the per-round ratios (lorakit / floor, lorakit / PEFT).
Inference configs compare against the base model without adapters. ``mixed`` times a batch of 8 rows
routed to 4 adapters against the same batch with one adapter. ``--memory`` adds the peak resident memory
of a training step per library, each in a fresh child process. For the record, BENCHMARKS.md is
written by benchmarks.compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.compare import SEVEN, build_base

CONFIGS = {
    "b": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05), True),
    "b0": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), True),
    "c": (dict(r=64, lora_alpha=16, target_modules=SEVEN, lora_dropout=0.1), True),
    "c0": (dict(r=64, lora_alpha=16, target_modules=SEVEN, lora_dropout=0.0), True),
    "d": (dict(r=16, lora_alpha=16, use_dora=True, target_modules="all-linear"), True),
    "b_infer": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05), False),
    "c_infer": (dict(r=64, lora_alpha=16, target_modules=SEVEN, lora_dropout=0.1), False),
}


def build(library: str | None, lora: dict | None) -> torch.nn.Module:
    base = build_base()
    base.requires_grad_(False)
    if library is None:
        base.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        return base
    module = __import__(library)
    model = module.get_peft_model(base, module.LoraConfig(**lora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def workload(model: torch.nn.Module, train: bool, batch=(4, 256), adapter_names=None):
    ids = torch.randint(0, 8192, batch, generator=torch.Generator().manual_seed(0))
    if not train:
        model.eval()
        extra = {} if adapter_names is None else {"adapter_names": adapter_names}

        def infer() -> None:
            with torch.no_grad():
                model(input_ids=ids, **extra)

        return infer
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def interleave(runs: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def mixed_runs() -> dict:
    model = build("lorakit", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    for name in ("a1", "a2", "a3"):
        model.add_adapter(name, __import__("lorakit").LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    names = [n for n in ("default", "a1", "a2", "a3") for _ in range(2)]
    return {"one adapter": workload(model, False, (8, 64)),
            "4 adapters": workload(model, False, (8, 64), adapter_names=names)}


def child_peak(config: str, library: str | None) -> float:
    code = ("import torch, json; torch.set_num_threads(1); from benchmarks.profile_ops import CONFIGS, build, "
            "workload; from lorakit.training import PeakMemory, rss_mb; base = rss_mb(); "
            f"lora, train = CONFIGS[{config!r}]; run = workload(build({library!r}, lora), True); run(); "
            "m = PeakMemory(); m.__enter__(); run(); m.__exit__(); print(json.dumps(m.peak - base))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", choices=[*CONFIGS, "mixed"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--no-peft", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.config == "mixed":
        times = interleave(mixed_runs(), args.repeats)
        print({k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()},
              "4 adapters / one:", round(ratio(times, "4 adapters", "one adapter"), 3))
        return
    lora, train = CONFIGS[args.config]
    libraries = ["lorakit", "floor"] if args.no_peft else ["peft", "lorakit", "floor"]
    runs = {lib: workload(build(None if lib == "floor" else lib, lora), train) for lib in libraries}
    times = interleave(runs, args.repeats)
    print(args.config, {k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()})
    print("lorakit/floor", round(ratio(times, "lorakit", "floor"), 3),
          "" if args.no_peft else f"peft/floor {ratio(times, 'peft', 'floor'):.3f} lorakit/peft {ratio(times, 'lorakit', 'peft'):.3f}")
    if args.memory and train:
        peaks = {lib: child_peak(args.config, None if lib == "floor" else lib) for lib in libraries}
        print("peak MiB", peaks, "" if args.no_peft else f"lorakit/peft {peaks['lorakit'] / peaks['peft']:.3f}")


if __name__ == "__main__":
    main()
