"""The ``lorakit`` command: train, chat, plan, inspect, merge, export (``python -m lorakit`` is the same).

Each subcommand is a ``Command`` in the ``COMMANDS`` registry: a help line, a function that adds its
arguments to an argparse parser, a function that runs it and returns the exit status, and the modules it
needs (checked before it runs, naming the extra to install). ``main`` turns every user error
(``CliError``, ``ValueError``, a missing file or package) into one line on stderr and exit status 2,
never a traceback. A bare ``lorakit`` prints the usage.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .common import COMMANDS, CliError, Command, OneLineParser, explicit_options
from .guard import check_dependencies

__all__ = ["COMMANDS", "CliError", "Command", "main"]


# Subcommand modules, in the order --help lists them; each registers itself in COMMANDS on import.
COMMAND_MODULES = ("train", "chat", "plan", "inspect", "merge", "export")


def _load_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = OneLineParser(prog="lorakit", description="LoRA fine-tuning, drop-in for PEFT's LoRA.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", required=True,
                                parser_class=OneLineParser)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lorakit <command> ...``; a bare ``lorakit`` prints the usage and the commands (exit status 0)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        print("\nStart with: lorakit train --help   (lorakit train with no options fine-tunes the embedded "
              "SmolLM2-135M-Instruct for about 7 minutes)")
        return 0
    args = parser.parse_args(argv)
    args.given = explicit_options(parser, argv)
    command = COMMANDS[args.command]
    try:
        check_dependencies(args.command, command.requires)
        return command.run(args)
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, OSError, RuntimeError) as error:
        message = " ".join(str(error).split())  # one line, whatever the exception's text
        print(f"lorakit {args.command}: error: {message}", file=sys.stderr)
        return 2
