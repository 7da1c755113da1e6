"""``lorakit plan``: recommend a LoRA configuration for a model, a task, a data size and a memory budget.

Only config.json is read (or a built-in preset): the model is built on the meta device, so planning a 70B
model takes a second and no weight memory. The plan prints the recommended ``LoraConfig`` as Python with
the rule of thumb behind each choice, the trainable parameters, and the memory of one training step
(``lorakit.app.memory``) for an fp32, a bf16 and a 4-bit base, against the ``--memory`` budget.

Rules of thumb, each printed with its reason when it applies:

- Start: causal LM -> the SFT recipe (r=64, alpha=16, dropout 0.1, all seven projections, rsLoRA);
  classification -> the library default (r=8, alpha=8, dropout 0, the architecture's default targets)
  with the classifier head trained in full (``modules_to_save``).
- Rank: lower for classification and small data, higher for generation, more data and bigger models
  (``RANKS``, ``BIG_MODEL``).
- Dropout for small datasets (``DROPOUTS``); ``lora_alpha = 2r`` is the common alternative scaling.
- DoRA at low ranks (r <= 8), where it gains most over LoRA (arXiv:2402.09353).
- Base precision: fp32, else bf16, else a 4-bit base (QLoRA, arXiv:2305.14314) when the fp32/bf16 base does
  not fit the budget; gradient checkpointing when none fits without it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ...config import LoraConfig
from ...errors import LoraWarning
from ...kinds import find_kind
from ..memory import BASE_DTYPES, FAMILIES, MemoryEstimate, Setup, estimate_memory
from ...targeting import DEFAULT_TARGETS
from .common import CliError, Command, register
from .train import SFT_RECIPE as TRAIN_RECIPE

# Built-in configs of common models: name -> (model_type, config fields). Sizes from each model's config.json.
PRESETS: dict[str, tuple[str, dict]] = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True)),
    "smollm2-1.7b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                                   tie_word_embeddings=True)),
    "llama-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 tie_word_embeddings=False)),
    "llama-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                num_attention_heads=40, num_key_value_heads=40, vocab_size=32000)),
    "llama-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)),
    "gpt2": ("gpt2", {}),
    "bert-base": ("bert", {}),
}
TASKS = {"causal-lm": ("CAUSAL_LM", "AutoModelForCausalLM"),
         "classification": ("SEQ_CLS", "AutoModelForSequenceClassification")}
ENCODERS = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "deberta", "deberta-v2", "distilbert"}
DEFAULT_EXAMPLES = 2361  # lorakit train's default data: the non-empty English chatterbot-corpus pairs

# Starting points: PEFT's defaults (targets by architecture), and lorakit train's SFT recipe.
LIBRARY_DEFAULT = dict(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=None)
SFT_RECIPE = {name: value for name, value in TRAIN_RECIPE.items() if name != "task_type"}
STARTS: dict[str, tuple[str, dict[str, Any]]] = {"causal-lm": ("the SFT recipe", SFT_RECIPE),
                                                  "classification": ("library defaults", LIBRARY_DEFAULT)}
# task -> [(fewer examples than this, rank)]: lower r for classification and small data, higher for generation.
RANKS = {"classification": [(1_000, 4), (100_000, 8), (math.inf, 16)],
         "causal-lm": [(1_000, 8), (10_000, 16), (100_000, 32), (math.inf, 64)]}
BIG_MODEL = 3e9  # base parameters from which generation doubles the rank (more layers to adapt)
MAX_RANK = 128
# [(fewer examples than this, lora_dropout)]: dropout regularizes small datasets.
DROPOUTS = [(10_000, 0.1), (100_000, 0.05), (math.inf, 0.0)]
DORA_MAX_RANK = 8
# Memory units: the SI ones are powers of 1000, the binary ones (and bare letters) powers of 1024.
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         **{prefix: 1024**power for power, letter in enumerate("kmgt", start=1)
            for prefix in (letter, letter + "ib")}}
# (base dtype, gradient checkpointing) in order of preference: fp32 computes fastest on CPU (bf16 matmuls ran
# ~5x slower there), checkpointing costs about one more forward pass, and 4 bits cost accuracy and speed.
PREFERENCE = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True), ("4bit", False), ("4bit", True)]
QLORA_LOAD = ('BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, '
              "bnb_4bit_compute_dtype=torch.bfloat16)")


def parse_memory(text: str) -> int:
    """'24GB' -> 24·10⁹, '512MiB' -> 512·2²⁰, '1.5T' -> 1.5·2⁴⁰ bytes.

    Raises:
        CliError: not a positive number followed by a known unit.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise CliError(f"--memory {text!r} is not a memory size; expected a number and a unit such as "
                       "24GB, 24GiB, 512MiB or 1.5T")
    return int(float(match.group(1)) * UNITS[unit])


def format_bytes(count: float) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


# ---- the model ------------------------------------------------------------------------------------------------
def preset_config(name: str) -> object:
    import transformers

    model_type, fields = PRESETS[name]
    return transformers.AutoConfig.for_model(model_type, **fields)


def default_task(config: object) -> str:
    """classification for encoders (BERT and kin) and *ForSequenceClassification folders, else causal-lm."""
    names = getattr(config, "architectures", None) or []
    if getattr(config, "model_type", None) in ENCODERS or any(n.endswith("ForSequenceClassification") for n in names):
        return "classification"
    return "causal-lm"


def build_model(config: object, task: str) -> nn.Module:
    """The task's transformers model of ``config`` on the meta device (shapes only, no memory).

    Raises:
        CliError: transformers has no such model for this architecture.
    """
    import transformers

    auto = getattr(transformers, TASKS[task][1])
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return auto.from_config(config)
    except (ValueError, KeyError) as error:
        raise CliError(f"no {task} model for model_type {getattr(config, 'model_type', None)!r} "
                       f"({' '.join(str(error).split())[:200]})") from None


# ---- the recommendation -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recommendation:
    """LoraConfig keyword arguments and the reason for each choice."""

    settings: dict
    reasons: list[str]


Value = TypeVar("Value")


def _first(table: Sequence[tuple[float, Value]], examples: int) -> Value:
    return next(value for limit, value in table if examples < limit)


def _targets(model: nn.Module, start: dict) -> object:
    """The start's targets in this model: the architecture's defaults, or the recipe's names where the model
    has them all, else "all-linear" (GPT-2's c_attn/c_proj/c_fc, BERT's query/key/value/dense)."""
    model_type = getattr(model.config, "model_type", None)
    if start["target_modules"] is None:
        return list(DEFAULT_TARGETS[model_type]) if model_type in DEFAULT_TARGETS else "all-linear"
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return list(start["target_modules"]) if set(start["target_modules"]) <= leaves else "all-linear"


def _rank(task: str, examples: int, parameters: int) -> tuple[int, str]:
    r = _first(RANKS[task], examples)
    reason = f"{examples:,d} examples for {task}: r={r}"
    if task == "causal-lm" and parameters >= BIG_MODEL:
        r = min(2 * r, MAX_RANK)
        reason += f", doubled to {r} for a {parameters / 1e9:.1f}B-parameter model"
    return r, reason + " (lower ranks for classification and small data, higher for generation and big models)"


def _head(model: nn.Module) -> list[str]:
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [name for name in ("classifier", "score") if name in leaves]


def recommend_lora(model: nn.Module, task: str, examples: int) -> Recommendation:
    """The LoRA settings the module docstring's rules give ``model`` (meta device), ``task`` and ``examples``."""
    start_name, start = STARTS[task]
    settings = {"task_type": TASKS[task][0], **start, "target_modules": _targets(model, start)}
    r, rank_reason = _rank(task, examples, sum(p.numel() for p in model.parameters()))
    settings["r"], settings["lora_dropout"] = r, _first(DROPOUTS, examples)
    limits = ", ".join(f"{value} under {limit:,d}" for limit, value in DROPOUTS if limit != math.inf)
    reasons = [f"{task}: start from {start_name} ({_describe(start)})", rank_reason,
               f"lora_dropout={settings['lora_dropout']}: dropout regularizes small datasets ({limits} examples, "
               "none above)", _alpha(settings, r)]
    if task == "classification" and _head(model):
        settings["modules_to_save"] = _head(model)
        reasons.append(f"modules_to_save={_head(model)}: the new classifier head starts random, so it trains in full")
    if any((kind := find_kind(module)) is not None and kind.weight_is_in_out for module in model.modules()):
        settings["fan_in_fan_out"] = True
        reasons.append("fan_in_fan_out=True: GPT-2's Conv1D layers store their weight as (in, out), as PEFT expects")
    reasons.append(_dora_note(settings, r))
    return Recommendation(settings, reasons)


def _alpha(settings: dict, r: int) -> str:
    """rsLoRA keeps the start's alpha (s = alpha/sqrt(r)); plain LoRA sets alpha = r (s = 1). Says why."""
    if settings.get("use_rslora"):
        alpha = settings["lora_alpha"]
        return (f"lora_alpha={alpha} with rsLoRA: the scale alpha/sqrt(r) = {alpha / math.sqrt(r):.2f} stays stable "
                f"across ranks; lora_alpha={2 * r} (2r) without rsLoRA is the common alternative")
    settings["lora_alpha"] = r
    return f"lora_alpha={r} (= r, scale 1 as in PEFT's defaults); lora_alpha={2 * r} (2r) is the common alternative"


def _describe(start: dict) -> str:
    targets = start["target_modules"]
    parts = [f"r={start['r']}", f"alpha={start['lora_alpha']}", f"dropout {start['lora_dropout']}",
             f"all {len(targets)} projections" if targets else "the architecture's default targets"]
    return ", ".join(parts + (["rsLoRA"] if start.get("use_rslora") else []))


def _dora_note(settings: dict, r: int) -> str:
    """DoRA at r <= 8 (set when lorakit runs it, else suggested)."""
    if r > DORA_MAX_RANK:
        return f"plain LoRA: at r={r} DoRA's gain over LoRA is small (it helps most at r <= {DORA_MAX_RANK})"
    if not LoraConfig(use_dora=True).not_yet_supported():
        settings["use_dora"] = True
        return f"use_dora=True: DoRA gains most over LoRA at low ranks like r={r} (arXiv:2402.09353)"
    return (f"at r={r} consider DoRA (use_dora=True, arXiv:2402.09353), which gains most at low ranks; PEFT runs "
            "it, lorakit does not yet")


# ---- memory and the base precision ------------------------------------------------------------------------
def estimates(model: nn.Module, lora: LoraConfig, setup: Setup) -> dict[str, MemoryEstimate]:
    """One estimate per base dtype (fp32, bf16, 4bit) for ``setup``'s batch and checkpointing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraWarning)
        return {dtype: estimate_memory(model, lora, replace(setup, base_dtype=dtype)) for dtype in BASE_DTYPES}


def choose_base(model: nn.Module, lora: LoraConfig, setup: Setup, budget: int) -> tuple[Setup | None, str]:
    """The first (base dtype, checkpointing) in ``PREFERENCE`` whose training step fits ``budget``, and why.

    Returns the setup to train with, or None when nothing fits. With ``setup.gradient_checkpointing`` only
    the checkpointed choices are tried.
    """
    choices = [(dtype, gc) for dtype, gc in PREFERENCE if gc or not setup.gradient_checkpointing]
    totals: dict[tuple[str, bool], float] = {}
    for checkpointing in sorted({gc for _, gc in choices}):
        trial = replace(setup, gradient_checkpointing=checkpointing)
        totals |= {(dtype, checkpointing): e.total for dtype, e in estimates(model, lora, trial).items()}
    for dtype, checkpointing in choices:
        if totals[dtype, checkpointing] <= budget:
            chosen = replace(setup, base_dtype=dtype, gradient_checkpointing=checkpointing)
            return chosen, _base_reason(chosen, totals, budget)
    return None, (f"nothing fits {format_bytes(budget)}: even a 4-bit base with gradient checkpointing needs "
                  f"{format_bytes(totals['4bit', True])}; lower --batch-size or --max-length, or plan a smaller model")


def _base_reason(chosen: Setup, totals: dict[tuple[str, bool], float], budget: int) -> str:
    need = {key: format_bytes(total) for key, total in totals.items()}
    dtype, checkpointing = chosen.base_dtype, chosen.gradient_checkpointing
    how = " with gradient checkpointing (one block's activations at a time)" if checkpointing else ""
    fitting = f"it needs {need[dtype, checkpointing]} of the {format_bytes(budget)}{how}"
    fp32 = f"fp32 needs {need['fp32', True]} even with gradient checkpointing"
    reasons = {
        "fp32": f"fp32 base: {fitting}; fp32 is the fastest compute on CPU",
        "bf16": f"bf16 base: {fp32}; {fitting}",
        "4bit": f"QLoRA: neither the fp32 ({need['fp32', True]}) nor the bf16 ({need['bf16', True]}) base fits "
                f"{format_bytes(budget)}, even with gradient checkpointing, so load the base in 4 bits: "
                f"{fitting}. Load it with {QLORA_LOAD}",
    }
    return reasons[dtype]


# ---- output -------------------------------------------------------------------------------------------------
def format_config(settings: dict) -> list[str]:
    """LoraConfig(...) as Python, one argument a line."""
    lines = ["LoraConfig("]
    for name, value in settings.items():
        if value is not None:
            lines.append(f"    {name}={json.dumps(value) if not isinstance(value, bool) else value},")
    return lines + [")"]


def format_table(table: dict[str, MemoryEstimate], budget: int, chosen: str | None) -> list[str]:
    """Rows: the memory parts and total; columns: fp32, bf16, 4-bit base; then whether each fits."""
    headers = {"fp32": "fp32", "bf16": "bf16", "4bit": "4-bit base"}
    lines = ["".ljust(18) + "".join(headers[dtype].rjust(13) for dtype in table)]
    labels = list(next(iter(table.values())).rows())
    for label in labels:
        lines.append(label.ljust(18) + "".join(format_bytes(e.rows()[label]).rjust(13) for e in table.values()))
    lines.append("total".ljust(18) + "".join(format_bytes(e.total).rjust(13) for e in table.values()))
    fits = ["yes" if e.total <= budget else "no" for e in table.values()]
    lines.append(f"fits {format_bytes(budget)}".ljust(18) + "".join(
        (f + (" *" if dtype == chosen else "")).rjust(13) for dtype, f in zip(table, fits, strict=True)))
    return ["  " + line for line in lines]


def _table_note(config: object) -> str:
    model_type = getattr(config, "model_type", None)
    family = "" if model_type in FAMILIES else f"; activations estimated as a Llama-style decoder ({model_type!r})"
    return ("  (resident memory of the training process on CPU: every batch --max-length tokens wide and padded; "
            f"activations include the allocator's slack; runtime is libraries and tokenizer{family})")


def train_default_note(settings: dict, examples: int) -> str:
    """How the plan compares with ``lorakit train``'s fixed default recipe, and why they differ."""
    fields = ("r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules")
    differ = [f"{name}={settings.get(name)} here, {TRAIN_RECIPE.get(name)} there" for name in fields
              if settings.get(name) != TRAIN_RECIPE.get(name)]
    if not differ:
        return "This is lorakit train's default recipe: `lorakit train` with no LoRA flags trains exactly this."
    return (f"lorakit train's default recipe ({_describe(SFT_RECIPE)}) differs: {'; '.join(differ)}. The "
            f"default is one fixed recipe for any data and model (the common SFT starting point), while this plan "
            f"sizes it to {examples:,d} examples and this model; give lorakit train the plan's values as flags "
            "(--r, --lora-dropout, ...) to train the plan.")


def train_command(args: argparse.Namespace, settings: dict, setup: Setup) -> str:
    """The ``lorakit train`` line that trains the plan (causal LM only: lorakit train fine-tunes causal LMs)."""
    parts = ["lorakit train"] + ([f"--model {args.model}"] if args.model else [])
    parts += [f"--batch-size {setup.batch_size}", f"--max-length {setup.max_length}", f"--r {settings['r']}",
              f"--lora-alpha {settings['lora_alpha']}", f"--lora-dropout {settings['lora_dropout']}"]
    targets = settings["target_modules"]
    parts.append(f"--target-modules {targets if isinstance(targets, str) else ','.join(targets)}")
    parts.append("--use-rslora" if settings.get("use_rslora") else "--no-use-rslora")
    parts += ["--gradient-checkpointing"] * setup.gradient_checkpointing
    parts += ["--load-in-4bit  # QLoRA: NF4 base (bitsandbytes), fp32 compute on CPU"] * (setup.base_dtype == "4bit")
    return " ".join(parts)


# ---- the command ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="a local transformers model folder; only config.json is read "
                                                   "(default: the embedded SmolLM2-135M-Instruct)")
    source.add_argument("--preset", choices=list(PRESETS), help="a built-in config of a common model (default: none, --model or the embedded SmolLM2)")
    parser.add_argument("--task", choices=list(TASKS), help="default: classification for encoders, else causal-lm")
    parser.add_argument("--memory", default="24GB", help="memory budget: 24GB (10^9), 24GiB or 24G (2^30), 512MiB, "
                                                         "1.5T (default 24GB)")
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                        help=f"training examples (default {DEFAULT_EXAMPLES:,d}: lorakit train's default data)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="plan with gradient checkpointing")


def _source(args: argparse.Namespace) -> tuple[object, str]:
    """The model config and how to name it: --preset, --model, or the embedded SmolLM2 (its config only)."""
    from ..embedded import SMOLLM2_NAME, cache_dir
    from .inspect import model_folder, read_model_config  # here, so that --help lists plan before inspect

    if args.preset:
        return preset_config(args.preset), f"preset {args.preset}"
    if args.model is not None:
        folder = model_folder(args.model)
        return read_model_config(folder), str(folder)
    folder = cache_dir() / SMOLLM2_NAME
    if (folder / "config.json").is_file():
        return read_model_config(folder), f"{folder} (the embedded {SMOLLM2_NAME})"
    return preset_config("smollm2-135m"), f"preset smollm2-135m (the embedded {SMOLLM2_NAME}, not converted yet)"


def _check(args: argparse.Namespace) -> None:
    for name in ("examples", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    budget = parse_memory(args.memory)
    config, label = _source(args)
    task = args.task or default_task(config)
    model = build_model(config, task)
    advice = recommend_lora(model, task, args.examples)
    lora = LoraConfig(**advice.settings)
    setup = Setup(batch_size=args.batch_size, max_length=args.max_length, causal_lm=task == "causal-lm",
                  gradient_checkpointing=args.gradient_checkpointing)
    chosen, base_reason = choose_base(model, lora, setup, budget)
    shown = chosen or replace(setup, gradient_checkpointing=True)  # nothing fits: show the smallest try
    table = estimates(model, lora, shown)
    counts = table["fp32"].parameters
    print(f"Plan for {label}: {type(model).__name__}, {counts.base:,d} parameters; task {task}, "
          f"{args.examples:,d} examples, batch {args.batch_size} x {args.max_length} tokens, budget {args.memory} "
          f"({format_bytes(budget)})\n\nRecommended LoRA configuration:")
    print("\n".join("    " + line for line in format_config(advice.settings)))
    print("\nWhy:\n" + "\n".join(f"  - {reason}" for reason in advice.reasons + [base_reason]))
    if task == "causal-lm":
        print("\n" + train_default_note(advice.settings, args.examples))
    print(f"\ntrainable params: {counts.trainable:,d} || all params: {counts.base + counts.trainable:,d} || "
          f"trainable%: {100 * counts.trainable / (counts.base + counts.trainable):.4f}")
    checkpointing = " with gradient checkpointing" if shown.gradient_checkpointing else ""
    print(f"\nMemory of one training step (AdamW, batch {args.batch_size} x {args.max_length}{checkpointing}; "
          "* = recommended):")
    print("\n".join(format_table(table, budget, chosen.base_dtype if chosen else None)))
    print(_table_note(config))
    if task == "causal-lm" and chosen and not args.preset:  # a preset names no folder to train
        print(f"\nTrain it: {train_command(args, advice.settings, chosen)}")
    return 0


register("plan", Command("recommend a LoRA configuration and estimate its training memory", add_arguments, run))
