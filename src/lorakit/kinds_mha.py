"""LoRA on ``nn.MultiheadAttention``: the packed q/k/v projection and the output projection.

For embedding size E, the attention's input projection is one packed matrix and its output projection a Linear:

    W_in = [W_q; W_k; W_v]  (3E, E)      q, k, v = split₃(x W_inᵀ + b_in)
    W_in'  = W_in  + Σ_a s_a · B_a A_a        A_a (r, E)    B_a (3E, r)      this layer's lora_A / lora_B
    W_out' = W_out + Σ_a s_a · B'_a A'_a      A'_a (r, E)   B'_a (E, r)      a nested lora.Linear on out_proj
    y, attention = MultiheadAttention(query, key, value; W_in', b_in, W_out', b_out)

``nn.MultiheadAttention.forward`` hands its raw tensors to ``F.multi_head_attention_forward`` and never calls
``out_proj.forward``, so there is no input to add a branch to: the update has to be in the weights. The
forward runs the base module with W_in' and W_out' standing in for its two parameters for the length of the
call (``weights_replaced``); both are differentiable in A and B (and in W where W trains), and the
parameters themselves are never written, so a forward leaves them bit for bit unchanged.

Module layout, state-dict keys and behaviour follow PEFT 0.21.2's ``lora.MultiheadAttention``: the wrapper
holds ``lora_A`` / ``lora_B`` for W_in and the MultiheadAttention as ``base_layer``, whose ``out_proj`` is a
LoRA layer of its own (``<path>.base_layer.out_proj.lora_A.<adapter>.weight``) that follows the wrapper's
adapter calls. Only ``_qkv_same_embed_dim=True`` (kdim = vdim = E) is supported; lora_dropout has no effect
(there is no branch input to drop out), DoRA and mixed-adapter batches are refused, as in PEFT.

One deliberate difference: PEFT 0.21.2 adds out_proj's update twice (W_out + 2·s·B'A', in its forward
and its merge; huggingface/peft#3774) while its gradients follow W_out + s·B'A'. lorakit applies it once,
the formula above, so a PEFT-trained adapter's out_proj update acts at half the strength it had in PEFT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .errors import explain
from .kinds import Kind, _linear_branch, _linear_factors, register_kind

if TYPE_CHECKING:
    from .layer import LoraLayer

# Attributes of the wrapped MultiheadAttention the wrapper shows as its own, as PEFT's wrapper does: code around
# an attention layer reads them (nn.TransformerEncoderLayer checks batch_first, in_proj_weight, ...).
MHA_ATTRIBUTES = ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                  "head_dim", "in_proj_weight", "in_proj_bias", "out_proj", "bias_k", "bias_v", "add_zero_attn",
                  "merge_masks")


def _mha_factors(m: nn.MultiheadAttention, r: int, lora_bias: bool) -> tuple[nn.Module, nn.Module]:
    """A: Linear(E, r), B: Linear(r, 3E), after checking the layer is one lorakit can adapt.

    Raises:
        ValueError: separate q/k/v weights (kdim or vdim differs from embed_dim).
        TypeError: out_proj is not an nn.Linear (nor already a LoRA layer over one).
    """
    if not m._qkv_same_embed_dim:
        raise ValueError(
            "Only same embed for query/key/value is supported as of now for MultiheadAttention. "
            + explain("cannot adapt this nn.MultiheadAttention", got=f"kdim={m.kdim}, vdim={m.vdim}",
                      expected=f"kdim = vdim = embed_dim = {m.embed_dim} (one packed in_proj_weight)",
                      fix="exclude this module, or target the layers that compute its key and value inputs")
        )
    out_proj = getattr(m.out_proj, "base_layer", m.out_proj)
    if not isinstance(out_proj, nn.Linear):
        raise TypeError(
            "out_proj must be an instance of nn.Linear for MultiheadAttention. "
            + explain("cannot adapt this nn.MultiheadAttention", got=type(out_proj).__name__,
                      expected="an nn.Linear out_proj", fix="exclude this module")
        )
    return _linear_factors(m.embed_dim, 3 * m.embed_dim, r, lora_bias)


def _set_in_proj(m: nn.MultiheadAttention, M: Tensor) -> None:
    m.in_proj_weight.copy_(M)


def added_adapters(layer: LoraLayer) -> list[str]:
    """The adapters whose update a weight-level forward adds: the active ones ``layer`` holds, and none when
    merged ones are already in W (a merged layer runs its base alone, as ``LoraLayer.forward`` does)."""
    return [] if layer.merged_adapters else [name for name in layer._active_adapter if name in layer.scaling]


def effective_weight(layer: LoraLayer) -> Tensor | None:
    """W + Σ_active s·ΔW of ``layer``'s base weight, differentiable in the factors; None: W as it is (no adapter
    adds anything, ``added_adapters``)."""
    names = added_adapters(layer)
    if not names:
        return None
    W = layer.kind.weight(layer.base_layer)
    for name in names:
        W = W + layer.get_delta_weight(name).to(W.dtype)
    return W


@contextlib.contextmanager
def weights_replaced(replacements: list[tuple[nn.Module, str, Tensor]]) -> Iterator[None]:
    """Inside the block, ``module.<name>`` reads the given tensor; the original object is put back after.

    The tensor goes where attribute lookup finds the original: the instance dict when the name is there (FSDP
    with ``use_orig_params`` sets parameters as plain tensor attributes during its forward, which
    ``torch.func.functional_call`` would skip silently), else ``_parameters``.
    """
    saved: list[tuple[dict[str, Any], str, object]] = []
    try:
        for module, name, value in replacements:
            store: dict[str, Any] = module.__dict__ if name in module.__dict__ else module._parameters
            saved.append((store, name, store[name]))
            store[name] = value
        yield
    finally:
        for store, name, original in reversed(saved):
            store[name] = original


def _mha_forward(layer: LoraLayer, query: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[Tensor, Tensor | None]:
    """MultiheadAttention(query, key, value; W_in', b_in, W_out', b_out) (module docstring).

    Raises:
        TypeError: a mixed-adapter batch (``adapter_names``): one merged weight cannot differ per row.
    """
    if layer._routes is not None:
        raise TypeError(
            "lora.MultiheadAttention does not support mixed adapter batches. "
            + explain("adapter_names cannot route rows", where="an nn.MultiheadAttention target",
                      fix="its update is applied to the weights, one per call: run each adapter's rows in its "
                          "own call (set_adapter), or exclude this module")
        )
    base = layer.base_layer
    out_proj = base.out_proj  # a LoraLayer once an adapter is added; the base's forward never calls it
    if layer._disable_adapters:
        layer.unmerge()  # unmerges out_proj too (a companion)
        result = base(query, *args, **kwargs)
    else:
        replacements = []
        W_in = effective_weight(layer)
        if W_in is not None:
            replacements.append((base, "in_proj_weight", W_in))
        if isinstance(out_proj, type(layer)):  # a LoRA layer: it follows this layer's set_adapter / merge (layer.py)
            W_out = effective_weight(out_proj)
            if W_out is not None:
                replacements.append((out_proj.base_layer, "weight", W_out))
        with weights_replaced(replacements):
            result = base(query, *args, **kwargs)
    output, attention = result
    dtype = query.dtype  # PEFT casts both back to the query's dtype
    return output.to(dtype), attention if attention is None else attention.to(dtype)


def _out_proj(m: nn.MultiheadAttention) -> dict[str, nn.Module]:
    return {"out_proj": m.out_proj}


register_kind(
    nn.MultiheadAttention,
    Kind(
        name="MultiheadAttention",
        features=lambda m: (m.embed_dim, 3 * m.embed_dim),  # (in, out) of the packed projection, as PEFT
        make_factors=_mha_factors,
        branch=_linear_branch,  # B A x, the q/k/v update of an input x; the forward applies it through W_in'
        delta_weight=lambda m, A, B: B @ A,  # (3E, E)
        matrix=lambda m: m.in_proj_weight,
        set_matrix=_set_in_proj,
        weight=lambda m: m.in_proj_weight,
        forward=_mha_forward,
        companions=_out_proj,
        attributes=MHA_ATTRIBUTES,
        undrawn_factors=True,  # kinds._linear_factors
    ),
)
