"""``lorakit train --resume``: the checkpoint's settings come back unless the user overrides one.

A checkpoint records the run's settings (``record``). On ``--resume`` every recorded setting the command
line does not give is taken from the checkpoint; one the user gives with a different value is either
applied, with a note on what it means from here (``CHANGEABLE``), or refused, because the adapter or the
data order depends on it (everything else). Settings that are not recorded (--time-limit, --save-every,
--samples, ...) are the command line's as always.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import LORA_FLAGS, CliError

# Recorded training settings (argparse destinations) besides the LoRA fields.
TRAIN_SETTINGS = ("model", "data", "max_steps", "batch_size", "grad_accum", "max_length", "lr", "seed", "load_in_4bit",
                  "precision")
# setting -> what a new value means from the checkpoint's step on
CHANGEABLE = {
    "lr": "the learning-rate schedule continues from here with the new peak rate",
    "max_steps": "the run now ends at the new step count and the learning-rate decay is rescaled to it",
    "lora_dropout": "dropout on the adapter's input changes from here",
    "precision": "the frozen base computes in the new dtype from here (the adapter and optimizer stay fp32)",
}
# setting -> why it cannot change (the default reason: it fixes the adapter's shape or scaling)
WHY_FIXED = {
    "model": "the adapter was trained on that base model",
    "data": "the position in the data is the checkpoint's",
    "batch_size": "the position in the data order is counted in batches of this size",
    "grad_accum": "the position in the data order is counted in micro-batches",
    "max_length": "the examples were cut at this length",
    "seed": "the seed fixes the data order",
    "load_in_4bit": "the adapter was trained on this base precision",
}
LORA_REASON = "the trained adapter's shape and scaling are fixed"


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _comparable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, (list, tuple, set)):
        return sorted(map(str, value))
    return value


def record(args: argparse.Namespace, max_steps: int, lora: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint keeps (JSON values): the training ones and the LoraConfig as a dict."""
    settings = {name: _comparable(getattr(args, name)) for name in TRAIN_SETTINGS}
    settings["max_steps"] = max_steps
    return {"settings": settings, "lora": lora}


def apply(args: argparse.Namespace, saved: dict[str, Any], given: set[str]) -> list[str]:
    """Fill ``args`` from the checkpoint's ``saved`` record; returns the notes on changed settings.

    Raises:
        CliError: one line naming every setting that cannot change on resume, with its old and new value.
    """
    if "config" in given:
        raise CliError("--config cannot be given with --resume: the adapter keeps the checkpoint's LoRA settings; "
                       "drop --config, or start a new run into another --output")
    # checkpoints written before --precision existed trained in fp32
    recorded = {"precision": "fp32", **saved["settings"], **{name: saved["lora"].get(name) for name in LORA_FLAGS}}
    if "epochs" in given:
        given = given | {"max_steps"}  # recomputed into a step count once the data is read
    notes, refused = [], []
    for name, old in recorded.items():
        new = getattr(args, name)
        if name not in given or name == "max_steps" and "epochs" in given:
            continue
        if _comparable(new) == old:
            continue
        if name in CHANGEABLE:
            notes.append(f"{_flag(name)} {_show(new)} (was {_show(old)}): {CHANGEABLE[name]}")
        else:
            refused.append(f"{_flag(name)} cannot change on resume (checkpoint: {_show(old)}, given: {_show(new)}; "
                           f"{WHY_FIXED.get(name, LORA_REASON)})")
    if refused:
        raise CliError("; ".join(refused) + ". Drop the flag to continue the run, or start a new run into another "
                       "--output")
    for name in TRAIN_SETTINGS:
        if name not in given:
            old = recorded[name]
            setattr(args, name, Path(old) if name in ("model", "data") and old is not None else old)
    if "max_steps" not in given:
        args.epochs = None
    return notes


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
