"""LoftQ applied after the fact: PEFT's ``replace_lora_weights_loftq`` for a model on a bitsandbytes 4-bit base.

For each LoRA layer over a bnb ``Linear4bit``, with W the layer's original (unquantized) weight read lazily
from the model's safetensors file and Q the 4-bit codes (LoftQ, arXiv:2310.08659, one alternating step):

    R = W − deq(Q)                     (out, in), float32: the quantization error
    R = U Σ Vᵀ                         (thin SVD)
    lora_B = U_r √Σ_r   (out, r),      lora_A = √Σ_r V_rᵀ   (r, in)

so B A is the best rank-r approximation of the error (Eckart–Young). As in PEFT, the factors carry no 1/s: the
forward adds s·B A, which repairs W exactly as far as rank r allows when s = lora_alpha / r = 1 (peft issue
#1982; lorakit's ``init_lora_weights="loftq"`` divides by s instead, see inits.loftq). The base keeps Q.

The optional ``callback(model, module_name) -> bool`` runs after each layer is replaced and may reject it
(the old factors come back), a greedy check such as "does the loss on a sample go down".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .codec import PREFIX
from .errors import explain
from .inits import split_svd
from .layer import named_lora_layers
from .quant import dense_weight

if TYPE_CHECKING:
    from .model import PeftModel

SAFETENSORS = "model.safetensors"


class SafetensorWeights:
    """Tensors read one at a time from a model's ``model.safetensors`` or its shards (``*.index.json``).

    Names are tried as given, then without the model's ``base_model_prefix`` (checkpoints saved from the inner
    model lack it).
    """

    def __init__(self, model_path: str | os.PathLike[str], base_model_prefix: str | None) -> None:
        path = str(model_path)
        if not path.endswith(SAFETENSORS):
            path = os.path.join(path, SAFETENSORS)
        self.base_model_prefix = base_model_prefix
        self.files: dict[str, str] | None = None  # tensor name -> shard file, for a sharded checkpoint
        self.path = path
        if not os.path.exists(path):
            folder = Path(path).parent
            index = folder / f"{SAFETENSORS}.index.json"
            if not index.is_file():
                raise FileNotFoundError(f"Could not find file for {path}, ensure that there is a (sharded) safetensors "
                                        "file of the model.")
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: str(folder / shard) for name, shard in weight_map.items()}

    def get_tensor(self, name: str) -> Tensor:
        """Raises: KeyError (a SafetensorError) when neither spelling of ``name`` is in the checkpoint."""
        names = [name]
        if self.base_model_prefix and name.startswith(self.base_model_prefix + "."):
            names.append(name[len(self.base_model_prefix) + 1:])
        for candidate in names:
            path = self.path if self.files is None else self.files.get(candidate)
            if path is None:
                continue
            with safe_open(path, framework="pt", device="cpu") as handle:
                try:
                    tensor: Tensor = handle.get_tensor(candidate)  # safetensors' framework="pt" handle
                    return tensor
                except SafetensorError:
                    continue
        raise KeyError(explain(f"no tensor {name!r} in the checkpoint", where=self.path,
                               fix="pass model_path= the safetensors file the quantized model was loaded from"))


def _default_path(peft_model: PeftModel) -> str:
    """The checkpoint the base model was loaded from: a local folder, or the Hub cache (no download)."""
    name: str | None = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
    if name and os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError as error:
        raise ValueError("The provided model does not appear to be a transformers model or is a local model. In this "
                         "case, you must pass the model_path argument that points to the safetensors file.") from error
    try:
        if not name:
            raise HFValidationError("no _name_or_path")
        return snapshot_download(name, local_files_only=True)
    except HFValidationError as error:
        raise ValueError("The provided model does not appear to be a transformers model or is a local model. In this "
                         "case, you must pass the model_path argument that points to the safetensors file.") from error
    except LocalEntryNotFoundError as error:
        raise ValueError("The model.safetensors file must be present on disk, but it could not be found.") from error


def loftq_factors(W: Tensor, W_quantized: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(A (r, in), B (out, r)) with B A the best rank-r approximation of W − deq(Q) (module docstring)."""
    U, S, Vh = torch.linalg.svd(W.float() - W_quantized.float(), full_matrices=False)
    return split_svd(U, S, Vh, r, 1.0)  # no 1/s in the factors, as PEFT (module docstring)


@torch.no_grad()
def replace_lora_weights_loftq(peft_model: nn.Module, model_path: str | None = None, adapter_name: str = "default",
                               callback: Callable[[nn.Module, str], bool] | None = None) -> None:
    """Replace ``adapter_name``'s factors on every bnb 4-bit LoRA layer by LoftQ's (module docstring).

    ``model_path``: the model's ``model.safetensors`` (or its folder, sharded or not); default: the folder the
    base model was loaded from (``config._name_or_path``), or its copy in the Hub cache. Layers that do not hold
    ``adapter_name`` are left alone.

    Raises:
        ValueError: bitsandbytes missing, no bnb 4-bit LoRA layer ("No bnb LoRA module found on the model"), or no
            checkpoint to read (PEFT's sentences).
        TypeError: ``peft_model`` is not a PeftModel (its layers are not under ``base_model.model.``).
        FileNotFoundError / KeyError: the checkpoint lacks the file or a layer's weight.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ValueError("bitsandbytes must be installed and the model must be quantized in 4bits.") from error
    linear4bit = bnb.nn.Linear4bit  # type: ignore[attr-defined]  # bnb.nn re-exports it implicitly
    layers = [(name, layer) for name, layer in named_lora_layers(peft_model) if isinstance(layer.base_layer, linear4bit)]
    if not layers:
        raise ValueError("No bnb LoRA module found on the model")
    if any(not name.startswith(PREFIX) for name, _ in layers):
        raise TypeError("The passed model does not appear to be a valid PeftModel")
    checked = cast("PeftModel", peft_model)  # its LoRA layers are under base_model.model.
    weights = SafetensorWeights(model_path if model_path is not None else _default_path(checked),
                                getattr(checked.get_base_model(), "base_model_prefix", None))
    for name, layer in layers:
        if adapter_name not in layer.r:
            continue
        name = name[len(PREFIX):]
        W = weights.get_tensor(name + ".weight")
        A, B = loftq_factors(W, dense_weight(layer.base_layer), layer.r[adapter_name])
        A_weight, B_weight = (cast(Tensor, factor[adapter_name].weight) for factor in (layer.lora_A, layer.lora_B))
        before = (A_weight.clone(), B_weight.clone()) if callback is not None else None
        A_weight.copy_(A)
        B_weight.copy_(B)
        if callback is not None and before is not None and not callback(peft_model, name):
            A_weight.copy_(before[0])  # rejected: roll back
            B_weight.copy_(before[1])
