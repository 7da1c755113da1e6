"""The model card (``README.md``) that ``save_pretrained`` writes next to the adapter, as PEFT writes it.

The card's YAML header is what the Hugging Face Hub reads: ``library_name: peft`` (the folder is a PEFT
adapter, whichever library wrote it), ``tags`` (``lora``, ``transformers`` for a transformers model,
``base_model:adapter:<name>`` and the model's own ``model_tags``), ``base_model`` (the model config's
``_name_or_path``) and, for causal LMs, ``pipeline_tag: text-generation``. An existing README.md is updated,
never replaced: its text and other header fields stay. The body is huggingface_hub's default model-card
template, with a "Framework versions" line; without huggingface_hub a short card with the same header is
written (and an existing one is left as it is, with a warning).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .config import PEFT_VERSION_WRITTEN
from .errors import warn
from .version import __version__

CARD_NAME = "README.md"
QUANTIZATION_PREFIX = "The following `bitsandbytes` quantization config was used during training:"


def card_metadata(peft_model: Any) -> dict[str, Any]:
    """The card's header fields for ``peft_model`` (tags sorted, as PEFT writes them)."""
    model = peft_model.get_base_model()
    tags = set(getattr(model, "model_tags", None) or [])
    if _is_transformers_model(model):
        tags.add("transformers")
    tags.add("lora")
    name_or_path = getattr(model, "name_or_path", None)
    if name_or_path is not None:
        tags.add(f"base_model:adapter:{name_or_path}")
    data: dict[str, Any] = {"library_name": "peft", "tags": sorted(tags)}
    config = _model_config(model)
    if config is not None and "_name_or_path" in config:
        data["base_model"] = config["_name_or_path"]
    if type(peft_model).__name__ in ("PeftModelForCausalLM",):
        data["pipeline_tag"] = "text-generation"
    return data


def create_or_update_model_card(peft_model: Any, output_dir: str | os.PathLike[str]) -> None:
    """Write or update ``<output_dir>/README.md`` (see the module docstring)."""
    path = Path(output_dir) / CARD_NAME
    try:
        from huggingface_hub import ModelCard, ModelCardData
    except ImportError:
        _write_plain_card(peft_model, path)
        return
    card = ModelCard.load(path) if path.is_file() else ModelCard.from_template(ModelCardData())
    data = card_metadata(peft_model)
    pipeline_tag = data.pop("pipeline_tag", None)
    for key, value in data.items():
        card.data[key] = value
    if pipeline_tag and not card.data.get("pipeline_tag"):
        card.data["pipeline_tag"] = pipeline_tag
    card.text = _updated_text(card.text, _quantization_lines(peft_model.get_base_model()))
    card.save(path)


def _updated_text(text: str, quantization: list[str]) -> str:
    """The card's body with the quantization block and the framework line added once each."""
    lines = text.splitlines()
    if quantization and QUANTIZATION_PREFIX not in lines:
        block = "\n".join([QUANTIZATION_PREFIX, *quantization, ""])
        _add_under(lines, "## Training procedure", block, blank_first=True)
    line = f"- lorakit {__version__} (PEFT {PEFT_VERSION_WRITTEN} adapter format)"
    if line not in lines:
        _add_under(lines, "### Framework versions", line)
    return "\n".join(lines)


def _add_under(lines: list[str], heading: str, text: str, blank_first: bool = False) -> None:
    """Insert ``text`` two lines below ``heading`` (after a blank line when ``blank_first``), or append the
    heading, a blank line and ``text`` when the card has no such heading."""
    if heading in lines:
        lines.insert(lines.index(heading) + 2, "\n" + text if blank_first else text)
    else:
        lines.append(f"{heading}\n\n{text}")


def _write_plain_card(peft_model: Any, path: Path) -> None:
    if path.is_file():
        warn(f"{path} exists and huggingface_hub is not installed, so its header cannot be updated; it was left as "
             "it is (pip install huggingface_hub to have save_pretrained update model cards)")
        return
    data = card_metadata(peft_model)
    header = []
    for key, value in sorted(data.items()):
        if isinstance(value, list):
            header += [f"{key}:", *(f"- {_yaml_scalar(item)}" for item in value)]
        else:
            header.append(f"{key}: {_yaml_scalar(value)}")
    body = _updated_text("# Model Card for Model ID\n\nA LoRA adapter (PEFT format) written by lorakit.",
                         _quantization_lines(peft_model.get_base_model()))
    path.write_text("---\n" + "\n".join(header) + "\n---\n\n" + body + "\n", encoding="utf-8")


def _yaml_scalar(value: object) -> str:
    text = str(value)
    return "'" + text.replace("'", "''") + "'" if (not text or ":" in text or text[0] in "'\"[{&*!|>%@`#") else text


def _is_transformers_model(model: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(model).__mro__)


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        as_dict: dict[str, Any] = config.to_dict()
        return as_dict
    return config if isinstance(config, dict) else None


def _quantization_lines(model: nn.Module) -> list[str]:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return []
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return [f"- {name}: {value}" for name, value in items.items()]
