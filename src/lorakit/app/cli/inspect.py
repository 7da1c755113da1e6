"""``lorakit inspect [MODEL]``: what a model contains, and what target_modules would pick in it.

The answer to "Target modules ... not found": the module tree with repeated blocks shown once
(``model.layers.{0..29}``), every layer LoRA can wrap by its leaf name (what ``target_modules`` says) with
weight shapes and counts, what the architecture's default targets and ``"all-linear"`` select, and the
parameter count. Only ``config.json`` is read: the model is built on the meta device, so inspecting a
7B model takes a second and no weight memory.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...config import LoraConfig
from ...errors import LoraWarning
from ...kinds import find_kind
from ...targeting import DEFAULT_TARGETS, TASK_MODULES_TO_SAVE, candidate_modules, resolve_targets
from .common import CliError, Command, register

# Class-name suffix of a transformers architecture -> PEFT task type (decides which heads "all-linear" skips).
ARCHITECTURE_TASKS = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}
# PEFT task type -> the transformers Auto class that loads a base model for it (None: no task recorded).
TASK_AUTO_CLASSES = {
    None: "AutoModelForCausalLM",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}


# ---- loading (shared with merge) ------------------------------------------------------------------------------
def model_folder(path: Path | None) -> Path:
    """``path``, checked to be a transformers folder, or the embedded SmolLM2 when ``path`` is None.

    Raises:
        CliError: ``path`` is not a folder, or has no config.json.
    """
    if path is None:
        from ..embedded import default_model_folder

        return default_model_folder()
    if not path.is_dir():
        raise CliError(f"model folder {path} does not exist (expected a local transformers model folder)")
    if not (path / "config.json").is_file():
        raise CliError(f"{path} is not a transformers model folder: it has no config.json")
    return path


def read_model_config(folder: Path) -> object:
    """transformers' config of ``folder``.

    Raises:
        CliError: config.json is unreadable or names an architecture transformers does not know.
    """
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CliError(f"{folder}/config.json is not a usable transformers config ({error})") from None


def architecture_class(config: object) -> type | None:
    """The transformers class named by ``config.architectures[0]``, or None."""
    import transformers

    names = getattr(config, "architectures", None) or []
    return getattr(transformers, names[0], None) if names else None


def meta_model(config: object) -> nn.Module:
    """The model of ``config`` with every tensor on the meta device (shapes only, no memory, no init cost)."""
    import transformers

    cls = architecture_class(config)
    with torch.device("meta"):
        if cls is not None:
            return cls(config)
        return transformers.AutoModelForCausalLM.from_config(config)


def architecture_task(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for suffix, task in ARCHITECTURE_TASKS.items() if name.endswith(suffix)), None)


# ---- the module tree, repeated blocks collapsed ------------------------------------------------------------------
def _signature(module: nn.Module) -> tuple:
    """What two blocks must share to be shown once: every submodule's type and every parameter's shape."""
    types = tuple((name, type(m).__name__) for name, m in module.named_modules())
    shapes = tuple((name, tuple(p.shape)) for name, p in module.named_parameters())
    return types, shapes


def _runs(children: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module, int]]:
    """(label, first module, count): consecutive numbered children with one signature merge into ``{a..b}``."""
    runs: list[list] = []
    for name, child in children:
        last = runs[-1] if runs else None
        if (last and name.isdigit() and last[0].isdigit() and int(name) == int(last[0]) + last[2]
                and _signature(child) == _signature(last[1])):
            last[2] += 1
        else:
            runs.append([name, child, 1])
    return [(f"{{{name}..{int(name) + count - 1}}}" if count > 1 else name, child, count)
            for name, child, count in runs]


def _describe(module: nn.Module, count: int) -> str:
    text = type(module).__name__
    if not list(module.children()):
        text += f"({module.extra_repr()})"
    return f"{count} × {text}" if count > 1 else text


def tree_rows(module: nn.Module, prefix: str = "", depth: int = 0) -> list[tuple[int, str, str]]:
    """(depth, dotted path, description) per module, numbered repeats collapsed as ``layers.{0..29}``."""
    rows = []
    for label, child, count in _runs(list(module.named_children())):
        path = f"{prefix}.{label}" if prefix else label
        rows.append((depth, path, _describe(child, count)))
        rows += tree_rows(child, path, depth + 1)
    return rows


def format_tree(model: nn.Module) -> list[str]:
    rows = tree_rows(model)
    width = min(64, max((2 * depth + len(path) for depth, path, _ in rows), default=0))
    return [f"  {'  ' * depth}{path}".ljust(width + 4) + description for depth, path, description in rows]


# ---- the layers LoRA can wrap, by leaf name -----------------------------------------------------------------------
@dataclass
class LeafGroup:
    kind: str
    shapes: list[tuple[int, ...]]
    count: int = 0
    tied_to: str | None = None


def leaf_groups(model: nn.Module) -> dict[str, LeafGroup]:
    """Leaf name -> kind, distinct weight shapes, how many modules carry it, and weight tying."""
    groups: dict[str, LeafGroup] = {}
    owners: dict[int, str] = {}  # id(weight) -> leaf name of the first module holding it
    for path, module in candidate_modules(model):
        kind = find_kind(module)
        if kind is None:
            continue
        leaf = path.rsplit(".", 1)[-1]
        group = groups.setdefault(leaf, LeafGroup(kind.name, []))
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
        if shape not in group.shapes:
            group.shapes.append(shape)
        group.count += 1
        if isinstance(weight, torch.Tensor):
            owner = owners.setdefault(id(weight), leaf)
            if owner != leaf:
                group.tied_to = owner
    return groups


def format_leaves(groups: dict[str, LeafGroup]) -> list[str]:
    shapes = {leaf: ", ".join("x".join(map(str, s)) or "-" for s in g.shapes) for leaf, g in groups.items()}
    name_width = max((len(leaf) for leaf in groups), default=4) + 2
    shape_width = max((len(text) for text in shapes.values()), default=5) + 2
    lines = [f"  {'name'.ljust(name_width)}{'type'.ljust(11)}{'weight'.ljust(shape_width)}count"]
    for leaf, group in groups.items():
        tied = f"  (weight tied to {group.tied_to})" if group.tied_to else ""
        lines.append(f"  {leaf.ljust(name_width)}{group.kind.ljust(11)}{shapes[leaf].ljust(shape_width)}"
                     f"{group.count}{tied}")
    return lines


# ---- what target_modules=None and "all-linear" pick --------------------------------------------------------------
def picked(model: nn.Module, target_modules: str | None, task: str | None) -> list[str]:
    """The module paths ``target_modules`` selects in ``model`` (lorakit's own targeting rules).

    Raises:
        ValueError: nothing is selected, or no default exists for this architecture.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraWarning)
        return list(resolve_targets(model, LoraConfig(target_modules=target_modules, task_type=task)).layers)


def _leaf_summary(paths: list[str]) -> str:
    leaves = list(dict.fromkeys(path.rsplit(".", 1)[-1] for path in paths))
    return f"{', '.join(leaves)} -> {len(paths)} modules"


def _left_out(model: nn.Module, task: str | None) -> str:
    """Why "all-linear" skips some Linear layers: the output head, and a task's fully trained head."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    notes = [f"output head {path} left out" for path, module in candidate_modules(model) if module is head]
    leaves = {path.rsplit(".", 1)[-1] for path, _ in candidate_modules(model)}
    saved = [name for name in TASK_MODULES_TO_SAVE.get(task or "", []) if name in leaves]
    if saved:
        notes.append(f"{', '.join(saved)} trained in full as modules_to_save with task_type={task}")
    return f" ({'; '.join(notes)})" if notes else ""


def format_picks(model: nn.Module, model_type: str | None) -> list[str]:
    task = architecture_task(model)
    lines = []
    if model_type in DEFAULT_TARGETS:
        lines.append(f"  target_modules=None (default for model_type {model_type!r}): "
                     f"{_leaf_summary(picked(model, None, task))}")
    else:
        lines.append(f"  target_modules=None: no default for model_type {model_type!r}; name target_modules "
                     "from the table above, or use 'all-linear'")
    try:
        linear = picked(model, "all-linear", task)
        lines.append(f"  target_modules='all-linear': {_leaf_summary(linear)}{_left_out(model, task)}")
    except ValueError:
        lines.append("  target_modules='all-linear': no Linear layers to pick")
    return lines


# ---- the command ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", type=Path, default=None, metavar="MODEL",
                        help="a local transformers model folder (default: the embedded SmolLM2-135M-Instruct)")


def run(args: argparse.Namespace) -> int:
    folder = model_folder(args.model)
    config = read_model_config(folder)
    model = meta_model(config)
    model_type = getattr(config, "model_type", None)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    print(f"{folder}: {type(model).__name__} (model_type {model_type!r}), built on the meta device from config.json")
    print("\nModule tree (numbered blocks with the same structure shown once):")
    print("\n".join(format_tree(model)))
    print("\nLayers LoRA can wrap, by the name target_modules uses:")
    print("\n".join(format_leaves(leaf_groups(model))))
    print("\nWhat target_modules picks:")
    print("\n".join(format_picks(model, model_type)))
    print(f"\nTotal parameters: {total:,d} (shared tensors counted once)")
    return 0


register("inspect", Command("show a model's layers and what target_modules would pick", add_arguments, run))
