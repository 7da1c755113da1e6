"""What every subcommand shares: the Command registry, one-line errors, LoRA flags, model loading."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ..config import LoraConfig


class CliError(Exception):
    """A user error the command reports as one line (exit status 2)."""


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(name: str, command: Command) -> Command:
    COMMANDS[name] = command
    return command


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _csv(text: str) -> list[str] | str:
    """'q_proj,v_proj' -> ['q_proj', 'v_proj']; 'all-linear' and regexes (with special characters) stay strings."""
    if text.lower() == "all-linear" or any(c in text for c in "*+?[]()|\\^$"):
        return text
    return [part for part in text.replace(" ", ",").split(",") if part]


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _init(text: str) -> bool | str:
    return {"true": True, "false": False}.get(text.lower(), text)


# LoraConfig field -> (flag type, help). Flags are generated from this table (``--lora-alpha`` etc.).
LORA_FLAGS: dict[str, tuple[Any, str]] = {
    "r": (int, "LoRA rank"),
    "lora_alpha": (float, "scaling numerator (s = alpha / r, or alpha / sqrt(r) with --use-rslora)"),
    "lora_dropout": (float, "dropout on the LoRA branch input"),
    "target_modules": (_csv, "comma-separated module names, a regex, or all-linear"),
    "exclude_modules": (_csv, "comma-separated module names or a regex to leave alone"),
    "use_rslora": (bool, "scale by alpha / sqrt(r) (rsLoRA)"),
    "use_dora": (bool, "weight-decomposed LoRA (DoRA)"),
    "lora_bias": (bool, "train a bias in lora_B"),
    "bias": (str, "which biases train: none, all, lora_only"),
    "init_lora_weights": (_init, "true, false, gaussian, pissa, olora, ..."),
    "modules_to_save": (lambda t: [p for p in t.split(",") if p], "modules trained in full and saved"),
    "layers_to_transform": (_ints, "comma-separated layer indices"),
}


def add_lora_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA settings (override --config and the defaults)")
    group.add_argument("--config", type=Path, help="a LoraConfig JSON file (adapter_config.json works)")
    for field, (kind, help_text) in LORA_FLAGS.items():
        flags = ["--" + field.replace("_", "-")]
        if field == "r":  # torchrun's parser takes a bare --r for an abbreviation of its own flags
            flags.append("--lora-r")
        if kind is bool:
            group.add_argument(*flags, dest=field, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(*flags, dest=field, type=kind, default=None, help=help_text)


def lora_config(args: argparse.Namespace, defaults: dict[str, Any]) -> LoraConfig:
    """defaults, then --config, then the LoRA flags given on the command line.

    Raises:
        CliError: an unreadable --config file. ValueError: an invalid LoRA setting (from LoraConfig).
    """
    settings = dict(defaults)
    if getattr(args, "config", None) is not None:
        try:
            data = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CliError(f"--config file {args.config} does not exist") from None
        except (OSError, json.JSONDecodeError) as error:
            raise CliError(f"--config file {args.config} is not valid JSON ({error})") from None
        settings.update(LoraConfig.from_dict(data, source=str(args.config)).to_dict())
        settings = {k: v for k, v in settings.items() if k not in ("peft_version", "inference_mode", "auto_mapping")}
    for field in LORA_FLAGS:
        value = getattr(args, field, None)
        if value is not None:
            settings[field] = value
    return LoraConfig(**settings)


def existing_folder(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return path
