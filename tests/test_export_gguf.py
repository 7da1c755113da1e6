"""``lorakit export --for llama.cpp --out FILE.gguf`` without llama.cpp: the file read back with gguf's reader.

Invariants, per architecture of the table: llama.cpp's names for every adapted weight, F32 tensors with
ggml shapes ``lora_a = [in, R]``, ``lora_b = [R, out]`` (flipped for ``token_embd``), the adapter metadata,
and ``(alpha / R) · lora_b @ lora_a == P(s_l · B A)`` for every layer, full tensor, against real PEFT's
factors and scalings (``P``: llama.cpp's RoPE row order for Llama / Mistral q_proj and k_proj, identity
elsewhere). Where a llama.cpp source tree is given (``LLAMA_CPP_DIR``), the file must be byte-identical to
what its own ``convert_lora_to_gguf.py`` writes from the folder export. Every refusal is one line, nothing
written.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import yaml
from gguf_llama import rope_rows
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import lorakit
from lorakit.app.cli import main

gguf = pytest.importorskip("gguf", reason="the gguf package (lorakit[cli]) is not installed")

SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
# architecture -> (transformers config, gguf arch name, RoPE-permuted modules)
ARCHITECTURES = {
    "llama": (lambda: LlamaConfig(**SIZES, architectures=["LlamaForCausalLM"]), "llama", {"q_proj", "k_proj"}),
    "mistral": (lambda: MistralConfig(**SIZES, architectures=["MistralForCausalLM"]), "llama", {"q_proj", "k_proj"}),
    "qwen2": (lambda: Qwen2Config(**SIZES, architectures=["Qwen2ForCausalLM"]), "qwen2", set()),
    "qwen3": (lambda: Qwen3Config(**SIZES, head_dim=8, architectures=["Qwen3ForCausalLM"]), "qwen3", set()),
}
# llama.cpp's tensor names, written out here (the exporter uses gguf's name map)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
# rsLoRA with rank and alpha patterns: ranks 2, 4, 6 and five different scalings
ADAPTER = {"r": 4, "lora_alpha": 8, "use_rslora": True, "init_lora_weights": False, "task_type": "CAUSAL_LM",
           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                              "embed_tokens", "lm_head"],
           "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6, "lm_head": 6},
           "alpha_pattern": {"o_proj": 3, "down_proj": 11}}


def _base(tmp_path: Path, architecture: str) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path / "base"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(ARCHITECTURES[architecture][0]()).eval()
    model.save_pretrained(folder)
    return folder, model


def _adapter(tmp_path: Path, model: torch.nn.Module, base: str | None, **changes) -> Path:
    folder = tmp_path / "adapter"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        config = lorakit.LoraConfig(**{**ADAPTER, **changes}, base_model_name_or_path=base)
        lorakit.get_peft_model(copy.deepcopy(model), config).save_pretrained(folder)
    return folder


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what building the models printed
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _one_line_error(result: tuple[int, str, str], *words: str) -> None:
    status, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]


def _peft_deltas(base_folder: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Module path -> s·B@A as real PEFT holds it: (out, in), and (dim, vocab) for embeddings."""
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), str(adapter))
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            path = name.removeprefix("base_model.model.")
            if "default" in module.lora_embedding_A:
                A, B = module.lora_embedding_A["default"], module.lora_embedding_B["default"]
            else:
                A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            deltas[path] = module.scaling["default"] * (B.detach().double() @ A.detach().double())
    return deltas


def _gguf_name(path: str) -> str:
    if path == "lm_head":
        return "output.weight"
    if path == "model.embed_tokens":
        return "token_embd.weight"
    block, module = path.removeprefix("model.layers.").split(".", 1)
    return f"blk.{block}.{GGUF_NAMES[module]}.weight"


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_gguf_reproduces_every_scaled_delta(capsys, tmp_path, architecture):
    base_folder, model = _base(tmp_path, architecture)
    adapter = _adapter(tmp_path, model, str(base_folder))
    out = tmp_path / "adapter.gguf"
    status, printed, err = _run(capsys, "export", adapter, "--for", "llama.cpp", "--out", out)
    assert status == 0, err
    assert f"architecture {ARCHITECTURES[architecture][1]}" in printed and "r = lora_alpha = 6" in printed

    reader = gguf.GGUFReader(out)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    # the model card save_pretrained writes (README.md, PEFT's) adds its tags, as llama.cpp's converter reads them
    card = yaml.safe_load((adapter / "README.md").read_text().split("---")[1])
    assert fields == {"general.architecture": ARCHITECTURES[architecture][1], "general.type": "adapter",
                      "adapter.type": "lora", "general.name": "Adapter", "adapter.lora.alpha": 6.0,
                      "general.quantization_version": 2, "general.tags": card["tags"] + [card["pipeline_tag"]],
                      "general.base_model.count": 1}
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    deltas = _peft_deltas(base_folder, adapter)
    assert set(tensors) == {_gguf_name(path) + suffix for path in deltas for suffix in (".lora_a", ".lora_b")}
    permuted, config = ARCHITECTURES[architecture][2], model.config
    for path, expected in deltas.items():
        name = _gguf_name(path)
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        lora_a, lora_b = torch.from_numpy(np.array(a.data)).double(), torch.from_numpy(np.array(b.data)).double()
        if name == "token_embd.weight":  # stored flipped: lora_a (vocab, R), lora_b (dim, R)
            assert list(a.shape) == [6, config.vocab_size] and list(b.shape) == [6, config.hidden_size]
            delta = lora_b @ lora_a.T
        else:  # ggml ne: lora_a [in, R], lora_b [R, out]
            assert list(a.shape) == [expected.shape[1], 6] and list(b.shape) == [6, expected.shape[0]]
            delta = lora_b @ lora_a
        module = path.rsplit(".", 1)[-1]
        if module in permuted:
            heads = config.num_attention_heads if module == "q_proj" else config.num_key_value_heads
            expected = expected[rope_rows(expected.shape[0], heads)]
        rank = b.shape[0]  # llama.cpp's scale: alpha / rank of lora_b
        torch.testing.assert_close(6.0 / rank * delta, expected, atol=1e-6, rtol=1e-5, msg=path)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_gguf_is_byte_identical_to_llama_cpp_converter(capsys, tmp_path, architecture):
    source = os.environ.get("LLAMA_CPP_DIR")
    if not source or not (Path(source) / "convert_lora_to_gguf.py").is_file():
        pytest.skip("set LLAMA_CPP_DIR to a llama.cpp source tree to compare with its convert_lora_to_gguf.py")
    base_folder, model = _base(tmp_path, architecture)
    adapter = _adapter(tmp_path, model, str(base_folder))
    assert _run(capsys, "export", adapter, "--for", "llama.cpp", "--out", tmp_path / "lorakit.gguf")[0] == 0
    folder = tmp_path / "exported" / adapter.name  # same folder name: general.name comes from it
    assert _run(capsys, "export", adapter, "--for", "llama.cpp", "--out", folder)[0] == 0
    subprocess.run([sys.executable, str(Path(source) / "convert_lora_to_gguf.py"), "--base", str(base_folder),
                    "--outfile", str(tmp_path / "converter.gguf"), str(folder)], check=True, capture_output=True)
    assert (tmp_path / "lorakit.gguf").read_bytes() == (tmp_path / "converter.gguf").read_bytes()


def test_arch_flag_when_the_base_config_is_not_at_hand(capsys, tmp_path):
    base_folder, model = _base(tmp_path, "llama")
    adapter = _adapter(tmp_path, model, "someone/not-downloaded", target_modules=["v_proj", "o_proj", "down_proj"],
                       rank_pattern={}, alpha_pattern={"o_proj": 3})
    _one_line_error(_run(capsys, "export", adapter, "--for", "llama.cpp", "--out", tmp_path / "x.gguf"),
                    "'someone/not-downloaded' has no config.json", "--base BASE_FOLDER or --arch")
    assert _run(capsys, "export", adapter, "--for", "llama.cpp", "--out", tmp_path / "arch.gguf", "--arch", "llama")[0] == 0
    assert _run(capsys, "export", adapter, "--for", "llama.cpp", "--out", tmp_path / "base.gguf",
                "--base", base_folder)[0] == 0
    assert (tmp_path / "arch.gguf").read_bytes() == (tmp_path / "base.gguf").read_bytes()


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case, words", [
    ("q_proj with --arch only", ["reorders the rows", "q_proj", "pass --base"]),
    ("unknown --arch", ["--arch 'gpt9'", "expected one of", "llama"]),
    ("no base model named", ["names no base model", "--base BASE_FOLDER or --arch"]),
    ("architecture not in the table", ["'GPT2LMHeadModel'", "convert_lora_to_gguf.py"]),
    ("tied lm_head", ["targets lm_head", "tie_word_embeddings=true"]),
    ("gguf for vllm", ["--for vllm", "--for llama.cpp only"]),
    ("--base for a folder", ["--base/--arch", "--for llama.cpp only"]),
    ("DoRA", ["llama.cpp cannot load", "DoRA"]),
])
def test_gguf_refusals_are_one_line_and_write_nothing(capsys, tmp_path, case, words):
    base_folder, model = _base(tmp_path, "llama")
    adapter = _adapter(tmp_path, model, str(base_folder), use_dora=case == "DoRA")
    out = tmp_path / "out.gguf"
    argv = ["export", adapter, "--for", "llama.cpp", "--out", out]
    if case == "q_proj with --arch only":
        argv = ["export", _adapter(tmp_path / "2", model, "someone/elsewhere"), "--for", "llama.cpp", "--out", out,
                "--arch", "llama"]
    elif case == "no base model named":
        argv[1] = _adapter(tmp_path / "2", model, None)
    elif case == "unknown --arch":
        argv += ["--arch", "gpt9"]
    elif case == "architecture not in the table":
        _edit_config(base_folder, architectures=["GPT2LMHeadModel"])
    elif case == "tied lm_head":
        _edit_config(base_folder, tie_word_embeddings=True)
    elif case == "gguf for vllm":
        argv[3] = "vllm"
    elif case == "--base for a folder":
        out = tmp_path / "folder"
        argv = ["export", adapter, "--for", "peft", "--out", out, "--base", base_folder]
    _one_line_error(_run(capsys, *argv), *words)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
