"""``lorakit.app.memory`` and ``lorakit plan``: exact counts, the recommendation rules, and a real training run.

(a) Parameter counts, adapter, gradient and optimizer bytes are exact; the activation count matches the
    tensors autograd really saves (a walk of the backward graph) for Llama, GPT-2 and BERT.
(b) The recommendation rules as a table: task x data size x model size -> r, dropout, targets, base.
(c) The estimate is within 15% of the resident memory a real ``lorakit train`` run measures
    (``train_memory_mib``), each run in a fresh process so that other tests' memory does not count.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings

import pytest
import tiny_lm
import torch
from models import build
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, \
    LlamaForCausalLM

import lorakit
from lorakit.app import memory
from lorakit.app.cli import main
from lorakit.app.cli.inspect import read_model_config
from lorakit.app.cli.plan import PRESETS, build_model, choose_base, default_task, parse_memory, preset_config, \
    recommend_lora
from lorakit.app.memory import Setup, estimate_memory
from lorakit.status import count_parameters
from lorakit.app.lm_loss import causal_lm_loss
from lorakit.app.training import TrainSettings, make_optimizer

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _meta(model: torch.nn.Module) -> torch.nn.Module:
    with torch.device("meta"):
        return type(model)(model.config)


# ---- (a) exact counts ---------------------------------------------------------------------------------------
COUNT_CASES = [
    ("llama", dict(r=8, target_modules=["q_proj", "v_proj"])),
    ("llama", dict(r=4, target_modules="all-linear", rank_pattern={"v_proj": 2}, lora_bias=True)),
    ("llama", dict(r=4, target_modules=["embed_tokens", "o_proj"])),
    ("gpt2", dict(r=8, fan_in_fan_out=True)),
    ("bert_seq_cls", dict(r=8, task_type="SEQ_CLS")),
    ("bert_seq_cls", dict(r=2, task_type="SEQ_CLS", target_modules="all-linear", modules_to_save=["pooler"])),
]


@pytest.mark.parametrize("name, settings", COUNT_CASES)
def test_parameter_counts_are_exact(name, settings):
    config = lorakit.LoraConfig(**settings)
    counts = memory.count_parameters(_meta(build(name)), config)
    assert counts.base == count_parameters(build(name))[1]
    assert counts.trainable == count_parameters(lorakit.get_peft_model(build(name), config))[0]


def test_adapter_gradient_and_optimizer_bytes_are_exact():
    config = lorakit.LoraConfig(r=8, target_modules=SEVEN, task_type="CAUSAL_LM")
    model = lorakit.get_peft_model(build("llama"), config)
    estimate = estimate_memory(_meta(build("llama")), config, Setup(batch_size=2, max_length=8))
    optimizer, _ = make_optimizer(model, TrainSettings(max_steps=1))
    inputs = torch.randint(0, 128, (2, 8))
    model(input_ids=inputs, labels=inputs).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert estimate.adapter_weights == sum(p.nbytes for p in trainable)
    assert estimate.gradients == sum(p.grad.nbytes for p in trainable)
    optimizer.step()
    states = [t for state in optimizer.state.values() for key, t in state.items() if key != "step"]
    assert estimate.optimizer_state == sum(t.nbytes for t in states)


def test_base_weight_bytes():
    model = build("llama")
    estimates = {dtype: estimate_memory(_meta(model), lorakit.LoraConfig(), Setup(base_dtype=dtype))
                 for dtype in memory.BASE_DTYPES}
    assert estimates["fp32"].base_weights == sum(p.nbytes for p in model.parameters())
    assert estimates["bf16"].base_weights == sum(p.nbytes for p in model.to(torch.bfloat16).parameters())
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "lm_head")  # a 4-bit load keeps the head
    others = sum(p.numel() for p in model.parameters()) - linear
    assert estimates["4bit"].base_weights == pytest.approx(linear * (0.5 + 1 / 64 + 4 / 16384) + 2 * others)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_with_published_sizes(name):
    published = {"smollm2-135m": 134_515_008, "smollm2-1.7b": 1_711_376_384, "llama-7b": 6_738_415_616,
                 "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096, "qwen2.5-7b": 7_615_616_512,
                 "llama-13b": 13_015_864_320, "llama-70b": 68_976_648_192, "gpt2": 124_439_808,
                 "bert-base": 109_483_778}  # bert-base with its 2-label classifier head
    config = preset_config(name)
    model = build_model(config, default_task(config))
    assert sum(p.numel() for p in model.parameters()) == published[name]


# ---- (a) activations against what autograd saves ----------------------------------------------------------
def saved_bytes(loss: torch.Tensor, model: torch.nn.Module) -> int:
    """Bytes of the distinct storages the backward graph of ``loss`` saved, parameters and buffers aside."""
    storages, stack, visited = {}, [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attribute in (name for name in dir(node) if name.startswith("_saved_") or name == "saved_tensors"):
            try:
                value = getattr(node, attribute)
            except RuntimeError:  # freed or not a tensor
                continue
            for tensor in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(tensor, torch.Tensor):
                    storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        stack += [next_node for next_node, _ in node.next_functions]
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return sum(size for pointer, size in storages.items() if pointer not in frozen | {0})


def _walk_model(family: str, attention: str) -> torch.nn.Module:
    """4 blocks, hidden 64: large enough that sequence-level tensors (rotary tables) stay under 1%."""
    sizes = dict(vocab_size=512, attn_implementation=attention)
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0, **sizes))
    if family == "bert":
        return BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                                        intermediate_size=160, num_labels=3, **sizes))
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, **sizes))


WALK_CASES = [  # family, attention, targets, lora_dropout, padded batch, dtype
    ("llama", "sdpa", None, 0.0, False, "fp32"),
    ("llama", "sdpa", SEVEN, 0.1, False, "fp32"),
    ("llama", "sdpa", SEVEN, 0.0, True, "fp32"),
    ("llama", "eager", SEVEN, 0.0, False, "fp32"),
    ("llama", "eager", None, 0.1, True, "fp32"),
    ("gpt2", "sdpa", None, 0.0, False, "fp32"),
    ("gpt2", "sdpa", "all-linear", 0.1, False, "fp32"),
    ("bert", "sdpa", None, 0.0, False, "fp32"),
    ("bert", "sdpa", "all-linear", 0.1, True, "fp32"),
    ("llama", "sdpa", SEVEN, 0.0, False, "bf16"),
    ("llama", "eager", SEVEN, 0.0, False, "bf16"),
    ("gpt2", "sdpa", "all-linear", 0.1, False, "bf16"),
    ("bert", "sdpa", None, 0.0, False, "bf16"),
]


@pytest.mark.parametrize("family, attention, targets, dropout, padded, dtype", WALK_CASES)
def test_activation_count_matches_saved_tensors(family, attention, targets, dropout, padded, dtype):
    """Within 2%: the rest are sequence-level tensors and, in the math path, block 0 keeping q only when
    k needs a gradient (BERT's defaults leave key frozen)."""
    model = _walk_model(family, attention)
    causal = family != "bert"
    config = lorakit.LoraConfig(r=4, lora_dropout=dropout, target_modules=targets, fan_in_fan_out=family == "gpt2",
                                task_type="CAUSAL_LM" if causal else "SEQ_CLS")
    setup = Setup(batch_size=2, max_length=32, base_dtype=dtype, attention=attention, padded=padded, causal_lm=causal)
    detail = memory.activation_terms(model, config, setup, memory.read_shapes(model.config))
    # The graph holds what backward needs; the estimate adds the slack and the chunked loss's transients (one
    # chunk's logits and gradient, the selected hidden rows): it keeps ∂L/∂h, tokens·d in the compute dtype.
    a = memory.COMPUTE_BYTES[dtype]
    transient = 2 * memory.CHUNK_ELEMENTS * 4 + setup.tokens * model.config.hidden_size * a if causal else 0
    expected = sum(detail.values()) - detail["allocator slack"] - transient
    peft_model = lorakit.get_peft_model(model.to(torch.bfloat16) if dtype == "bf16" else model, config)
    peft_model.train()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0 if padded else 1
    labels = ids if causal else torch.tensor([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = causal_lm_loss(peft_model, ids, mask, labels) if causal else \
            peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss  # what lorakit train runs
    assert expected == pytest.approx(saved_bytes(loss, peft_model), rel=0.02)


def test_gradient_checkpointing_keeps_block_inputs_and_one_block():
    model = _meta(build("llama"))
    config = lorakit.LoraConfig(r=8, target_modules=SEVEN)
    full = memory.activation_terms(model, config, Setup(padded=False), memory.read_shapes(model.config))
    checkpointed = memory.activation_terms(model, config, Setup(padded=False, gradient_checkpointing=True),
                                           memory.read_shapes(model.config))
    tokens, layers, hidden = 8 * 128, 2, 32
    assert checkpointed["block inputs"] == tokens * layers * hidden * 4
    blocks = sum(full[name] for name in ("norms", "attention", "mlp", "hidden dropout", "lora"))
    first_norm = tokens * (hidden + 1) * 4  # block 0's input norm saves nothing
    assert checkpointed["recomputed block"] == pytest.approx((blocks + first_norm) / layers)
    # the chunked loss: ∂L/∂h per token plus one chunk's logits and gradient (no tokens x vocab term)
    assert checkpointed["loss"] == full["loss"] == tokens * 2 * hidden * 4 + 2 * memory.CHUNK_ELEMENTS * 4


@pytest.mark.parametrize("text, expected", [
    ("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), ("24G", 24 * 2**30), ("512MiB", 512 * 2**20),
    ("1.5T", int(1.5 * 2**40)), ("800mb", 800 * 10**6), ("4096", 4096), (" 2 gib ", 2 * 2**30)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


# ---- (b) the recommendation rules --------------------------------------------------------------------------
RULES = [  # task, examples, preset, budget -> r, lora_dropout, target_modules, (base dtype, checkpointing)
    ("causal-lm", 2_393, "smollm2-135m", "24GB", 16, 0.1, SEVEN, ("fp32", False)),
    ("causal-lm", 500, "smollm2-135m", "3GB", 8, 0.1, SEVEN, ("fp32", True)),
    ("causal-lm", 50_000, "smollm2-1.7b", "24GB", 32, 0.05, SEVEN, ("fp32", False)),
    ("causal-lm", 5_000, "gpt2", "8GB", 16, 0.1, "all-linear", ("fp32", False)),
    ("causal-lm", 5_000, "llama-7b", "80GB", 32, 0.1, SEVEN, ("fp32", False)),
    ("causal-lm", 5_000, "llama-7b", "40GB", 32, 0.1, SEVEN, ("fp32", True)),
    ("causal-lm", 5_000, "llama-7b", "24GB", 32, 0.1, SEVEN, ("bf16", True)),
    ("causal-lm", 500, "mistral-7b", "12GB", 16, 0.1, SEVEN, ("4bit", True)),
    # bf16 fits now that the loss keeps no (tokens, 128k vocab) fp32 tensors (it needed 4-bit before)
    ("causal-lm", 200_000, "llama-3-8b", "24GB", 128, 0.0, SEVEN, ("bf16", True)),
    ("causal-lm", 20_000, "llama-70b", "80GiB", 64, 0.05, SEVEN, ("4bit", True)),
    ("causal-lm", 2_000, "llama-70b", "16GB", 32, 0.1, SEVEN, None),
    ("classification", 500, "bert-base", "8GB", 4, 0.1, ["query", "value"], ("fp32", False)),
    ("classification", 20_000, "bert-base", "8GB", 8, 0.05, ["query", "value"], ("fp32", False)),
    ("classification", 500_000, "qwen2.5-7b", "24GB", 16, 0.0, ["q_proj", "v_proj"], ("bf16", True)),
]


@pytest.mark.parametrize("task, examples, preset, budget, r, dropout, targets, base", RULES)
def test_recommendation_rules(task, examples, preset, budget, r, dropout, targets, base):
    model = build_model(preset_config(preset), task)
    settings = recommend_lora(model, task, examples).settings
    assert (settings["r"], settings["lora_dropout"], settings["target_modules"]) == (r, dropout, targets)
    assert settings["task_type"] == {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS"}[task]
    if task == "classification":
        assert settings["modules_to_save"] in (["classifier"], ["score"])
        assert settings["lora_alpha"] == r and not settings.get("use_rslora")
    else:
        assert (settings["lora_alpha"], settings["use_rslora"]) == (16, True)
    setup = Setup(causal_lm=task == "causal-lm")
    chosen, reason = choose_base(model, lorakit.LoraConfig(**settings), setup, parse_memory(budget))
    assert (chosen and (chosen.base_dtype, chosen.gradient_checkpointing)) == base
    assert ("QLoRA" in reason) == (base is not None and base[0] == "4bit")


def test_plan_command_prints_config_table_and_qlora(capsys):
    assert main(["plan", "--preset", "llama-7b", "--memory", "12GB"]) == 0
    out = capsys.readouterr().out
    assert "LoraConfig(" in out and "r=32," in out and "QLoRA" in out
    for row in ("base weights", "adapter weights", "gradients", "optimizer state", "activations", "total"):
        assert row in out
    assert "4-bit base" in out and "yes *" in out and "Train it" not in out  # a preset has no weights


def test_plan_command_defaults_to_the_embedded_model(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "134,515,008 parameters" in out and "Train it: lorakit train" in out


@pytest.mark.parametrize("argv, words", [
    (["--memory", "lots"], ["--memory", "24GB"]),
    (["--examples", "0"], ["--examples"]),
    (["--model", "/nonexistent"], ["/nonexistent"]),
])
def test_plan_command_errors_are_one_line(capsys, argv, words):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(word in err for word in words), err


# ---- (c) the estimate against a real `lorakit train` run ----------------------------------------------------
WORDS = tiny_lm.WORDS


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A 49 M-parameter Llama (vocab 49,152, like SmolLM2's) and rows long enough for any batch.

    The tokenizer is tests/tiny_lm's word-level one (offline, no embedded package needed); the model's
    vocabulary is still 49,152 wide, which is what drives the logits memory the estimator must capture.
    """
    folder = tmp_path_factory.mktemp("llama49m")
    config = LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    tiny_lm.tokenizer().save_pretrained(folder)
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=20)), "response": " ".join(rng.choices(WORDS, k=700))}
            for _ in range(40)]
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


TRAIN_CASES = [  # batch, max_length, LoRA settings
    (4, 128, dict(r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, target_modules=["q_proj", "v_proj"])),
    (4, 128, dict(r=64, lora_alpha=16, lora_dropout=0.1, use_rslora=True, target_modules=SEVEN)),
    (2, 512, dict(r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, target_modules=["q_proj", "v_proj"])),
]


def _flags(settings: dict) -> list[str]:
    flags = ["--use-rslora" if settings["use_rslora"] else "--no-use-rslora"]
    for name in ("r", "lora_alpha", "lora_dropout"):
        flags += ["--" + name.replace("_", "-"), str(settings[name])]
    return flags + ["--target-modules", ",".join(settings["target_modules"])]


@pytest.mark.parametrize("batch, length, settings", TRAIN_CASES)
def test_estimate_matches_measured_training_memory(llama_folder, tmp_path, batch, length, settings):
    """Every row reaches --max-length, so no batch is padded. Two steps: the second holds AdamW's state."""
    argv = ["train", "--model", llama_folder, "--data", llama_folder / "data.jsonl", "--output", tmp_path,
            "--max-steps", 2, "--batch-size", batch, "--max-length", length, "--samples", 0, "--save-every", 0,
            "--precision", "fp32", *_flags(settings)]  # the estimate is of an fp32 run (auto may pick bf16)
    script = "import sys; from lorakit.app.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads((tmp_path / "metrics.json").read_text())["train_memory_mib"]
    model = build_model(read_model_config(llama_folder), "causal-lm")
    estimate = estimate_memory(model, lorakit.LoraConfig(task_type="CAUSAL_LM", **settings),
                               Setup(batch_size=batch, max_length=length, padded=False)).total / 2**20
    print(f"batch {batch} x {length}, r={settings['r']}: estimated {estimate:.0f} MiB, measured {measured:.0f} MiB")
    assert abs(estimate - measured) / measured <= 0.15, f"estimated {estimate:.0f} MiB, measured {measured:.0f} MiB"

