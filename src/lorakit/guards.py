"""Guards: PEFT's silent failures turned into errors or ``LoraWarning``s, one small function each.

``GUARDS`` is the table (name -> when it runs, what it does); the README's reliability section shows it and
``tests/test_guards.py`` has one test per entry that fails without the guard. Every guard is cheap: it runs
at most once per call it guards (never per forward on the common path) and reads no tensor data it does not
need (the save check parses the safetensors header only).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .errors import explain, warn
from .layer import LoraLayer
from .ties import unwrapped as _unwrapped


@dataclasses.dataclass(frozen=True)
class Guard:
    when: str
    outcome: str


GUARDS: dict[str, Guard] = {
    "no_trainable_parameters": Guard("get_peft_model", "LoraWarning naming why (inference_mode, disabled, no layer)"),
    "frozen_adapter_trained": Guard("first forward in train mode with grad on, after from_pretrained(is_trainable="
                                    "False)", "LoraWarning: pass is_trainable=True"),
    "adapter_not_learning": Guard("check_training(model) / LoraTrainingCheckCallback after N optimizer steps",
                                  "LoraWarning listing layers whose lora_B (or lora_embedding_A) is still all zero"),
    "saved_file_incomplete": Guard("save_pretrained, before the new folder replaces the old one",
                                   "AdapterSaveError (tensor count, names, shapes, dtypes, empty tensors, file size); "
                                   "the old folder stays"),
    "merge_changed_outputs": Guard("merge_and_unload(check=True, probe=...)",
                                   "LoraWarning above the dtype's precision; the number is on model.lorakit_merge_check"),
    "tied_embedding_trained": Guard("get_peft_model with one side of tied embeddings trained",
                                    "LoraWarning; ensure_weight_tying=True ties the adapters as PEFT does"),
    "new_tokens_not_saved": Guard("save_pretrained with a resized vocabulary",
                                  "save_embedding_layers='auto' saves the embeddings (PEFT); False: LoraWarning"),
    "different_base_model": Guard("from_pretrained / load_adapter",
                                  "LoraWarning when base_model_name_or_path differs and every shape fits; otherwise "
                                  "the name joins the one aggregated AdapterLoadError"),
}


class AdapterSaveError(OSError):
    """``save_pretrained`` wrote a file that does not hold what it should; the previous folder is kept."""


def _any_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())  # stops at the first (adapters come early)


# ---- zero trainable parameters --------------------------------------------------------------------------------
def _why_frozen(peft_model: nn.Module) -> str:
    tuner = peft_model.base_model
    active = tuner.active_adapters
    if any(tuner.peft_config[name].inference_mode for name in active):
        return (f"adapter(s) {active} have inference_mode=True (e.g. a config read from a saved adapter_config.json); "
                "build the config with inference_mode=False")
    if not any(name in layer.r for layer in tuner.lora_layers() for name in active):
        return f"no layer holds the active adapter(s) {active}: every target was excluded; check target_modules"
    return "every adapter parameter has requires_grad=False (frozen after get_peft_model?); call set_adapter(name)"


def check_trainable(peft_model: nn.Module) -> None:
    """Warn when ``get_peft_model`` produced a model in which nothing trains (PEFT trains nothing silently)."""
    if not _any_trainable(peft_model):
        warn(f"the PeftModel has 0 trainable parameters: {_why_frozen(peft_model)}")


def check_frozen_training(peft_model: nn.Module) -> None:
    """First training-mode forward of a model loaded with ``is_trainable=False``: warn if nothing can learn."""
    peft_model._lorakit_frozen_load = False  # once
    if not _any_trainable(peft_model):
        warn("training step on an adapter loaded with from_pretrained(..., is_trainable=False) (PEFT's default): "
             "it has 0 trainable parameters, so nothing will learn. Load it with "
             "PeftModel.from_pretrained(model, path, is_trainable=True) to continue training")


# ---- an adapter that does not learn --------------------------------------------------------------------------
def _zero_factors(layer: LoraLayer, name: str) -> Iterator[Tensor]:
    for container in (layer.lora_A, layer.lora_B):
        if name in container:
            yield container[name].weight
    for container in (layer.lora_embedding_A, layer.lora_embedding_B):
        if name in container:
            yield container[name]


def check_training(model: nn.Module, steps: int | None = None) -> list[str]:
    """``path (adapter)`` of every trainable LoRA layer whose update ΔW = s·B·A is still exactly zero.

    After N optimizer steps a zero-initialised factor (lora_B; lora_embedding_A for embeddings) that is still
    all zero means the layer never got a gradient: parameters missing from the optimizer, lr 0, or inputs that
    never reach the layer. Warns (LoraWarning) when the list is not empty.
    """
    found = []
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name in layer.r:
            factors = list(_zero_factors(layer, name))
            if any(f.requires_grad for f in factors) and any(not f.detach().any() for f in factors):
                found.append(f"{path} ({name})")
    if found:
        after = f"after {steps} optimizer step(s)" if steps is not None else "now"
        warn(f"{len(found)} LoRA layer(s) still have an all-zero factor {after}, so they have not learned: "
             f"{found[:5]}{' ...' if len(found) > 5 else ''}. Check that the optimizer was built after "
             "get_peft_model and holds these parameters, that the learning rate is not 0, and that the inputs "
             "reach these layers")
    return found


# ---- a saved file that is incomplete --------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """(header without ``__metadata__``, end of the data section) from the first bytes of a safetensors file.

    Raises:
        AdapterSaveError: the file is shorter than its header says, or the header is not JSON.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > size - 8:
            raise AdapterSaveError(explain("written safetensors header is cut off", where=str(path), got=f"{size} bytes"))
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise AdapterSaveError(f"written safetensors header of {path} is not JSON ({error})") from None
    header.pop("__metadata__", None)
    return header, size - 8 - length


def _header_problems(header: dict[str, dict], data_size: int, tensors: dict[str, Tensor]) -> list[str]:
    problems = [f"missing {k}" for k in sorted(set(tensors) - set(header))]
    problems += [f"unexpected {k}" for k in sorted(set(header) - set(tensors))]
    end = 0
    for key in sorted(set(header) & set(tensors)):
        entry, tensor = header[key], tensors[key]
        start, stop = entry.get("data_offsets", (0, 0))
        end = max(end, stop)
        if tuple(entry.get("shape", ())) != tuple(tensor.shape):
            problems.append(f"{key}: shape {entry.get('shape')} on disk, {list(tensor.shape)} in memory")
        if entry.get("dtype") != _SAFETENSORS_DTYPES.get(tensor.dtype, entry.get("dtype")):
            problems.append(f"{key}: dtype {entry.get('dtype')} on disk, {tensor.dtype} in memory")
        if stop - start != tensor.numel() * tensor.element_size() or tensor.numel() == 0:
            problems.append(f"{key}: {stop - start} bytes on disk for {tensor.numel()} element(s)")
    if end != data_size:
        problems.append(f"data section holds {data_size} bytes, the header describes {end}")
    return problems


def verify_saved(path: Path, tensors: dict[str, Tensor]) -> None:
    """Check a just-written weights file against what was meant to be written, without reading tensor data.

    safetensors: the header alone (names, shapes, dtypes, byte spans, file size). ``.bin``: a memory-mapped
    load (the zip index only). No tensor may be empty and the adapter must hold at least one tensor.

    Raises:
        AdapterSaveError: every difference found, in one message.
    """
    if path.suffix == ".safetensors":
        problems = _header_problems(*read_safetensors_header(path), tensors)
    else:
        written = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        problems = [f"{k}: missing or shape differs" for k, v in tensors.items()
                    if k not in written or tuple(written[k].shape) != tuple(v.shape) or v.numel() == 0]
        problems += [f"unexpected {k}" for k in sorted(set(written) - set(tensors))]
    if not tensors:
        problems.append("the adapter holds no tensor at all")
    if problems:
        raise AdapterSaveError(explain(f"save check failed: {len(problems)} problem(s): {'; '.join(problems[:10])}",
                                       where=str(path), fix="the previous adapter folder was kept; check free disk "
                                       "space and the filesystem, then save again"))


# ---- merge that changes outputs -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MergeCheck:
    """max |merged - unmerged| over a probe batch, next to the bound the dtype allows."""

    max_abs_change: float
    tolerance: float
    dtype: str

    @property
    def ok(self) -> bool:
        return self.max_abs_change <= self.tolerance


# Rounding of W + s·BA to the weight dtype, accumulated over a few layers: a multiple of eps times |output|.
MERGE_TOLERANCE_ULPS = 32


def _probe_inputs(model: nn.Module, probe: object) -> object:
    if probe is None:
        probe = getattr(model, "dummy_inputs", None)  # transformers' PreTrainedModel has one
    if probe is None:
        raise ValueError(explain("merge_and_unload(check=True) needs a probe batch", where=type(model).__name__,
                                 got="a model without dummy_inputs",
                                 fix="pass probe=<a tensor, a tuple of arguments or a dict of keyword arguments>"))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    move = (lambda v: v.to(device) if isinstance(v, Tensor) else v)
    if isinstance(probe, dict):
        return {k: move(v) for k, v in probe.items()}
    return tuple(move(v) for v in probe) if isinstance(probe, (tuple, list)) else move(probe)


def _first_tensor(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise ValueError(f"merge check: the model's output ({type(output).__name__}) holds no tensor to compare")


def _run(model: nn.Module, inputs: object) -> Tensor:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            output = (model(**inputs) if isinstance(inputs, dict)
                      else model(*inputs) if isinstance(inputs, tuple) else model(inputs))
    finally:
        for module, mode in modes.items():
            module.training = mode
    return _first_tensor(output).detach()


def checked_merge(model: nn.Module, unload: Callable[[], nn.Module], probe: object = None) -> nn.Module:
    """``unload()`` (merge and unload), measuring max |y_merged - y_unmerged| on a probe batch.

    Tolerance: ``MERGE_TOLERANCE_ULPS · eps(dtype) · max(1, max|y|)``. The result is recorded as
    ``merged.lorakit_merge_check`` (a MergeCheck); a change above the tolerance (or NaN) warns.

    Raises:
        ValueError: no probe given and the model has no ``dummy_inputs`` (nothing was merged then).
    """
    inputs = _probe_inputs(model, probe)
    before = _run(model, inputs)
    merged = unload()
    after = _run(merged, inputs)
    change = (after.double() - before.double()).abs().max().item() if before.numel() else 0.0
    dtype = before.dtype if before.is_floating_point() else torch.float32
    scale = max(1.0, before.double().abs().max().item()) if before.numel() else 1.0
    check = MergeCheck(change, MERGE_TOLERANCE_ULPS * torch.finfo(dtype).eps * scale, str(dtype))
    merged.lorakit_merge_check = check
    if not check.ok:  # also catches NaN
        warn(f"merge_and_unload changed the model's outputs by up to {change:.3g} on the probe batch, above the "
             f"{check.tolerance:.3g} that {dtype} rounding explains; compare generations before using the merged "
             "model (a variant or quantized layer may not merge exactly)")
    return merged


# ---- new tokens not saved -------------------------------------------------------------------------------------
def _base_vocab_size(model: nn.Module) -> int | None:
    """vocab_size of the base model's config on disk (a local folder only: lorakit never goes online here)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    config_file = Path(name) / "config.json" if name else None
    if config_file is None or not config_file.is_file():
        return None
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = data.get("vocab_size", (data.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def embedding_layers_to_save(peft_model: nn.Module, save_embedding_layers: bool | str) -> bool | str:
    """PEFT's "auto": save the embeddings when the vocabulary was resized against the base model's config.

    Warns in that case (as PEFT does) and when ``save_embedding_layers=False`` drops the new rows.
    """
    model = peft_model.get_base_model()
    getter = getattr(model, "get_input_embeddings", None)
    weight = getattr(_unwrapped(getter()), "weight", None) if callable(getter) else None
    base = _base_vocab_size(model)
    if weight is None or base is None or weight.shape[0] == base:
        return save_embedding_layers
    if save_embedding_layers == "auto":
        warn(f"the embedding was resized ({base} -> {weight.shape[0]} rows); saving the embedding layers with the "
             "adapter (PEFT's save_embedding_layers='auto' does the same)")
        return True
    if save_embedding_layers is False:
        warn(f"the embedding was resized ({base} -> {weight.shape[0]} rows) but save_embedding_layers=False: the "
             "new tokens' embeddings are not saved and the adapter will not work on the base model. Save with "
             "save_embedding_layers=True (or 'auto')")
    return save_embedding_layers


# ---- a different base model ---------------------------------------------------------------------------------
def base_model_mismatch(model: nn.Module, config: LoraConfig) -> str | None:
    """A sentence when the adapter names another base model than ``model`` (both known), else None.

    Names are compared by their last path component, so a local copy of a hub model matches its hub id.
    """
    mine = getattr(getattr(model, "config", None), "_name_or_path", None)
    theirs = config.base_model_name_or_path
    if not mine or not theirs:
        return None
    short = (lambda name: str(name).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower())
    if short(mine) == short(theirs):
        return None
    return f"the adapter was trained on base model {theirs!r}, this model is {mine!r}"


def frozen_load_flag(peft_model: nn.Module, is_trainable: bool) -> None:
    """Arm ``check_frozen_training`` for the first training-mode forward of a frozen-loaded adapter."""
    peft_model._lorakit_frozen_load = not is_trainable


__all__ = ["GUARDS", "AdapterSaveError", "MergeCheck", "check_training", "checked_merge", "verify_saved"]
