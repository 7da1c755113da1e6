"""``lorakit train``: fine-tune a causal LM with LoRA on chat data, end to end.

With no arguments it fine-tunes the embedded SmolLM2-135M-Instruct on the English chatterbot-corpus
pairs with the common SFT recipe (r=64, alpha=16, dropout 0.1, all seven projections, rsLoRA), loss on
the replies only; evaluates held-out loss and prints two sample answers before and after; saves the
adapter (PEFT format), a loss-curve PNG and metrics.json into --output.

Under ``torchrun --nproc-per-node=N`` (WORLD_SIZE > 1) it trains data-parallel: DDP by default, FSDP2 with
--fsdp; --batch-size stays the global batch, each rank taking its rows of every micro-batch, so the run
matches one process up to float error. Rank 0 alone prints and writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch

from ..model import get_peft_model
from ..training import (
    PeakMemory,
    TrainSettings,
    TrainState,
    evaluate,
    load_trainer_state,
    make_optimizer,
    peak_rss_mb,
    plot_losses,
    rss_mb,
    sample_answers,
    save_checkpoint,
    should_save,
    throughput,
    train_loop,
)
from .common import CliError, Command, add_lora_flags, lora_config, register

SFT_RECIPE = dict(task_type="CAUSAL_LM", r=64, lora_alpha=16, lora_dropout=0.1, use_rslora=True,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
SAMPLE_PROMPTS = ["What is a computer virus?", "Do you like to read books?"]
HELD_OUT = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="a local transformers model folder (default: embedded SmolLM2)")
    parser.add_argument("--data", type=Path, help="JSONL of {prompt, response} or {messages} rows "
                                                  "(default: English chatterbot-corpus)")
    parser.add_argument("--output", type=Path, default=Path("out/lorakit-train"), help="output folder")
    parser.add_argument("--max-steps", type=int, default=80, help="optimizer steps (default 80)")
    parser.add_argument("--epochs", type=float, help="train this many passes over the data instead of --max-steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (longer are cut)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA: quantize the frozen base to 4 bits")
    parser.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint")
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="seconds of training before stopping early with a note (default 420; 0: none)")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--samples", type=int, default=2, help="sample answers printed before and after (0: none)")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the model with FSDP2 instead of replicating it with DDP")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                        help="with --fsdp on bf16-capable CUDA GPUs: compute in bf16, reduce in fp32 (default no)")
    add_lora_flags(parser)


def _check(args: argparse.Namespace) -> None:
    for name in ("max_steps", "batch_size", "grad_accum", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.epochs is not None and args.epochs <= 0:
        raise CliError(f"--epochs must be positive, got {args.epochs}")
    if args.lr <= 0:
        raise CliError(f"--lr must be positive, got {args.lr}")
    if args.load_in_4bit and (args.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise CliError("--load-in-4bit trains in one process; drop --fsdp / torchrun for QLoRA")
    if args.model is not None and not (args.model / "config.json").is_file():
        raise CliError(f"--model {args.model} is not a transformers model folder (no config.json)")


def _load(args: argparse.Namespace) -> tuple[object, object, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from ..embedded import default_model_folder

    folder = args.model if args.model is not None else default_model_folder()
    transformers_logging.disable_progress_bar()  # loading a local fp32 folder takes a second; keep stderr clean
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise CliError(f"cannot load a causal LM and tokenizer from {folder}: {error}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.gradient_checkpointing:
        model.config.use_cache = False
    if args.load_in_4bit:  # QLoRA: NF4 projections, fp32 compute (bf16 is slower on CPU), lm_head kept
        from ..kbit import quantize_model

        quantize_model(model, quant_type="nf4", compute_dtype=torch.float32, double_quant=True)
    return model, tokenizer, folder


def _rows(args: argparse.Namespace) -> list[dict]:
    from ..embedded import chatterbot_pairs
    from ..sft import read_jsonl

    return read_jsonl(args.data) if args.data is not None else chatterbot_pairs()


def _print_samples(label: str, prompts: list[str], answers: list[str]) -> None:
    for prompt, answer in zip(prompts, answers, strict=True):
        print(f"  [{label}] Q: {prompt}\n  [{label}] A: {answer}")


def _init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group when torchrun set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device("cpu")
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def run(args: argparse.Namespace) -> int:
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise CliError("--fsdp shards over several processes: launch with torchrun --nproc-per-node=N")
    if args.mixed_precision != "no" and not args.fsdp:
        raise CliError("--mixed-precision applies to FSDP2: add --fsdp (and launch with torchrun on CUDA GPUs)")
    rank, world, device = _init_distributed()
    try:
        with contextlib.ExitStack() as stack:
            if rank != 0:  # one log: the other ranks print nothing
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            return _run(args, rank, world, device)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    from tqdm.auto import tqdm

    from ..sft import encode_all, split

    _check(args)
    config = lora_config(args, SFT_RECIPE)  # invalid LoRA settings fail before anything is loaded
    rows = _rows(args)
    import transformers  # noqa: F401  (imported before the baseline so only model memory is counted)

    baseline = rss_mb()
    model, tokenizer, folder = _load(args)
    torch.manual_seed(args.seed)  # the adapter's random init is part of the run's reproducibility
    peft_model = get_peft_model(model, config)  # inject before wrapping or sharding
    if args.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    print(f"model {folder}: {type(model).__name__}; LoRA r={config.r} alpha={config.lora_alpha} "
          f"dropout={config.lora_dropout} rslora={config.use_rslora} targets={sorted(config.target_modules)}")
    peft_model.print_trainable_parameters()

    train_rows, held_rows = split(rows, HELD_OUT, args.seed)
    train_set = encode_all(tokenizer, train_rows, args.max_length)
    held_set = encode_all(tokenizer, held_rows, args.max_length)
    if not train_set:
        raise CliError("no training example has a reply token left after --max-length truncation")
    steps = args.max_steps
    if args.epochs is not None:
        steps = max(1, round(args.epochs * len(train_set) / (args.batch_size * args.grad_accum)))
    settings = TrainSettings(max_steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                             seed=args.seed, save_every=args.save_every, time_limit=args.time_limit or None)
    print(f"data: {len(train_set)} training and {len(held_set)} held-out examples; {steps} steps of "
          f"{args.batch_size}x{args.grad_accum} examples ({steps * args.batch_size * args.grad_accum / len(train_set):.2f} epochs)")

    output = args.output
    if args.resume:  # the adapter goes in before wrapping or sharding, the optimizer state after
        if not (output / "checkpoint" / "trainer_state.pt").is_file():
            raise CliError(f"--resume: no checkpoint in {output / 'checkpoint'}")
        from ..io import read_weights, set_peft_model_state_dict

        set_peft_model_state_dict(peft_model, read_weights(output / "checkpoint" / "adapter"))
    train_model = peft_model
    if world > 1:
        peft_model.to(device)
        if args.fsdp:
            from ..distributed import shard

            shard(peft_model, mixed_precision=args.mixed_precision)
        else:
            train_model = torch.nn.parallel.DistributedDataParallel(
                peft_model, device_ids=[device.index] if device.type == "cuda" else None)
        print(f"distributed: {world} processes, {'FSDP2' if args.fsdp else 'DDP'} on {device.type}; "
              f"each optimizer step takes the global batch of {args.batch_size}x{args.grad_accum}")
    optimizer, scheduler = make_optimizer(peft_model, settings)
    state = TrainState()
    if args.resume:
        state = load_trainer_state(peft_model, optimizer, scheduler, output / "checkpoint")
        print(f"resumed from {output / 'checkpoint'} at step {state.step}")

    # held-out loss and samples: FSDP2 needs every rank in each forward; DDP's rank 0 runs the bare model
    evaluating = args.fsdp or rank == 0
    prompts = SAMPLE_PROMPTS[: args.samples]
    loss_before = evaluate(peft_model, held_set, args.batch_size, tokenizer.pad_token_id) if evaluating else 0.0
    print(f"held-out loss before training: {loss_before:.4f}")
    if evaluating:
        _print_samples("before", prompts, _sample(peft_model, tokenizer, prompts))

    def checkpoint(current: TrainState) -> None:
        if should_save(current.step, settings.save_every, settings.max_steps):
            save_checkpoint(peft_model, optimizer, scheduler, current, output / "checkpoint")

    with tqdm(total=steps, initial=state.step, desc="training", unit="step", dynamic_ncols=True,
              disable=rank != 0) as bar, PeakMemory() as memory:
        train_loop(train_model, train_set, settings, tokenizer.pad_token_id, state, optimizer, scheduler,
                   progress=bar, on_step=checkpoint, rank=rank, world=world)

    if state.stopped_early:
        print(f"note: {state.stopped_early}; the adapter is saved as trained so far (a 2-core CPU does about "
              "2-4 s per step of the default recipe)")
        save_checkpoint(peft_model, optimizer, scheduler, state, output / "checkpoint")
    loss_after = evaluate(peft_model, held_set, args.batch_size, tokenizer.pad_token_id) if evaluating else 0.0
    print(f"held-out loss after training: {loss_after:.4f} (before: {loss_before:.4f})")
    if evaluating:
        _print_samples("after", prompts, _sample(peft_model, tokenizer, prompts))
    _finish(peft_model, state, output, loss_before, loss_after, (baseline, memory.peak), folder, rank, world)
    return 0


def _sample(peft_model: object, tokenizer: object, prompts: list[str]) -> list[str]:
    """Greedy answers; an FSDP2 root is unsharded around generate (which bypasses the root's forward)."""
    from ..distributed import is_sharded

    if not prompts or not is_sharded(peft_model):
        return sample_answers(peft_model, tokenizer, prompts)
    peft_model.unshard()
    try:
        return sample_answers(peft_model, tokenizer, prompts)
    finally:
        peft_model.reshard()


def _finish(peft_model: object, state: TrainState, output: Path, before: float, after: float,
            memory: tuple[float, float], folder: Path, rank: int = 0, world: int = 1) -> None:
    from ..distributed import is_sharded

    if world > 1 and is_sharded(peft_model):
        peft_model.save_pretrained(output / "adapter", is_main_process=rank == 0)  # every rank gathers
    if rank != 0:
        return
    output.mkdir(parents=True, exist_ok=True)
    if not (world > 1 and is_sharded(peft_model)):
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


COMMAND = register("train", Command(help="fine-tune a causal LM with LoRA (default: SmolLM2-135M on chatterbot)",
                                    add_arguments=add_arguments, run=run))
