"""Pure-torch 4-bit NormalFloat (NF4) and 8-bit row-wise quantisation, as bitsandbytes does them.

LoftQ (inits.py) alternates quantisation and a low-rank fit; it only needs the round trip W -> Q(W) ->
deq(Q(W)), so these functions are the reference math, with no packing and no kernels.

NF4 (QLoRA, arXiv:2305.14314, section 3): W is flattened row-major into blocks of ``block_size`` (64)
values; each block b has the scale c_b = max |w| over the block, and every value is stored as the index of
the nearest of the 16 NF4 levels q_j to w / c_b:

    code(w) = argmin_j |w / c_b − q_j|,     deq(code) = q_code · c_b.

Int8 (LLM.int8(), arXiv:2208.07339; bitsandbytes' ``int8_vectorwise_quant``): per row i of W (out, in),
c_i = max_j |W_ij|, code = round(127 · W_ij / c_i), deq = code · c_i / 127.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The 16 NF4 levels of QLoRA, exactly as bitsandbytes stores them (float32): quantiles of N(0, 1) scaled to
# [-1, 1], with an exact 0 and 8 positive / 7 negative levels.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip
NF4_BLOCK_SIZE = 64  # bitsandbytes' default blocksize for Params4bit


def quantize_nf4(W: Tensor, block_size: int = NF4_BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """W (any shape) -> (codes, absmax): codes (numel,) uint8 in [0, 16), absmax (ceil(numel / block_size),).

    The last block may be short; it is padded with zeros, which never change a block's absmax.
    """
    flat = W.detach().float().flatten()
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
    absmax = padded.abs().amax(dim=1)  # (blocks,)
    normalized = padded / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]
    levels = NF4_LEVELS.to(W.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # nearest level = number of midpoints below the value
    codes = torch.bucketize(normalized, midpoints).to(torch.uint8)
    return codes.flatten()[: flat.numel()], absmax


def dequantize_nf4(codes: Tensor, absmax: Tensor, shape: torch.Size | tuple[int, ...],
                   block_size: int = NF4_BLOCK_SIZE) -> Tensor:
    """(codes, absmax) -> float32 tensor of ``shape``: q_code · c_block."""
    values = NF4_LEVELS.to(codes.device)[codes.long()]  # (numel,)
    scales = absmax.repeat_interleave(block_size)[: values.numel()]
    return (values * scales).view(shape)


def quantize_int8_rows(W: Tensor) -> tuple[Tensor, Tensor]:
    """W (out, in) -> (codes (out, in) int8, absmax (out,)): code = round(127 · W / max_row |W|)."""
    W = W.detach().float()
    absmax = W.abs().amax(dim=1)
    codes = torch.round(W * 127 / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
    return codes.to(torch.int8), absmax


def dequantize_int8_rows(codes: Tensor, absmax: Tensor) -> Tensor:
    """(codes, absmax) -> float32 (out, in): code · c_row / 127."""
    return codes.float() * absmax[:, None] / 127


def fake_quantize(W: Tensor, bits: int) -> Tensor:
    """deq(Q(W)) in float32 for an (out, in) matrix: NF4 blockwise for 4 bits, int8 row-wise for 8.

    Raises:
        ValueError: ``bits`` is not 4 or 8 (the formats PEFT's LoftQ supports).
    """
    if bits == 4:
        return dequantize_nf4(*quantize_nf4(W), W.shape)
    if bits == 8:
        return dequantize_int8_rows(*quantize_int8_rows(W))
    raise ValueError(f"invalid loftq_bits in LoftQConfig: got {bits!r}; expected 4 (NF4) or 8 (int8)")
