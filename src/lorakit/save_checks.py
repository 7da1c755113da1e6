"""Checks around ``save_pretrained``: before writing, the embeddings a resized vocabulary needs; after writing,
the file against what was meant to be in it (errors.GUARDS: new_tokens_not_saved, saved_file_incomplete).

The written-file check reads no tensor data: a safetensors file is checked by its header alone (8 bytes of
length, then JSON: names, shapes, dtypes, byte spans), which must describe exactly the file's data section.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import explain, warn
from .ties import unwrapped

if TYPE_CHECKING:
    from .model import PeftModel

Header = dict[str, dict[str, Any]]  # a safetensors header: {key: {"dtype", "shape", "data_offsets"}}


class AdapterSaveError(OSError):
    """``save_pretrained`` wrote a file that does not hold what it should; the previous folder is kept."""


# ---- a saved file that is incomplete -------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def read_safetensors_header(path: Path) -> tuple[Header, int]:
    """(header without ``__metadata__``, end of the data section) from the first bytes of a safetensors file.

    Raises:
        AdapterSaveError: the file is shorter than its header says, or the header is not JSON.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > size - 8:
            raise AdapterSaveError(explain("written safetensors header is cut off", where=str(path),
                                           got=f"{size} bytes"))
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise AdapterSaveError(f"written safetensors header of {path} is not JSON ({error})") from None
    header.pop("__metadata__", None)
    return header, size - 8 - length


def _header_problems(header: Header, data_size: int, tensors: dict[str, Tensor]) -> list[str]:
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


def embedding_layers_to_save(peft_model: PeftModel, save_embedding_layers: bool | str) -> bool | str:
    """PEFT's "auto": save the embeddings when the vocabulary was resized against the base model's config.

    Warns in that case (as PEFT does) and when ``save_embedding_layers=False`` drops the new rows.
    """
    model = peft_model.get_base_model()
    getter = getattr(model, "get_input_embeddings", None)
    weight = getattr(unwrapped(getter()), "weight", None) if callable(getter) else None
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
