"""PEFT vs lorakit, side by side in one process: the issue-9 table, written to BENCHMARKS.md.

    python -m benchmarks.compare [--rows train_b,inject_c] [--repeats 7] [--threads 1] [--out BENCHMARKS.md]

``ROWS`` is the table: each row names a workload kind (``KINDS``: one workload function each, in
workloads.py), a model, a LoRA config and a batch, and the issue's target for it. A row's runs (PEFT,
lorakit and the row's reference: the frozen floor, the base model, a single adapter, plain allocation or
plain safetensors) are timed interleaved A B C A B C ... after warm-up; the table shows their medians and
the median of the per-round ratios. Peak memory of a training step is measured in a fresh child process per
(row, library): resident memory sampled every 5 ms during the second step, minus the memory before the
model was built. ``--list`` prints the row keys.
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

from benchmarks import workloads

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_B = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.05}
LORA_C = {"r": 64, "lora_alpha": 16, "target_modules": SEVEN, "lora_dropout": 0.1}
DORA = {"r": 16, "lora_alpha": 16, "use_dora": True, "target_modules": "all-linear"}
LLAMA_BATCH, SMOLLM_BATCH = (4, 256), (2, 128)


@dataclass(frozen=True)
class Target:
    """The issue's target for a row: what it says, and the check on the row's measured numbers."""

    text: str
    met: Callable[[dict], bool]


@dataclass(frozen=True)
class Kind:
    """A kind of row: its workload, which runs fill the PEFT / lorakit / reference columns, its warm-up."""

    runs: Callable[..., dict]  # (model, lora, batch) -> {name: run}
    peft: str | None
    lorakit: str | None
    reference: dict[str, str]  # column ("peft" / "lorakit") -> the run it is divided by
    warmup: int = 2


KINDS: dict[str, Kind] = {
    "train": Kind(lambda m, lora, b: workloads.train_runs(m, lora, b, ("floor", "peft", "lorakit")),
                  "peft", "lorakit", {"peft": "floor", "lorakit": "floor"}, warmup=1),
    "floor": Kind(lambda m, lora, b: workloads.train_runs(m, lora, b, ("floor",)), None, None, {}, warmup=1),
    "full": Kind(lambda m, lora, b: workloads.train_runs(m, lora, b, ("floor", "full")),
                 None, "full", {"lorakit": "floor"}, warmup=1),
    "infer": Kind(workloads.infer_runs, "peft", "lorakit", {"peft": "base", "lorakit": "base"}),
    "mixed": Kind(workloads.mixed_runs, "peft mixed", "lorakit mixed",
                  {"peft": "peft one", "lorakit": "lorakit one"}),
    "inject": Kind(workloads.inject_runs, "peft", "lorakit", {"peft": "alloc", "lorakit": "alloc"}),
    "roundtrip": Kind(workloads.roundtrip_runs, "peft", "lorakit", {"peft": "safetensors", "lorakit": "safetensors"}),
    "merge": Kind(workloads.merge_runs, "peft", "lorakit", {}),
}


@dataclass(frozen=True)
class Row:
    label: str
    kind: str
    model: str
    lora: dict | None
    batch: tuple[int, int]
    target: Target | None = None


def _vs_floor(limit: float) -> Target:
    return Target(f"≤ {limit}x floor", lambda m: m["lorakit_ref"] <= limit)


def _vs_peft(time_limit: float, memory_limit: float) -> Target:
    return Target(f"≤ {time_limit}x PEFT time, peak ≤ {memory_limit}x PEFT's",
                  lambda m: m["ratio"] <= time_limit and m["memory_ratio"] <= memory_limit)


def _train_rows(model: str, batch: tuple[int, int], targets: bool) -> dict[str, Row]:
    """(a)-(e) of the issue on ``model``; the targets are the issue's for the Llama-style model only."""
    no_dropout = lambda lora: {**lora, "lora_dropout": 0.0}
    rows = {
        "a": Row("(a) frozen floor: no adapters, backward to the input", "floor", model, None, batch),
        "b": Row("(b) r=8 α=16 q,v, dropout 0.05", "train", model, LORA_B, batch, _vs_floor(1.04)),
        "b0": Row("(b0) r=8 α=16 q,v, dropout 0", "train", model, no_dropout(LORA_B), batch, _vs_floor(1.02)),
        "c": Row("(c) r=64 α=16 seven projections, dropout 0.1", "train", model, LORA_C, batch, _vs_peft(0.80, 0.85)),
        "c0": Row("(c0) r=64 α=16 seven projections, dropout 0", "train", model, no_dropout(LORA_C), batch,
                  _vs_floor(1.26)),
        "d": Row("(d) DoRA r=16 all-linear", "train", model, DORA, batch, _vs_peft(0.75, 0.75)),
        "e": Row("(e) full fine-tuning (plain torch, in the lorakit column)", "full", model, None, batch),
    }
    prefix = "train" if model == "llama" else model
    return {f"{prefix}_{key}": row if targets else Row(row.label, row.kind, model, row.lora, batch)
            for key, row in rows.items()}


ROWS: dict[str, Row] = {
    **_train_rows("llama", LLAMA_BATCH, targets=True),
    **_train_rows("smollm", SMOLLM_BATCH, targets=False),
    "inject_b": Row("get_peft_model, (b) config", "inject", "llama", LORA_B, LLAMA_BATCH,
                    Target("≥ 3x faster than PEFT", lambda m: m["ratio"] <= 1 / 3)),
    "inject_c": Row("get_peft_model, (c) config", "inject", "llama", LORA_C, LLAMA_BATCH,
                    Target("≥ 3x faster than PEFT", lambda m: m["ratio"] <= 1 / 3)),
    "roundtrip_b": Row("save_pretrained + from_pretrained, (b) config", "roundtrip", "llama", LORA_B, LLAMA_BATCH,
                       Target("≥ 2x faster than PEFT", lambda m: m["ratio"] <= 0.5)),
    "roundtrip_c": Row("save_pretrained + from_pretrained, (c) config", "roundtrip", "llama", LORA_C, LLAMA_BATCH,
                       Target("≥ 2x faster than PEFT", lambda m: m["ratio"] <= 0.5)),
    "merge_c": Row("merge_and_unload, (c) config", "merge", "llama", LORA_C, LLAMA_BATCH),
    "merge_d": Row("merge_and_unload, DoRA r=16 all-linear", "merge", "llama", DORA, LLAMA_BATCH),
    "infer_b": Row("inference unmerged vs base, (b) config", "infer", "llama", LORA_B, (4, 256),
                   Target("≤ 1.02x base", lambda m: m["lorakit_ref"] <= 1.02)),
    "infer_c": Row("inference unmerged vs base, (c) config", "infer", "llama", LORA_C, (4, 256),
                   Target("≤ 1.18x base", lambda m: m["lorakit_ref"] <= 1.18)),
    "infer_d": Row("inference unmerged vs base, DoRA r=16 all-linear", "infer", "llama", DORA, (1, 32),
                   Target("≤ 1.3x base", lambda m: m["lorakit_ref"] <= 1.3)),
    "mixed_b": Row("mixed batch of 4 adapters vs one adapter, (b) config", "mixed", "llama", LORA_B, (8, 128),
                   Target("≤ 1.05x one adapter", lambda m: m["lorakit_ref"] <= 1.05)),
    "mixed_c": Row("mixed batch of 4 adapters vs one adapter, (c) config", "mixed", "llama", LORA_C, (8, 128),
                   Target("≤ 1.05x one adapter", lambda m: m["lorakit_ref"] <= 1.05)),
}
MEMORY_KINDS = {"train": ("floor", "peft", "lorakit"), "floor": ("floor",), "full": ("floor", "full")}


# ---- measuring ------------------------------------------------------------------------------------------------
def measure(key: str, repeats: int, threads: int, peaks: dict) -> dict:
    """The row's timings (medians, paired ratios) and, for training rows, peak memory per library."""
    row, kind = ROWS[key], KINDS[ROWS[key].kind]
    samples = workloads.interleave(kind.runs(row.model, row.lora, row.batch), repeats, kind.warmup)
    median = {name: statistics.median(values) for name, values in samples.items()}
    result: dict = {"median_s": median}
    if kind.peft and kind.lorakit:
        result["ratio"] = workloads.paired_ratio(samples, kind.lorakit, kind.peft)
    for column, reference in kind.reference.items():
        result[f"{column}_ref"] = workloads.paired_ratio(samples, getattr(kind, column), reference)
    result["extra"] = {name: workloads.paired_ratio(samples, name, "base")
                       for name in samples if name.endswith("merged")}
    for library in MEMORY_KINDS.get(row.kind, ()):
        cache_key = (row.model, row.batch, library, json.dumps(row.lora, sort_keys=True) if library in (
            "peft", "lorakit") else None)
        if cache_key not in peaks:
            peaks[cache_key] = child_peak(key, library, threads)
        result.setdefault("peak_mib", {})[library] = peaks[cache_key]
    if "peak_mib" in result and {"peft", "lorakit"} <= set(result["peak_mib"]):
        result["memory_ratio"] = result["peak_mib"]["lorakit"] / result["peak_mib"]["peft"]
    result["met"] = row.target.met(result) if row.target else None
    return result


def child_peak(key: str, library: str, threads: int) -> float:
    """Peak resident MiB above the pre-build baseline during a second training step, in a fresh interpreter."""
    code = (f"import torch; torch.set_num_threads({threads}); from benchmarks.compare import peak_in_this_process; "
            f"peak_in_this_process({key!r}, {library!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return float(out.stdout.strip().splitlines()[-1])


def peak_in_this_process(key: str, library: str) -> None:
    from lorakit.app.training import PeakMemory, rss_mb

    row = ROWS[key]
    before = rss_mb()
    step = workloads.train_step(workloads.apply(workloads.MODELS[row.model](), library, row.lora), row.batch)
    step()
    with PeakMemory() as memory:
        step()
    print(json.dumps(memory.peak - before))


# ---- writing ---------------------------------------------------------------------------------------------------
COLUMNS = ("row", "batch", "PEFT", "lorakit", "lorakit / PEFT", "reference", "PEFT / ref", "lorakit / ref",
           "peak PEFT", "peak lorakit", "peak lorakit / PEFT", "target", "met")


def render_row(key: str, result: dict) -> str:
    row, kind = ROWS[key], KINDS[ROWS[key].kind]
    median, peaks = result["median_s"], result.get("peak_mib", {})
    ms = lambda name: f"{median[name] * 1e3:.1f} ms" if name in median else "-"
    ratio = lambda name: f"{result[name]:.3f}x" if name in result else "-"
    references = sorted(set(kind.reference.values())) or ([next(iter(median))] if row.kind == "floor" else [])
    reference = ", ".join(f"{name} {ms(name)}" for name in references) or "-"
    reference += "".join(f"; {name} {value:.3f}x base" for name, value in result["extra"].items())
    if peaks.get("floor") is not None:
        reference += f"; floor peak {peaks['floor']:,.0f} MiB"
    mib = lambda lib: f"{peaks[lib]:,.0f} MiB" if lib in peaks else "-"
    met = {None: "-", True: "met", False: "**missed**"}[result["met"]]
    cells = (f"{row.label} `{key}`", f"{row.batch[0]}x{row.batch[1]}" if row.kind in MEMORY_KINDS or row.kind in (
        "infer", "mixed") else "-", ms(kind.peft) if kind.peft else "-",
        ms(kind.lorakit) if kind.lorakit else "-", ratio("ratio"), reference, ratio("peft_ref"), ratio("lorakit_ref"),
        mib("peft"), mib("full" if row.kind == "full" else "lorakit"), ratio("memory_ratio"),
        row.target.text if row.target else "-", met)
    return "| " + " | ".join(cells) + " |"


def header(args: argparse.Namespace, seconds: float) -> str:
    import peft
    import transformers

    import lorakit

    cpu = _cpu_name()
    command = f"python -m benchmarks.compare --rows {args.rows} --repeats {args.repeats} --threads {args.threads}"
    return (f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n`{command}` ({seconds / 60:.1f} min)\n\n"
            f"{cpu}, {torch.get_num_threads()} thread(s); torch {torch.__version__}, transformers "
            f"{transformers.__version__}, peft {peft.__version__}, lorakit {lorakit.__version__}, Python "
            f"{platform.python_version()}; fp32, CPU. Models: the issue's Llama-style model (hidden 512, "
            f"intermediate 1376, 8 layers, 8 heads, vocab 8192: 33.7 M parameters) at batch "
            f"{LLAMA_BATCH[0]}x{LLAMA_BATCH[1]}, and the embedded SmolLM2-135M-Instruct (fp32) at batch "
            f"{SMOLLM_BATCH[0]}x{SMOLLM_BATCH[1]} (smaller, to keep the run affordable; no targets there). "
            f"Medians of {args.repeats} interleaved rounds; ratios are medians of per-round ratios.\n\n"
            f"| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({_cores()} cores visible)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated keys of ROWS (default: all)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--append", action="store_true", help="add a section to --out instead of replacing it")
    parser.add_argument("--list", action="store_true", help="print the row keys and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(f"{key}: {row.label}" for key, row in ROWS.items()))
        return
    unknown = [key for key in args.rows.split(",") if key not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; --list shows them")
    torch.set_num_threads(args.threads)
    start, lines, peaks, results = time.perf_counter(), [], {}, {}
    for key in args.rows.split(","):
        results[key] = measure(key, args.repeats, args.threads, peaks)
        lines.append(render_row(key, results[key]))
        print(lines[-1], flush=True)
    section = header(args, time.perf_counter() - start) + "\n".join(lines) + "\n"
    previous = args.out.read_text(encoding="utf-8") if args.append and args.out.exists() else PREAMBLE
    args.out.write_text(previous.rstrip("\n") + "\n\n" + section, encoding="utf-8")
    print(json.dumps({"written": str(args.out), "minutes": round((time.perf_counter() - start) / 60, 1)}))


PREAMBLE = """# Benchmarks

Written by `python -m benchmarks.compare` (see its docstring). Columns: PEFT and lorakit are medians of the
timed runs; "lorakit / PEFT" is the median of per-round ratios (below 1: lorakit is faster); "reference" is
the row's baseline, timed in the same interleaved rounds: the frozen floor for training rows (no adapters,
backward to the input), the base model for inference, one adapter for mixed batches, allocating +
initialising the same factors for `get_peft_model`, `safetensors` save_file + load_file of the same
tensors for the round trip; "PEFT / ref" and "lorakit / ref" are per-round ratios to it. Peak memory is
the resident set during a training step in a fresh process, above the memory before the model was built
(weights included). "target" is the issue's, checked on these numbers.
"""


if __name__ == "__main__":
    main()
