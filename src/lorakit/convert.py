"""Residual-init adapters (PiSSA, OLoRA, LoftQ, CorDA) saved as plain LoRA against the original base weights.

A residual init rewrites the base, W_res = W − s·B₀A₀, and trains A, B from A₀, B₀. The trained model is

    W_res + s·B A = W + s·(B A − B₀A₀) = W + s·[B, −B₀] [A; A₀] = W + s'·B' A',

so the plain LoRA adapter B' = [B, −B₀] (out, 2r), A' = [A; A₀] (2r, in) with r' = 2r and the same scaling
s' = s (lora_alpha' = 2·alpha, or √2·alpha with rsLoRA; rank_pattern doubled, alpha_pattern scaled the same
way) reproduces it on the unmodified base. This is PEFT's ``subtract_mutated_init`` and its config rewrite.
It is exact for PiSSA, OLoRA and CorDA; for LoftQ the base kept the quantised Q, not W − s·B₀A₀, so the
result is off by W − Q − s·B₀A₀ (PEFT warns and converts LoftQ the same way).

Where lorakit differs from PEFT 0.21.2, on purpose: Embedding factors are converted too (PEFT drops them),
the adapter's other tensors (modules_to_save, trained biases) are kept (PEFT drops them; both drop the saved
residual base weights of adapted layers), and rsLoRA works with rank_pattern / alpha_pattern (PEFT refuses
that combination).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import io
from .codec import parse_key
from .config import LoraConfig
from .errors import explain, warn
from .init_registry import INITS

if TYPE_CHECKING:
    from .model import PeftModel

SCALING_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")


def residual_to_plain_lora(tensors: dict[str, Tensor], config: LoraConfig, initial_tensors: dict[str, Tensor],
                           initial_config: LoraConfig) -> tuple[dict[str, Tensor], LoraConfig]:
    """(trained file tensors, config) and the ones saved right after init -> a plain LoRA adapter of rank 2r.

    A' = [A; A₀] (rank dim 0), B' = [B, −B₀] (rank dim 1), lora_B bias b' = b − b₀. The base weight of an
    adapted layer (saved for embeddings and lm_head by ``save_embedding_layers``) is W_res, not W, so it is
    left out, as PEFT leaves it out; the other tensors (modules_to_save, trained biases) are kept.

    Raises:
        ValueError: DoRA or BD-LoRA adapters, initial factors missing or of other shapes, or an initial
            config with another scaling (r, lora_alpha, use_rslora, rank_pattern, alpha_pattern); every
            problem is listed at once.
    """
    if config.use_dora or config.use_bdlora is not None:
        raise ValueError(explain("cannot convert this adapter to plain LoRA", got="use_dora" if config.use_dora
                                 else "use_bdlora", expected="a plain LoRA adapter with a residual init",
                                 fix="save it without path_initial_model_for_weight_conversion"))
    problems = [f"{name}: initial {getattr(initial_config, name)!r}, trained {getattr(config, name)!r}"
                for name in SCALING_FIELDS if getattr(initial_config, name) != getattr(config, name)]
    factors = {key: parsed for key in tensors if (parsed := parse_key(key)) is not None and parsed.role}
    factor_paths = {parsed.path for parsed in factors.values()}
    out = {}
    for key, value in tensors.items():
        # codec.FILE_ROLES: A (rank in dim 0), B (rank in dim 1), bias (lora_B's), magnitude (DoRA)
        role = factors[key].role if key in factors else None
        if role is None:
            if key.removesuffix(".base_layer.weight") not in factor_paths:  # W_res must not replace W on load
                out[key] = value
            continue
        initial = initial_tensors.get(key)
        if role == "magnitude" or initial is None or initial.shape != value.shape:
            problems.append(f"{key}: " + ("DoRA's magnitude cannot be converted" if role == "magnitude" else
                                          f"trained {tuple(value.shape)}, initial "
                                          f"{'missing' if initial is None else tuple(initial.shape)}"))
            continue
        initial = initial.to(value.dtype)
        out[key] = (torch.cat([value, initial], dim=0) if role == "A" else
                    torch.cat([value, -initial], dim=1) if role == "B" else value - initial)
    if problems:
        raise ValueError("cannot convert the adapter with path_initial_model_for_weight_conversion: the initial "
                         "adapter must be the one saved right after get_peft_model, before training. "
                         f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return out, plain_config(config)


def plain_config(config: LoraConfig) -> LoraConfig:
    """The converted adapter's config: r' = 2r, s' = s, init_lora_weights=True.

    alpha' = 2·alpha keeps alpha/r; with rsLoRA alpha' = √2·alpha keeps alpha/√r. The same factors apply to
    rank_pattern (×2) and alpha_pattern entries.
    """
    factor = math.sqrt(2) if config.use_rslora else 2
    return dataclasses.replace(
        config, r=2 * config.r, lora_alpha=config.lora_alpha * factor, init_lora_weights=True, loftq_config={},
        rank_pattern={k: 2 * v for k, v in (config.rank_pattern or {}).items()},
        alpha_pattern={k: v * factor for k, v in (config.alpha_pattern or {}).items()},
    )


def save_converted(peft_model: PeftModel, save_directory: str | os.PathLike[str],
                   initial_directory: str | os.PathLike[str],
                   selected_adapters: list[str] | None, safe_serialization: bool,
                   save_embedding_layers: bool | str) -> None:
    """PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=initial_directory)``.

    Writes each selected adapter converted by ``residual_to_plain_lora`` against the adapter in
    ``initial_directory`` (saved with ``save_pretrained`` right after init). Like PEFT, it then rewrites
    ``initial_directory/adapter_config.json`` with ``init_lora_weights=True``, so that loading that folder
    no longer re-runs the residual init.

    Raises:
        ValueError: an unknown adapter name, or an initial adapter that does not fit (see above).
        lorakit.io.AdapterLoadError: ``initial_directory`` holds no readable adapter.
    """
    initial_config, initial_tensors = io.read_config(initial_directory), io.read_weights(initial_directory)

    def convert(name: str, tensors: dict[str, Tensor], config: LoraConfig) -> tuple[dict[str, Tensor], LoraConfig]:
        _warn_inexact(config)
        return residual_to_plain_lora(tensors, config, initial_tensors, initial_config)

    names = io.save_adapters(peft_model, save_directory, selected_adapters, safe_serialization,
                             save_embedding_layers, transform=convert)
    last = peft_model.peft_config[names[-1]]  # PEFT rewrites the initial config once per adapter; the last wins
    dataclasses.replace(last, init_lora_weights=True, loftq_config={}).save_pretrained(str(initial_directory))


def _warn_inexact(config: LoraConfig) -> None:
    method = config.init_method.name
    if method == "loftq":
        warn("converting a LoftQ adapter to plain LoRA is approximate: the base kept the quantised weight Q, so "
             "the converted adapter on the original W is off by W - Q - s*B0*A0 (PEFT converts it the same way)")
    elif not INITS[method].exact:  # B₀A₀ is what the base lost (or 0): init_registry.Init.exact
        warn(f"path_initial_model_for_weight_conversion only converts residual inits (PiSSA, OLoRA, CorDA) or "
             f"LoRA's zero-B init exactly; init_lora_weights={config.init_lora_weights!r} is converted as if it "
             "were one of them")
