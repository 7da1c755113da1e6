"""``lorakit inspect``, ``merge`` and ``export`` through ``lorakit.app.cli.main`` on tiny saved models.

Invariants: merged checkpoint == base + adapter (and loads without lorakit); an exported adapter gives the
original's outputs in real PEFT and in lorakit, with r == lora_alpha and one rank for every layer; every
refusal and user error is exit status 2 with one line on stderr and nothing written.
"""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from models import example_inputs, tiny_llama, tiny_mlp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.app.cli import main

TOL = {"atol": 1e-5, "rtol": 1e-5}
# rsLoRA plus rank and alpha patterns: four different per-layer scalings, three ranks, an Embedding target.
FOLDING_CONFIG = {
    "r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "o_proj", "embed_tokens"],
    "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, "alpha_pattern": {"o_proj": 3},
    "init_lora_weights": False, "task_type": "CAUSAL_LM",
}


def _tokenizer(folder) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"t{i}": i for i in range(1, 128)}}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_llama(0).save_pretrained(folder)
    _tokenizer(folder)
    return folder


def _save_adapter(folder, model, **settings) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        lorakit.get_peft_model(model, lorakit.LoraConfig(**settings)).save_pretrained(folder)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, base_dir):
    folder = tmp_path_factory.mktemp("adapter")
    _save_adapter(folder, tiny_llama(0), **FOLDING_CONFIG, base_model_name_or_path=str(base_dir))
    return folder


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _assert_one_line_error(status: int, err: str, *words: str) -> None:
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]


@torch.no_grad()
def _lorakit_logits(folder, model=None, name="llama") -> torch.Tensor:
    loaded = lorakit.PeftModel.from_pretrained(model if model is not None else tiny_llama(0), folder)
    out = loaded(**example_inputs(name))
    return out.logits if name == "llama" else out


@torch.no_grad()
def _peft_logits(folder, model=None, name="llama") -> torch.Tensor:
    loaded = peft.PeftModel.from_pretrained(model if model is not None else tiny_llama(0), str(folder)).eval()
    out = loaded(**example_inputs(name))
    return out.logits if name == "llama" else out


# ---- inspect ---------------------------------------------------------------------------------------------------
def test_inspect_collapses_blocks_and_shows_picks(capsys, base_dir):
    status, out, _ = _run(capsys, "inspect", base_dir)
    assert status == 0
    assert "model.layers.{0..1}    " in out and "2 × LlamaDecoderLayer" in out
    assert "model.layers.0." not in out  # the block is shown once
    q_row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["q_proj"])
    assert q_row == ["q_proj", "Linear", "32x32", "2"]
    assert "default for model_type 'llama'): q_proj, v_proj -> 4 modules" in out
    assert "'all-linear': q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj -> 14 modules" in out
    assert "lm_head left out" in out
    total = sum(p.numel() for p in tiny_llama(0).parameters())
    assert f"Total parameters: {total:,d}" in out


def test_inspect_embedded_model_on_meta(capsys):
    from lorakit.app.embedded import cache_dir

    if not (cache_dir() / "SmolLM2-135M-Instruct" / "config.json").is_file():
        pytest.skip("the embedded SmolLM2 is not converted on this machine")
    status, out, _ = _run(capsys, "inspect")
    assert status == 0
    assert "model.layers.{0..29}" in out and "30 × LlamaDecoderLayer" in out
    assert "(weight tied to embed_tokens)" in out and "Total parameters: 134,515,008" in out


@pytest.mark.parametrize("content, words", [
    (None, ["no config.json"]),
    ("{not json", ["config.json is not a usable transformers config"]),
])
def test_inspect_refuses_a_folder_that_is_not_a_model(capsys, tmp_path, content, words):
    (tmp_path / "notes.txt").write_text("hello")
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    _assert_one_line_error(*_run(capsys, "inspect", tmp_path)[::2], *words)


def test_inspect_missing_folder(capsys, tmp_path):
    _assert_one_line_error(*_run(capsys, "inspect", tmp_path / "nope")[::2], "does not exist")


# ---- merge -----------------------------------------------------------------------------------------------------
def test_merge_writes_a_plain_checkpoint_equal_to_base_plus_adapter(capsys, base_dir, adapter_dir, tmp_path):
    out_dir = tmp_path / "merged"
    out_dir.mkdir()
    (out_dir / "model-00001-of-00002.safetensors").write_text("stale shard")
    (out_dir / "README.md").write_text("kept")
    status, out, _ = _run(capsys, "merge", adapter_dir, "--out", out_dir)
    assert status == 0
    assert "the adapter's base_model_name_or_path" in out and str(out_dir) in out
    difference = float(out.split("max |merged - unmerged| logits = ")[1].split()[0])
    assert difference < 1e-5
    assert not (out_dir / "model-00001-of-00002.safetensors").exists()  # the stale shard is gone
    assert (out_dir / "README.md").read_text() == "kept"
    assert (out_dir / "tokenizer.json").read_bytes() == (base_dir / "tokenizer.json").read_bytes()
    merged = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        got = merged(**example_inputs("llama")).logits
    torch.testing.assert_close(got, _lorakit_logits(adapter_dir), **TOL)


def test_merge_dtype_explicit_model_and_auto_mapping(capsys, base_dir, tmp_path):
    _save_adapter(tmp_path / "no_task", tiny_llama(0), r=2, target_modules=["q_proj"], init_lora_weights=False)
    assert json.loads((tmp_path / "no_task" / "adapter_config.json").read_text())["auto_mapping"] is not None
    status, out, _ = _run(capsys, "merge", tmp_path / "no_task", "--out", tmp_path / "m", "--model", base_dir,
                          "--dtype", "bfloat16")
    assert status == 0 and "(--model)" in out and "LlamaForCausalLM, torch.bfloat16" in out
    assert {t.dtype for t in load_file(tmp_path / "m" / "model.safetensors").values()} == {torch.bfloat16}


@pytest.mark.parametrize("case, words", [
    ("missing adapter", ["adapter folder", "does not exist"]),
    ("model is not a model", ["no config.json"]),
    ("out is the base", ["is the base model folder"]),
])
def test_merge_errors_are_one_line(capsys, base_dir, adapter_dir, tmp_path, case, words):
    argv = {
        "missing adapter": ["merge", tmp_path / "nope", "--out", tmp_path / "o"],
        "model is not a model": ["merge", adapter_dir, "--out", tmp_path / "o", "--model", tmp_path],
        "out is the base": ["merge", adapter_dir, "--out", base_dir, "--model", base_dir],
    }[case]
    _assert_one_line_error(*_run(capsys, *argv)[::2], *words)
    assert not (tmp_path / "o").exists()


# ---- export ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["peft", "vllm", "llama.cpp"])
def test_export_folds_scaling_and_keeps_outputs(capsys, adapter_dir, tmp_path, engine):
    out_dir = tmp_path / "exported"
    status, out, _ = _run(capsys, "export", adapter_dir, "--for", engine, "--out", out_dir)
    assert status == 0 and "r = lora_alpha = 6" in out
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (6, 6, False)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    tensors = load_file(out_dir / "adapter_model.safetensors")
    ranks = {t.shape[0] for k, t in tensors.items() if "lora_A" in k or "lora_embedding_A" in k}
    assert ranks == {6}  # one rank everywhere: llama.cpp's per-tensor alpha / rank is 1 too
    assert any(k.endswith("base_layer.weight") for k in tensors) == (engine == "peft")
    expected = _lorakit_logits(adapter_dir)
    torch.testing.assert_close(_lorakit_logits(out_dir), expected, **TOL)
    torch.testing.assert_close(_peft_logits(out_dir), expected, **TOL)


def test_export_peft_folds_lora_bias_and_conv(capsys, tmp_path):
    adapter = tmp_path / "mlp"
    _save_adapter(adapter, tiny_mlp(0), r=2, lora_alpha=5, target_modules=["emb", "conv", "lin1"], lora_bias=False,
                  rank_pattern={"conv": 4}, alpha_pattern={"lin1": 7}, init_lora_weights=False)
    linear_bias = tmp_path / "linear_bias"
    _save_adapter(linear_bias, tiny_mlp(0), r=2, lora_alpha=3, target_modules=["lin1", "lin2"], lora_bias=True,
                  use_rslora=True, rank_pattern={"lin2": 5}, init_lora_weights=False)
    for folder in (adapter, linear_bias):
        status, _, err = _run(capsys, "export", folder, "--for", "peft", "--out", tmp_path / f"{folder.name}_out")
        assert status == 0, err
        exported = tmp_path / f"{folder.name}_out"
        expected = _lorakit_logits(folder, tiny_mlp(0), "mlp")
        torch.testing.assert_close(_lorakit_logits(exported, tiny_mlp(0), "mlp"), expected, **TOL)
        torch.testing.assert_close(_peft_logits(exported, tiny_mlp(0), "mlp"), expected, **TOL)


def test_export_peft_keeps_dora_exact(capsys, tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=6, use_dora=True, use_rslora=True, target_modules=["lin1", "lin2"],
                             rank_pattern={"lin2": 4}, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        peft.get_peft_model(tiny_mlp(0), config).save_pretrained(tmp_path / "dora")
    assert _run(capsys, "export", tmp_path / "dora", "--for", "peft", "--out", tmp_path / "out")[0] == 0
    torch.testing.assert_close(_peft_logits(tmp_path / "out", tiny_mlp(0), "mlp"),
                               _peft_logits(tmp_path / "dora", tiny_mlp(0), "mlp"), **TOL)


def _edited_adapter(source, target, **changes):
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("engine, changes, words", [
    ("vllm", {"use_dora": True}, ["vllm cannot load", "DoRA"]),
    ("llama.cpp", {"use_dora": True}, ["llama.cpp cannot load", "DoRA"]),
    ("vllm", {"modules_to_save": ["lm_head"]}, ["modules_to_save", "lm_head"]),
    ("vllm", {"task_type": "SEQ_CLS"}, ["modules_to_save", "score"]),
    ("vllm", {"lora_bias": True}, ["lora_bias=true"]),
    ("llama.cpp", {"bias": "all"}, ["bias='all'"]),
    ("peft", {"init_lora_weights": "pissa"}, ["init_lora_weights='pissa'",
                                              "path_initial_model_for_weight_conversion"]),
    ("vllm", {"init_lora_weights": "olora"}, ["init_lora_weights='olora'"]),
])
def test_export_refusals(capsys, adapter_dir, tmp_path, engine, changes, words):
    adapter = _edited_adapter(adapter_dir, tmp_path / "edited", **changes)
    _assert_one_line_error(*_run(capsys, "export", adapter, "--for", engine, "--out", tmp_path / "o")[::2], *words)
    assert not (tmp_path / "o").exists()


def test_export_refuses_conv_targets_for_vllm(capsys, tmp_path):
    _save_adapter(tmp_path / "conv", tiny_mlp(0), r=2, target_modules=["conv"])
    status, _, err = _run(capsys, "export", tmp_path / "conv", "--for", "vllm", "--out", tmp_path / "o")
    _assert_one_line_error(status, err, "convolution")


def test_export_errors_are_one_line(capsys, adapter_dir, tmp_path):
    _assert_one_line_error(*_run(capsys, "export", tmp_path / "nope", "--for", "peft", "--out", tmp_path / "o")[::2],
                           "does not exist")
    no_weights = _edited_adapter(adapter_dir, tmp_path / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    _assert_one_line_error(*_run(capsys, "export", no_weights, "--for", "peft", "--out", tmp_path / "o")[::2],
                           "no adapter weights")
    mismatched = _edited_adapter(adapter_dir, tmp_path / "mismatched", rank_pattern={})
    _assert_one_line_error(*_run(capsys, "export", mismatched, "--for", "peft", "--out", tmp_path / "o")[::2],
                           "do not match its config", "holds rank 2")
    assert not (tmp_path / "o").exists()
