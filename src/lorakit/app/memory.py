"""Memory of one LoRA training step, estimated from a model built on the meta device (no weights).

    total = base weights + adapter weights + gradients + optimizer state + activations + runtime

N is the number of base parameters, N_q of them in the Linear layers a 4-bit load quantizes, P the trainable
parameters (LoRA factors and modules_to_save copies), T = batch · seq the tokens of a batch, a the bytes of
the compute dtype (4 for fp32; 2 for bf16 and for 4-bit bases, which compute in bf16 as QLoRA does):

    base weights     fp32: 4N   bf16: 2N   4bit: N_q·(1/2 + 1/64 + 4/16384) + 2·(N − N_q)
    adapter weights  4P          adapters stay fp32 over a half or 4-bit base (PEFT's autocast_adapter_dtype)
    gradients        4P          only trainable tensors get a .grad
    optimizer state  8P          AdamW keeps exp_avg and exp_avg_sq, fp32
    activations      T · bytes per token, + ALLOCATOR_SLACK × all but the loss  (see ``activation_terms``)
    runtime          RUNTIME_MIB, a measured constant: libraries and the tokenizer loaded with the model

NF4 (QLoRA, arXiv:2305.14314) stores 4 bits per weight, one 8-bit absmax per block of 64 weights and, with
double quantization, one fp32 constant per 256 absmax values: 1/2 + 1/64 + 4/(64·256) bytes per weight.
Embeddings, norms, biases and the output head are not quantized; they are held in bf16.

Activations are counted tensor by tensor: what autograd saves for backward in one block, times the blocks,
plus the loss over the vocabulary. Per token, with d hidden, f intermediate, h heads of size e, g key/value
heads, s the sequence length, V the vocabulary and r each adapter's rank:

    norm            input d + statistics (RMSNorm: 1/rms; LayerNorm: mean and 1/σ); Llama's RMSNorm is fp32
    attention       SDPA's fused CPU kernel: q, out (h·e each), k, v (g·e each, h·e when a padding mask
                    makes transformers repeat them), logsumexp h; with a padding mask also the mask, s, fp32
                    math path (eager, or attention dropout): q, k, v (h·e each), probabilities h·s, and with
                    attention dropout its noise and the dropped probabilities (2·h·s more)
    MLP             gated (Llama): act(gate) saves gate f, the product saves act(gate) and up, 2f;
                    plain: the activation's own saves (GELU 1f, GPT-2's tanh GELU 4f)
    hidden dropout  2 per block (GPT-2, BERT): torch's CPU dropout saves its noise tensor, d each
    LoRA branch     the input x (in), once per distinct input tensor (q, k and v read one tensor), fp32
                    (lorakit casts x to the adapter's dtype), plus with dropout a 1-byte keep-mask per
                    module (ops.py); x·Aᵀ, r per module. With LORAKIT_FUSED=0, 2·in per module with
                    dropout (the noise and the dropped copy)
    loss            lorakit train's chunked loss (lm_loss.py): the selected hidden rows and ∂L/∂h, 2·d per
                    token (an upper bound: only reply tokens are selected), plus one chunk's float32 logits
                    and their gradient, 2·CHUNK_ELEMENTS·4 bytes in all. (transformers' own loss would keep
                    3·V·4 bytes per token: the fp32 log_softmax, the NLL gradient and the logits' gradient.)

A tensor is counted once however many ops save it: o_proj's LoRA input is the SDPA output the fused kernel
already saves. Tensors that need no gradient save nothing: block 0 reads the frozen embedding, so a pre-norm
model's first norm saves nothing and LoRA dropout on block 0's attention input keeps no noise.
With gradient checkpointing, each block keeps only its input (d) and one block is recomputed at a time in
backward. Sequence-level terms (rotary tables, the classifier's pooled vector) are below 0.1% and left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import ops
from ..config import LoraConfig
from .lm_loss import CHUNK_ELEMENTS
from ..kinds import is_linear_like, with_companions
from ..targeting import layer_index, resolve_targets

MIB = 2**20
BASE_DTYPES = ("fp32", "bf16", "4bit")
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0}  # bytes per unquantized base parameter
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "4bit": 2}  # QLoRA computes in bf16 (bnb_4bit_compute_dtype)
NF4_BYTES = 1 / 2 + 1 / 64 + 4 / (64 * 256)  # 4-bit code + 8-bit absmax per 64 + fp32 per 256 absmax
ADAPTER_BYTES = 4  # fp32 adapter weights, and their gradients
ADAMW_STATES = 2  # exp_avg, exp_avg_sq
# Measured in `lorakit train` with SmolLM2's tokenizer: loading the tokenizer imports ~970 transformers
# modules (+135 MiB resident); the model's Python objects and lorakit add ~15 MiB.
RUNTIME_MIB = 150.0
# glibc serves tensors below its mmap threshold (at most 32 MiB) from heaps whose freed blocks stay resident
# and fragment, so resident memory exceeds the live-tensor peak. torch.profiler's live-tensor peak matched
# this module's count within 3% (lower by the adapter gradients, which appear after the peak), and in one run
# with MALLOC_MMAP_THRESHOLD_=65536 (no heap reuse) resident memory matched count + RUNTIME_MIB within 1%.
# With glibc's defaults, the excess over count + RUNTIME_MIB, divided by the activations other than the
# loss's vocabulary-sized tensors (those are mmapped and given back), was 0.35-1.56, median 0.85, over 17
# `lorakit train` runs: Llama models of 16, 28, 49 and 135 M parameters (vocab 49,152), r 8-64, q/v or all
# seven projections, dropout 0 or 0.1, batch x length 4x128, 8x128, 2x512. With gradient checkpointing the
# ratio was higher (1.7 and 3.1; the totals came out 3% and 10% low).
ALLOCATOR_SLACK = 0.85


@dataclass(frozen=True)
class Family:
    """How one architecture family's blocks save activations for backward (see the module docstring)."""

    norm_stats: int  # statistics a norm saves per token besides its input
    norm_fp32: bool  # the norm upcasts its input to fp32 (Llama's RMSNorm)
    pre_norm: bool  # norm → attention: block 0's first norm saves nothing; a final norm follows the blocks
    gated_mlp: bool  # act(gate(x)) · up(x)
    lora_inputs: dict[str, str]  # module path suffix -> the tensor it reads (one tensor is saved once)


LLAMA = Family(1, True, True, True, {
    "q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
    "o_proj": "attention output", "gate_proj": "MLP input", "up_proj": "MLP input", "down_proj": "MLP hidden"})
GPT2 = Family(2, False, True, False, {
    "c_attn": "attention input", "attn.c_proj": "attention output", "c_fc": "MLP input",
    "mlp.c_proj": "MLP hidden"})
BERT = Family(2, False, False, False, {
    "query": "attention input", "key": "attention input", "value": "attention input",
    "attention.output.dense": "attention output", "intermediate.dense": "MLP input",
    "output.dense": "MLP hidden"})
# config.model_type -> family; other decoders are estimated as Llama-style (gated MLP, RMSNorm, pre-norm).
FAMILIES: dict[str, Family] = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "granite"], LLAMA),
    "gpt2": GPT2,
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert"], BERT),
}
# Per-token tensors an MLP activation saves itself, in units of f (GPT-2's "gelu_new" is a chain of ops).
ACTIVATION_SAVES = {"gelu_new": 4}

# Our name -> config attributes tried in order (GPT-2 spells them n_embd, n_layer, ...).
CONFIG_FIELDS = {
    "hidden": ("hidden_size", "n_embd"),
    "intermediate": ("intermediate_size", "n_inner"),
    "layers": ("num_hidden_layers", "n_layer"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "vocab": ("vocab_size",),
    "attention_dropout": ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"),
    "hidden_dropout": ("resid_pdrop", "hidden_dropout_prob"),
    "activation": ("hidden_act", "activation_function"),
}


@dataclass(frozen=True)
class Shapes:
    """The sizes of a transformer that set its activation memory, read from its config."""

    family: Family
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    activation: str = "silu"


def read_shapes(config: object) -> Shapes:
    """Shapes from a transformers config; missing sizes take the usual defaults (f = 4d, g = h, e = d/h).

    Raises:
        ValueError: the config names no hidden size, layer count, head count or vocabulary size.
    """
    found: dict[str, Any] = {}
    for name, attributes in CONFIG_FIELDS.items():
        values = [getattr(config, attribute, None) for attribute in attributes]
        found[name] = next((value for value in values if value is not None), None)
    missing = [CONFIG_FIELDS[name][0] for name in ("hidden", "layers", "heads", "vocab") if not found[name]]
    if missing:
        raise ValueError(f"cannot estimate activations: the {type(config).__name__} has no {', '.join(missing)}; "
                         "lorakit.app.memory reads transformer decoder and encoder configs")
    hidden, heads = found["hidden"], found["heads"]
    found["intermediate"] = found["intermediate"] or 4 * hidden
    found["kv_heads"] = found["kv_heads"] or heads
    found["head_dim"] = found["head_dim"] or hidden // heads
    found["attention_dropout"] = float(found["attention_dropout"] or 0.0)
    found["hidden_dropout"] = float(found["hidden_dropout"] or 0.0)
    found["activation"] = str(found["activation"] or "silu")
    family = FAMILIES.get(getattr(config, "model_type", ""), LLAMA)
    return Shapes(family=family, **found)


@dataclass(frozen=True)
class Setup:
    """How the model is trained: what sets activation and weight memory besides the model and the adapter."""

    batch_size: int = 8
    max_length: int = 128
    base_dtype: str = "fp32"  # "fp32" | "bf16" | "4bit"
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # transformers' attn_implementation: "sdpa" or "eager"
    padded: bool = True  # batches carry a padding mask (rows shorter than the longest)
    causal_lm: bool = True  # the loss is over the vocabulary at every token (False: a classifier head)

    def __post_init__(self) -> None:
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"base_dtype {self.base_dtype!r} is not one of {BASE_DTYPES}")
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"attention {self.attention!r} is not 'sdpa' or 'eager'")
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError(f"batch_size and max_length must be at least 1, got {self.batch_size}, "
                             f"{self.max_length}")

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_length


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model and its adapter, each shared tensor once."""

    base: int  # N
    quantized: int  # N_q: weights of the Linear layers a 4-bit load quantizes
    trainable: int  # P: LoRA factors and modules_to_save copies


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per row of the memory table; ``total`` is their sum."""

    base_weights: float
    adapter_weights: float
    gradients: float
    optimizer_state: float
    activations: float
    runtime: float
    parameters: ParameterCounts
    activation_detail: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.rows().values())

    def rows(self) -> dict[str, float]:
        """Row label -> bytes, in table order (without the total)."""
        names = ("base_weights", "adapter_weights", "gradients", "optimizer_state", "activations", "runtime")
        return {name.replace("_", " "): getattr(self, name) for name in names}


# ---- parameters ----------------------------------------------------------------------------------------------
def _head_paths(model: nn.Module) -> set[str]:
    """The output head and classifier heads, which a 4-bit load keeps unquantized (transformers' rule)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    leaves = ("lm_head", "score", "classifier", "qa_outputs")
    return {name for name, module in model.named_modules()
            if module is head or name.rsplit(".", 1)[-1] in leaves}


def quantized_parameters(model: nn.Module) -> int:
    """N_q = Σ weight numel over Linear-like layers except the heads (what bitsandbytes' 4-bit load packs)."""
    heads = _head_paths(model)
    return sum(module.weight.numel() for name, module in model.named_modules()
               if name and name not in heads and is_linear_like(module))


def adapter_parameters(model: nn.Module, lora: LoraConfig) -> int:
    """P = Σ_targets r·(in + out) [+ out for lora_bias, + out for DoRA's magnitude] + Σ modules_to_save numel.

    The factors are built on the meta device by each layer's Kind, so every layer type is counted exactly.

    Raises:
        ValueError: target_modules selects nothing in ``model`` (from ``resolve_targets``).
    """
    plan = resolve_targets(model, lora)
    modules = dict(model.named_modules())
    total = 0
    for path, spec in plan.layers.items():
        for module, kind in with_companions(modules[path], plan.kinds[path]):  # MultiheadAttention: + out_proj
            with torch.device("meta"):
                factors = kind.make_factors(module, spec.r, spec.lora_bias)
            total += sum(_numel(factor) for factor in factors)
            if lora.use_dora:
                total += kind.features(module)[1]
    unique = {id(p): p.numel() for path in plan.modules_to_save for p in modules[path].parameters()}
    return total + sum(unique.values())


def _numel(factor: nn.Module | torch.Tensor) -> int:
    if isinstance(factor, torch.Tensor):
        return factor.numel()
    return sum(p.numel() for p in factor.parameters())


def count_parameters(model: nn.Module, lora: LoraConfig) -> ParameterCounts:
    """N, N_q and P for ``model`` (on any device, the meta device included) and ``lora``."""
    base = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    return ParameterCounts(base, quantized_parameters(model), adapter_parameters(model, lora))


def base_weight_bytes(counts: ParameterCounts, base_dtype: str) -> float:
    """fp32: 4N; bf16: 2N; 4bit: N_q·NF4_BYTES + 2·(N − N_q)."""
    if base_dtype == "4bit":
        return counts.quantized * NF4_BYTES + WEIGHT_BYTES["bf16"] * (counts.base - counts.quantized)
    return WEIGHT_BYTES[base_dtype] * counts.base


# ---- activations ---------------------------------------------------------------------------------------------
def _attention_flash(s: Shapes, setup: Setup, a: int) -> float:
    """SDPA's fused CPU kernel: q, out (h·e), k, v (g·e, or h·e repeated under a mask), logsumexp h (fp32)."""
    kv_heads = s.heads if setup.padded else s.kv_heads
    saved = a * (2 * s.heads * s.head_dim + 2 * kv_heads * s.head_dim) + 4 * s.heads
    return saved + (4 * setup.max_length if setup.padded else 0)  # SDPA saves a float copy of the mask


def _attention_math(s: Shapes, setup: Setup, a: int) -> float:
    """Eager or SDPA's math path: q, k, v (h·e each), probabilities h·s, and with attention dropout its noise
    and the dropped probabilities (2·h·s). On CPU, SDPA's math path computes in fp32 whatever the dtype;
    eager's softmax saves fp32 probabilities and, below fp32, its matmul saves a copy in the compute dtype."""
    probabilities = s.heads * setup.max_length
    dropout = 2 * probabilities if s.attention_dropout > 0 else 0
    if setup.attention == "sdpa":
        return 4 * (3 * s.heads * s.head_dim + probabilities + dropout)
    copy = a if a != 4 else 0
    return a * (3 * s.heads * s.head_dim + dropout) + (4 + copy) * probabilities


def uses_flash(s: Shapes, setup: Setup) -> bool:
    """SDPA runs its fused CPU kernel unless attention dropout is on (then its math path, like eager)."""
    return setup.attention == "sdpa" and s.attention_dropout == 0


def attention_bytes(s: Shapes, setup: Setup, a: int) -> float:
    """Bytes per token one attention saves."""
    return (_attention_flash if uses_flash(s, setup) else _attention_math)(s, setup, a)


def mlp_bytes(s: Shapes, a: int) -> float:
    """Gated: gate, act(gate), up (3f); plain: the activation's own saves (1f; GPT-2's gelu_new 4f)."""
    if s.family.gated_mlp:
        return a * 3 * s.intermediate
    return a * ACTIVATION_SAVES.get(s.activation, 1) * s.intermediate


def block_bytes(s: Shapes, setup: Setup, a: int) -> dict[str, float]:
    """Bytes per token one block saves besides its LoRA branches, by part."""
    return {
        "norms": 2 * _norm_bytes(s, a),
        "attention": attention_bytes(s, setup, a),
        "mlp": mlp_bytes(s, a),
        "hidden dropout": 2 * s.hidden * a if s.hidden_dropout > 0 else 0.0,
    }


def _input_name(path: str, family: Family) -> str:
    """The tensor a targeted module reads, named by the longest matching path suffix (else its own path)."""
    suffixes = [suffix for suffix in family.lora_inputs if path == suffix or path.endswith("." + suffix)]
    return family.lora_inputs[max(suffixes, key=len)] if suffixes else path


def lora_bytes(model: nn.Module, lora: LoraConfig, s: Shapes, setup: Setup) -> dict[int | None, float]:
    """Bytes per token the LoRA branches save, per block index (None: outside the blocks).

    Per module: B saves x·Aᵀ (r); A saves its input (in, see ``_saved_input``); all fp32, the adapter's
    dtype. An embedding's branch looks rows of A up by token id, so it saves only x·Aᵀ. DoRA (PEFT's form)
    also saves the base output and the branch it rescales (2·out); the weight norm it needs is left out.

    Raises:
        ValueError: target_modules selects nothing in ``model`` (from ``resolve_targets``).
    """
    plan = resolve_targets(model, lora)
    modules = dict(model.named_modules())
    shared = COMPUTE_BYTES[setup.base_dtype] == ADAPTER_BYTES  # else each module casts x to fp32 itself
    # SDPA's fused kernel already saves its output, which o_proj reads: the same storage, counted once.
    seen = {(block, "attention output") for block in range(s.layers)} if uses_flash(s, setup) else set()
    per_block: dict[int | None, float] = {}
    for path, spec in plan.layers.items():
        kind, block = plan.kinds[path], layer_index(path, None)
        in_features, out_features = kind.features(modules[path])
        saved: float = spec.r + (2 * out_features if lora.use_dora else 0)
        if not kind.embedding:
            tensor = (block, _input_name(path, s.family))
            saved += _saved_input(in_features, spec.lora_dropout, tensor if shared else None, seen,
                                  frozen=tensor == (0, "attention input"))
        per_block[block] = per_block.get(block, 0.0) + ADAPTER_BYTES * saved
    return per_block


def _saved_input(in_features: int, dropout: float, tensor: tuple | None, seen: set, frozen: bool) -> float:
    """What A saves of its input x (in fp32 elements).

    The fused path (ops.py): x itself, once per distinct ``tensor`` (None: not shared with other modules),
    plus with dropout a bool keep-mask (in bytes). The reference path (``LORAKIT_FUSED=0``) with dropout:
    the dropped copy (in) and torch's CPU dropout noise (in), but no noise when x needs no gradient
    (``frozen``: block 0's attention input comes from the frozen embedding).
    """
    if dropout > 0 and not ops.FUSED:
        return in_features if frozen else 2 * in_features
    extra = in_features / ADAPTER_BYTES if dropout > 0 else 0  # ops.py: x itself plus a 1-byte keep-mask
    if tensor is not None:
        if tensor in seen:
            return extra
        seen.add(tensor)
    return in_features + extra


def _norm_bytes(s: Shapes, a: int) -> float:
    return (s.hidden + s.family.norm_stats) * (4 if s.family.norm_fp32 else a)


def activation_terms(model: nn.Module, lora: LoraConfig, setup: Setup, s: Shapes) -> dict[str, float]:
    """Bytes of activations alive at the step's peak (the start of backward), by part.

    Without checkpointing: T·(L·block + Σ LoRA + final norm − block 0's first norm) + T·3·V·4 for the loss.
    With checkpointing: T·L·d·a for the block inputs, plus one block recomputed at a time, plus the loss.
    Then ALLOCATOR_SLACK × everything but the loss (heap-allocated tensors; see the constant).
    """
    a, tokens = COMPUTE_BYTES[setup.base_dtype], setup.tokens
    block, branches = block_bytes(s, setup, a), lora_bytes(model, lora, s, setup)
    norm = _norm_bytes(s, a) if s.family.pre_norm else 0.0  # block 0's first norm and the final norm
    outside = branches.pop(None, 0.0)
    if setup.gradient_checkpointing:
        one_block = sum(block.values()) + max(branches.values(), default=0.0)
        terms = {"block inputs": tokens * s.layers * s.hidden * a, "recomputed block": tokens * one_block}
    else:
        terms = {name: tokens * s.layers * value for name, value in block.items()}
        terms["norms"] -= tokens * norm
        terms["lora"] = tokens * sum(branches.values())
    terms["final norm and head LoRA"] = tokens * (norm + outside)
    terms["loss"] = tokens * 2 * s.hidden * a + 2 * CHUNK_ELEMENTS * 4 if setup.causal_lm else 0.0
    terms["allocator slack"] = ALLOCATOR_SLACK * (sum(terms.values()) - terms["loss"])
    return terms


def estimate_memory(model: nn.Module, lora: LoraConfig, setup: Setup) -> MemoryEstimate:
    """The memory table of one LoRA training step of ``model`` (built on the meta device) with ``lora``.

    Raises:
        ValueError: target_modules selects nothing in ``model``.
    """
    counts = count_parameters(model, lora)
    detail = activation_terms(model, lora, setup, read_shapes(model.config))
    adapter = ADAPTER_BYTES * counts.trainable
    return MemoryEstimate(
        base_weights=base_weight_bytes(counts, setup.base_dtype),
        adapter_weights=adapter,
        gradients=adapter,
        optimizer_state=ADAMW_STATES * adapter,
        activations=sum(detail.values()),
        runtime=RUNTIME_MIB * MIB,
        parameters=counts,
        activation_detail=detail,
    )
