"""``lorakit export ADAPTER --for llama.cpp --out FILE.gguf``: the GGUF LoRA that llama.cpp loads with ``--lora``.

What llama.cpp reads (``llama_adapter_lora_init``, ``build_lora_mm``) for every adapted base tensor W
named by gguf's tensor map (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``):

    <name>.lora_a   numpy (R, in)    ggml ne = [in, R]
    <name>.lora_b   numpy (out, R)   ggml ne = [R, out]
    y = W x + (alpha / R) * lora_b (lora_a x)        alpha = adapter.lora.alpha, R = lora_b's ne[0]

The token embedding is stored flipped (``llm_build_inp_embd`` gathers rows of lora_a by token id):
``token_embd.weight.lora_a = Aᵀ (vocab, R)``, ``lora_b = B (dim, R)``, and its delta is ``lora_b @ lora_aᵀ``.

The factors are the folder export's (``export.normalise``): ``B' = [s_l B, 0]``, ``A' = [A; 0]`` and
``alpha = R = max_l r_l``, so llama.cpp's ``alpha / R = 1`` and ``lora_b @ lora_a = s_l B A`` for every layer:
rsLoRA and rank / alpha patterns are folded in. Some architectures store W in another row order than
transformers does; their converter reorders W's rows, and for LoRA that is ``(P W)`` -> ``(P B) A``, so only
B's rows move (``_architectures``). Llama and Mistral permute q_proj / k_proj for llama.cpp's RoPE, which
rotates adjacent pairs where transformers rotates the two halves.

The file is what llama.cpp's own ``convert_lora_to_gguf.py`` writes from the folder export (default
``--outtype f32``): the same tensor names, order, F32 type and the metadata ``general.architecture``,
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, ``general.name`` and
``general.quantization_version``. The base model is needed only for its architecture name (and the head
counts of a RoPE permutation): ``--base DIR``, else the adapter's ``base_model_name_or_path`` if it is a
local folder or in the Hugging Face cache, else ``--arch``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...config import LoraConfig
from .adapter_layers import layers_of
from .common import CliError

LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


# ---- architectures: gguf's name, and the row reorder llama.cpp's converter applies ----------------------------
def rope_permute(B: Tensor, heads: int) -> Tensor:
    """P B for llama.cpp's RoPE layout: per head, rows [h0, h1] (two halves) -> interleaved (h0[0], h1[0], ...).

    B: (out, R) with out = heads * head_dim; the same reshape llama.cpp's converter applies to W (out, in).
    """
    return B.reshape(heads, 2, B.shape[0] // heads // 2, *B.shape[1:]).swapaxes(1, 2).reshape(B.shape)


def _query_heads(hparams: dict[str, Any]) -> int:
    return int(hparams["num_attention_heads"])


def _key_value_heads(hparams: dict[str, Any]) -> int:
    return int(hparams.get("num_key_value_heads") or hparams["num_attention_heads"])


@dataclass(frozen=True)
class Architecture:
    """One transformers architecture as llama.cpp's converter maps it."""

    arch: Any  # gguf.MODEL_ARCH
    # module name suffix -> the head count its B rows are RoPE-permuted by (read from the base config)
    permuted: dict[str, Callable[[dict[str, Any]], int]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[self.arch]


def _architectures() -> dict[str, Architecture]:
    """transformers ``architectures[0]`` -> how llama.cpp's converter treats its linear weights.

    Only architectures whose converter class was checked: Llama / Mistral (``LlamaModel``: q/k RoPE permute)
    and Qwen2 / Qwen3 (plain tensor map).
    """
    import gguf

    llama = Architecture(gguf.MODEL_ARCH.LLAMA, {"q_proj": _query_heads, "k_proj": _key_value_heads})
    return {
        "LlamaForCausalLM": llama,
        "MistralForCausalLM": llama,
        "Qwen2ForCausalLM": Architecture(gguf.MODEL_ARCH.QWEN2),
        "Qwen3ForCausalLM": Architecture(gguf.MODEL_ARCH.QWEN3),
    }


def arch_names() -> list[str]:
    """The names ``--arch`` accepts (gguf's architecture names of the table)."""
    return sorted({entry.name for entry in _architectures().values()})


# ---- the base model: only its architecture and head counts -----------------------------------------------------
@dataclass(frozen=True)
class Base:
    architecture: Architecture
    hparams: dict[str, Any]  # the base config.json ({} when only --arch is known)
    folder: Path | None


def _config_folder(config: LoraConfig, base: Path | None) -> Path | None:
    """--base, else base_model_name_or_path as a local folder or a Hugging Face cache entry (no download)."""
    if base is not None:
        if not (base / "config.json").is_file():
            raise CliError(f"--base {base} has no config.json; point it at the base model's folder")
        return base
    name = config.base_model_name_or_path
    if not name:
        return None
    if (Path(name) / "config.json").is_file():
        return Path(name)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(name, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def resolve_base(config: LoraConfig, base: Path | None, arch: str | None) -> Base:
    """The base facts the GGUF needs, with the reason when they cannot be found or llama.cpp lacks the model."""
    table = _architectures()
    folder = _config_folder(config, base)
    hparams = json.loads((folder / "config.json").read_text(encoding="utf-8")) if folder else {}
    if arch is not None:
        by_name = {entry.name: entry for entry in table.values()}
        if arch not in by_name:
            raise CliError(f"--arch {arch!r} is not one lorakit writes GGUF for; expected one of {arch_names()}")
        return Base(by_name[arch], hparams, folder)
    if folder is None:
        where = (f"the base model {config.base_model_name_or_path!r} has no config.json here (not a local folder, "
                 "not in the Hugging Face cache)" if config.base_model_name_or_path else
                 "the adapter names no base model (base_model_name_or_path is empty)")
        raise CliError(f"llama.cpp's GGUF names the base model's architecture, and {where}; pass --base "
                       f"BASE_FOLDER or --arch {'|'.join(arch_names())}")
    hf_arch = (hparams.get("architectures") or [None])[0]
    if hf_arch not in table:
        raise CliError(f"the base model {folder} is {hf_arch!r}, which lorakit does not write GGUF for (it writes "
                       f"{sorted(table)}); export a folder with --out DIR and convert it with llama.cpp's "
                       "convert_lora_to_gguf.py --base BASE_FOLDER DIR")
    return Base(table[hf_arch], hparams, folder)


# ---- PEFT factors -> llama.cpp tensors -------------------------------------------------------------------------
def _block_count(base: Base, paths: list[str]) -> int:
    if "num_hidden_layers" in base.hparams:
        return int(base.hparams["num_hidden_layers"])
    return 1 + max((int(match[1]) for path in paths if (match := LAYER_INDEX.search(path))), default=-1)


def _suffix_rule(architecture: Architecture, path: str) -> Callable[[dict[str, Any]], int] | None:
    return architecture.permuted.get(path.rsplit(".", 1)[-1])


def _problems(base: Base, paths: list[str], names: dict[str, str | None]) -> list[str]:
    """Every reason llama.cpp could not load these layers (empty: it can)."""
    problems = [f"{path} has no llama.cpp tensor in gguf's {base.architecture.name} name map"
                for path, name in names.items() if name is None]
    if base.hparams.get("tie_word_embeddings") and any(name == "output.weight" for name in names.values()):
        problems.append("the adapter targets lm_head, but the base model ties it to embed_tokens "
                        "(tie_word_embeddings=true), so llama.cpp has no output tensor to adapt")
    if not base.hparams and any(_suffix_rule(base.architecture, path) for path in paths):
        problems.append(f"{base.architecture.name} reorders the rows of "
                        f"{sorted(base.architecture.permuted)} by the head counts, which only the base model's "
                        "config.json gives; pass --base BASE_FOLDER")
    return problems


def gguf_tensors(tensors: dict[str, Tensor], paths: dict[str, tuple[str, str]], base: Base) -> dict[str, np.ndarray]:
    """llama.cpp's ``<name>.lora_a`` / ``.lora_b`` arrays (float32) from normalised PEFT factors.

    ``paths``: module path -> (A key, B key) of the normalised adapter (every layer's scaling already in B).
    Raises:
        CliError: a layer llama.cpp cannot load, with every reason.
    """
    import gguf

    tensor_map = gguf.get_tensor_name_map(base.architecture.arch, _block_count(base, list(paths)))
    names = {path: tensor_map.get_name(key=path + ".weight", try_suffixes=(".weight", ".bias")) for path in paths}
    problems = _problems(base, list(paths), names)
    if problems:
        raise CliError(f"llama.cpp cannot load this adapter: {'; '.join(problems[:5])}")
    out: dict[str, np.ndarray] = {}
    for path in sorted(paths):
        A, B = (tensors[key].to(torch.float32) for key in paths[path])
        name = names[path]
        if rule := _suffix_rule(base.architecture, path):
            B = rope_permute(B, rule(base.hparams))
        if name == "token_embd.weight":  # PEFT: A (R, vocab), B (dim, R) -> lora_a (vocab, R), lora_b (dim, R)
            A = A.T
        out[f"{name}.lora_a"] = A.contiguous().numpy()
        out[f"{name}.lora_b"] = B.contiguous().numpy()
    return out


def factor_paths(tensors: dict[str, Tensor]) -> dict[str, tuple[str, str]]:
    """Module path (after PEFT's ``base_model.model.``) -> (A key, B key)."""

    return {path: (layer.A, layer.B) for path, layer in layers_of(tensors).items() if layer.A and layer.B}


# ---- the file ------------------------------------------------------------------------------------------------
def write_gguf(path: Path, arrays: dict[str, np.ndarray], alpha: float, base: Base, adapter: Path) -> None:
    """Write the GGUF via a temporary sibling and ``os.replace``: the old file or the new one, never half."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=base.architecture.name)
    for name, array in arrays.items():
        writer.add_tensor(name, array, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, adapter, None, total)
    if metadata.name is None:
        metadata.name = (base.folder or adapter).name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, expert_count)
    metadata.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(descriptor)
    try:
        writer.write_header_to_file(path=Path(temporary))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def export_gguf(out: Path, adapter: Path, config: LoraConfig, tensors: dict[str, Tensor], base: Path | None,
                arch: str | None) -> str:
    """Write the normalised adapter (``config.r == lora_alpha == R``) as llama.cpp's GGUF; return a summary."""
    resolved = resolve_base(config, base, arch)
    arrays = gguf_tensors(tensors, factor_paths(tensors), resolved)
    write_gguf(out, arrays, config.lora_alpha, resolved, adapter)
    return f"llama.cpp GGUF LoRA, architecture {resolved.architecture.name}, {len(arrays) // 2} adapted tensors"
