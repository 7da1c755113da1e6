"""Compact inverted-dropout masks for the fused LoRA path (ops.py).

Inverted dropout keeps each element with probability 1 − p and scales it by 1/(1 − p):

    dropout(x) = x ⊙ m / (1 − p),   m_ij ~ Bernoulli(1 − p), independent per element and per call

``torch.nn.Dropout`` draws m with ``bernoulli_`` into a float tensor; on CPU that one call costs as much as
a 1024x512 by 512x512 matmul, does not speed up with threads, and autograd then keeps two float tensors
(the noise and the dropped copy, 8 bytes per element). Here m is drawn by thresholding uniform 16-bit
integers:

    w_ij uniform on {−2¹⁵, ..., 2¹⁵ − 1}  (four per 64-bit word of ``random_()``, full range)
    m_ij = [w_ij ≥ −2¹⁵ + round(p·2¹⁶)]    →   P(m_ij = 1) = 1 − round(p·2¹⁶)/2¹⁶

so the keep probability is 1 − p rounded to a multiple of 2⁻¹⁶ (within 2⁻¹⁷ of 1 − p: 0.05 becomes
0.0500031), every element independent, the scale 1/(1 − p) exact (it is folded into a matmul's alpha by
the caller, never multiplied into the mask). The mask is a bool tensor, 1 byte per element, kept for
backward instead of being regenerated from a seed: regenerating costs a second draw, which is the very
cost this file removes, while 1 byte per element is 1/8 of what nn.Dropout keeps.

The words come from torch's generator for the tensor's device, so ``torch.manual_seed`` reproduces the
masks, and gradient checkpointing (which saves and restores that generator's state around the recompute)
redraws the same mask. Masks are not bit-identical to ``nn.Dropout``'s (a different draw of the same law).

torch.compile: ``random_`` is an in-place random op that TorchDynamo cannot trace (a graph break per
call), so traced code draws through ``torch.ops.lorakit.keep_mask``, a custom op (``torch.library``) that
runs the same ``keep_mask`` when the graph runs: the same words from the same generator, so a compiled
model draws exactly the masks eager mode draws from the same seed. The op fills a fresh ``torch.empty``
bool tensor in place rather than returning one: AOTAutograd's common-subexpression pass merges calls of a
functional op with equal arguments (q, k and v read one x and would share one mask), while each
``empty`` is its own node, so every call stays a separate draw. It is tagged ``nondeterministic_seeded``
so the partitioner never recomputes a draw in backward (which would draw a different mask).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

WORD_BITS = 16  # resolution of p: multiples of 2^-16


def keep_threshold(p: float) -> int:
    """The int16 threshold t with P(w ≥ t) = 1 − round(p·2¹⁶)/2¹⁶ for w uniform on int16."""
    return -(1 << (WORD_BITS - 1)) + round(p * (1 << WORD_BITS))


def keep_probability(p: float) -> float:
    """The exact keep probability of ``keep_mask(..., p)``: 1 − round(p·2¹⁶)/2¹⁶."""
    return 1.0 - round(p * (1 << WORD_BITS)) / (1 << WORD_BITS)


def _draws(shape: torch.Size | tuple[int, ...], device: torch.device | None,
           generator: torch.Generator | None) -> Tensor:
    """w (int16, ``shape``) uniform on int16: four draws per 64-bit word of ``random_``."""
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None, generator=generator)  # 64 uniform bits per word: four int16 draws
    return words.view(torch.int16)[:numel].view(shape)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | None = None,
              generator: torch.Generator | None = None) -> Tensor:
    """m (bool, ``shape``): True with probability 1 − p (module docstring), independent per element."""
    return _draws(shape, device, generator) >= keep_threshold(p)


@torch.library.custom_op("lorakit::keep_mask_", mutates_args=("mask",), tags=(torch.Tag.nondeterministic_seeded,))
def _keep_mask_op(mask: Tensor, p: float) -> None:
    torch.ge(_draws(mask.shape, mask.device, None), keep_threshold(p), out=mask)  # keep_mask's draw, into mask


def traced_keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """``keep_mask(shape, p, device)`` as one opaque node of a torch.compile graph (module docstring)."""
    mask = torch.empty(shape, dtype=torch.bool, device=device)
    torch.ops.lorakit.keep_mask_(mask, p)
    return mask
