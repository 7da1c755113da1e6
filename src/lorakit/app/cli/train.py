"""``lorakit train``: fine-tune a causal LM with LoRA on chat data, end to end.

With no arguments it fine-tunes the embedded SmolLM2-135M-Instruct on the English chatterbot-corpus
pairs with the common SFT recipe (r=64, alpha=16, dropout 0.1, all seven projections, rsLoRA), loss on
the replies only; evaluates held-out loss and prints two sample answers before and after; saves the
adapter (PEFT format), a loss-curve PNG and metrics.json into --output.

A run is never thrown away: the output folder is checked and locked before the model loads; a NaN or
infinite loss stops the run at once and keeps the last good checkpoint; Ctrl-C / SIGTERM stop between
steps and save a checkpoint; ``--resume`` restores the weights, optimizer, schedule, random-number
states and settings, so it continues exactly (``resume.py`` says what a changed flag means).

Under ``torchrun --nproc-per-node=N`` (WORLD_SIZE > 1) it trains data-parallel: DDP by default, FSDP2 with
--fsdp; --batch-size stays the global batch, each rank taking its rows of every micro-batch, so the run
matches one process up to float error. Rank 0 alone prints and writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from ..checkpoint import (
    STATE_FILE,
    load_trainer_state,
    read_checkpoint,
    reschedule,
    restore_rng,
    save_checkpoint,
    set_peak_lr,
)
from ...config import LoraConfig
from ...model import get_peft_model
from ...precision import CHOICES, Choice, decide, hold_frozen_in
from ..training import (
    NonFiniteError,
    PeakMemory,
    TrainSettings,
    TrainState,
    evaluate,
    make_optimizer,
    rss_mb,
    sample_answers,
    should_save,
    train_loop,
)
from . import resume
from .common import CliError, Command, add_lora_flags, lora_config, register
from .guard import StopSignals, check_dependencies, claim_output, disk_full, free_space_problem
from .train_report import finish, print_samples, what_next

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

    from ..sft import ChatTokenizer

SFT_RECIPE = dict(task_type="CAUSAL_LM", r=64, lora_alpha=16, lora_dropout=0.1, use_rslora=True,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
SAMPLE_PROMPTS = ["What is a computer virus?", "Do you like to read books?"]
HELD_OUT = 64
# bytes on disk per trainable parameter: final adapter, checkpoint adapter and AdamW's two moments, with
# the old checkpoint kept until the new one is whole (fp32: 4 bytes each)
DISK_BYTES_PER_PARAMETER = 4 * (1 + 2 * 3)
DEFAULT_LR = 2e-4
CONFIG_ONLY = ("peft_version", "inference_mode", "auto_mapping")  # LoraConfig.to_dict fields a run never sets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="a local transformers model folder "
                                                   "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", type=Path, help="JSONL of {prompt, response} or {messages} rows "
                                                  "(default: the English chatterbot-corpus pairs)")
    parser.add_argument("--output", type=Path, default=Path("out/lorakit-train"), help="output folder")
    parser.add_argument("--max-steps", type=int, default=80, help="optimizer steps")
    parser.add_argument("--epochs", type=float, help="train this many passes over the data instead of --max-steps "
                                                     "(default: unset, --max-steps counts)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (longer are cut)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (AdamW, warmup then linear decay)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapter init, data split and order")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA: quantize the frozen base to 4 bits")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <output>/checkpoint with its settings (flags given override them)")
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="seconds of training before stopping early with a note (0: none)")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--samples", type=int, default=2, help="sample answers printed before and after (0: none)")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the model with FSDP2 instead of replicating it with DDP")
    parser.add_argument("--precision", choices=list(CHOICES), default="auto",
                        help="dtype of the frozen base: bf16 (adapters and optimizer stay fp32), fp32, or auto: "
                             "bf16 where the CPU has AMX / AVX512-BF16 and a probe finds it faster (precision.py)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                        help="with --fsdp on bf16-capable GPUs or CPUs (AMX / AVX512-BF16): compute in bf16, "
                             "reduce in fp32")
    add_lora_flags(parser, SFT_RECIPE, "the SFT recipe")


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


def _precision(args: argparse.Namespace, world: int, device: torch.device) -> Choice:
    """The base's dtype for ``--precision``, decided before anything loads (a refusal costs nothing)."""
    if world > 1:  # DDP / FSDP2 keep one dtype per process group here; FSDP2 has --mixed-precision
        if args.precision == "bf16":
            raise CliError("--precision bf16 trains in one process; under torchrun use --fsdp --mixed-precision bf16")
        lowered = "FSDP2 computes in bf16 (--mixed-precision bf16)" if args.mixed_precision == "bf16" else \
            "--fsdp --mixed-precision bf16 computes in bf16"
        return Choice(torch.float32, f"{args.precision}: fp32 parameters under torchrun; {lowered}")
    if args.load_in_4bit and args.precision == "auto":
        return Choice(torch.float32, "auto: fp32 compute for the 4-bit base (bf16 not measured there; "
                                     "ask with --precision bf16)")
    try:
        return decide(args.precision, device)
    except ValueError as error:
        raise CliError(str(error)) from None


def _load(args: argparse.Namespace,
          compute: torch.dtype = torch.float32) -> tuple[torch.nn.Module, ChatTokenizer, Path]:
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
    if args.load_in_4bit:  # QLoRA: NF4 projections computing in the --precision dtype, lm_head kept
        from ...kbit import quantize_model

        quantize_model(model, quant_type="nf4", compute_dtype=compute, double_quant=True)
    return model, tokenizer, folder


def _pad_id(tokenizer: ChatTokenizer) -> int:
    """The tokenizer's pad id (``_load`` gives a tokenizer without one its EOS token)."""
    assert tokenizer.pad_token_id is not None
    return tokenizer.pad_token_id


def _rows(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows), split before the model loads so a data problem costs no time."""
    from ..embedded import chatterbot_pairs
    from ..sft import read_jsonl, split

    rows = read_jsonl(args.data) if args.data is not None else chatterbot_pairs()
    train_rows, held_rows = split(rows, HELD_OUT, args.seed)
    if not train_rows:
        raise CliError(f"--data {args.data} has {len(rows)} row(s), and every one went to the held-out split "
                       f"(10% of the rows, at least 1, at most {HELD_OUT}, for the before/after loss), leaving "
                       "none to train on; give at least 2 rows (a few hundred to learn something)")
    return train_rows, held_rows


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
        raise CliError("--mixed-precision applies to FSDP2: add --fsdp (and launch with torchrun); in one process "
                       "use --precision bf16")
    _check(args)
    if args.model is None and not args.resume:
        from ..embedded import is_converted

        if not is_converted():  # the first use converts the embedded GGUF file, which needs gguf
            check_dependencies("train", ("gguf",))
    rank, world, device = _init_distributed()
    try:
        with contextlib.ExitStack() as stack:
            if rank != 0:  # one log: the other ranks print nothing
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            with claim_output(args.output, enabled=rank == 0):
                try:
                    return _run(args, rank, world, device)
                except Exception as error:  # a full disk, however the writer words it, is one clear line
                    message = disk_full(error, args.output)
                    if message is None:
                        raise
                    raise CliError(f"{message}; {_last_checkpoint(args.output)}") from None
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _last_checkpoint(output: Path) -> str:
    try:
        step = json.loads((output / "checkpoint" / STATE_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no checkpoint had been saved yet, so start again"
    return f"the last good checkpoint (step {step}) is kept in {output / 'checkpoint'}: continue with --resume"


def _settings(args: argparse.Namespace) -> tuple[dict | None, list[str], LoraConfig]:
    """(the checkpoint's state or None, notes on settings changed on resume, the LoRA config).

    On --resume the checkpoint's settings fill ``args`` first: they decide the config, the data and the model.

    Raises:
        CliError: a setting that cannot change on resume; CheckpointError: no usable checkpoint.
    """
    saved, notes = None, []
    if args.resume:
        saved, _ = read_checkpoint(args.output / "checkpoint")
        notes = resume.apply(args, saved["run"], args.given)
        recipe = {k: v for k, v in saved["run"]["lora"].items() if k not in CONFIG_ONLY}
    else:
        recipe = dict(SFT_RECIPE)
        if args.model is None:  # name the base by its hub id, which resolves anywhere (embedded.SMOLLM2_HUB_ID)
            from ..embedded import SMOLLM2_HUB_ID

            recipe["base_model_name_or_path"] = SMOLLM2_HUB_ID
    return saved, notes, lora_config(args, recipe)  # invalid LoRA settings fail before anything is loaded


def _before(peft_model: torch.nn.Module, tokenizer: ChatTokenizer, held_set: list, prompts: list[str], batch_size: int,
            evaluating: bool, saved: dict | None, dtype: torch.dtype) -> tuple[float, list[str]]:
    """The untrained model's held-out loss and answers: measured, or on resume as the checkpoint recorded them."""
    if saved is not None:
        before, answers = saved["run"]["held_out_loss_before"], saved["run"]["samples_before"][: len(prompts)]
        print(f"held-out loss before training: {before:.4f} (the untrained model's, recorded in the checkpoint)")
    else:
        before = evaluate(peft_model, held_set, batch_size, _pad_id(tokenizer), dtype) if evaluating else 0.0
        answers = _sample(peft_model, tokenizer, prompts) if evaluating else []
        print(f"held-out loss before training: {before:.4f}")
    if evaluating:
        print_samples("before", prompts[: len(answers)], answers)
    return before, answers


def _run(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    from tqdm.auto import tqdm

    from ..sft import encode_all

    output = args.output
    saved, notes, config = _settings(args)
    choice = _precision(args, world, device)  # after --resume filled args, before anything loads
    args.precision = choice.name  # the checkpoint records the resolved dtype: a resume does not re-probe
    train_rows, held_rows = _rows(args)
    import transformers  # noqa: F401  (imported before the baseline so only model memory is counted)

    baseline = rss_mb()
    model, tokenizer, folder = _load(args, choice.dtype)
    torch.manual_seed(args.seed)  # the adapter's random init is part of the run's reproducibility
    peft_model = get_peft_model(model, config)  # inject before wrapping or sharding
    hold_frozen_in(peft_model, choice.dtype)  # after injection: the adapters were made fp32 and stay so
    if args.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    print(f"model {folder}: {type(model).__name__}; LoRA r={config.r} alpha={config.lora_alpha} "
          f"dropout={config.lora_dropout} rslora={config.use_rslora} targets={sorted(config.target_modules or ())}")
    peft_model.print_trainable_parameters()
    print(f"precision: frozen base in {choice.name}, adapters and optimizer in fp32 ({choice.reason})")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    problem = free_space_problem(output, trainable * DISK_BYTES_PER_PARAMETER) if rank == 0 else None
    if problem:
        raise CliError(problem)

    train_set = encode_all(tokenizer, train_rows, args.max_length)
    held_set = encode_all(tokenizer, held_rows, args.max_length)
    if not train_set:
        raise CliError(f"none of the {len(train_rows)} training rows has a reply token left after cutting to "
                       f"--max-length {args.max_length}; raise --max-length or shorten the prompts")
    steps = args.max_steps
    if args.epochs is not None:
        steps = max(1, round(args.epochs * len(train_set) / (args.batch_size * args.grad_accum)))
    if saved is not None and steps != saved["run"]["settings"]["max_steps"] and "max_steps" not in args.given:
        notes.append(f"--epochs {args.epochs} = {steps} steps (was {saved['run']['settings']['max_steps']}): "
                     + resume.CHANGEABLE["max_steps"])
    settings = TrainSettings(max_steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                             seed=args.seed, save_every=args.save_every, time_limit=args.time_limit or None,
                             dtype=choice.dtype)
    print(f"data: {len(train_set)} training and {len(held_set)} held-out examples; {steps} steps of "
          f"{args.batch_size}x{args.grad_accum} examples ({steps * args.batch_size * args.grad_accum / len(train_set):.2f} epochs)")

    if saved is not None:  # the adapter goes in before wrapping or sharding, the optimizer state after
        from ...io import read_weights, load_adapter_weights

        load_adapter_weights(peft_model, read_weights(output / "checkpoint" / "adapter"))
    train_model = _distribute(peft_model, args, world, device)
    optimizer, scheduler = make_optimizer(peft_model, settings)
    state = TrainState()
    if saved is not None:
        state = load_trainer_state(peft_model, optimizer, scheduler, output / "checkpoint")
        set_peak_lr(scheduler, args.lr) if "lr" in args.given else reschedule(scheduler)
        print(f"resumed from {output / 'checkpoint'} at step {state.step} of {steps} with its settings"
              + ("; changed: " + "; ".join(notes) if notes else ""))

    # held-out loss and samples: FSDP2 needs every rank in each forward; DDP's rank 0 runs the bare model
    evaluating = args.fsdp or rank == 0
    prompts = SAMPLE_PROMPTS[: args.samples]
    before, answers = _before(peft_model, tokenizer, held_set, prompts, args.batch_size, evaluating, saved,
                              choice.dtype)
    record = {**resume.record(args, steps, config.to_dict()), "held_out_loss_before": before,
              "samples_before": answers}

    def checkpoint(current: TrainState) -> None:
        save_checkpoint(peft_model, optimizer, scheduler, current, output / "checkpoint", record)

    def on_step(current: TrainState) -> None:
        if should_save(current.step, settings.save_every, steps):
            checkpoint(current)

    stop = StopSignals()
    restore_rng(state.rng)  # last, so nothing above (init, eval, sampling) shifts the generators
    try:
        with tqdm(total=steps, initial=state.step, desc="training", unit="step", dynamic_ncols=True,
                  disable=rank != 0) as bar, PeakMemory() as memory, stop:
            train_loop(train_model, train_set, settings, _pad_id(tokenizer), state, optimizer, scheduler,
                       progress=bar, on_step=on_step, rank=rank, world=world, interrupt=stop)
    except NonFiniteError as error:
        raise CliError(f"training diverged: {error}. Nothing from that step was saved; {_last_checkpoint(output)} "
                       f"with a lower --lr (now {args.lr:g}; the default is {DEFAULT_LR:g})") from None
    if state.interrupted:
        checkpoint(state)
        print(f"{state.stopped_early}: checkpoint saved in {output / 'checkpoint'}; continue with:\n"
              f"    lorakit train --output {output} --resume")
        return 130
    if state.stopped_early:
        print(f"note: {state.stopped_early}; the adapter is saved as trained so far (a 2-core CPU does about "
              "2-4 s per step of the default recipe)")
        checkpoint(state)
    after = evaluate(peft_model, held_set, args.batch_size, _pad_id(tokenizer), choice.dtype) if evaluating else 0.0
    print(f"held-out loss after training: {after:.4f} (before: {before:.4f})")
    if evaluating:
        print_samples("after", prompts, _sample(peft_model, tokenizer, prompts))
    finish(peft_model, state, output, before, after, (baseline, memory.peak), folder, rank, world)
    if rank == 0:
        print(what_next(output / "adapter", str(folder), SAMPLE_PROMPTS[0]))
    return 0


def _distribute(peft_model: torch.nn.Module, args: argparse.Namespace, world: int,
                device: torch.device) -> torch.nn.Module:
    """The model the loop trains: the PeftModel itself, DDP around it, or it sharded in place by FSDP2."""
    if world <= 1:
        return peft_model
    peft_model.to(device)
    train_model = peft_model
    if args.fsdp:
        from ...distributed import shard

        shard(peft_model, mixed_precision=args.mixed_precision)
    else:
        train_model = torch.nn.parallel.DistributedDataParallel(
            peft_model, device_ids=[device.index] if device.type == "cuda" else None)
    print(f"distributed: {world} processes, {'FSDP2' if args.fsdp else 'DDP'} on {device.type}; "
          f"each optimizer step takes the global batch of {args.batch_size}x{args.grad_accum}")
    return train_model


def _sample(peft_model: torch.nn.Module, tokenizer: ChatTokenizer, prompts: list[str]) -> list[str]:
    """Greedy answers; an FSDP2 root is unsharded around generate (which bypasses the root's forward)."""
    from ...distributed import is_sharded

    if not prompts or not is_sharded(peft_model):
        return sample_answers(peft_model, tokenizer, prompts)
    root = cast("FSDPModule", peft_model)  # shard() made the root an FSDP2 module
    root.unshard()
    try:
        return sample_answers(peft_model, tokenizer, prompts)
    finally:
        root.reshard()


COMMAND = register("train", Command(help="fine-tune a causal LM with LoRA (default: SmolLM2-135M on chatterbot)",
                                    add_arguments=add_arguments, run=run,
                                    requires=("transformers", "tqdm", "matplotlib", "yaml", "safetensors")))
