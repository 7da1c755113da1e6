"""BD-LoRA (block-diagonal LoRA for multi-LoRA tensor-parallel serving, as PEFT 0.21.2 runs it), Linear and Conv1D only. One factor
of the listed modules is block-diagonal with N blocks, so that a tensor-parallel shard needs no all-gather:
A for row-sharded layers (o_proj, down_proj), B for column-sharded ones (q/k/v, up, gate):

    A = diag(A_1, ..., A_N),  A_i (r/N, in/N)   stored compactly as [A_1; ...; A_N]  (r, in/N)
    B = diag(B_1, ..., B_N),  B_i (out/N, r/N)  stored compactly as [B_1; ...; B_N]  (out, r/N)
    y = base(x) + s·B A dropout(x),  block i of A x = A_i x_i with x = [x_1, ..., x_N] split along in

The compact weight keeps PEFT's key (``lora_A.<name>.weight``). A block-diagonal A starts as
kaiming_uniform_ (a = 0), a block-diagonal B as zeros, as in PEFT; the other factor follows the init.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..config import BdLoraConfig
from ..errors import explain
from . import Variant, VariantLayer, plain_forward, plain_merge, register_variant

if TYPE_CHECKING:
    from ..kinds import Kind
    from ..config import LoraConfig
    from ..layer import LayerSpec


class BlockDiagonalLinear(nn.Module):
    """y = diag(W_1, ..., W_N) x with ``weight`` = [W_1; ...; W_N], (out, in/N); PEFT's module of the same name."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, *, zero: bool,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if in_features % nblocks or out_features % nblocks:
            raise ValueError(explain("BD-LoRA factor does not split into blocks", got=f"in_features={in_features}, "
                                     f"out_features={out_features}, nblocks={nblocks}",
                                     expected="r and the layer's features divisible by nblocks",
                                     fix="pick r (rank_pattern) and nblocks so that they divide evenly"))
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, device=device, dtype=dtype))
        with torch.no_grad():
            if zero:
                nn.init.zeros_(self.weight)
            else:
                nn.init.kaiming_uniform_(self.weight)  # a = 0, as PEFT

    def forward(self, x: Tensor) -> Tensor:
        N = self.nblocks
        blocks = self.weight.view(N, self.out_features // N, self.in_features // N)  # (N, out/N, in/N)
        y = torch.einsum("...im,inm->...in", x.reshape(*x.shape[:-1], N, -1), blocks)  # (..., N, out/N)
        return y.flatten(-2)  # (..., out)

    def dense(self) -> Tensor:
        """diag(W_1, ..., W_N), (out, in)."""
        dense: Tensor = torch.block_diag(*self.weight.chunk(self.nblocks, dim=0))  # type: ignore[no-untyped-call]
        return dense  # (torch's block_diag is untyped)


def _bdlora_init(factor: str | None, nblocks: int, layer: VariantLayer, adapter_name: str, A: Tensor, B: Tensor,
                 s: float) -> dict[str, nn.Module] | None:
    """Replace the block-diagonal factor ("A" or "B"; None: plain LoRA) with a compact BlockDiagonalLinear.

    Raises:
        ValueError: the layer is not Linear / Conv1D, or r or its features are not divisible by nblocks.
    """
    if layer.kind.name not in ("Linear", "Conv1D"):
        raise ValueError(explain("use_bdlora is not supported", where=f"a {layer.kind.name} target",
                                 expected="Linear or Conv1D targets", fix="exclude these modules or drop use_bdlora"))
    if factor == "A":
        return {"lora_A": BlockDiagonalLinear(layer.in_features, A.shape[0], nblocks, zero=False, device=A.device,
                                                dtype=A.dtype)}
    if factor == "B":
        return {"lora_B": BlockDiagonalLinear(B.shape[1], layer.out_features, nblocks, zero=True, device=A.device,
                                                dtype=A.dtype)}
    return None


def _bdlora_dense(layer: VariantLayer, adapter_name: str) -> tuple[Tensor, Tensor]:
    A, B = layer.factors(adapter_name)
    def weight(m: Any) -> Tensor:
        return m.dense() if isinstance(m, BlockDiagonalLinear) else cast(Tensor, m.weight)

    return weight(A), weight(B)


def _bdlora_shapes(factor: str | None, nblocks: int, r: int, kind: Kind, base: nn.Module) -> dict[str, Any]:
    in_features, out_features = kind.features(base)
    if factor == "A":
        return {"lora_A": (r, in_features // nblocks)}
    return {"lora_B": (out_features, r // nblocks)} if factor == "B" else {}


def _bdlora_options(name: str, config: LoraConfig) -> tuple[Any, ...]:
    """(factor, nblocks): which factor of the module at ``name`` is block-diagonal ("A", "B" or None), and N.

    Raises:
        ValueError: the module matches both BD-LoRA lists, or none with ``match_strict``.
    """
    bd = config.use_bdlora
    assert isinstance(bd, BdLoraConfig)  # select() chose this variant; LoraConfig coerced a dict
    in_a = any(pattern in name for pattern in bd.target_modules_bd_a or [])
    in_b = any(pattern in name for pattern in bd.target_modules_bd_b or [])
    if in_a and in_b:
        raise ValueError(explain("target matches both BD-LoRA lists", where=name, got=bd,
                                 fix="make target_modules_bd_a and target_modules_bd_b select different modules"))
    if bd.match_strict and not (in_a or in_b):
        raise ValueError(explain("target matches neither BD-LoRA list", where=name, got=bd,
                                 fix="add it to target_modules_bd_a / _bd_b, or set match_strict=False"))
    return ("A" if in_a else "B" if in_b else None, bd.nblocks)


def _bdlora_bind(spec: LayerSpec) -> Variant:
    factor, nblocks = spec.variant_options
    return replace(BDLORA, init=partial(_bdlora_init, factor, nblocks),
                   shapes=partial(_bdlora_shapes, factor, nblocks, spec.r))


# forward: A and B run their own (block-diagonal) matmuls in the branch; merge: the dense factor (``dense``)
BDLORA: Variant = register_variant("bdlora", Variant(
    init=partial(_bdlora_init, None, 1), forward=plain_forward, merge=plain_merge,
    shapes=partial(_bdlora_shapes, None, 1, 0), dense=_bdlora_dense, bind=_bdlora_bind,
    select=lambda config: config.use_bdlora is not None, options=_bdlora_options))
