"""Textbook LoRA formulas on plain tensors: the ground truth the tests compare lorakit against.

Shapes follow PEFT's storage: A is lora_A.weight (r, in[, *k]), B is lora_B.weight (out, r[, 1...]);
for Embedding A is lora_embedding_A (r, num_embeddings) and B is lora_embedding_B (embedding_dim, r).
No lorakit code is used here, only torch and the formulas of the LoRA paper.
"""

import math

import torch
import torch.nn.functional as F


def scaling(alpha, r, rslora=False):
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def kaiming_uniform_bound(fan_in, a=math.sqrt(5)):
    """Bound of nn.init.kaiming_uniform_(a=a): gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2))."""
    return math.sqrt(2.0 / (1.0 + a * a)) * math.sqrt(3.0 / fan_in)


def _branch_input(x, mask, p):
    return x if mask is None else dropout_input(x, mask, p)


def lora_linear(x, W, b, A, B, s, lora_b_bias=None, mask=None, p=0.0):
    """y = x W^T + b + s * ((x' A^T) B^T + b_B), x' = x or dropout(x)   (W: (out, in), A: (r, in), B: (out, r))."""
    y = x @ W.T
    if b is not None:
        y = y + b
    delta = (_branch_input(x, mask, p) @ A.T) @ B.T
    if lora_b_bias is not None:
        delta = delta + lora_b_bias
    return y + s * delta


def dropout_input(x, mask, p):
    """Inverted dropout with a given 0/1 keep-mask: x * mask / (1 - p)."""
    return x * mask / (1.0 - p)


def lora_linear_dropout(x, W, b, A, B, s, mask, p, lora_b_bias=None):
    """Dropout (given keep-mask) only on the LoRA branch input; the base path sees the clean x."""
    return lora_linear(x, W, b, A, B, s, lora_b_bias, mask=mask, p=p)


def lora_conv1d_gpt2(x, W, b, A, B, s, lora_b_bias=None, mask=None, p=0.0):
    """transformers Conv1D stores W as (in, out): base y = x W + b; the LoRA branch is as for Linear."""
    y = x @ W
    if b is not None:
        y = y + b
    delta = (_branch_input(x, mask, p) @ A.T) @ B.T
    if lora_b_bias is not None:
        delta = delta + lora_b_bias
    return y + s * delta


def lora_embedding(ids, W, A, B, s, padding_idx=None):
    """y = W[ids] + s * A^T[ids] B^T. padding_idx only stops gradients (as F.embedding), not values."""
    base = F.embedding(ids, W, padding_idx=padding_idx)
    after_a = F.embedding(ids, A.T, padding_idx=padding_idx)
    return base + s * (after_a @ B.T)


_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def lora_convNd(x, W, b, A, B, s, stride=1, padding=0, dilation=1, lora_b_bias=None, mask=None, p=0.0):
    """Base conv + s * B(A(x')): A a conv with the base kernel/stride/padding/dilation, B a 1x1(x1) conv."""
    conv = _CONV[W.dim()]
    y = conv(x, W, b, stride=stride, padding=padding, dilation=dilation)
    h = conv(_branch_input(x, mask, p), A, None, stride=stride, padding=padding, dilation=dilation)
    delta = conv(h, B, lora_b_bias)
    return y + s * delta


# ---- delta weights: W_merged = W + delta (same layout as the base weight) -------------------------------


def delta_weight_linear(A, B, s):
    """(out, in)."""
    return s * (B @ A)


def delta_weight_conv1d_gpt2(A, B, s):
    """(in, out): transposed, because Conv1D stores its weight as (in, out)."""
    return (s * (B @ A)).T


def delta_weight_embedding(A, B, s):
    """(num_embeddings, embedding_dim) = s * (B A)^T."""
    return (s * (B @ A)).T


def delta_weight_convNd(A, B, s):
    """(out, in, *k): delta[o, i, k...] = s * sum_r B[o, r] A[r, i, k...]."""
    B2 = B.reshape(B.shape[0], B.shape[1])
    return s * torch.einsum("or,r...->o...", B2, A)
