"""Why did ``lorakit train`` learn less per step than TRL + PEFT? One change at a time, same everything else.

    python -m benchmarks.learning [--steps 20] [--variants default,batch_mean,...] [--weights]

Each variant is ``lorakit train`` on the default job (``--precision`` auto, seed 0, ``--steps`` steps) with
one thing swapped, in its own process; the table gives the held-out loss after training (the run's own
``evaluate``, the same pairs). Variants (``VARIANTS``):

- ``default``: length-bucketed batches (sft.batches: windows of 16 batches sorted by length), the loss
  summed over reply tokens / n̄ (training.py), warmup then linear decay to 10% (training.schedule);
- ``batch_mean``: the loss a mean over each batch's reply tokens (lorakit before this change, and TRL);
- ``batch_mean_shuffled``: that, with plain shuffled batches (bucket=1: random lengths, as TRL's sampler);
- ``shuffled``: lorakit's loss (Σ / n̄) with plain shuffled batches (bucket=1);
- ``trl_schedule``: TRL's default schedule, linear from the peak to 0 with no warmup.

``--weights`` prints, without training, how bucketing moves the weight of each reply token in the
gradient: the loss is a mean over a batch's reply tokens, so a token's weight is 1 / (reply tokens in its
batch); the printout compares the weight short and long replies get over one epoch, bucketed vs shuffled.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("default", "batch_mean", "batch_mean_shuffled", "shuffled", "trl_schedule")


def _patch(variant: str) -> None:
    from lorakit.app import sft, training

    if variant.startswith("batch_mean"):  # loss = mean · n_b / n̄ with n_b = n̄ = 1: the per-batch mean
        training.reply_tokens = lambda labels: 1
        training.mean_batch_tokens = lambda examples, batch_size: 1.0
    if variant.endswith("shuffled"):
        training.batches = functools.partial(sft.batches, bucket=1)
    elif variant == "trl_schedule":
        def linear_to_zero(settings: training.TrainSettings):  # transformers' "linear", warmup 0
            return lambda step: max(0.0, 1.0 - step / max(1, settings.max_steps))
        training.schedule = linear_to_zero


def child(variant: str, output: Path, steps: int) -> None:
    from lorakit.app.cli import main

    _patch(variant)
    code = main(["train", "--output", str(output), "--max-steps", str(steps), "--samples", "0", "--time-limit", "0",
                 "--save-every", "0"])
    if code:
        raise SystemExit(code)


def weights() -> None:
    from transformers import AutoTokenizer

    from lorakit.app.cli.train import HELD_OUT
    from lorakit.app.embedded import chatterbot_pairs, default_model_folder
    from lorakit.app.sft import batches, encode_all, split

    tokenizer = AutoTokenizer.from_pretrained(default_model_folder())
    examples = encode_all(tokenizer, split(chatterbot_pairs(), HELD_OUT, 0)[0], 128)
    replies = {id(e): sum(label != -100 for label in e.labels) for e in examples}
    median = statistics.median(replies.values())
    for bucket in (16, 1):
        short = long = 0.0
        for batch in batches(examples, 8, 0, 0, bucket=bucket):
            total = sum(replies[id(e)] for e in batch)
            for e in batch:
                weight = replies[id(e)] / total  # this example's share of its batch's loss
                short, long = (short + weight, long) if replies[id(e)] <= median else (short, long + weight)
        print(f"bucket={bucket}: examples with replies <= {median} tokens carry {short / (short + long):.1%} of the "
              f"summed gradient weight ({len(examples)} examples)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--weights", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.output, args.steps)
        return 0
    if args.weights:
        weights()
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorakit-learning-") as scratch:
        for variant in args.variants.split(","):
            output = Path(scratch) / variant
            subprocess.run([sys.executable, "-m", "benchmarks.learning", "--child", variant, "--output", str(output),
                            "--steps", str(args.steps)], check=True, stdout=subprocess.DEVNULL)
            metrics = json.loads((output / "metrics.json").read_text())
            rows.append(f"| {variant} | {metrics['held_out_loss_before']:.4f} | {metrics['held_out_loss_after']:.4f} | "
                        f"{metrics['train_seconds'] / metrics['steps']:.2f} s |")
            print(rows[-1], flush=True)
    print(f"\n{args.steps} steps\n\n| variant | held-out before | held-out after | s / step |\n|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
