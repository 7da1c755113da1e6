"""Regional compilation: ``torch.compile`` each repeated block of a model (a decoder's layers), compiled once.

A decoder is L copies of one block between an embedding and a head:

    h₀ = embed(ids),   h_{l+1} = block_l(h_l)   (l = 0 … L − 1),   logits = head(norm(h_L))

Compiling the whole model traces all L blocks into one graph: compile time grows with L. Compiling each
block's forward in place (``nn.Module.compile``) gives one graph that every block reuses, because the L
blocks run the same code and TorchDynamo treats a block's parameters as graph inputs, not constants
(``inline_inbuilt_nn_modules``, torch's default): block 0 compiles, blocks 1 … L − 1 pass the same guards
(same types, same adapter settings, same shapes) and run the cached code. Compile time is that of one
block (forward and, in training, backward), whatever L is; in training with a frozen embedding it is two:
block 0's input needs no gradient and the others' inputs do, and Dynamo guards on ``requires_grad``.
Embedding, head and loss stay eager. Train with ``use_cache=False`` (``lorakit train`` does): a KV cache
hands each block its own layer index, a guarded constant, which would compile every block anew.

LoRA layers inside the blocks trace without a graph break (ops.py "Compiled", dropout.py): the compiled
block draws the same dropout masks as eager mode from the same seed and computes the same function.
A change the guards see (``set_adapter``, ``train()`` / ``eval()``, a new sequence length: after one such
recompile Dynamo marks the length dynamic) recompiles once; ``torch._dynamo.config.recompile_limit`` caps
how many variants of the block are kept.

Measured (``python -m benchmarks.compile_blocks``: SmolLM2-135M's shape, random weights, 30 layers, LoRA
r=64 on the seven projections, dropout 0.1, batch 8x128, AdamW, float32, inductor, 2 threads, torch
2.13 CPU, on a 2-core machine shared with other jobs, so times are noisy): 2 graphs, no recompile.
Load ~17, cold inductor cache: compile ≈ 192 s, compiled/eager step 0.477 paired (0.56, 0.48, 0.38), an
80-step job ≈ 7.8 ks against 15.9 ks eager. Load ~4, warm on-disk inductor cache: compile ≈ 6.6 s,
compiled/eager step 0.855 (0.86, 0.83, 1.07; 20.2 against 24.3 s), 80 steps ≈ 1.63 ks against 1.94 ks.
Compiled was faster per step in 5 of 6 rounds; bfloat16 autocast was not measured compiled.

    compile_blocks(model)                  # before training; returns the compiled blocks
    compile_blocks(model, backend="aot_eager", fullgraph=True)   # any torch.compile argument
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import explain


def repeated_blocks(model: nn.Module, min_blocks: int = 2) -> list[nn.Module]:
    """The children of the longest ``nn.ModuleList`` whose children share one class (a decoder's layers).

    ``min_blocks`` or more entries are needed (compiling: two; FSDP2's wrap plan: one); ties go to the list
    met first in ``model.modules()`` order. [] when the model has no such list.
    """
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > max(min_blocks - 1, len(best)):
            children = list(module)
            if len({type(child) for child in children}) == 1:
                best = children
    return best


def compile_blocks(model: nn.Module, **compile_options: Any) -> list[nn.Module]:
    """Compile each of ``model``'s repeated blocks in place (module docstring); returns them.

    ``compile_options`` go to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ``fullgraph``, ``options``);
    torch's defaults (inductor) otherwise. The model keeps its class, parameters and state-dict keys: only the
    blocks' calls go through the compiled code, so saving, loading and merging adapters work as before.

    Raises:
        ValueError: the model has no list of two or more blocks of one class.
    """
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(explain("no repeated blocks to compile", where=type(model).__name__,
                                 expected="an nn.ModuleList of two or more modules of one class (decoder layers)",
                                 fix="compile the whole model with torch.compile(model) instead"))
    for block in blocks:
        block.compile(**compile_options)
    return blocks
