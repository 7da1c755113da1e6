"""The ``lorakit`` command: train, plan, inspect, merge, export.

Each subcommand is a ``Command`` in the ``COMMANDS`` registry: a help line, a function that adds its
arguments to an argparse parser, and a function that runs it and returns the exit status. ``main``
turns every user error (``CliError``, ``ValueError``, a missing file or package) into one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .common import COMMANDS, CliError, Command, OneLineParser

__all__ = ["COMMANDS", "CliError", "Command", "main"]


# Subcommand modules, in the order --help lists them; each registers itself in COMMANDS on import.
COMMAND_MODULES = ("train", "plan", "inspect", "merge", "export")


def _load_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = OneLineParser(prog="lorakit", description="LoRA fine-tuning, drop-in for PEFT's LoRA.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}",
                                parser_class=OneLineParser)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lorakit <command> ...``; a bare ``lorakit`` runs ``lorakit train`` with its defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    command = COMMANDS[args.command]
    try:
        return command.run(args)
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, OSError, RuntimeError) as error:
        message = " ".join(str(error).split())  # one line, whatever the exception's text
        print(f"lorakit {args.command}: error: {message}", file=sys.stderr)
        return 2
