"""``lorakit chat ADAPTER``: talk to a trained adapter on its base model.

``--prompt "..."`` answers once; without it every line read from stdin is one user turn (a REPL on a
terminal, a batch on a pipe), answered greedily through the tokenizer's chat template, the same way
``lorakit train`` prints its sample answers. The base model is the adapter config's
``base_model_name_or_path`` (the embedded SmolLM2 for its hub id, see ``embedded.resolve_base``) unless
``--model`` names one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .common import CliError, Command, existing_folder, register

if TYPE_CHECKING:
    from ..sft import ChatTokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", type=existing_folder, help="an adapter folder (adapter_config.json + weights)")
    parser.add_argument("--prompt", help="answer this one message and exit "
                                         "(default: none, read one message per line from stdin)")
    parser.add_argument("--model", help="the base model folder or hub id "
                                        "(default: the adapter config's base_model_name_or_path)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens")


def _base_reference(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    try:
        config = json.loads((args.adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CliError(f"{args.adapter} has no readable adapter_config.json ({error}); give an adapter folder "
                       "as lorakit train or save_pretrained writes it") from None
    name = config.get("base_model_name_or_path")
    if not name:
        raise CliError(f"{args.adapter}/adapter_config.json names no base_model_name_or_path; give --model")
    from ..embedded import resolve_base

    return resolve_base(name)


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, ChatTokenizer]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from ...model import PeftModel

    base = _base_reference(args)
    transformers_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise CliError(f"cannot load the base model {base!r}: {' '.join(str(error).split())[:300]}; "
                       "give its folder with --model") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return PeftModel.from_pretrained(model, args.adapter).eval(), tokenizer


def run(args: argparse.Namespace) -> int:
    from ..training import sample_answers

    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = _load(args)
    if args.prompt is not None:
        print(sample_answers(model, tokenizer, [args.prompt], args.max_new_tokens)[0])
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.adapter} (one message per line; Ctrl-D ends)")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            print(sample_answers(model, tokenizer, [line.strip()], args.max_new_tokens)[0], flush=True)


COMMAND = register("chat", Command(help="answer prompts with a trained adapter (one-shot with --prompt, else stdin)",
                                   add_arguments=add_arguments, run=run))
