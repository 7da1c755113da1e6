"""`lorakit train` end to end on a tiny chat model, its data handling, resume, and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_lm import save_tiny_llm, tokenizer, write_chat_jsonl

from lorakit.app.cli import main
from lorakit.app.sft import IGNORE, encode, read_jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_llm(root / "model"), write_chat_jsonl(root / "chat.jsonl")


def train(model, data, output, *extra):
    return main(["train", "--model", str(model), "--data", str(data), "--output", str(output), "--samples", "1",
                 "--r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--batch-size", "4", "--lr", "1e-2",
                 "--time-limit", "0", *extra])


def test_train_end_to_end_and_peft_loads_the_adapter(tiny, tmp_path, capsys):
    model_dir, data = tiny
    assert train(model_dir, data, tmp_path, "--max-steps", "12") == 0
    out = capsys.readouterr().out
    assert "trainable params:" in out and "[before] A:" in out and "[after] A:" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["held_out_loss_after"] < metrics["held_out_loss_before"]
    assert metrics["train_memory_mib"] > 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the adapter is a PEFT adapter: real peft loads it onto the same base with equal outputs
    import peft
    from transformers import AutoModelForCausalLM

    import lorakit

    ids = torch.tensor([[2, 5, 7, 12, 11, 13, 3, 7, 2, 6, 7]])
    outputs = []
    for library in (peft, lorakit):
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        loaded = library.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        with torch.no_grad():
            outputs.append(loaded(input_ids=ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["task_type"] == "CAUSAL_LM"


def test_epochs_sets_the_step_count(tiny, tmp_path, capsys):
    model_dir, data = tiny
    assert train(model_dir, data, tmp_path, "--epochs", "1", "--samples", "0", "--save-every", "0") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 44 // 4  # 48 rows, 4 held out (10%), batch 4


def test_labels_cover_only_the_replies():
    tok = tokenizer()
    messages = [{"role": "user", "content": "hello how are you ?"}, {"role": "assistant", "content": "i am fine ."}]
    example = encode(tok, messages, max_length=512)
    prompt = tok.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    full = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert example.input_ids == full
    assert example.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert example.labels[len(prompt):] == full[len(prompt):]
    assert tok.decode(full[len(prompt):]).split()[:3] == ["i", "am", "fine"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "response": "b"}', "{not json"], ":2: not valid JSON"),
        (['{"prompt": "a"}'], ":1: expected string fields 'prompt' and 'response'"),
        (['{"messages": [{"role": "user", "content": "x"}]}'], ":1: 'messages' has no assistant turn"),
        (['[1, 2]'], ":1: expected a JSON object"),
        ([""], "holds no rows"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace("[", r"\[")):
        read_jsonl(path)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--data", "/nonexistent.jsonl"], "does not exist"),
        (["--target-modules", "not_a_layer"], "not found in the base model"),
        (["--max-steps", "0"], "--max-steps must be at least 1"),
        (["--r", "0"], "invalid r"),
        (["--no-such-option"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, args, fragment):
    model_dir, data = tiny
    base = ["train", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path), "--samples", "0"]
    with pytest.raises(SystemExit) if "--no-such-option" in args else _nothing() as raised:
        status = main(base + args)
    status = raised.value.code if raised is not None and hasattr(raised, "value") else status
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert fragment in err and "Traceback" not in err and len(err.splitlines()) == 1, err  # only the error line


def test_model_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--model", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a transformers model folder" in err and len(err.splitlines()) == 1


class _nothing:
    """A context manager that does nothing (the branch of the error test where main returns)."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
