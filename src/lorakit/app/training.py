"""A plain training loop for LoRA fine-tuning, with held-out evaluation, samples, checkpoints and a plot.

Per optimizer step t (AdamW on the trainable parameters only), with ``grad_accum`` micro-batches:

    g_t = Σ_k ∇ L(batch_k) / grad_accum,   clip ‖g_t‖ ≤ 1,   lr_t = lr · warmup-then-linear-decay(t)

with the loss of a micro-batch b normalised by a constant, not by its own reply-token count n_b:

    L(b) = Σ_{i ∈ replies(b)} ℓ_i / n̄,     n̄ = batch_size · (mean reply tokens per training example)

Every reply token of an epoch then weighs the same in the gradient, as in the held-out loss (a token
mean). Dividing by n_b instead (transformers' per-batch mean) weighs a token by 1/n_b: with length-bucketed
batches (``sft.batches``) the batches of short replies have small n_b, so short replies got 58% of the
gradient weight instead of 41% (``python -m benchmarks.learning --weights``), and held-out loss, dominated
by long replies, fell more slowly. ``mean_batch_tokens`` gives n̄. The reported loss is still the batch
mean. ℓ_i comes from ``lm_loss.causal_lm_loss`` (the LM head only at label positions, chunked).

The loop is deliberately small: it is what the ``lorakit train`` command runs, and what a user can read
to see what a LoRA training step is. ``transformers.Trainer`` works on lorakit models too (see README).
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .lm_loss import causal_lm_loss
from ..precision import compute
from .sft import ChatTokenizer, Example, batches, collate


class Progress(Protocol):
    """A tqdm bar, as far as the loop uses it."""

    def set_postfix(self, **kwargs: Any) -> Any: ...

    def update(self, n: int = 1) -> Any: ...


@dataclass
class TrainSettings:
    max_steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    seed: int = 0
    warmup_steps: int = 10
    save_every: int = 50
    max_grad_norm: float = 1.0
    time_limit: float | None = None  # seconds of training; stop early (and say so) rather than overrun
    dtype: torch.dtype = torch.float32  # the forward's compute dtype (precision.py): bf16 runs under autocast
    loss_tokens: float | None = None  # n̄ of the module docstring; None: mean_batch_tokens of the training set


@dataclass
class TrainState:
    """Where training stands: enough to resume exactly (optimizer and schedule live beside it)."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: str | None = None
    interrupted: bool = False  # stopped by SIGINT / SIGTERM (``interrupt``), not by the time limit
    rng: dict | None = None  # random-number states read from a checkpoint (``checkpoint.restore_rng``)


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm is NaN or infinite: the step was not applied, the run stops."""


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (from /proc/self/statm; 0 where it does not exist)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class PeakMemory:
    """Samples resident memory every ``interval`` seconds in a thread; ``peak`` is the largest seen (MiB).

    ru_maxrss covers the whole process life (model loading briefly holds weights twice), so the training
    phase is measured on its own: this is the number ``lorakit plan`` estimates.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.peak = rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def schedule(settings: TrainSettings) -> Callable[[int], float]:
    """lr multiplier: linear warmup over warmup_steps, then linear decay to 10% at max_steps."""
    warmup = max(1, min(settings.warmup_steps, settings.max_steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, settings.max_steps - warmup)
        return 1.0 - 0.9 * min(1.0, progress)

    return factor


def make_optimizer(model: nn.Module, settings: TrainSettings) -> tuple[torch.optim.Optimizer, LambdaLR]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: nothing would train (is the adapter frozen? "
                         "load it with is_trainable=True)")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(settings))


def reply_tokens(labels: torch.Tensor) -> int:
    """Label positions the loss counts after the shift by one (labels ≠ -100 past the first column)."""
    return int((labels[:, 1:] != -100).sum())


def mean_batch_tokens(examples: list[Example], batch_size: int) -> float:
    """n̄: batch_size times the mean number of reply tokens per example (the loss's constant normaliser)."""
    per_example = sum(sum(label != -100 for label in e.labels[1:]) for e in examples) / max(len(examples), 1)
    return max(batch_size * per_example, 1.0)


def micro_batches(examples: list[Example], settings: TrainSettings, skip: int) -> Iterator[list[Example]]:
    """Endless seeded epochs of micro-batches, skipping the first ``skip`` (to resume in place)."""
    epoch, seen = 0, 0
    while True:
        for batch in batches(examples, settings.batch_size, settings.seed, epoch):
            if seen >= skip:
                yield batch
            seen += 1
        epoch += 1


def train_loop(model: nn.Module, examples: list[Example], settings: TrainSettings, pad_id: int,
               state: TrainState, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
               progress: Progress | None = None, on_step: Callable[[TrainState], None] | None = None,
               rank: int = 0, world: int = 1, interrupt: Callable[[], str | None] | None = None) -> TrainState:
    """Run optimizer steps from ``state.step`` to ``settings.max_steps``; ``progress`` is a tqdm bar or None.

    ``interrupt()`` is asked before each step; a reason (e.g. "SIGINT") stops the loop there, between
    steps, so the state is a clean one to checkpoint (``state.interrupted``).

    Raises:
        NonFiniteError: a step's loss or gradient norm is NaN or infinite. The step is not applied (the
            gradients are dropped), so the model and optimizer hold the last good step.

    With ``world > 1`` (under torchrun, ``model`` wrapped in DDP or sharded by FSDP2) every rank draws the
    same global micro-batches and takes rows ``rank::world`` of each; its loss is weighted by its share of
    the global reply tokens, so the averaged gradient, the reported loss and the step equal one process
    training on the whole batch (up to float error). ``--batch-size`` stays the global batch.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    stream = micro_batches(examples, settings, skip=state.step * settings.grad_accum)
    n_bar = settings.loss_tokens or mean_batch_tokens(examples, settings.batch_size)
    smoothed, first_step, first_seconds = None, state.step, state.seconds
    device = params[0].device if params else torch.device("cpu")
    while state.step < settings.max_steps:
        spent, run = state.seconds - first_seconds, state.step - first_step
        stop = settings.time_limit is not None and run and spent + spent / run > settings.time_limit
        reason = interrupt() if interrupt is not None else None
        if world > 1:  # every rank must stop at the same step, or the others wait forever in a collective
            flag = torch.tensor([float(bool(stop)), float(reason is not None)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop, reason = bool(flag[0].item()), (reason or "a signal") if flag[1].item() else None
        if reason is not None:
            state.interrupted = True
            state.stopped_early = f"interrupted ({reason}) after {state.step} of {settings.max_steps} steps"
            break
        if stop:
            state.stopped_early = (f"stopped after {state.step} of {settings.max_steps} steps: the next step would "
                                   f"pass the {settings.time_limit:.0f} s training time limit (--time-limit)")
            break
        start, step_loss, step_tokens = time.perf_counter(), 0.0, 0
        for _ in range(settings.grad_accum):
            if world > 1:
                part, tokens = _rank_backward(model, next(stream), pad_id, rank, world, settings.grad_accum, device,
                                              n_bar)
                step_loss += part
                step_tokens += tokens
                continue
            batch = collate(next(stream), pad_id)
            with compute(settings.dtype, device):
                # the LM head at label positions only
                mean = causal_lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            (mean * (reply_tokens(batch["labels"]) / n_bar / settings.grad_accum)).backward()
            step_loss += mean.item() / settings.grad_accum
            step_tokens += int(batch["attention_mask"].sum())
        if world > 1:  # each rank holds its share of the global mean; sum the shares
            total = torch.tensor([step_loss], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(total)
            step_loss = float(total.item())
        norm = _scalar(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
        if not (math.isfinite(step_loss) and math.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            what = f"loss {step_loss}" if not math.isfinite(step_loss) else f"gradient norm {norm}"
            raise NonFiniteError(f"step {state.step + 1} of {settings.max_steps}: the {what} is not finite, so the "
                                 f"step was not applied (learning rate {optimizer.param_groups[0]['lr']:.3g})")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += step_tokens
        state.seconds += time.perf_counter() - start
        state.losses.append((state.step, step_loss))
        smoothed = step_loss if smoothed is None else 0.9 * smoothed + 0.1 * step_loss
        if progress is not None:
            progress.set_postfix(loss=f"{smoothed:.3f}", tok_s=f"{state.tokens / max(state.seconds, 1e-9):.0f}")
            progress.update(1)
        if on_step is not None:
            on_step(state)
    return state


def _scalar(value: torch.Tensor) -> float:
    """A 0-d tensor as a float; an FSDP2 DTensor (a sharded model's gradient norm) is gathered first."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


def _rank_backward(model: nn.Module, examples: list[Example], pad_id: int, rank: int, world: int,
                   grad_accum: int, device: torch.device, n_bar: float) -> tuple[float, int]:
    """Backward of this rank's rows of one global micro-batch; returns (its share of the loss, global tokens).

    DDP and FSDP2 average gradients over ranks, so the local loss sum is divided by n̄ and scaled by
    ``world``: the average is then the gradient of Σ ℓ over the global batch / n̄, as in one process. The
    returned share (reported only) is weighted by this rank's fraction of the global reply tokens.
    """
    mine, weight = examples[rank::world], 1.0
    if not mine:  # a last batch smaller than the world: run a zero-weight row to keep collectives in step
        mine, weight = examples[:1], 0.0
    batch = {k: v.to(device) for k, v in collate(mine, pad_id).items()}
    counts = torch.tensor([float((batch["labels"][:, 1:] != -100).sum()) * weight,
                           float(batch["attention_mask"].sum()) * weight], dtype=torch.float64, device=device)
    local = float(counts[0])
    torch.distributed.all_reduce(counts)
    output = model(**batch)
    if not local:
        (output.logits.sum() * 0.0).backward()
        return 0.0, int(counts[1])
    (output.loss * (local / n_bar * world / grad_accum)).backward()  # Σ ℓ over the global batch / n̄, averaged
    return float(output.loss.detach()) * local / max(float(counts[0]), 1.0) / grad_accum, int(counts[1])


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int,
             dtype: torch.dtype = torch.float32) -> float:
    """Mean loss per reply token over ``examples`` (token-weighted across batches)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        with compute(dtype, device):
            total += causal_lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).item() * tokens
        count += tokens
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def sample_answers(model: nn.Module, tokenizer: ChatTokenizer, prompts: list[str],
                   max_new_tokens: int = 40) -> list[str]:
    """Greedy answers to ``prompts`` through the chat template."""
    was_training = model.training
    model.eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True, return_dict=False, return_tensors="pt")
        ids = ids.to(next(model.parameters()).device)
        generate = getattr(model, "generate")  # a transformers model or PeftModel; nn.Module declares no generate
        output = generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def plot_losses(losses: list[tuple[int, float]], evals: list[tuple[int, float]], path: Path, title: str) -> None:
    """Training loss per step (raw and smoothed) and held-out loss points, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*losses, strict=True) if losses else ((), ())
    window = max(1, len(values) // 20)
    smoothed = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                for i in range(len(values))]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    axes.plot(steps, values, color="#9ecae1", linewidth=0.8, label="train loss (per step)")
    axes.plot(steps, smoothed, color="#3182bd", linewidth=1.8, label=f"train loss (mean of {window})")
    if evals:
        axes.plot(*zip(*evals, strict=True), "o--", color="#e6550d", label="held-out loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (reply tokens)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def throughput(state: TrainState) -> str:
    if not state.seconds:
        return "no steps run"
    return (f"{state.step} steps, {state.tokens:,d} tokens in {state.seconds:.0f} s "
            f"({state.tokens / state.seconds:.0f} tokens/s, {state.seconds / max(state.step, 1):.2f} s/step)")


def should_save(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0 and not math.isclose(step, 0))
