"""Write the golden adapter folders under tests/golden/ with the real peft 0.21.2 (run once; the output is committed).

Each folder is an adapter as ``peft.PeftModel.save_pretrained`` writes it (``adapter_config.json`` and
``adapter_model.safetensors``; PEFT's README.md model card is dropped, it plays no part in loading) for one
tiny seeded model of ``tests/models.py``, plus ``expected.safetensors``: the adapted model's outputs on
``example_inputs(model)`` in eval mode, with ``{"model": ..., "seed": ...}`` as metadata. tests/test_golden.py
loads every folder with lorakit alone and compares.

Every adapter tensor is set to seeded noise and every other trainable tensor (modules_to_save copies, lora
biases) gets noise added, so the adapters are far from their zero init.

Re-running gives the same tensors and values; the bytes may differ (PEFT writes target_modules from a set,
and the safetensors header's metadata order varies).

Usage (from the repository root)::

    .venv/bin/python tests/golden/make_golden.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import peft
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from models import build, example_inputs  # noqa: E402

SEED = 0
# folder name -> (model factory name, LoraConfig kwargs)
GOLDEN = {
    "llama_rslora_rank_pattern": ("llama", dict(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, use_rslora=True,
        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3},
    )),
    "gpt2_conv1d_modules_to_save": ("gpt2", dict(
        task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, r=2, lora_alpha=4,
        modules_to_save=["ln_f"],
    )),
    "mlp_emb_conv_linear": ("mlp", dict(
        target_modules=["emb", "conv", "lin1"], r=2, lora_alpha=5, modules_to_save=["lin2"],
    )),
    # No task_type (auto_mapping is written); an embed_tokens target also saves the base embedding weight.
    "llama_embed_tokens_no_task": ("llama", dict(target_modules=["embed_tokens", "o_proj"], r=2, lora_alpha=3)),
    "bert_seq_cls_lora_bias": ("bert_seq_cls", dict(
        task_type="SEQ_CLS", target_modules=["query", "value"], r=2, lora_alpha=4, lora_bias=True,
    )),
}


def perturb(model: torch.nn.Module, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
            elif param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def outputs(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return {"output": out}
    return {key: value.contiguous() for key, value in out.items() if isinstance(value, torch.Tensor)}


def main() -> None:
    assert peft.__version__ == "0.21.2", f"golden folders are written by peft 0.21.2, found {peft.__version__}"
    for folder, (model_name, kwargs) in GOLDEN.items():
        torch.manual_seed(0)
        model = peft.get_peft_model(build(model_name, seed=SEED), peft.LoraConfig(**kwargs))
        perturb(model)
        model.eval()
        target = HERE / folder
        shutil.rmtree(target, ignore_errors=True)
        model.save_pretrained(target)
        (target / "README.md").unlink(missing_ok=True)
        save_file(outputs(model, example_inputs(model_name)), str(target / "expected.safetensors"),
                  metadata={"model": model_name, "seed": str(SEED)})
        size = sum(p.stat().st_size for p in target.iterdir())
        print(f"{folder}: {sorted(p.name for p in target.iterdir())}, {size} bytes")


if __name__ == "__main__":
    main()
