"""QLoRA model preparation: quantize a loaded model's linears to 4 bits, and ready a k-bit model for training.

``quantize_model`` turns each nn.Linear of an already loaded fp32/bf16 model into a bitsandbytes
``Linear4bit`` in place (QLoRA, arXiv:2305.14314: NF4 codes in blocks of 64, double-quantized absmax),
for users who start from a plain checkpoint rather than ``from_pretrained(quantization_config=...)``:

    W (out, in) float  ->  codes (out·in/2,) uint8 + absmax per 64 values (8-bit, fp32 per 256 with double quant)
    footprint ≈ out·in·(1/2 + 1/64 + 4/16384) bytes instead of 4·out·in (fp32)

``prepare_model_for_kbit_training`` has PEFT's meaning: freeze every parameter, upcast fp16/bf16
parameters that are not 4-bit codes (norms, embeddings, heads) to fp32, and for a k-bit model with
``use_gradient_checkpointing`` make the input embeddings' output require grad and turn checkpointing on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import explain
from .quant import is_quantized
from .targeting import _output_head_names

HALF_DTYPES = (torch.float16, torch.bfloat16)
# (method, its keyword for gradient_checkpointing_kwargs), the first the model has wins: transformers 5's name
# first (no FutureWarning), then the older one
CHECKPOINTING_METHODS = (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                         ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs"))


def is_kbit(model: nn.Module) -> bool:
    """True for a model loaded in 4/8 bits by transformers or holding a quantized layer lorakit knows."""
    flags = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    return bool(flags) or any(is_quantized(module) for module in model.modules())


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Freeze ``model``, upcast its half-precision non-quantized parameters to fp32, enable checkpointing.

    As PEFT 0.21.2: parameters are frozen and upcast for any model; only a k-bit model (``is_kbit``) with
    ``use_gradient_checkpointing`` gets input grads and ``gradient_checkpointing_enable(
    gradient_checkpointing_kwargs=...)``. Returns the same model object.

    Raises:
        ValueError: checkpointing was asked for a model without ``gradient_checkpointing_enable``.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in HALF_DTYPES and param.__class__.__name__ != "Params4bit":
            param.data = param.data.float()
    if not (use_gradient_checkpointing and is_kbit(model)):
        return model
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for method, keyword in CHECKPOINTING_METHODS:
        enable = getattr(model, method, None)
        if callable(enable):
            _enable_input_grads(model)  # a frozen embedding would cut the graph that checkpointed blocks re-run
            enable(**{keyword: kwargs})
            return model
    raise ValueError(explain("use_gradient_checkpointing=True but the model cannot checkpoint",
                             where=type(model).__name__, expected="a transformers PreTrainedModel",
                             fix="pass use_gradient_checkpointing=False"))


def _enable_input_grads(model: nn.Module) -> None:
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
        return
    embeddings: nn.Module = getattr(model, "get_input_embeddings")()
    embeddings.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))


def quantize_model(model: nn.Module, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                   double_quant: bool = True, skip: Iterable[str] = ("lm_head",), blocksize: int = 64) -> nn.Module:
    """Replace every nn.Linear of ``model`` by a bitsandbytes Linear4bit in place and return ``model``.

    Args:
        quant_type: "nf4" (QLoRA's NormalFloat) or "fp4". compute_dtype: the dtype of the matmul (bf16 on GPUs
            and on CPUs with AMX / AVX512-BF16, where it measured faster than fp32; fp32 on other CPUs, where
            bf16 is emulated). double_quant: quantize the absmax too.
        skip: module names (a path or its last segment) left in full precision; the output embedding is
            always skipped, as transformers' 4-bit load does, and so are LoRA factors (``lora_*``) when
            ``model`` already holds adapters (LoftQ on the full-precision model, then quantize its base).

    bnb's CPU forward in eval mode repacks the weight for its AVX512-BF16 kernel, rounding absmax to bf16 (and
    it fails for layers with fewer than 64 inputs); the layers made here keep the fp32 path so that eval
    outputs equal training outputs.

    Raises:
        ImportError: bitsandbytes is not installed (``pip install lorakit[qlora]``).
        ValueError: quant_type is not "nf4" or "fp4".
    """
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(explain("invalid quant_type", got=quant_type, expected="'nf4' or 'fp4'"))
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError("quantize_model needs bitsandbytes; install it with `pip install lorakit[qlora]` "
                          "(bitsandbytes==0.50.2)") from error
    skip = set(skip) | _output_head_names(model)
    for path, module in list(model.named_modules()):
        names = path.split(".")
        if type(module) is not nn.Linear or path in skip or names[-1] in skip:
            continue
        if any(name.startswith("lora_") for name in names):  # LoRA factors of an adapted model stay trainable
            continue
        model.set_submodule(path, _linear4bit(bnb, module, quant_type, compute_dtype, double_quant, blocksize))
    setattr(model, "is_loaded_in_4bit", True)  # what transformers' 4-bit load sets and PEFT / is_kbit read
    return model


def _linear4bit(bnb: Any, linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype, double_quant: bool,
                blocksize: int) -> nn.Module:
    """Linear4bit holding quantize(W) of ``linear`` (its bias kept as is, frozen), on the same device."""
    device = linear.weight.device
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                              device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False, quant_type=quant_type,
                                     blocksize=blocksize, compress_statistics=double_quant, module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    layer.support_avx512bf16_for_cpu = False
    placed: nn.Module = layer.to(device)
    return placed
