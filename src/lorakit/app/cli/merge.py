"""``lorakit merge ADAPTER --out DIR``: fold an adapter into its base model and save a plain checkpoint.

Every adapted weight becomes ``W' = W + s·ΔW`` (computed in float32, cast once; ``LoraLayer.merge``), the
LoRA layers are removed, and the result is saved as an ordinary transformers folder (plus the base
folder's tokenizer files) that loads without lorakit or PEFT. The folder is written atomically: a crash
leaves the previous ``--out`` or the new one, whole. As a check the command prints
``max |merged − unmerged|`` over the logits of a fixed probe batch, which should be rounding noise.
"""

from __future__ import annotations

import argparse
import fnmatch
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...atomic import replace_folder
from ...io import read_config
from .common import CliError, Command, register
from .inspect import TASK_AUTO_CLASSES, model_folder

if TYPE_CHECKING:
    from ...model import PeftModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files of a transformers tokenizer, copied byte for byte from the base folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model", "sentencepiece.bpe.model")
# Files a previous checkpoint in --out may hold; the new save replaces them all (no stale shard survives).
CHECKPOINT_PATTERNS = ("config.json", "generation_config.json", "model*.safetensors", "model*.safetensors.index.json",
                       "pytorch_model*.bin", "pytorch_model*.bin.index.json", *TOKENIZER_FILES)
PROBE_SHAPE = (1, 16)  # one row: sequence classifiers without a pad token refuse batches of several rows


def base_folder(args: argparse.Namespace, recorded: str | None) -> tuple[Path, str]:
    """The base model folder and why it was chosen: --model, the adapter's recorded base, or the embedded one."""
    if args.model is not None:
        return model_folder(args.model), "--model"
    if recorded and (Path(recorded) / "config.json").is_file():
        return Path(recorded), "the adapter's base_model_name_or_path"
    reason = f"base_model_name_or_path {recorded!r} is not a local folder" if recorded else "no base recorded"
    return model_folder(None), f"the embedded default ({reason}; pass --model to choose)"


def base_class(task: str | None, auto_mapping: dict | None) -> type:
    """The Auto class of the adapter's task type; with no task, the transformers class auto_mapping names."""
    import transformers

    named = (auto_mapping or {}).get("base_model_class")
    if task is None and isinstance(named, str) and hasattr(transformers, named):
        return getattr(transformers, named)
    return getattr(transformers, TASK_AUTO_CLASSES.get(task, "AutoModelForCausalLM"))


def load_base(folder: Path, auto: type[Any], dtype: str | None) -> nn.Module:
    """``auto.from_pretrained(folder)`` in eval mode, in ``dtype`` (default: the checkpoint's own).

    Raises:
        CliError: the folder's weights cannot be loaded as that class.
    """
    try:
        model = auto.from_pretrained(folder, dtype=DTYPES[dtype] if dtype else "auto")
    except (OSError, ValueError, KeyError) as error:
        raise CliError(f"cannot load {folder} as a {auto.__name__} base model ({error})") from None
    return model.eval()


def probe_ids(model: nn.Module) -> torch.Tensor:
    """A fixed batch of token ids inside the model's vocabulary, on its device."""
    vocab = getattr(model.config, "vocab_size", None) or 2
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, PROBE_SHAPE, generator=generator)
    return ids.to(next(model.parameters()).device)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=ids)
    return (output.logits if hasattr(output, "logits") else output[0]).float()


def merged_with_check(peft_model: PeftModel) -> tuple[nn.Module, float, float]:
    """(merged plain model, max |merged − unmerged|, max |unmerged − base|) on the probe batch."""
    ids = probe_ids(peft_model)
    unmerged = logits(peft_model, ids)
    with peft_model.disable_adapter():
        base = logits(peft_model, ids)
    merged = peft_model.merge_and_unload()
    difference = (logits(merged, ids) - unmerged).abs().max().item()
    return merged, difference, (unmerged - base).abs().max().item()


def save_checkpoint(model: nn.Module, base: Path, out: Path) -> list[str]:
    """Write ``model`` and the base folder's tokenizer files to ``out`` atomically; the tokenizer files copied."""
    tokenizer_files = [name for name in TOKENIZER_FILES if (base / name).is_file()]
    stale = [entry.name for entry in out.iterdir() if any(fnmatch.fnmatch(entry.name, pattern)
                                                          for pattern in CHECKPOINT_PATTERNS)] if out.is_dir() else []

    def write(folder: Path) -> None:
        getattr(model, "save_pretrained")(folder)  # a transformers model; nn.Module declares no save_pretrained
        for name in tokenizer_files:
            shutil.copy2(base / name, folder / name)

    replace_folder(out, write, owned=stale)
    return tokenizer_files


def _check_out(out: Path, adapter: Path, base: Path) -> None:
    for other, what in ((adapter, "the adapter folder"), (base, "the base model folder")):
        if out.resolve() == other.resolve():
            raise CliError(f"--out {out} is {what}; write the merged model to a new folder")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", type=Path, metavar="ADAPTER", help="adapter folder (PEFT's or lorakit's)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged transformers checkpoint")
    parser.add_argument("--model", type=Path, default=None, help="base model folder (default: the adapter's "
                        "base_model_name_or_path if it is a local folder, else the embedded SmolLM2)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of the merged checkpoint (default: the base checkpoint's own)")


def run(args: argparse.Namespace) -> int:
    from ...model import PeftModel

    if not args.adapter.is_dir():
        raise CliError(f"adapter folder {args.adapter} does not exist")
    config = read_config(args.adapter)
    base, why = base_folder(args, config.base_model_name_or_path)
    _check_out(args.out, args.adapter, base)
    print(f"base model: {base} ({why})")
    task = getattr(config.task_type, "value", config.task_type)
    model = load_base(base, base_class(task, config.auto_mapping), args.dtype)
    peft_model = PeftModel.from_pretrained(model, args.adapter)
    merged, difference, effect = merged_with_check(peft_model)
    tokenizer_files = save_checkpoint(merged, base, args.out)
    dtype = next(merged.parameters()).dtype
    print(f"merged {args.adapter} into {base} -> {args.out} ({type(merged).__name__}, {dtype}"
          f"{', tokenizer copied' if tokenizer_files else ', no tokenizer in the base folder'})")
    print(f"check on a {PROBE_SHAPE[0]}x{PROBE_SHAPE[1]} probe batch: max |merged - unmerged| logits = "
          f"{difference:.3g} (the adapter moves them by up to {effect:.3g})")
    return 0


register("merge", Command("merge an adapter into its base model and save a plain checkpoint", add_arguments, run))
