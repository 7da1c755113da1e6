"""What every subcommand shares: the Command registry, one-line errors, LoRA flags, model loading."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ...config import LoraConfig


class CliError(Exception):
    """A user error the command reports as one line (exit status 2)."""


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    requires: tuple[str, ...] = ("transformers",)  # modules checked before ``run`` (see guard.check_dependencies)


COMMANDS: dict[str, Command] = {}


def register(name: str, command: Command) -> Command:
    COMMANDS[name] = command
    return command


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default: argparse's own "(default: X)", unless the help text already
    says its default in words (options whose default is computed, like "the embedded SmolLM2")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action) or ""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2, and --help shows the defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

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


# what a LoraConfig default of None means, for --help
UNSET_MEANS = {"exclude_modules": "nothing excluded", "modules_to_save": "none",
               "layers_to_transform": "every layer", "target_modules": "the architecture's default targets"}


def add_lora_flags(parser: argparse.ArgumentParser, recipe: dict[str, Any], recipe_name: str) -> None:
    """One flag per ``LORA_FLAGS`` field; its help shows the recipe's value, else LoraConfig's default."""
    group = parser.add_argument_group("LoRA settings (override --config and the defaults)")
    group.add_argument("--config", type=Path, help="a LoraConfig JSON file (adapter_config.json works) "
                                                   "(default: none, the recipe and flags only)")
    library = {f.name: f.default for f in dataclasses.fields(LoraConfig) if f.default is not dataclasses.MISSING}
    for field, (kind, text) in LORA_FLAGS.items():
        shown = (f"{_show(recipe[field])}, {recipe_name}" if field in recipe
                 else UNSET_MEANS.get(field, "") if library.get(field) is None else _show(library[field]))
        help_text = f"{text} (default: {shown})"
        flags = ["--" + field.replace("_", "-")]
        if field == "r":  # torchrun's parser takes a bare --r for an abbreviation of its own flags
            flags.append("--lora-r")
        if kind is bool:
            group.add_argument(*flags, dest=field, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(*flags, dest=field, type=kind, default=None, help=help_text)


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


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


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += _parsers(child)
    return found


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations the command line sets itself (not left at their defaults), e.g. {"lr", "output"}.

    Parses ``argv`` again with every default swapped for a marker: what still holds the marker was not given.
    (``--resume`` needs this: a flag given equal to its default is still the user's choice.)
    """
    unset = object()
    saved = [(action, action.default) for p in _parsers(parser) for action in p._actions
             if action.dest not in (argparse.SUPPRESS, "help")]
    for action, _ in saved:
        action.default = unset
    try:
        namespace = parser.parse_args(list(argv))
    finally:
        for action, default in saved:
            action.default = default
    return {name for name, value in vars(namespace).items() if value is not unset}
