"""CUDA paths: bf16/fp16 bases with fp32 adapters on the GPU, merge, save/load, mixed batches, PEFT parity.

Skipped cleanly without a CUDA device (``pytest -m gpu`` selects them on a GPU machine).
"""

from __future__ import annotations

import pytest
import torch
from models import build, example_inputs

from lorakit import LoraConfig, PeftModel, get_peft_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TOL = {torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float16: dict(atol=5e-3, rtol=5e-3),
       torch.float32: dict(atol=1e-4, rtol=1e-4)}


def on_gpu(name: str, dtype: torch.dtype, config: LoraConfig):
    model = get_peft_model(build(name, seed=0).to("cuda", dtype), config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0, 0.2)
    return model


def inputs(name: str) -> dict:
    return {k: v.cuda() for k, v in example_inputs(name).items()}


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_trains_fp32_adapters_on_cuda(dtype):
    model = on_gpu("llama", dtype, LoraConfig(target_modules="all-linear", lora_dropout=0.1))
    assert all(p.dtype == torch.float32 and p.is_cuda for n, p in model.named_parameters() if "lora_" in n)
    model.train()
    batch = inputs("llama")
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.dtype == dtype
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_save_load_and_mixed_batch_on_cuda(dtype, tmp_path):
    model = on_gpu("llama", dtype, LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True))
    batch = inputs("llama")
    unmerged = logits(model, batch)
    model.save_pretrained(tmp_path)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, batch), unmerged, **TOL[dtype])
    model.unmerge_adapter()
    loaded = PeftModel.from_pretrained(build("llama", seed=0).to("cuda", dtype), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), unmerged, atol=0, rtol=0)
    rows = batch["input_ids"].shape[0]
    mixed = logits(model, batch, adapter_names=(["default", "__base__"] * rows)[:rows])
    torch.testing.assert_close(mixed[0], unmerged[0], **TOL[dtype])
    with model.disable_adapter():
        base = logits(model, batch)
    torch.testing.assert_close(mixed[1], base[1], **TOL[dtype])


def test_parity_with_peft_on_cuda():
    peft = pytest.importorskip("peft")
    config = dict(target_modules="all-linear", r=8, lora_alpha=16, init_lora_weights=False)
    ours = on_gpu("llama", torch.bfloat16, LoraConfig(**config))
    theirs = peft.get_peft_model(build("llama", seed=0).to("cuda", torch.bfloat16), peft.LoraConfig(**config)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    batch = inputs("llama")
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), **TOL[torch.bfloat16])
