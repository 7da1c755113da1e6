"""Registry of quantized base-layer backends: how to read a quantized W as float32 and write one back.

QLoRA (arXiv:2305.14314) trains LoRA over a frozen quantized base: ``LoraLayer.forward`` calls the quantized
layer itself, y = base_q(x) + s·B A x, so the forward never needs W. Only the spots that need the dense
weight (merge / unmerge, DoRA's row norm, the residual inits PiSSA / OLoRA / LoftQ / CorDA) read it, and
they do so through ``dense_weight`` / ``write_weight`` here:

    dense_weight(m)    = deq(Q)                   (out, in) float32
    write_weight(m, W) : Q ← quantize(W)          m keeps its format (quant type, block size, double quant)

A backend is two functions; nothing else of lorakit changes per backend (no LoRA class per backend).
Registering a backend also registers a ``Kind`` for its class (kinds.py, keyed by "module.QualName" so that
bitsandbytes is never imported just to look a type up) and DoRA's per-kind entry (variants/dora.py). Because
``find_kind`` walks the MRO, the quantized Kind is found before nn.Linear, which bnb's layers subclass.

Requantization rounds: after ``write_weight`` the layer holds deq(quantize(W)) ≠ W. The change of the
layer's outputs that rounding caused is measured on fixed probe inputs X (64 rows, N(0, 1), seed 0):

    rounding = max |X (deq(quantize(W)) − W)ᵀ|           (a number in output units)

``merge_adapter`` / ``merge_and_unload`` warn with the largest such number over the merged layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import warn
from .kinds import Base, DoraSupport, Kind, base_weight, register_kind

T = TypeVar("T")
PROBE_ROWS = 64  # rows of the probe input that measures a requantization's rounding


@dataclass(frozen=True)
class QuantBackend:
    """One quantized layer type.

    Attributes:
        name: the Kind name (PEFT prints ``lora.<name>``).
        dequantize: module -> deq(Q) (out, in), in any float dtype; ``dense`` detaches it and casts to float32.
        requantize: (module, W (out, in)) -> None; quantizes W into the module in place, in its own format.
        bits: bits per weight, for messages.
        stored: module -> the tensor that holds the codes, whose version keys DoRA's norm cache
            (``module.weight`` but for HQQ's ``W_q``).
        keeps_dtype: the quantized weight remembers the model's float dtype (torchao), which a dequantized
            layer returns to; False: the dequantized layer is float32 (bitsandbytes, as PEFT).
    """

    name: str
    dequantize: Callable[[Base], Tensor]
    requantize: Callable[[Base, Tensor], None]
    bits: int
    keeps_dtype: bool = False
    stored: Callable[[Base], Tensor] = lambda m: m.weight

    def dense(self, module: Base) -> Tensor:
        """deq(Q) of ``module``: (out, in) float32, detached."""
        return self.dequantize(module).detach().float()


QUANT_BACKENDS: dict[str, QuantBackend] = {}  # "module.QualName" of the layer class -> backend
WEIGHT_BACKENDS: dict[str, QuantBackend] = {}  # "module.QualName" of a quantized weight tensor class -> backend


def register_quant_backend(qualified_name: str, backend: QuantBackend) -> None:
    """Register ``backend`` for the class named ``qualified_name``, with its Kind and DoRA entry."""
    QUANT_BACKENDS[qualified_name] = backend
    register_kind(qualified_name, _quantized_linear_kind(backend))


def _quantized_linear_kind(backend: QuantBackend) -> Kind:
    """A linear Kind whose W is read and written through ``backend``; "all-linear" selects it (as PEFT does), DoRA
    runs on it."""
    return Kind(
        name=backend.name,
        features=lambda m: (m.in_features, m.out_features),
        make_factors=lambda m, r, bias: (nn.Linear(m.in_features, r, bias=False),
                                         nn.Linear(r, m.out_features, bias=bias)),
        branch=lambda base, x, A, B: B(A(x)),
        delta_weight=lambda m, A, B: B @ A,  # (out, in)
        matrix=dense_weight,  # by module, so a base swapped for nn.Linear (dequantize=True) still reads
        set_matrix=write_weight,
        weight=lambda m: backend.stored(m) if find_backend(m) is not None else m.weight,  # dequantize=True: nn.Linear
        linear_like=True,
        dora=DoraSupport(out_dim=0, weight_only=_dequantized_weight_only),
    )


def register_weight_backend(qualified_name: str, backend: QuantBackend) -> None:
    """Register ``backend`` for layers of a dense class (nn.Linear) whose ``weight`` is a quantized tensor
    subclass named ``qualified_name`` (torchao): the layer keeps its Kind, only W's reading and writing change."""
    WEIGHT_BACKENDS[qualified_name] = backend
    register_kind(qualified_name, _quantized_linear_kind(backend), by_weight=True)


def _nearest(table: dict[str, QuantBackend], cls: type) -> QuantBackend | None:
    for klass in cls.__mro__:
        backend = table.get(f"{klass.__module__}.{klass.__qualname__}")
        if backend is not None:
            return backend
    return None


def find_backend(module: nn.Module) -> QuantBackend | None:
    """The backend of ``module``'s class (or nearest registered base class), else of its weight's tensor
    class; None for dense layers."""
    backend = _nearest(QUANT_BACKENDS, type(module))
    if backend is None and WEIGHT_BACKENDS:
        weight = module._parameters.get("weight")  # the layer's own weight, never one a LoRA wrapper shows
        backend = _nearest(WEIGHT_BACKENDS, type(weight)) if weight is not None else None
    return backend


def is_quantized(module: nn.Module) -> bool:
    return find_backend(module) is not None


def dense_weight(module: nn.Module, kind: Kind | None = None) -> Tensor:
    """W in the module's own layout as float32, detached: deq(Q) for a quantized layer, a copy-free cast else.

    ``kind``: the LoRA layer's own Kind, which says which tensor W is (a ParamWrapper's parameter); None: the
    Kind registered for the module's type.
    """
    backend = find_backend(module)
    if backend is not None:
        return backend.dense(module)
    return (base_weight(module) if kind is None else kind.weight(module)).detach().float()


def write_weight(module: nn.Module, W: Tensor, kind: Kind | None = None) -> float | None:
    """Write W (the module's own layout) into ``module``; for a quantized layer return the rounding it caused.

    Dense layers: W is cast once to the weight's dtype, in place. Quantized layers: Q ← quantize(W), and the
    result is max |X (deq(Q) − W)ᵀ| over the probe inputs X (module docstring).
    """
    backend = find_backend(module)
    if backend is None:
        weight = base_weight(module) if kind is None else kind.weight(module)  # module.weight, in_proj_weight, ...
        with torch.no_grad():
            weight.copy_(W.to(weight.dtype))
        return None
    with torch.no_grad():
        target = W.detach().float()
        backend.requantize(module, target)
        dequantized = backend.dense(module)
        error = dequantized - target.to(dequantized.device)  # (out, in)
        probe = torch.randn(PROBE_ROWS, error.shape[1], generator=torch.Generator().manual_seed(0))
        return (probe.to(error.device) @ error.T).abs().max().item()


def _high_precision_dtype(module: Base) -> torch.dtype:
    """The float dtype a quantized tensor-subclass weight stands for (its ``dtype``), float32 otherwise."""
    dtype = getattr(module, "weight").dtype
    return dtype if dtype.is_floating_point else torch.float32


def _dequantized_weight_only(base: Base, x: Tensor) -> Tensor:
    """DoRA's base term on dropped-out input, W x without bias, with W dequantized (as PEFT does)."""
    return F.linear(x, dense_weight(base).to(x.dtype))


# ---- the rounding warning and full-precision unloading ---------------------------------------------------------
def merge_reporting_rounding(layers: Iterable[Any], merge: Callable[[], T]) -> T:  # layers: LoraLayers
    """Run ``merge()``; then warn once with the largest rounding (``LoraLayer.rounding_error``) it caused.

    A plain function rather than a context manager, so that the warning points at the user's line.
    """
    layers = [layer for layer in layers if is_quantized(layer.base_layer)]
    for layer in layers:
        layer.rounding_error = None
    result = merge()
    errors = [(layer.rounding_error, layer) for layer in layers if layer.rounding_error is not None]
    if errors:
        worst, layer = max(errors, key=lambda pair: pair[0])
        warn(f"merged into {len(errors)} quantized layer(s) ({layer.kind.name}): requantizing the merged weights "
             f"rounds them; the largest change of a layer's outputs on N(0, 1) probe inputs is {worst:.4g} "
             "(max-abs). Use merge_and_unload(dequantize=True) for an exact full-precision merge.")
    return result


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer of ``model`` with an nn.Linear holding deq(Q) in float32, in place.

    A transformers model also drops its quantization config (as its own ``dequantize`` does), so that
    ``save_pretrained`` writes a plain full-precision checkpoint.
    """
    for path, module in list(model.named_modules()):
        backend = find_backend(module)
        if backend is None:
            continue
        W = backend.dense(module)  # (out, in)
        bias = getattr(module, "bias", None)
        linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=W.device)
        with torch.no_grad():
            linear.weight.copy_(W)
            if bias is not None:
                linear.bias.copy_(bias.detach().float())
        if backend.keeps_dtype:  # a dense layer with a quantized weight (torchao): back to the model's dtype
            linear.to(_high_precision_dtype(module))
        linear.requires_grad_(False)
        model.set_submodule(path, linear)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return model


# ---- bitsandbytes ----------------------------------------------------------------------------------------------
def _bnb4_dequantize(module: Base) -> Tensor:
    """deq(Q) of a bnb Linear4bit: blockwise NF4 / FP4 codes times their (double-quantized) absmax."""
    import bitsandbytes.functional as bnb_functional

    data, state = _bnb4_unpacked(module)
    return bnb_functional.dequantize_4bit(data, state)


def _bnb4_unpacked(module: Base) -> tuple[Tensor, Any]:  # (codes, bnb QuantState)
    """(codes, quant state) in bnb's canonical layout. In eval mode without grad, bnb's CPU forward repacks the
    weight for its AVX512-BF16 kernel (absmax rounded to bf16); undo that on copies, leaving the module as is."""
    import copy

    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = module.weight
    if not getattr(weight.quant_state, "packing_format_for_cpu", False):
        return weight.data, weight.quant_state
    return _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(weight.quant_state))


def _bnb4_requantize(module: Base, W: Tensor) -> None:
    """Q ← quantize_4bit(W) with the module's quant type, block size, double quant and storage dtype."""
    import bitsandbytes as bnb

    old = module.weight
    state = _bnb4_unpacked(module)[1]
    module.weight = bnb.nn.Params4bit(  # type: ignore[attr-defined,misc]  # bnb: no __all__; its .to stub clashes
        W.to(device="cpu", dtype=state.dtype), requires_grad=False, quant_type=state.quant_type,
        blocksize=state.blocksize, compress_statistics=state.nested, quant_storage=old.quant_storage,
        module=module,
    ).to(old.device)
    module.quant_state = module.weight.quant_state


def _bnb8_dequantize(module: Base) -> Tensor:
    """deq(Q) of a bnb Linear8bitLt: W = CB · SCB_row / 127 (LLM.int8() row-wise absmax, arXiv:2208.07339).

    CB (out, in) int8 is the weight's data; SCB (out,) is on the weight until the first forward, on
    ``module.state`` after.
    """
    weight = module.weight
    SCB = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    W: Tensor = weight.data.float() * SCB.float()[:, None] / 127
    return W


def _bnb8_requantize(module: Base, W: Tensor) -> None:
    """CB, SCB ← int8_vectorwise_quant(W) in place; the module re-reads them at its next forward."""
    import bitsandbytes.functional as bnb_functional

    CB, SCB, _ = bnb_functional.int8_vectorwise_quant(W.to(module.weight.device, torch.float16))
    module.weight.data = CB
    module.weight.CB, module.weight.SCB = CB, SCB
    module.state.CB = module.state.SCB = None  # init_8bit_state moves the new codes over at the next forward


register_quant_backend("bitsandbytes.nn.modules.Linear4bit",
                       QuantBackend("Linear4bit", _bnb4_dequantize, _bnb4_requantize, bits=4))
register_quant_backend("bitsandbytes.nn.modules.Linear8bitLt",
                       QuantBackend("Linear8bitLt", _bnb8_dequantize, _bnb8_requantize, bits=8))

