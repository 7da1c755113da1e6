"""The end of ``lorakit train``: the adapter, plot and metrics written, and what to do with them next."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..training import TrainState, peak_rss_mb, plot_losses, throughput

if TYPE_CHECKING:
    from ...model import PeftModel


def print_samples(label: str, prompts: list[str], answers: list[str]) -> None:
    for prompt, answer in zip(prompts, answers, strict=True):
        print(f"  [{label}] Q: {prompt}\n  [{label}] A: {answer}")


def what_next(adapter: Path, base: str, prompt: str) -> str:
    """Three lines that load the adapter (lorakit or peft, same names), and the chat command."""
    return (f"what next: load the adapter in Python (`from peft import PeftModel` works the same)\n"
            f"    from transformers import AutoModelForCausalLM; from lorakit import PeftModel\n"
            f"    base = AutoModelForCausalLM.from_pretrained({base!r})\n"
            f"    model = PeftModel.from_pretrained(base, {str(adapter)!r})\n"
            f"or talk to it: lorakit chat {adapter} --prompt {json.dumps(prompt)}")


def finish(peft_model: PeftModel, state: TrainState, output: Path, before: float, after: float,
           memory: tuple[float, float], folder: Path, rank: int = 0, world: int = 1) -> None:
    """Save the adapter (every rank gathers an FSDP2 one), then rank 0 writes the plot and metrics and reports."""
    from ...distributed import is_sharded

    sharded = world > 1 and is_sharded(peft_model)
    if sharded:
        peft_model.save_pretrained(output / "adapter", is_main_process=rank == 0)
    if rank != 0:
        return
    output.mkdir(parents=True, exist_ok=True)
    if not sharded:
        peft_model.save_pretrained(output / "adapter")
    plot_losses(state.losses, [(0, before), (state.step, after)], output / "loss.png",
                f"LoRA on {Path(folder).name}")
    metrics = {"held_out_loss_before": before, "held_out_loss_after": after, "steps": state.step,
               "tokens": state.tokens, "train_seconds": state.seconds, "baseline_rss_mib": memory[0],
               "train_peak_rss_mib": memory[1], "train_memory_mib": memory[1] - memory[0],
               "process_peak_rss_mib": peak_rss_mb(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"training: {throughput(state)}; memory while training {metrics['train_memory_mib']:.0f} MiB "
          f"above the {memory[0]:.0f} MiB before the model was loaded")
    print(f"adapter (PEFT format): {output / 'adapter'}")
    print(f"loss curve: {output / 'loss.png'}")
    print(f"metrics: {output / 'metrics.json'}")
