"""Golden adapter folders written by peft 0.21.2 load in lorakit with the outputs PEFT computed (STYLE.md 10).

Each folder under tests/golden/ (made by tests/golden/make_golden.py, committed) holds a PEFT adapter for a
tiny seeded model of tests/models.py and ``expected.safetensors``: PEFT's outputs on ``example_inputs``,
with the model name and seed as metadata. This file never imports peft: it checks the format with lorakit
alone, as a user without the reference installed would load such a folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import build, example_inputs
from safetensors import safe_open

import lorakit

GOLDEN = Path(__file__).resolve().parent / "golden"
FOLDERS = sorted(p.parent.name for p in GOLDEN.glob("*/adapter_config.json"))
TOL = dict(atol=1e-5, rtol=1e-5)


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {key: f.get_tensor(key) for key in f.keys()}


def _outputs(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return {"output": out}
    return {key: value for key, value in out.items() if isinstance(value, torch.Tensor)}


def _golden(folder: str) -> tuple[str, int, dict[str, torch.Tensor]]:
    meta, expected = _read(GOLDEN / folder / "expected.safetensors")
    return meta["model"], int(meta["seed"]), expected


def test_golden_folders_present_and_tiny():
    assert len(FOLDERS) >= 4, FOLDERS
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    assert total < 200_000, f"golden data is {total} bytes; keep it tiny"


@pytest.mark.parametrize("folder", FOLDERS)
def test_golden_outputs(folder):
    model_name, seed, expected = _golden(folder)
    inputs = example_inputs(model_name)
    base_out = _outputs(build(model_name, seed=seed), inputs)
    # The golden adapter must matter, or the comparison below would pass with the adapter ignored.
    assert any(not torch.allclose(base_out[k], v, **TOL) for k, v in expected.items())

    model = lorakit.PeftModel.from_pretrained(build(model_name, seed=seed), GOLDEN / folder)
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(_outputs(model, inputs), expected, **TOL)


@pytest.mark.parametrize("folder", FOLDERS)
def test_golden_resaved_by_lorakit_is_the_same_adapter(folder, tmp_path):
    """lorakit writes back what PEFT wrote: same tensors (keys, shapes, dtypes, values), metadata and config keys."""
    model_name, seed, _ = _golden(folder)
    model = lorakit.PeftModel.from_pretrained(build(model_name, seed=seed), GOLDEN / folder)
    model.save_pretrained(tmp_path)

    golden_meta, golden_tensors = _read(GOLDEN / folder / "adapter_model.safetensors")
    ours_meta, ours_tensors = _read(tmp_path / "adapter_model.safetensors")
    assert ours_meta == golden_meta == {"format": "pt"}
    assert sorted(ours_tensors) == sorted(golden_tensors)
    torch.testing.assert_close(ours_tensors, golden_tensors, atol=0, rtol=0)

    golden_config = json.loads((GOLDEN / folder / "adapter_config.json").read_text())
    ours_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(ours_config) == sorted(golden_config)
    for field in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias", "task_type",
                  "fan_in_fan_out", "lora_bias", "inference_mode", "auto_mapping"):
        assert ours_config.get(field) == golden_config.get(field), field
    for field in ("target_modules", "modules_to_save"):
        assert set(ours_config[field] or ()) == set(golden_config[field] or ()), field
    assert ours_config["peft_version"].startswith(golden_config["peft_version"] + "+lorakit.")


def test_golden_loads_without_peft_imported():
    """In a fresh interpreter: load every golden folder and check that nothing imported peft on the way."""
    script = (
        "import sys, torch, lorakit\n"
        "from models import build\n"
        "from safetensors import safe_open\n"
        f"from pathlib import Path\ngolden = Path({str(GOLDEN)!r})\n"
        f"for folder in {FOLDERS!r}:\n"
        "    meta = safe_open(str(golden / folder / 'expected.safetensors'), 'pt').metadata()\n"
        "    lorakit.PeftModel.from_pretrained(build(meta['model'], int(meta['seed'])), golden / folder)\n"
        "leaked = sorted(m for m in sys.modules if m == 'peft' or m.startswith('peft.'))\n"
        "assert not leaked, leaked\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(GOLDEN.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
