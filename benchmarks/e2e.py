"""The main job end to end: ``lorakit train`` against TRL's SFTTrainer + PEFT, appended to BENCHMARKS.md.

    python -m benchmarks.e2e [--steps 80] [--rounds 1] [--out BENCHMARKS.md]

One recipe for every run: the embedded SmolLM2-135M-Instruct (fp32 folder), the English chatterbot pairs
split as ``lorakit train`` splits them (64 held out, seed 0), LoRA r=64, alpha=16, dropout 0.1, the seven
projections, rsLoRA, batch 8, max length 128, peak lr 2e-4, ``--steps`` optimizer steps. The runs:

- ``lorakit train`` with ``--precision auto`` (bf16 base on a CPU with AMX / AVX512-BF16) and with
  ``--precision fp32``;
- TRL 1.16 ``SFTTrainer`` + peft 0.21.2 with SFTConfig's defaults otherwise (bf16 autocast, gradient
  checkpointing, linear decay without warmup, completion-only loss on prompt/completion rows).

Each run is its own process, run back to back (``--rounds`` > 1 repeats the set, rotating the order).
Measured: seconds per optimizer step (the step loop only: lorakit's ``train_seconds``, TRL's time between
``on_step_begin`` and ``on_step_end``), the process's peak resident memory (ru_maxrss, model loading
included), and the held-out loss of each saved adapter, computed in a separate process by one function
(``lorakit.app.training.evaluate``, fp32 base, the adapter loaded with ``peft.PeftModel``) on the same pairs.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = dict(r=64, lora_alpha=16, lora_dropout=0.1, use_rslora=True, task_type="CAUSAL_LM",
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
BATCH, MAX_LENGTH, LR, SEED = 8, 128, 2e-4, 0
RUNS = ("lorakit auto", "lorakit fp32", "TRL+PEFT")


def _held_out_rows() -> tuple[list[dict], list[dict]]:
    from lorakit.app.cli.train import HELD_OUT
    from lorakit.app.embedded import chatterbot_pairs
    from lorakit.app.sft import split

    return split(chatterbot_pairs(), HELD_OUT, SEED)


def run_lorakit(output: Path, steps: int, precision: str) -> dict:
    command = [sys.executable, "-m", "lorakit", "train", "--output", str(output), "--max-steps", str(steps),
               "--samples", "0", "--time-limit", "0", "--save-every", "0", "--precision", precision,
               "--batch-size", str(BATCH), "--max-length", str(MAX_LENGTH), "--lr", str(LR), "--seed", str(SEED)]
    log = subprocess.run(command, capture_output=True, text=True, check=False)
    if log.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log.stdout[-3000:]}\n{log.stderr[-3000:]}")
    metrics = json.loads((output / "metrics.json").read_text())
    chosen = next((line for line in log.stdout.splitlines() if line.startswith("precision:")), "")
    return {"s_per_step": metrics["train_seconds"] / metrics["steps"], "peak_rss_mib": metrics["process_peak_rss_mib"],
            "adapter": str(output / "adapter"), "note": chosen}


def trl_child(output: Path, steps: int) -> None:
    """TRL SFTTrainer + peft with SFTConfig's defaults beyond the shared recipe; writes output/metrics.json."""
    import peft
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lorakit.app.embedded import default_model_folder

    folder = default_model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    train_rows, _ = _held_out_rows()
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": row["prompt"]}],
                               "completion": [{"role": "assistant", "content": row["response"]}]}
                              for row in train_rows])
    step_seconds: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args: object, **kwargs: object) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *args: object, **kwargs: object) -> None:
            step_seconds.append(time.perf_counter() - self.start)

    config = SFTConfig(output_dir=str(output / "trainer"), max_steps=steps, per_device_train_batch_size=BATCH,
                       max_length=MAX_LENGTH, learning_rate=LR, seed=SEED, use_cpu=True, report_to="none",
                       save_strategy="no", logging_steps=max(1, steps // 10))
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft.LoraConfig(**RECIPE), callbacks=[StepTimer()])
    trainer.train()
    trainer.save_model(str(output / "adapter"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (output / "metrics.json").write_text(json.dumps({"step_seconds": step_seconds, "process_peak_rss_mib": peak,
                                                     "bf16": config.bf16,
                                                     "gradient_checkpointing": config.gradient_checkpointing}))


def run_trl(output: Path, steps: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.e2e", "--child-trl", str(output), "--steps", str(steps)]
    log = subprocess.run(command, capture_output=True, text=True, check=False)
    if log.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log.stdout[-3000:]}\n{log.stderr[-3000:]}")
    metrics = json.loads((output / "metrics.json").read_text())
    return {"s_per_step": sum(metrics["step_seconds"]) / len(metrics["step_seconds"]),
            "peak_rss_mib": metrics["process_peak_rss_mib"], "adapter": str(output / "adapter"),
            "note": f"SFTConfig defaults: bf16={metrics['bf16']}, "
                    f"gradient_checkpointing={metrics['gradient_checkpointing']}"}


def eval_child(adapters: list[str], output: Path) -> None:
    """Held-out loss of the base and of each adapter: lorakit.app.training.evaluate, fp32, peft-loaded."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.app.embedded import default_model_folder
    from lorakit.app.sft import encode_all
    from lorakit.app.training import evaluate

    folder = default_model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    _, held_rows = _held_out_rows()
    held = encode_all(tokenizer, held_rows, MAX_LENGTH)
    losses = {"base": evaluate(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), held, BATCH, pad)}
    for adapter in adapters:
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        losses[adapter] = evaluate(peft.PeftModel.from_pretrained(base, adapter), held, BATCH, pad)
    output.write_text(json.dumps({"losses": losses, "pairs": len(held)}))


def held_out(adapters: list[str], scratch: Path) -> tuple[dict[str, float], int]:
    target = scratch / "eval.json"
    command = [sys.executable, "-m", "benchmarks.e2e", "--child-eval", str(target), *adapters]
    log = subprocess.run(command, capture_output=True, text=True, check=False)
    if log.returncode != 0:
        raise RuntimeError(f"held-out evaluation failed:\n{log.stderr[-3000:]}")
    result = json.loads(target.read_text())
    return result["losses"], result["pairs"]


def cpu_model() -> str:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def table(results: dict[str, list[dict]], losses: dict[str, float], steps: int, rounds: int, pairs: int) -> str:
    rows = ["| run | s / step | peak RSS | held-out loss after | precision / settings |", "|---|---|---|---|---|"]
    for name in RUNS:
        runs = results[name]
        seconds = statistics.median(r["s_per_step"] for r in runs)
        peak = statistics.median(r["peak_rss_mib"] for r in runs) / 1024
        after = " / ".join(f"{losses[r['adapter']]:.4f}" for r in runs)
        rows.append(f"| {name} | {seconds:.2f} s | {peak:.2f} GiB | {after} | {runs[0]['note']} |")
    return (f"Held-out loss before training (base model): {losses['base']:.4f} on {pairs} held-out pairs; "
            f"{steps} steps, medians of {rounds} round(s) (losses: one per round).\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--note", default="", help="a sentence added under the table (e.g. 'machine busy')")
    parser.add_argument("--child-trl", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-eval", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("adapters", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_trl is not None:
        trl_child(args.child_trl, args.steps)
        return 0
    if args.child_eval is not None:
        eval_child(args.adapters, args.child_eval)
        return 0
    import peft
    import torch
    import transformers
    import trl

    begin = time.time()
    results: dict[str, list[dict]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory(prefix="lorakit-e2e-") as scratch_name:
        scratch = Path(scratch_name)
        for round_ in range(args.rounds):
            order = RUNS[round_ % len(RUNS):] + RUNS[: round_ % len(RUNS)]
            for name in order:
                output = scratch / f"{name.replace(' ', '_').replace('+', '_')}_{round_}"
                print(f"round {round_ + 1}/{args.rounds}: {name} ...", flush=True)
                result = run_trl(output, args.steps) if name == "TRL+PEFT" else \
                    run_lorakit(output, args.steps, name.split()[1])
                print(f"  {result['s_per_step']:.2f} s/step, peak {result['peak_rss_mib']:.0f} MiB", flush=True)
                results[name].append(result)
        losses, pairs = held_out([r["adapter"] for runs in results.values() for r in runs], scratch)
        body = table(results, losses, args.steps, args.rounds, pairs)
    minutes = (time.time() - begin) / 60
    import lorakit

    header = (f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: end to end, `lorakit train` vs TRL SFTTrainer + PEFT\n\n"
              f"`python -m benchmarks.e2e --steps {args.steps} --rounds {args.rounds}` ({minutes:.1f} min)\n\n"
              f"CPU: {cpu_model()} ({torch.get_num_threads()} threads); torch {torch.__version__}, transformers "
              f"{transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}, lorakit "
              f"{lorakit.__version__}, Python {platform.python_version()}. Recipe: SmolLM2-135M-Instruct (embedded, "
              f"fp32 folder), chatterbot pairs, r=64 alpha=16 dropout 0.1, seven projections, rsLoRA, batch {BATCH}, "
              f"max length {MAX_LENGTH}, lr {LR:g}. Held-out loss: `lorakit.app.training.evaluate` (fp32, adapter loaded "
              f"with peft) on the same pairs for every adapter.\n\n")
    text = header + body + (f"\n{args.note}\n" if args.note else "")
    print(text)
    with args.out.open("a", encoding="utf-8") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
